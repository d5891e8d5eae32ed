"""Split virtqueues over numpy views of guest memory (the reference "python" engine).

The interface is batch-shaped so a C engine can replace the loops without changing the
callers: :meth:`SplitQueue.pop_batch` takes up to N available chains, validated and
translated; :meth:`SplitQueue.push_batch` publishes used entries; :meth:`read_chain` and
:meth:`write_chain` copy payloads.  Every guest address is bounds checked through
:class:`~vhost_rpmsg.memory.GuestMemory`, and every malformed chain comes back as a
:class:`Chain` with an ``error`` so the caller can count it and return the buffer.

For the hot path there are array forms with no Python object per chain:
:meth:`SplitQueue.pop_raw_batch` (a :class:`RawBatch` of heads, errors and the copied
payloads) and :meth:`SplitQueue.push_used` / :meth:`SplitQueue.push_batch` with numpy
arrays.

A :class:`Chain` names guest buffers by region index, which only means something for the
memory table it was translated with: it records that table's ``generation``, and copying
through it after the table changed raises :class:`StaleChain`.
"""

from __future__ import annotations

import enum
import logging
import operator
import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

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
    INDIRECT_BAD_LEN = 6  # indirect table length zero, not a multiple of 16, or > queue size
    INDIRECT_WITH_NEXT = 7  # indirect descriptor that also has NEXT set
    INDIRECT_NOT_NEGOTIATED = 8  # indirect used without VIRTIO_RING_F_INDIRECT_DESC
    READABLE_AFTER_WRITABLE = 9  # device-readable buffer after a writable one


class QueueBroken(Exception):
    """The ring itself is inconsistent (e.g. avail idx ran ahead by more than its size)."""


class StaleChain(Exception):
    """A chain used after the memory table changed: its buffers were translated for the old one.

    Region indices (and the regions themselves) may mean something else now, so nothing is
    copied.  The chain is still outstanding on the ring: give its head back (push it
    used, length 0) like any chain that could not be served.
    """


def stale_chain(chain: Chain, generation: int) -> StaleChain:
    """The StaleChain for ``chain`` under memory-table ``generation`` (both engines' text)."""
    return StaleChain(
        f"chain at head {chain.head} was taken under memory table generation "
        f"{chain.generation}; the memory table changed since the chain was taken "
        f"(now generation {generation}), so its buffers are no longer valid"
    )


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
    # GuestMemory.generation the segments were translated under (-1: not from a pop).
    generation: int = -1

    @property
    def ok(self) -> bool:
        return self.error is ChainError.OK

    @property
    def returnable(self) -> bool:
        """A chain whose head is a real descriptor can be given back on the used ring."""
        return self.error is not ChainError.HEAD_OUT_OF_RANGE


_U32 = np.dtype(np.uint32)
_U8 = np.dtype(np.uint8)
_BOOL = np.dtype(np.bool_)
_I64 = np.dtype(np.int64)
U32_MAX = 0xFFFFFFFF


