"""The reference ("python") engine: split-ring operations over numpy views of the rings.

Section numbers (§) in the comments are the VIRTIO 1.2 specification's (§2.7 Split
Virtqueues); the rules quoted are those the walk and the ring updates enforce.

Readable first; the cffi engine (``queue_cffi.py``) must give exactly its results.  Every
guest address is bounds checked through :class:`~vhost_rpmsg.virtio.memory.GuestMemory`,
and every malformed chain comes back as a :class:`~.queue.Chain` with an ``error`` so the
caller can count it and return the buffer.
"""

from __future__ import annotations

import operator
import threading
from collections.abc import Sequence
from typing import ClassVar

import numpy as np

from .constants import (
    DESC_SIZE,
    VRING_AVAIL_F_NO_INTERRUPT,
    VRING_DESC_F_INDIRECT,
    VRING_DESC_F_NEXT,
    VRING_DESC_F_WRITE,
    VRING_USED_F_NO_NOTIFY,
)
from .memory import BadAddress, GuestMemory
from .queue import (
    RX_READABLE,
    RX_TOO_SMALL,
    WALK_BUDGET,
    Chain,
    ChainError,
    Filled,
    Located,
    Put,
    QueueBroken,
    QueueState,
    RawBatch,
    Taken,
    stale_chain,
    used_entries_array,
    used_heads_array,
    used_length,
)

_fence_lock = threading.Lock()
_HDR_COLS: dict[int, np.ndarray] = {}


def full_fence() -> None:
    """A full memory barrier between our ring stores and loads.

    Needed where a store must be visible before a load (used idx before reading
    used_event; avail_event before re-reading avail idx).  Python has no fence
    primitive; taking an uncontended lock executes a locked read-modify-write, which is
    a full barrier on x86.  The cffi engine uses a real ``__atomic_thread_fence``.
    """
    with _fence_lock:
        pass


def split_headers(rb: RawBatch, size: int) -> np.ndarray:
    """The first ``size`` bytes of every chain of ``rb``, zero-filled: (count, size) u8."""
    n = rb.count
    out = np.zeros((n, size), np.uint8)
    if not n or not size:
        return out
    if (int(rb.offsets.min()) < 0 or int(rb.lengths.min()) < 0
            or int((rb.offsets + rb.lengths).max()) > len(rb.data)):
        raise ValueError("raw batch offsets and lengths do not fit its data")
    buf = np.frombuffer(rb.data, np.uint8)
    cols = _HDR_COLS.get(size)
    if cols is None:
        cols = _HDR_COLS[size] = np.arange(size, dtype=np.int64)
    full = rb.lengths >= size
    if full.all():
        return buf[rb.offsets[:, None] + cols]
    for i in np.flatnonzero(~full).tolist():
        o, k = int(rb.offsets[i]), int(rb.lengths[i])
        out[i, :k] = buf[o : o + k]
    if full.any():
        out[full] = buf[rb.offsets[full][:, None] + cols]
    return out


