"""Split virtqueues over numpy views of guest memory (the reference "python" engine).

The interface is batch-shaped so a C engine can replace the loops without changing the
callers: :meth:`SplitQueue.pop_batch` takes up to N available chains, validated and
translated; :meth:`SplitQueue.push_batch` publishes used entries; :meth:`read_chain` and
:meth:`write_chain` copy payloads.  Every guest address is bounds checked through
:class:`~vhost_rpmsg.memory.GuestMemory`, and every malformed chain comes back as a
:class:`Chain` with an ``error`` so the caller can count it and return the buffer.
"""

from __future__ import annotations

import enum
import logging
import os
import threading
from dataclasses import dataclass, field

import numpy as np

from .memory import BadAddress, GuestMemory

log = logging.getLogger(__name__)

VRING_DESC_F_NEXT = 1
VRING_DESC_F_WRITE = 2
VRING_DESC_F_INDIRECT = 4
VRING_AVAIL_F_NO_INTERRUPT = 1
VRING_USED_F_NO_NOTIFY = 1
DESC_SIZE = 16
MAX_QUEUE_SIZE = 32768

_fence_lock = threading.Lock()


def full_fence() -> None:
    """A full memory barrier between our ring stores and loads.

    Needed where a store must be visible before a load (used idx before reading
    used_event; avail_event before re-reading avail idx).  Python has no fence
    primitive; taking an uncontended lock executes a locked read-modify-write, which is
    a full barrier on x86.  The cffi engine uses a real ``__atomic_thread_fence``.
    """
    with _fence_lock:
        pass


class ChainError(enum.IntEnum):
    """Why a descriptor chain was rejected.  Values are shared with the C engine."""

    OK = 0
    HEAD_OUT_OF_RANGE = 1  # avail ring names a descriptor >= queue size
    NEXT_OUT_OF_RANGE = 2  # a next field points past the table
    LOOP = 3  # chain longer than its table: a loop or garbage
    ADDR_OUT_OF_BOUNDS = 4  # a buffer lies outside every memory region
    INDIRECT_NESTED = 5  # indirect descriptor inside an indirect table
    INDIRECT_BAD_LEN = 6  # indirect table length zero or not a multiple of 16
    INDIRECT_WITH_NEXT = 7  # indirect descriptor that also has NEXT set
    INDIRECT_NOT_NEGOTIATED = 8  # indirect used without VIRTIO_RING_F_INDIRECT_DESC
    READABLE_AFTER_WRITABLE = 9  # device-readable buffer after a writable one


class QueueBroken(Exception):
    """The ring itself is inconsistent (e.g. avail idx ran ahead by more than its size)."""


Segment = tuple[int, int, int]  # (region index, offset in region, length)


@dataclass(slots=True)
class Chain:
    """One available descriptor chain, translated to guest-memory segments."""

    head: int
    error: ChainError = ChainError.OK
    readable: list[Segment] = field(default_factory=list)
    writable: list[Segment] = field(default_factory=list)
    read_len: int = 0
    write_len: int = 0

    @property
    def ok(self) -> bool:
        return self.error is ChainError.OK

    @property
    def returnable(self) -> bool:
        """A chain whose head is a real descriptor can be given back on the used ring."""
        return self.error is not ChainError.HEAD_OUT_OF_RANGE


@dataclass
class QueueStats:
    popped: int = 0
    pushed: int = 0
    bad_chains: int = 0
    notifies: int = 0
    notifies_suppressed: int = 0
    kicks: int = 0