class RawBatch:
    """Chains taken by :meth:`SplitQueue.pop_raw_batch`, as arrays (no object per chain).

    ``count`` chains, in avail-ring order; for chain ``i``:

    ``heads[i]`` (uint32)
        its head descriptor index: what goes back on the used ring.
    ``errors[i]`` (uint8)
        a :class:`ChainError` value; ``HEAD_OUT_OF_RANGE`` chains cannot be returned
        (see :meth:`returnable_heads`).
    ``has_writable[i]`` (bool)
        the chain is OK but also has non-empty device-writable buffers (False for a chain
        with an error).  Such a chain counts as OK here; whether it is acceptable is the
        caller's decision.
    ``lengths[i]`` (int64)
        bytes of the chain's device-readable payload copied to ``data``:
        ``min(read_len, limit)`` (0 when ``limit`` < 0), and 0 for a chain with an error.
    ``offsets[i]`` (int64)
        where those bytes start in ``data``.  Chains are packed in order:
        ``offsets[i + 1] == offsets[i] + lengths[i]``, ``offsets[0] == 0``.
    ``data`` (bytes)
        the payloads of all chains, concatenated; ``len(data) == lengths.sum()``.

    All arrays are one-dimensional, ``count`` long and C-contiguous; no engine writes them
    after returning the batch (they may be views of one buffer the batch owns; an empty
    batch's arrays are shared and read-only).

    Counts, so that the common all-good batch needs no numpy pass: ``nbad`` chains with
    an error, ``nwritable`` chains with ``has_writable``, ``nunreturnable`` chains with
    ``HEAD_OUT_OF_RANGE``.
    """

    __slots__ = ("count", "data", "errors", "has_writable", "heads", "lengths", "nbad",
                 "nunreturnable", "nwritable", "offsets")

    def __init__(self, heads: np.ndarray, errors: np.ndarray, has_writable: np.ndarray,
                 lengths: np.ndarray, offsets: np.ndarray, data: bytes,
                 nbad: int | None = None, nwritable: int | None = None,
                 nunreturnable: int | None = None) -> None:
        self.heads = heads
        self.errors = errors
        self.has_writable = has_writable
        self.lengths = lengths
        self.offsets = offsets
        self.data = data
        self.count = len(heads)
        self.nbad = int(np.count_nonzero(errors)) if nbad is None else nbad
        self.nwritable = (int(np.count_nonzero(has_writable)) if nwritable is None
                          else nwritable)
        self.nunreturnable = (
            int(np.count_nonzero(errors == ChainError.HEAD_OUT_OF_RANGE.value))
            if nunreturnable is None else nunreturnable)

    @classmethod
    def empty(cls) -> RawBatch:
        h, e, w, n, o = _EMPTY_ARRAYS
        return cls(h, e, w, n, o, b"", 0, 0, 0)

    @classmethod
    def from_chains(cls, chains: Sequence[Chain], payloads: Sequence[bytes]) -> RawBatch:
        """The batch of ``chains`` whose copied payloads are ``payloads`` (b"" if bad)."""
        n = len(chains)
        lengths = np.fromiter(map(len, payloads), _I64, n)
        offsets = np.cumsum(lengths) - lengths
        writable = [c.ok and bool(c.writable) for c in chains]
        return cls(
            np.fromiter((c.head for c in chains), _U32, n),
            np.fromiter((c.error for c in chains), _U8, n),
            np.fromiter(writable, _BOOL, n),
            lengths,
            offsets.astype(_I64, copy=False),
            b"".join(payloads),
            sum(not c.ok for c in chains),
            sum(writable),
            sum(not c.returnable for c in chains),
        )

    def __len__(self) -> int:
        return self.count

    def payload(self, i: int) -> bytes:
        """The bytes copied for chain ``i``."""
        o = int(self.offsets[i])
        return self.data[o : o + int(self.lengths[i])]

    def returnable_heads(self) -> np.ndarray:
        """Heads of the chains that can be given back on the used ring, in order.

        ``heads`` itself when every chain can (the usual case: no copy).
        """
        if not self.nunreturnable:
            return self.heads
        return self.heads[self.errors != ChainError.HEAD_OUT_OF_RANGE.value]

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, RawBatch):
            return NotImplemented
        return (self.count, self.data, self.nbad, self.nwritable, self.nunreturnable) == (
            other.count, other.data, other.nbad, other.nwritable, other.nunreturnable) and all(
            a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a, b)
            for a, b in ((self.heads, other.heads), (self.errors, other.errors),
                         (self.has_writable, other.has_writable),
                         (self.lengths, other.lengths), (self.offsets, other.offsets)))

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return (f"RawBatch(count={self.count}, heads={self.heads.tolist()}, "
                f"errors={self.errors.tolist()}, has_writable={self.has_writable.tolist()}, "
                f"lengths={self.lengths.tolist()}, offsets={self.offsets.tolist()}, "
                f"data={self.data!r}, nbad={self.nbad}, nwritable={self.nwritable}, "
                f"nunreturnable={self.nunreturnable})")


def _read_only(a: np.ndarray) -> np.ndarray:
    a.flags.writeable = False
    return a