class PythonQueue:
    """The reference engine over one :class:`~.queue.QueueState`."""

    name: ClassVar[str] = "python"

    def __init__(self, state: QueueState) -> None:
        self.state = state

    # -- the guest's side of the ring -------------------------------------------

    def avail_idx(self) -> int:
        return int(self.state.avail[1])

    def has_available(self) -> bool:
        return self.state.mapped and self.avail_idx() != self.state.last_avail_idx

    def pending(self) -> int:
        """Chains the guest made available and we have not taken yet."""
        n = (self.avail_idx() - self.state.last_avail_idx) & 0xFFFF
        # virtio 1.2 §2.7: "Queue Size corresponds to the maximum number of buffers in the
        # virtqueue"; §2.7.6.1: "A driver MUST NOT decrement the available idx"
        if n > self.state.size:
            # More outstanding than the ring holds: the ring itself is corrupt.
            raise QueueBroken(f"avail idx {self.avail_idx()} is {n} ahead of "
                              f"{self.state.last_avail_idx}")
        return n

    # -- batch operations (the engine) -------------------------------------------

    def pop_batch(self, max_chains: int) -> list[Chain]:
        """Take up to ``max_chains`` available chains, each validated and translated."""
        n = min(self.pending(), max_chains)
        if n <= 0:
            return []
        full_fence()  # read ring entries only after the avail idx that covers them
        avail = self.state.avail
        size = self.state.size
        mem = self.state.mem
        assert mem is not None
        generation = mem.generation  # before the walks: a change under them makes them stale
        out: list[Chain] = []
        last = self.state.last_avail_idx
        budget, reads = WALK_BUDGET * size, 0
        while len(out) < n and reads < budget:  # the rest wait for the next pop
            head = int(avail[2 + (last % size)])
            chain, r = self._walk(head, generation)
            reads += r
            if not chain.ok:
                self.state.stats.bad_chains += 1
            out.append(chain)
            last = (last + 1) & 0xFFFF
        self.state.last_avail_idx = last
        self.state.stats.popped += len(out)
        return out

    def unpop(self, count: int) -> None:
        """Give back the last ``count`` chains popped and not used, in the avail ring.

        They are simply seen again by the next pop: the driver does not touch an avail
        entry until the device has used it.
        """
        if count:
            self.state.last_avail_idx = (self.state.last_avail_idx - count) & 0xFFFF
            self.state.stats.popped -= count

    def _walk(self, head: int, generation: int) -> tuple[Chain, int]:
        """The chain at ``head``, and how many descriptors were read for it."""
        chain = Chain(head, generation=generation)
        size = self.state.size
        # §2.7.5: "The number of descriptors in the table is defined by the queue size"
        if head >= size:
            chain.error = ChainError.HEAD_OUT_OF_RANGE
            return chain, 0
        mem = self.state.mem
        assert mem is not None
        table = self.state.desc
        limit = size
        idx = head
        seen = reads = 0
        nested = False
        while True:
            seen += 1
            # §2.7.5: "this is the maximum possible descriptor chain length"; §2.7.5.2:
            # "this implies that loops in the descriptor chain are forbidden!"
            if seen > limit:
                chain.error = ChainError.LOOP
                return chain, reads
            reads += 1
            addr = table.item(2 * idx)
            word = table.item(2 * idx + 1)
            length = word & 0xFFFFFFFF
            flags = (word >> 32) & 0xFFFF
            nxt = word >> 48
            if flags & VRING_DESC_F_INDIRECT:
                # §2.7.5.3 Indirect Descriptors, driver requirements:
                # "MUST NOT set the VIRTQ_DESC_F_INDIRECT flag unless the
                # VIRTIO_F_INDIRECT_DESC feature was negotiated"
                if not self.state.indirect:
                    chain.error = ChainError.INDIRECT_NOT_NEGOTIATED
                    return chain, reads
                # "(ie. only one table per descriptor)"
                if nested:
                    chain.error = ChainError.INDIRECT_NESTED
                    return chain, reads
                # "MUST NOT set both VIRTQ_DESC_F_INDIRECT and VIRTQ_DESC_F_NEXT"
                if flags & VRING_DESC_F_NEXT:
                    chain.error = ChainError.INDIRECT_WITH_NEXT
                    return chain, reads
                # "struct virtq_desc desc[len / 16];" and "A driver MUST NOT create a
                # descriptor chain longer than the Queue Size of the device."
                if length == 0 or length % DESC_SIZE or length // DESC_SIZE > size:
                    # empty, ragged, or more descriptors than the queue holds
                    chain.error = ChainError.INDIRECT_BAD_LEN
                    return chain, reads
                try:
                    r, off = mem.find_gpa(addr, length)
                except BadAddress:
                    chain.error = ChainError.ADDR_OUT_OF_BOUNDS
                    return chain, reads
                # Device requirements: "The device MUST ignore the write-only flag" here, and
                # "MUST handle the case of zero or more normal chained descriptors followed
                # by a single descriptor with flags&VIRTQ_DESC_F_INDIRECT".
                table = mem.view(r, off, length).view("<u8")
                limit = length // DESC_SIZE
                idx = 0
                seen = 0
                nested = True
                continue
            if length:
                try:
                    r, off = mem.find_gpa(addr, length)
                except BadAddress:
                    chain.error = ChainError.ADDR_OUT_OF_BOUNDS
                    return chain, reads
                if flags & VRING_DESC_F_WRITE:
                    chain.writable.append((r, off, length))
                    chain.write_len += length
                else:
                    # §2.7.4.2: "The driver MUST place any device-writable descriptor
                    # elements after any device-readable descriptor elements."
                    if chain.writable:
                        chain.error = ChainError.READABLE_AFTER_WRITABLE
                        return chain, reads
                    chain.readable.append((r, off, length))
                    chain.read_len += length
            elif not flags & VRING_DESC_F_WRITE and chain.writable:  # §2.7.4.2 as well
                chain.error = ChainError.READABLE_AFTER_WRITABLE
                return chain, reads
            if not flags & VRING_DESC_F_NEXT:
                return chain, reads
            # next indexes this table: queue size entries (§2.7.5), or len / 16 (§2.7.5.3)
            if nxt >= limit:
                chain.error = ChainError.NEXT_OUT_OF_RANGE
                return chain, reads
            idx = nxt

    def pop_raw_batch(self, max_chains: int, limit: int) -> RawBatch:
        """Take up to ``max_chains`` chains with up to ``limit`` readable bytes of each.

        The array form of :meth:`pop_batch` + :meth:`read_chain` (see :class:`RawBatch`):
        chains, stats and QueueBroken exactly as :meth:`pop_batch`; the payload of each
        chain without error is ``read_chain(chain, limit)``.
        """
        max_chains = operator.index(max_chains)
        limit = operator.index(limit)
        chains = self.pop_batch(max_chains)
        if not chains:
            return RawBatch.empty()
        payloads = [self.read_chain(c, limit) if c.ok else b"" for c in chains]
        return RawBatch.from_chains(chains, payloads)

    def pop_located(self, max_chains: int, head: int, limit: int) -> Located:
        """:meth:`pop_raw_batch`, one-segment chains left in place (:class:`Located`)."""
        max_chains = operator.index(max_chains)
        head = operator.index(head)
        limit = operator.index(limit)
        chains = self.pop_batch(max_chains)
        if not chains:
            return Located(RawBatch.empty(), np.empty(0, np.int32), np.empty(0, np.int64),
                           np.empty(0, np.int64))
        in_place = [c.ok and len(c.readable) == 1 for c in chains]
        payloads = [self.read_chain(c, min(limit, head) if here else limit) if c.ok else b""
                    for c, here in zip(chains, in_place, strict=True)]
        n = len(chains)
        return Located(
            RawBatch.from_chains(chains, payloads),
            np.fromiter((c.readable[0][0] if here else -1
                         for c, here in zip(chains, in_place, strict=True)), np.int32, n),
            np.fromiter((c.readable[0][1] if here else 0
                         for c, here in zip(chains, in_place, strict=True)), np.int64, n),
            np.fromiter((c.read_len if c.ok else 0 for c in chains), np.int64, n))

    def take_one(self, limit: int) -> Taken | None:
        """The single-message path, composed of the batch operations it stands for."""
        limit = operator.index(limit)
        with self.state.lock:
            if not self.state.mapped:
                return None
            shown = self.pending()
            if shown != 1:
                if not shown:
                    self.enable_kicks()  # as the batch path's last, empty round
                return None  # several: for the batch operations
            rb = self.pop_raw_batch(1, limit)
            if not rb.count:
                return None
            head, error = int(rb.heads[0]), int(rb.errors[0])
            if error != ChainError.HEAD_OUT_OF_RANGE:
                self.push_used(rb.heads, 0)
            notify = self.need_notify()
            more = self.enable_kicks()
            return head, error, bool(rb.has_writable[0]), rb.data, notify, more

    def push_batch(self, entries: list[tuple[int, int]] | np.ndarray) -> None:
        """Publish (head, bytes written) pairs on the used ring, then the new used idx.

        ``entries`` is a list of pairs or an (n, 2) array of them (uint32, or any integer
        array whose values fit).
        """
        if isinstance(entries, np.ndarray):
            arr = used_entries_array(entries)
            if not len(arr):
                return
            entries = arr.tolist()
        if not entries:
            return
        used32 = self.state.used32
        size = self.state.size
        idx = self.state.used_idx
        for head, written in entries:
            slot = 2 * (idx % size)
            used32[slot] = head
            used32[slot + 1] = written
            idx = (idx + 1) & 0xFFFF
        # x86 keeps stores in order; the idx store below is the publication point.
        # §2.7.8.2: "The device MUST set len prior to updating the used idx."
        self.state.used16[1] = idx
        self.state.used_idx = idx
        self.state.stats.pushed += len(entries)

    def push_used(self, heads: np.ndarray, length: int) -> None:
        """Publish every head of ``heads`` (a uint32 array) with the same used ``length``.

        The same ring, idx and stats as ``push_batch([(h, length) for h in heads])``; heads
        and length are checked before anything is written.
        """
        h = used_heads_array(heads)
        written = used_length(length)
        n = len(h)
        if not n:
            return
        size = self.state.size
        used32 = self.state.used32
        if not size or used32.size < 2 * size:
            raise RuntimeError(f"queue {self.state.index}: used ring not mapped")
        idx = self.state.used_idx
        k = min(n, size)  # with more than size entries, only the last size ones remain
        slots = np.arange(idx + n - k, idx + n) % size
        pairs = used32.reshape(size, 2)
        pairs[slots, 0] = h[n - k :]
        pairs[slots, 1] = written
        idx = (idx + n) & 0xFFFF
        self.state.used16[1] = idx  # the publication point, after the elements (§2.7.8.2)
        self.state.used_idx = idx
        self.state.stats.pushed += n

    def need_notify(self) -> bool:
        """Whether the guest asked to be interrupted for what we pushed since last time."""
        full_fence()  # our used idx store must be visible before we read its wishes
        new, old = self.state.used_idx, self.state.signalled_used
        self.state.signalled_used = new
        if new == old:
            return False
        if self.state.event_idx:
            # §2.7.7.2: "The device MUST ignore the lower bit of flags."; for any entry pushed
            # whose used idx "was equal to used_event, the device MUST send a notification."
            event = int(self.state.avail[2 + self.state.size])
            return ((new - event - 1) & 0xFFFF) < ((new - old) & 0xFFFF)
        # §2.7.7.2: "The device MUST ignore the used_event value."; "If flags is 0, the
        # device MUST send a notification."
        return not int(self.state.avail[0]) & VRING_AVAIL_F_NO_INTERRUPT

    def disable_kicks(self) -> None:
        """Tell the guest not to kick while we are draining the ring anyway."""
        # §2.7.10.2: without EVENT_IDX "The device MUST set flags to 0 or 1."; with it, 0.
        if not self.state.event_idx:
            self.state.used16[0] = VRING_USED_F_NO_NOTIFY

    def enable_kicks(self) -> bool:
        """Ask for a kick on the next buffer; True if buffers raced in meanwhile."""
        if self.state.event_idx:
            # §2.7.10.2: "The device MAY use avail_event to advise the driver"
            self.state.used16[2 + 4 * self.state.size] = self.state.last_avail_idx
        else:
            self.state.used16[0] = 0
        full_fence()  # publish our wish before re-reading avail idx
        return self.avail_idx() != self.state.last_avail_idx

    def split_headers(self, rb: RawBatch, size: int) -> np.ndarray:
        """The first ``size`` bytes of every chain of ``rb``, zero-filled: (count, size) u8."""
        return split_headers(rb, size)

    # -- payload copies ------------------------------------------------------------

    def _copy_memory(self, chain: Chain, offset: int) -> GuestMemory:
        """The memory to copy ``chain``'s buffers with: checks offset and generation."""
        mem = self.state.mem
        assert mem is not None
        if offset < 0:
            raise ValueError(f"offset {offset} is negative")
        if chain.generation != mem.generation:
            raise stale_chain(chain, mem.generation)
        return mem

    def read_chain(self, chain: Chain, limit: int | None = None, offset: int = 0) -> bytes:
        """Up to ``limit`` device-readable bytes of ``chain``, starting ``offset`` bytes in.

        ValueError for a negative ``offset``; :class:`StaleChain` if the memory table
        changed since ``chain`` was popped.
        """
        mem = self._copy_memory(chain, offset)
        want = chain.read_len - offset if limit is None else min(limit, chain.read_len - offset)
        parts = []
        for r, off, length in chain.readable:
            if want <= 0:
                break
            if offset >= length:
                offset -= length
                continue
            take = min(length - offset, want)
            parts.append(mem.regions[r].mv[off + offset : off + offset + take])
            offset = 0
            want -= take
        return b"".join(parts)

    def put_one(self, message: bytes) -> Put:
        """The single-message path, composed of the operations it stands for."""
        done = self.fill_rx([message])
        return done.written, done.refused, done.exhausted, self.need_notify()

    def fill_rx(self, messages: Sequence[bytes]) -> Filled:
        """Write ``messages`` in order, one per available chain, and publish them
        (:meth:`Queue.fill_rx`): the reference of cext/vring.c's ``vr_fill_rx``."""
        n = len(messages)
        shown = self.pending()  # one look at the avail idx: no more chains than it shows
        taken = written = 0
        refused: list[tuple[int, int, int, int]] = []
        used: list[tuple[int, int]] = []
        if shown:
            full_fence()  # read ring entries only after the avail idx that covers them
        state = self.state
        avail, size, mem = state.avail, state.size, state.mem
        assert mem is not None
        generation = mem.generation
        # Chain by chain, each walked after the copies before it (a guest buffer may
        # overlap the ring), the used elements written after all of them: as vr_fill_rx.
        budget, reads = WALK_BUDGET * size, 0
        while written < n and taken < shown and reads < budget:  # the rest: next call
            c, r = self._walk(int(avail[2 + (state.last_avail_idx % size)]), generation)
            reads += r
            state.last_avail_idx = (state.last_avail_idx + 1) & 0xFFFF
            state.stats.popped += 1
            if not c.ok:
                state.stats.bad_chains += 1
            taken += 1
            msg = messages[written]
            if not c.ok:
                refused.append((c.head, int(c.error), 0, written))
            elif c.readable:
                # §2.7.5.1: "A device MUST NOT write to a device-readable buffer"
                refused.append((c.head, RX_READABLE, 0, written))
            elif c.write_len < len(msg):
                refused.append((c.head, RX_TOO_SMALL, c.write_len, written))
            else:
                used.append((c.head, self.write_chain(c, msg)))
                written += 1
                continue
            if c.returnable:
                used.append((c.head, 0))
        self.push_batch(used)
        return Filled(written, refused, written < n and taken == shown)

    def write_chain(self, chain: Chain, data: bytes | bytearray | memoryview,
                    offset: int = 0) -> int:
        """Copy ``data`` into the writable buffers of ``chain`` from ``offset`` on.

        Returns the bytes written (less than ``len(data)`` if the chain is shorter).
        ValueError for a negative ``offset``; :class:`StaleChain` if the memory table
        changed since ``chain`` was popped.
        """
        mem = self._copy_memory(chain, offset)
        # §2.7.5.1: "A device MUST NOT write to a device-readable buffer": writable only.
        src = memoryview(data)
        pos = 0
        total = len(src)
        for r, off, length in chain.writable:
            if pos >= total:
                break
            if offset >= length:
                offset -= length
                continue
            take = min(length - offset, total - pos)
            mem.regions[r].mv[off + offset : off + offset + take] = src[pos : pos + take]
            offset = 0
            pos += take
        return pos