class SplitQueue:
    """One split virtqueue.  Configured by the vhost-user backend, driven by a device."""

    engine = "python"

    def __init__(self, index: int, max_size: int = 1024) -> None:
        self.index = index
        self.max_size = max_size
        self.lock = threading.RLock()
        self.stats = QueueStats()
        self.size = 0
        self.desc_addr = self.avail_addr = self.used_addr = 0
        self.addr_set = False
        self.last_avail_idx = 0
        self.used_idx = 0
        self.kick_fd: int | None = None
        self.call_fd: int | None = None
        self.err_fd: int | None = None
        self.started = False
        self.enabled = False
        self.event_idx = False
        self.indirect = False
        self.broken: str | None = None
        self._signalled_used = 0
        self._mem: GuestMemory | None = None
        self._desc = np.empty(0, np.uint64)
        self._avail = np.empty(0, np.uint16)
        self._used16 = np.empty(0, np.uint16)
        self._used32 = np.empty(0, np.uint32)

    # -- configuration ---------------------------------------------------------

    @property
    def ready(self) -> bool:
        """Started, enabled, mapped and not broken: the device may use it."""
        return self.started and self.enabled and self.broken is None and self._desc.size > 0

    def set_size(self, num: int) -> None:
        if num == 0 or num > min(self.max_size, MAX_QUEUE_SIZE) or num & (num - 1):
            raise ValueError(f"queue size {num} is not a power of two in 1..{self.max_size}")
        self.size = num

    def set_addresses(self, desc: int, avail: int, used: int) -> None:
        if desc % 16 or avail % 2 or used % 4:
            raise ValueError(
                f"ring addresses misaligned: desc 0x{desc:x} avail 0x{avail:x} used 0x{used:x}"
            )
        self.desc_addr, self.avail_addr, self.used_addr = desc, avail, used
        self.addr_set = True

    def set_base(self, base: int) -> None:
        self.last_avail_idx = base & 0xFFFF
        self.used_idx = base & 0xFFFF
        self._signalled_used = self.used_idx

    def map(self, mem: GuestMemory) -> None:
        """Translate the ring addresses (front-end VAs) into views of guest memory."""
        if not self.addr_set or not self.size:
            raise ValueError(f"queue {self.index}: size or addresses not set")
        n = self.size
        regions = []
        for addr, length in (
            (self.desc_addr, DESC_SIZE * n),
            (self.avail_addr, 6 + 2 * n),
            (self.used_addr, 6 + 8 * n),
        ):
            regions.append((*mem.find_uva(addr, length), length))
        (dr, doff, dlen), (ar, aoff, alen), (ur, uoff, ulen) = regions
        self._mem = mem
        self._desc = mem.view(dr, doff, dlen).view("<u8")
        self._avail = mem.view(ar, aoff, alen).view("<u2")
        used = mem.view(ur, uoff, ulen)
        self._used16 = used.view("<u2")
        self._used32 = used[4 : 4 + 8 * n].view("<u4")
        if self.used_idx != int(self._used16[1]) and self.started:
            log.debug("queue %d: used idx %d in memory, %d kept", self.index,
                      int(self._used16[1]), self.used_idx)

    def unmap(self) -> None:
        self._mem = None
        self._desc = np.empty(0, np.uint64)
        self._avail = np.empty(0, np.uint16)
        self._used16 = np.empty(0, np.uint16)
        self._used32 = np.empty(0, np.uint32)

    def close_fds(self) -> None:
        for name in ("kick_fd", "call_fd", "err_fd"):
            fd = getattr(self, name)
            if fd is not None:
                try:
                    os.close(fd)
                except OSError:
                    pass
                setattr(self, name, None)

    def reset(self) -> None:
        """Back to the state of a queue never configured (keeps max_size and index)."""
        self.close_fds()
        self.unmap()
        self.size = 0
        self.addr_set = False
        self.started = self.enabled = False
        self.broken = None
        self.set_base(0)

    # -- the guest's side of the ring -------------------------------------------

    def avail_idx(self) -> int:
        return int(self._avail[1])

    def has_available(self) -> bool:
        return self.ready and self.avail_idx() != self.last_avail_idx

    def pending(self) -> int:
        """Chains the guest made available and we have not taken yet."""
        n = (self.avail_idx() - self.last_avail_idx) & 0xFFFF
        if n > self.size:
            self._break(f"avail idx {self.avail_idx()} is {n} ahead of {self.last_avail_idx}")
        return n

    def _break(self, why: str) -> None:
        self.broken = why
        log.error("queue %d broken: %s; stopped until the ring is set up again", self.index, why)
        raise QueueBroken(why)

    # -- batch operations (the engine) -------------------------------------------

    def pop_batch(self, max_chains: int) -> list[Chain]:
        """Take up to ``max_chains`` available chains, each validated and translated."""
        n = min(self.pending(), max_chains)
        if n <= 0:
            return []
        full_fence()  # read ring entries only after the avail idx that covers them
        avail = self._avail
        size = self.size
        out = []
        last = self.last_avail_idx
        for _ in range(n):
            head = int(avail[2 + (last % size)])
            chain = self._walk(head)
            if not chain.ok:
                self.stats.bad_chains += 1
            out.append(chain)
            last = (last + 1) & 0xFFFF
        self.last_avail_idx = last
        self.stats.popped += n
        return out

    def unpop(self, count: int) -> None:
        """Give back the last ``count`` chains popped and not used, in the avail ring.

        They are simply seen again by the next pop: the driver does not touch an avail
        entry until the device has used it.
        """
        if count:
            self.last_avail_idx = (self.last_avail_idx - count) & 0xFFFF
            self.stats.popped -= count

    def _walk(self, head: int) -> Chain:
        chain = Chain(head)
        size = self.size
        if head >= size:
            chain.error = ChainError.HEAD_OUT_OF_RANGE
            return chain
        mem = self._mem
        assert mem is not None
        table = self._desc
        limit = size
        idx = head
        seen = 0
        nested = False
        while True:
            seen += 1
            if seen > limit:
                chain.error = ChainError.LOOP
                return chain
            addr = table.item(2 * idx)
            word = table.item(2 * idx + 1)
            length = word & 0xFFFFFFFF
            flags = (word >> 32) & 0xFFFF
            nxt = word >> 48
            if flags & VRING_DESC_F_INDIRECT:
                if not self.indirect:
                    chain.error = ChainError.INDIRECT_NOT_NEGOTIATED
                    return chain
                if nested:
                    chain.error = ChainError.INDIRECT_NESTED
                    return chain
                if flags & VRING_DESC_F_NEXT:
                    chain.error = ChainError.INDIRECT_WITH_NEXT
                    return chain
                if length == 0 or length % DESC_SIZE:
                    chain.error = ChainError.INDIRECT_BAD_LEN
                    return chain
                try:
                    r, off = mem.find_gpa(addr, length)
                except BadAddress:
                    chain.error = ChainError.ADDR_OUT_OF_BOUNDS
                    return chain
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
                    return chain
                if flags & VRING_DESC_F_WRITE:
                    chain.writable.append((r, off, length))
                    chain.write_len += length
                else:
                    if chain.writable:
                        chain.error = ChainError.READABLE_AFTER_WRITABLE
                        return chain
                    chain.readable.append((r, off, length))
                    chain.read_len += length
            elif not flags & VRING_DESC_F_WRITE and chain.writable:
                chain.error = ChainError.READABLE_AFTER_WRITABLE
                return chain
            if not flags & VRING_DESC_F_NEXT:
                return chain
            if nxt >= limit:
                chain.error = ChainError.NEXT_OUT_OF_RANGE
                return chain
            idx = nxt

    def push_batch(self, entries: list[tuple[int, int]]) -> None:
        """Publish (head, bytes written) pairs on the used ring, then the new used idx."""
        if not entries:
            return
        used32 = self._used32
        size = self.size
        idx = self.used_idx
        for head, written in entries:
            slot = 2 * (idx % size)
            used32[slot] = head
            used32[slot + 1] = written
            idx = (idx + 1) & 0xFFFF
        # x86 keeps stores in order; the idx store below is the publication point.
        self._used16[1] = idx
        self.used_idx = idx
        self.stats.pushed += len(entries)

    def need_notify(self) -> bool:
        """Whether the guest asked to be interrupted for what we pushed since last time."""
        full_fence()  # our used idx store must be visible before we read its wishes
        new, old = self.used_idx, self._signalled_used
        self._signalled_used = new
        if new == old:
            return False
        if self.event_idx:
            event = int(self._avail[2 + self.size])
            return ((new - event - 1) & 0xFFFF) < ((new - old) & 0xFFFF)
        return not int(self._avail[0]) & VRING_AVAIL_F_NO_INTERRUPT

    def notify(self) -> bool:
        """Interrupt the guest if it wants it; returns whether we did."""
        if not self.need_notify():
            self.stats.notifies_suppressed += 1
            return False
        fd = self.call_fd
        if fd is None:
            return False
        try:
            os.eventfd_write(fd, 1)
        except OSError as e:
            log.error("queue %d: call eventfd write failed: %s", self.index, e)
            return False
        self.stats.notifies += 1
        return True

    def disable_kicks(self) -> None:
        """Tell the guest not to kick while we are draining the ring anyway."""
        if not self.event_idx:
            self._used16[0] = VRING_USED_F_NO_NOTIFY

    def enable_kicks(self) -> bool:
        """Ask for a kick on the next buffer; True if buffers raced in meanwhile."""
        if self.event_idx:
            self._used16[2 + 4 * self.size] = self.last_avail_idx
        else:
            self._used16[0] = 0
        full_fence()  # publish our wish before re-reading avail idx
        return self.avail_idx() != self.last_avail_idx

    # -- payload copies ------------------------------------------------------------

    def read_chain(self, chain: Chain, limit: int | None = None, offset: int = 0) -> bytes:
        """Up to ``limit`` device-readable bytes of ``chain``, starting ``offset`` bytes in."""
        mem = self._mem
        assert mem is not None
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

    def write_chain(self, chain: Chain, data: bytes | bytearray | memoryview,
                    offset: int = 0) -> int:
        """Copy ``data`` into the writable buffers of ``chain`` from ``offset`` on.

        Returns the bytes written (less than ``len(data)`` if the chain is shorter).
        """
        mem = self._mem
        assert mem is not None
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
