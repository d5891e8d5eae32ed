"""The kernel vhost_rpmsg API, in Python.

Mirrors the proposed in-kernel API (``vhost_rpmsg_init``, ``_ns_announce``,
``_start_lock``, ``_copy``, ``_finish_unlock``, ``_destroy``, an endpoint table with
``read``/``write`` callbacks, ``VHOST_RPMSG_ITER``) name for name, with Pythonic
forms beside it: a context manager for one message, ``send()``, exceptions instead of
negative errnos.  ``docs/api.md`` maps every kernel name to its counterpart here.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..endpoints.base import Endpoint
from ..vhost_user.vring import Vring
from ..virtio.queue import Chain
from . import codec as rp
from .device import MAX_READ, TO_GUEST, TO_HOST, RpmsgDevice
from .errors import PayloadTooLarge, RpmsgError, WouldBlock

#: kernel names of the two queues
VIRTIO_RPMSG_RESPONSE = TO_GUEST
VIRTIO_RPMSG_REQUEST = TO_HOST


@dataclass
class RpmsgIter:
    """``struct vhost_rpmsg_iter``: one message being written or read.

    ``src``/``dst``/``len`` are the message header; ``priv`` is the caller's.
    """

    src: int = 0
    dst: int = 0
    len: int = 0
    qid: int = -1
    priv: Any = None
    ept: EptEntry | None = None
    #: RESPONSE: the rx buffer being filled
    chain: Chain | None = None
    #: REQUEST: the guest's buffer, already copied out
    head: int | None = None
    #: bytes copied so far
    pos: int = 0
    #: a message already copied out of the ring
    data: bytes | None = None
    #: the locks held between start_lock and finish_unlock
    held: list[Any] = field(default_factory=list)

    @property
    def remaining(self) -> int:
        return self.len - self.pos


def VHOST_RPMSG_ITER(src: int, dst: int) -> RpmsgIter:
    """An iterator for a message from ``src`` to ``dst`` (the kernel's initializer macro)."""
    return RpmsgIter(src=src, dst=dst)


ReadCallback = Callable[["VhostRpmsg", RpmsgIter], int | None]


@dataclass
class EptEntry:
    """``struct vhost_rpmsg_ept``: an address and its callbacks.

    ``read`` is called with an iterator positioned on a guest message to ``addr``;
    ``write``, if set, afterwards with the same iterator (buffer already returned), to
    answer the sender.
    """

    addr: int
    read: ReadCallback | None = None
    write: ReadCallback | None = None


class _TableEndpoint(Endpoint):
    plugin = "ept-table"

    def __init__(self, vr: VhostRpmsg, entry: EptEntry) -> None:
        super().__init__(entry.addr)
        self.vr = vr
        self.entry = entry

    def on_message(self, src: int, data: bytes) -> None:
        it = RpmsgIter(src=src, dst=self.addr, len=len(data), qid=TO_HOST, ept=self.entry,
                       data=data)
        if self.entry.read is not None:
            self.entry.read(self.vr, it)
        if self.entry.write is not None:
            self.entry.write(self.vr, it)


class VhostRpmsg:
    """``struct vhost_rpmsg`` and its functions, over an :class:`RpmsgDevice`."""

    RESPONSE = VIRTIO_RPMSG_RESPONSE
    REQUEST = VIRTIO_RPMSG_REQUEST

    def __init__(self, ept: Sequence[EptEntry] = (), *, device: RpmsgDevice | None = None,
                 dispatch: bool = True) -> None:
        """``vhost_rpmsg_init``.  With ``dispatch=False`` guest messages wait in the ring
        for :meth:`start_lock` on the REQUEST queue instead of going to the table."""
        self.device = device if device is not None else RpmsgDevice(auto_dispatch=dispatch)
        self.ept = list(ept)
        for entry in self.ept:
            self.device.add_endpoint(_TableEndpoint(self, entry))

    # -- name service ----------------------------------------------------------------------

    def ns_announce(self, name: str, src: int) -> None:
        """``vhost_rpmsg_ns_announce``: queued until the guest is ready, never dropped."""
        self.device.announce(name, src, rp.NsFlags.CREATE)

    def ns_destroy(self, name: str, src: int) -> None:
        """The DESTROY counterpart of :meth:`ns_announce`."""
        self.device.announce(name, src, rp.NsFlags.DESTROY)

    # -- one message through an iterator ------------------------------------------------

    def start_lock(self, it: RpmsgIter | None, qid: int, length: int = 0,
                   src: int | None = None, dst: int | None = None,
                   timeout: float | None = 0.0) -> RpmsgIter:
        """``vhost_rpmsg_start_lock``: take a buffer on ``qid`` and hold the queue.

        RESPONSE (to the guest): reserves an rx buffer for a ``length``-byte message from
        ``src`` to ``dst`` (or the iterator's) and writes its header.  REQUEST (from the
        guest): takes the next guest message and fills in ``src``, ``dst`` and ``len``.
        Raises WouldBlock when there is no buffer within ``timeout`` seconds.
        """
        it = it if it is not None else RpmsgIter()
        if src is not None:
            it.src = src
        if dst is not None:
            it.dst = dst
        it.qid = qid
        it.pos = 0
        if qid == TO_GUEST:
            if not 0 <= length <= rp.MAX_PAYLOAD:
                raise PayloadTooLarge(f"message of {length} bytes; the guest takes at most "
                                      f"{rp.MAX_PAYLOAD}")
            it.len = length
            self._take(it, timeout, self._try_response)
        elif qid == TO_HOST:
            self._take(it, timeout, self._try_request)
        else:
            raise RpmsgError(f"no queue {qid}: use RESPONSE ({TO_GUEST}) or REQUEST ({TO_HOST})")
        return it

    def _take(self, it: RpmsgIter, timeout: float | None,
              attempt: Callable[[RpmsgIter, Vring], bool]) -> None:
        dev = self.device
        deadline = None if timeout is None else time.monotonic() + timeout
        cond = dev.lock
        cond.acquire()
        try:
            while True:
                vr = dev.vrings[it.qid] if dev.vrings else None
                if vr is not None and vr.ready:
                    lock = vr.queue.state.lock
                    lock.acquire()
                    try:
                        with vr.guarding():
                            ok = attempt(it, vr)
                    except BaseException:
                        lock.release()
                        raise
                    if ok:
                        it.held = [lock, cond]
                        return
                    lock.release()
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    raise WouldBlock(f"no buffer on queue {it.qid}")
                dev.wait(left)
        except BaseException:
            cond.release()
            raise

    def _try_response(self, it: RpmsgIter, vr: Vring) -> bool:
        dev = self.device
        q = vr.queue
        dev.flush()  # queued messages go first
        if dev.queued or not dev.guest_ready:
            return False
        while True:
            chains = q.pop_batch(1)
            if not chains:
                if q.enable_kicks():
                    continue
                return False
            c = chains[0]
            # Header plus a zeroed payload: copy() overwrites it, and nothing stale survives.
            blank = rp.encode_header(it.src, it.dst, it.len) + bytes(it.len)
            if dev.write_rx(q, c, blank) is None:
                if c.returnable:
                    q.push_batch([(c.head, 0)])
                    vr.notify()
                continue
            it.chain = c
            return True

    def _try_request(self, it: RpmsgIter, vr: Vring) -> bool:
        dev = self.device
        q = vr.queue
        while True:
            rb = q.pop_raw_batch(1, MAX_READ)
            if not rb.count:
                if q.enable_kicks():
                    continue
                return False
            parsed = dev.parse(rb, q)  # counts and logs a bad chain or message
            if not parsed.runs:
                if rb.nunreturnable == 0:
                    q.push_used(rb.heads, 0)
                    vr.notify()
                continue
            run = parsed.runs[0]
            it.src, it.dst, it.len = int(run.srcs[0]), run.dst, int(run.lengths[0])
            it.head = int(rb.heads[0])
            it.data = run.payload(0)
            return True

    def copy(self, it: RpmsgIter, data: bytes | int) -> bytes | int:
        """``vhost_rpmsg_copy``: RESPONSE: copy ``data`` in, return bytes copied (capped at
        the declared length).  REQUEST: ``data`` is a size; return up to that many bytes."""
        if it.qid == TO_HOST or (it.data is not None and it.chain is None):
            assert it.data is not None
            size = int(data) if isinstance(data, int) else len(data)
            out = it.data[it.pos : it.pos + size]
            it.pos += len(out)
            return out
        if it.chain is None or not it.held:
            raise RpmsgError("copy() on an iterator that is not started")
        if isinstance(data, int):
            raise TypeError("copy() on the RESPONSE queue takes the bytes to send")
        chunk = bytes(data[: it.remaining])
        q = self.device.vrings[TO_GUEST].queue
        n = q.write_chain(it.chain, chunk, rp.HDR_SIZE + it.pos)
        it.pos += n
        return n

    def finish_unlock(self, it: RpmsgIter) -> int:
        """``vhost_rpmsg_finish_unlock``: return the buffer, notify the guest, unlock.

        Returns the bytes of the message not copied (0 when complete)."""
        if not it.held or (it.chain is None and it.head is None):
            raise RpmsgError("finish_unlock() on an iterator that is not started")
        vr = self.device.vrings[it.qid]
        q = vr.queue
        left = it.remaining
        try:
            if it.qid == TO_GUEST:
                assert it.chain is not None
                # A short copy still delivers the declared length (zero-filled at start),
                # so the guest never sees a header claiming bytes that are not there.
                self.device.stats["to_guest_messages"] += 1  # before the guest sees it
                q.push_batch([(it.chain.head, rp.HDR_SIZE + it.len)])
            else:
                q.push_used(np.array([it.head], np.uint32), 0)
                self.device.stats["to_host_messages"] += 1
            vr.notify()
        finally:
            it.chain = None
            it.head = None
            for lock in it.held:
                lock.release()
            it.held = []
        return left

    # -- Pythonic forms -------------------------------------------------------------------

    @contextlib.contextmanager
    def start(self, qid: int, length: int = 0, src: int = 0, dst: int = 0,
              timeout: float | None = None) -> Iterator[RpmsgIter]:
        """``with vr.start(vr.RESPONSE, len(data), src, dst) as it: vr.copy(it, data)``."""
        it = self.start_lock(None, qid, length, src, dst, timeout)
        try:
            yield it
        finally:
            if it.held:
                self.finish_unlock(it)

    def send(self, src: int, dst: int, data: bytes, timeout: float | None = None) -> None:
        """One whole message to the guest (queued while it has no rx buffer)."""
        self.device.send(src, dst, data, timeout)

    def receive(self, timeout: float | None = None) -> tuple[int, int, bytes]:
        """(src, dst, payload) of the next guest message (``dispatch=False`` mode)."""
        with self.start(self.REQUEST, timeout=timeout) as it:
            data = self.copy(it, it.len)
        assert isinstance(data, bytes)
        return it.src, it.dst, data

    def destroy(self) -> None:
        """``vhost_rpmsg_destroy``."""
        self.device.destroy()
