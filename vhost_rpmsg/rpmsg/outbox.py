"""The outbox: host messages waiting for guest rx buffers, and how they get into them.

Bounded, so flow control has something to push against: while it is full the device
stops taking guest messages (their tx buffers stay in the ring and the guest's own
back-pressure does the rest), and senders hear WouldBlock.
"""

from __future__ import annotations

import itertools
from collections import Counter, deque
from collections.abc import Iterable

from ..virtio.queue import RX_READABLE, RX_TOO_SMALL, Chain, ChainError, Queue
from .ratelimit import RateLimitedLog

BATCH = 256  # rx chains taken at a time: at most a whole ring
#: fill_rx calls one fill makes at most: each is bounded (WALK_BUDGET), and a ring of
#: chains the guest made to be refused must not hold the loop for all of them at once
FILL_CALLS = 8


class Outbox:
    """Encoded messages for the guest, oldest first, at most ``limit`` of them."""

    def __init__(self, limit: int, stats: Counter[str], rl: RateLimitedLog) -> None:
        self.limit = limit
        #: the device stopped taking guest messages because this was full
        self.to_host_paused = False
        self._q: deque[bytes] = deque()
        self._stats = stats
        self._rl = rl

    def __len__(self) -> int:
        return len(self._q)

    @property
    def full(self) -> bool:
        return len(self._q) >= max(self.limit, 1)

    def room(self) -> int:
        return self.limit - len(self._q)

    def append(self, msg: bytes) -> None:
        self._q.append(msg)

    def offer(self, msg: bytes) -> bool:
        """Queue ``msg`` if there is room; whether it was queued (one call: the hot path)."""
        q = self._q
        if len(q) >= self.limit:
            return False
        q.append(msg)
        return True

    def discard(self, msg: bytes) -> bool:
        """Take ``msg`` out of the queue if it is still there (not yet written)."""
        try:
            self._q.remove(msg)
        except ValueError:
            return False
        return True

    def extend(self, msgs: Iterable[bytes]) -> None:
        self._q.extend(msgs)

    def put_first(self, msgs: list[bytes]) -> None:
        """Ahead of everything queued, in the order given."""
        self._q.extendleft(reversed(msgs))

    def clear(self) -> int:
        """Drop everything (the guest they were for is gone); how many were dropped."""
        n = len(self._q)
        self._q.clear()
        self.to_host_paused = False
        return n

    def fill(self, q: Queue) -> tuple[int, bool]:
        """Move what fits into the rx ring's free buffers, in order: the messages written,
        and whether it stopped at FILL_CALLS with chains perhaps left (call again soon).

        One ``Queue.fill_rx`` per up to BATCH messages (one C call on the cffi engine).
        The caller holds the queue lock and notifies the guest afterwards.
        """
        out = self._q
        wrote = 0
        for _ in range(FILL_CALLS):
            if not out:
                return wrote, False
            batch = list(out) if len(out) <= BATCH else list(itertools.islice(out, BATCH))
            done = q.fill_rx(batch)
            for head, kind, detail, m in done.refused:
                self._refused(head, kind, detail, len(batch[m]))
            if done.written:
                # Counted before the guest can see them (it reads the used idx only after
                # our notification), so the count never lags behind.
                self._stats["to_guest_messages"] += done.written
                wrote += done.written
                if done.written == len(out):
                    out.clear()
                else:
                    for _ in range(done.written):
                        out.popleft()
            elif not done.refused:  # no chain at all
                if done.exhausted and q.enable_kicks():
                    continue  # buffers raced in
                return wrote, False
        return wrote, bool(out)

    def fill_one(self, q: Queue) -> tuple[int, bool]:
        """:meth:`fill` for an outbox of one message, with the notification decision
        (``Queue.put_one``: no list, no :class:`Filled`): (written, notify).  When nothing
        was written the caller notifies as asked, then falls back to :meth:`fill`."""
        msg = self._q[0]
        written, refused, _, notify = q.put_one(msg)
        for head, kind, detail, _ in refused:
            self._refused(head, kind, detail, len(msg))
        if written:
            self._stats["to_guest_messages"] += 1
            self._q.clear()
        return written, notify

    def _refused(self, head: int, kind: int, detail: int, size: int) -> None:
        """Count and log (rate-limited) an rx chain ``fill_rx`` gave back empty."""
        if kind == RX_TOO_SMALL:
            self._stats["rx_buffer_too_small"] += 1
            self._rl.error("rxsmall", "to_guest: rx buffer of %d bytes cannot hold a %d-byte "
                           "message; returned empty", detail, size)
        elif kind == RX_READABLE:
            self._stats["bad_chains"] += 1
            self._rl.error("rxdir", "to_guest: chain %d has device-readable buffers", head)
        else:
            self._stats["bad_chains"] += 1
            self._rl.error("rxchain", "to_guest: bad descriptor chain at head %d: %s",
                           head, ChainError(kind).name)

    def write(self, q: Queue, c: Chain, msg: bytes) -> int | None:
        """Copy ``msg`` into rx chain ``c``; None (counted, logged) if it cannot take it."""
        if not c.ok:
            self._stats["bad_chains"] += 1
            self._rl.error("rxchain", "to_guest: bad descriptor chain at head %d: %s",
                           c.head, c.error.name)
            return None
        if c.readable:
            self._stats["bad_chains"] += 1
            self._rl.error("rxdir", "to_guest: chain %d has device-readable buffers", c.head)
            return None
        if c.write_len < len(msg):
            self._stats["rx_buffer_too_small"] += 1
            self._rl.error("rxsmall", "to_guest: rx buffer of %d bytes cannot hold a %d-byte "
                           "message; returned empty", c.write_len, len(msg))
            return None
        return q.write_chain(c, msg)