_EMPTY_ARRAYS = (_read_only(np.empty(0, _U32)), _read_only(np.empty(0, _U8)),
                 _read_only(np.empty(0, _BOOL)), _read_only(np.empty(0, _I64)),
                 _read_only(np.empty(0, _I64)))


def _as_u32(a: np.ndarray, what: str) -> np.ndarray:
    if a.dtype != _U32:
        if a.dtype.kind not in "iu":
            raise TypeError(f"{what} must be integers, not {a.dtype}")
        if a.size and (int(a.min()) < 0 or int(a.max()) > U32_MAX):
            raise ValueError(f"{what} out of the uint32 range")
        a = a.astype(_U32)
    return np.ascontiguousarray(a)


def used_entries_array(entries: Any) -> np.ndarray:
    """``entries`` as a C-contiguous (n, 2) uint32 array of (head, length) rows."""
    a = np.asarray(entries)
    if a.ndim != 2 or a.shape[1] != 2:
        raise ValueError(f"used entries must be an (n, 2) array, not of shape {a.shape}")
    return _as_u32(a, "used entries")


def used_heads_array(heads: Any) -> np.ndarray:
    """``heads`` as a C-contiguous one-dimensional uint32 array."""
    a = np.asarray(heads)
    if a.ndim != 1:
        raise ValueError(f"heads must be a one-dimensional array, not of shape {a.shape}")
    return _as_u32(a, "heads")


def used_length(length: Any) -> int:
    """``length`` as an int that fits a used element's 32-bit length."""
    n = operator.index(length)
    if not 0 <= n <= U32_MAX:
        raise ValueError(f"used length {n} out of the uint32 range")
    return n


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
        mem = self._mem
        assert mem is not None
        generation = mem.generation  # before the walks: a change under them makes them stale
        out = []
        last = self.last_avail_idx
        for _ in range(n):
            head = int(avail[2 + (last % size)])
            chain = self._walk(head, generation)
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

    def _walk(self, head: int, generation: int) -> Chain:
        chain = Chain(head, generation=generation)
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
                if length == 0 or length % DESC_SIZE or length // DESC_SIZE > size:
                    # empty, ragged, or more descriptors than the queue holds
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

    def pop_raw_batch(self, max_chains: int, limit: int) -> RawBatch:
        """Take up to ``max_chains`` chains with up to ``limit`` readable bytes of each.

        The array form of :meth:`pop_batch` + :meth:`read_chain` (see :class:`RawBatch`):
        chains, stats and QueueBroken exactly as :meth:`pop_batch`; the payload of each
        chain without error is ``read_chain(chain, limit)``.
        """
        max_chains = operator.index(max_chains)
        limit = operator.index(limit)
        chains = SplitQueue.pop_batch(self, max_chains)
        if not chains:
            return RawBatch.empty()
        payloads = [SplitQueue.read_chain(self, c, limit) if c.ok else b"" for c in chains]
        return RawBatch.from_chains(chains, payloads)

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
        size = self.size
        used32 = self._used32
        if not size or used32.size < 2 * size:
            raise RuntimeError(f"queue {self.index}: used ring not mapped")
        idx = self.used_idx
        k = min(n, size)  # with more than size entries, only the last size ones remain
        slots = np.arange(idx + n - k, idx + n) % size
        pairs = used32.reshape(size, 2)
        pairs[slots, 0] = h[n - k :]
        pairs[slots, 1] = written
        idx = (idx + n) & 0xFFFF
        self._used16[1] = idx  # the publication point, after the elements
        self.used_idx = idx
        self.stats.pushed += n

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

    def _copy_memory(self, chain: Chain, offset: int) -> GuestMemory:
        """The memory to copy ``chain``'s buffers with: checks offset and generation."""
        mem = self._mem
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

    def write_chain(self, chain: Chain, data: bytes | bytearray | memoryview,
                    offset: int = 0) -> int:
        """Copy ``data`` into the writable buffers of ``chain`` from ``offset`` on.

        Returns the bytes written (less than ``len(data)`` if the chain is shorter).
        ValueError for a negative ``offset``; :class:`StaleChain` if the memory table
        changed since ``chain`` was popped.
        """
        mem = self._copy_memory(chain, offset)
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
