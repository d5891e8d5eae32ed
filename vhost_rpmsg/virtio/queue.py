"""The split virtqueue: its state, the results of walking it, and the engine contract.

A virtqueue here is pure virtio: guest-physical ring addresses, descriptor chains, used
entries and the notification decision; it holds no file descriptor and does no I/O (the
vhost-user ``Vring`` owns the eventfds and the ring's started/enabled state).

* :class:`QueueState` is everything one queue is, in one place: configuration, the two
  indices, the ring views over guest memory, feature flags, stats.
* :class:`Queue` is the contract both engines meet over a state: the Python reference
  (``queue_python.PythonQueue``) and the C one (``queue_cffi.CffiQueue``) give identical
  results on every ring, well formed or hostile (tests/test_engine_differential.py).
* :class:`Chain` and :class:`RawBatch` are what a pop returns.  A chain names guest
  buffers by region index, which only means something for the memory table it was
  translated with: it records that table's ``generation``, and copying through it after
  the table changed raises :class:`StaleChain`.
"""

from __future__ import annotations

import enum
import logging
import operator
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

import numpy as np

from .constants import DESC_SIZE, MAX_QUEUE_SIZE
from .memory import GuestMemory

log = logging.getLogger(__name__)


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
    """Chains taken by :meth:`Queue.pop_raw_batch`, as arrays (no object per chain).

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


#: descriptor reads one pop or fill may start, in queue sizes (cext/vring.h's
#: VR_WALK_BUDGET): a chain is walked only while fewer were read in the call, the rest
#: wait for the next.  A well-formed batch of direct chains reads at most a queue size;
#: a looping chain reads a queue size (an indirect table as much again) before it is
#: refused, so a ring of them would otherwise cost size^2 reads in one call.
WALK_BUDGET = 4

#: kinds of refusal in :attr:`Filled.refused` beyond the ChainError values (cext/vring.h)
RX_READABLE = 64  # the chain has device-readable buffers
RX_TOO_SMALL = 65  # its device-writable bytes cannot hold the message


@dataclass(frozen=True, slots=True)
class Filled:
    """What :meth:`Queue.fill_rx` did."""

    #: messages written: the first ``written`` of those given
    written: int
    #: chains refused, in ring order: (head, ChainError value or RX_*, writable bytes
    #: for RX_TOO_SMALL else 0, index of the message it was tried for); each was given
    #: back empty unless its head is out of range
    refused: list[tuple[int, int, int, int]]
    #: every available chain was taken and messages are left (re-arm the guest's kicks)
    exhausted: bool


@dataclass(frozen=True, slots=True, eq=False)
class Located:
    """What :meth:`Queue.pop_located` took: a :class:`RawBatch`, and where each chain's
    readable bytes lie when they were left in guest memory (zero-copy receive).

    For chain ``i``: ``region[i]`` (int32) is the index of the memory region its one
    readable segment lies wholly in, at ``offset[i]`` (int64), ``read_len[i]`` (int64)
    bytes long, and only its first bytes were copied to ``raw``; ``region[i]`` is -1
    for a chain copied as :meth:`Queue.pop_raw_batch` copies it (several readable
    segments, or an error: then ``read_len[i]`` is 0).
    """

    raw: RawBatch
    region: np.ndarray
    offset: np.ndarray
    read_len: np.ndarray

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Located):
            return NotImplemented
        return self.raw == other.raw and all(
            a.dtype == b.dtype and np.array_equal(a, b)
            for a, b in ((self.region, other.region), (self.offset, other.offset),
                         (self.read_len, other.read_len)))

    __hash__ = None  # type: ignore[assignment]


#: what :meth:`Queue.take_one` took: (head, ChainError value, has_writable, the bytes
#: copied, whether the guest wants an interrupt now, whether chains are left to take).
#: A plain tuple: it is made once per message on the single-message path.
Taken = tuple[int, int, bool, bytes, bool, bool]

#: what :meth:`Queue.put_one` did: :class:`Filled`'s written, refused and exhausted, and
#: whether the guest wants an interrupt now
Put = tuple[int, list[tuple[int, int, int, int]], bool, bool]


@dataclass
class QueueStats:
    popped: int = 0
    pushed: int = 0
    bad_chains: int = 0
    notifies: int = 0
    notifies_suppressed: int = 0
    notify_failures: int = 0  # call eventfd writes that failed (full counter, closed fd)
    kicks: int = 0




def ring_sizes(size: int) -> tuple[int, int, int]:
    """Bytes of the descriptor table, available ring and used ring of a ``size`` ring
    (virtio 1.2 §2.7: 16 per descriptor; flags, idx, ring[size] of 2 and of 8 bytes,
    and the event word)."""
    return DESC_SIZE * size, 6 + 2 * size, 6 + 8 * size


def check_ring_alignment(desc: int, avail: int, used: int) -> None:
    """ValueError unless the rings are aligned as virtio requires.

    Virtio 1.2 §2.7 (Split Virtqueues) gives the alignment of each part: descriptor table
    16, available ring 2, used ring 4.
    """
    # virtio 1.2 §2.7.1: "a multiple of the specified alignment value in the above table"
    if desc % 16 or avail % 2 or used % 4:
        raise ValueError(
            f"ring addresses misaligned: desc 0x{desc:x} avail 0x{avail:x} used 0x{used:x}"
        )


class QueueState:
    """One split virtqueue's state, shared by whichever engine drives it.

    Configured by the vhost-user back-end (size, guest-physical ring addresses, base),
    mapped onto guest memory, then advanced by the engine: ``last_avail_idx`` (our next
    avail slot), ``used_idx`` (our next used slot, published to the guest) and
    ``signalled_used`` (the used idx at the last notification decision).
    """

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
        self.signalled_used = 0
        self.event_idx = False
        self.indirect = False
        self.mem: GuestMemory | None = None
        #: the rings, as views of guest memory (empty while unmapped)
        self.desc = np.empty(0, np.uint64)
        self.avail = np.empty(0, np.uint16)
        self.used16 = np.empty(0, np.uint16)
        self.used32 = np.empty(0, np.uint32)
        #: an engine's cache derived from the views; dropped whenever they change
        self.snapshot: object | None = None

    @property
    def mapped(self) -> bool:
        return self.desc.size > 0

    def set_size(self, num: int) -> None:
        # "Queue Size value is always a power of 2.  The maximum Queue Size value is
        # 32768." (virtio 1.2 §2.7 Split Virtqueues)
        if num == 0 or num > min(self.max_size, MAX_QUEUE_SIZE) or num & (num - 1):
            raise ValueError(f"queue size {num} is not a power of two in 1..{self.max_size}")
        self.size = num

    def set_addresses(self, desc: int, avail: int, used: int) -> None:
        """Guest-physical addresses of the three rings."""
        check_ring_alignment(desc, avail, used)
        self.desc_addr, self.avail_addr, self.used_addr = desc, avail, used
        self.addr_set = True

    def set_base(self, base: int) -> None:
        self.last_avail_idx = base & 0xFFFF
        self.used_idx = base & 0xFFFF
        self.signalled_used = self.used_idx

    def map(self, mem: GuestMemory) -> None:
        """Views of the three rings in ``mem``; BadAddress (nothing changed) if not there."""
        if not self.addr_set or not self.size:
            raise ValueError(f"queue {self.index}: size or addresses not set")
        n = self.size
        # Part sizes from the table of virtio 1.2 §2.7 Split Virtqueues: 16n, 6 + 2n, 6 + 8n.
        (dr, doff, dlen), (ar, aoff, alen), (ur, uoff, ulen) = [
            (*mem.find_gpa(addr, length), length)
            for addr, length in zip((self.desc_addr, self.avail_addr, self.used_addr),
                                    ring_sizes(n), strict=True)
        ]
        self.snapshot = None  # never an engine cache of the old rings with the new ones
        self.mem = mem
        self.desc = mem.view(dr, doff, dlen).view("<u8")
        self.avail = mem.view(ar, aoff, alen).view("<u2")
        used = mem.view(ur, uoff, ulen)
        self.used16 = used.view("<u2")
        self.used32 = used[4 : 4 + 8 * n].view("<u4")
        if self.used_idx != int(self.used16[1]):
            log.debug("queue %d: used idx %d in memory, %d kept", self.index,
                      int(self.used16[1]), self.used_idx)

    def unmap(self) -> None:
        self.snapshot = None  # drop engine exports first: nothing keeps the old mapping
        self.mem = None
        self.desc = np.empty(0, np.uint64)
        self.avail = np.empty(0, np.uint16)
        self.used16 = np.empty(0, np.uint16)
        self.used32 = np.empty(0, np.uint32)

    def reset(self) -> None:
        """Back to a queue never configured (keeps index, max_size, features and stats)."""
        self.unmap()
        self.size = 0
        self.addr_set = False
        self.set_base(0)


class Queue(Protocol):
    """What a device and the vhost-user ``Vring`` may do with a queue: the engine contract.

    Every method works on :attr:`state`; both engines give the same results, errors,
    exceptions, stats and ring bytes.  :class:`QueueBroken` means the ring itself is
    inconsistent: the caller stops using it until it is set up again.
    """

    name: ClassVar[str]
    state: QueueState

    def pending(self) -> int:
        """Chains the guest made available and we have not taken yet."""
        ...

    def has_available(self) -> bool:
        """Mapped, and the guest made chains available that we have not taken."""
        ...

    def pop_batch(self, max_chains: int) -> list[Chain]:
        """Take up to ``max_chains`` available chains, each validated and translated."""
        ...

    def unpop(self, count: int) -> None:
        """Give back the last ``count`` chains popped and not used."""
        ...

    def pop_raw_batch(self, max_chains: int, limit: int) -> RawBatch:
        """:meth:`pop_batch` + :meth:`read_chain` of up to ``limit`` bytes, as arrays."""
        ...

    def pop_located(self, max_chains: int, head: int, limit: int) -> Located:
        """:meth:`pop_raw_batch`, except that a chain without error whose readable bytes
        are one segment stays where it is: only its first ``min(head, limit)`` bytes are
        copied, and :class:`Located` says where the rest lies (zero-copy receive: the
        caller reads it in guest memory and gives the chain back when done)."""
        ...

    def take_one(self, limit: int) -> Taken | None:
        """The single-message path of a copying consumer, for a ring showing exactly one
        chain: :meth:`pop_raw_batch` of it (``limit`` bytes), :meth:`push_used` (length 0,
        unless its head is out of range), :meth:`need_notify`, :meth:`enable_kicks` (see
        :data:`Taken`).  None, and nothing taken, when the ring shows none (kicks are
        enabled again) or several (they are for the batch operations).  Errors and stats
        as those operations'."""
        ...

    def split_headers(self, rb: RawBatch, size: int) -> np.ndarray:
        """The first ``size`` bytes of every chain of ``rb`` as a (count, size) uint8
        array, zero-filled past a chain's end: the hook a device parses headers with."""
        ...

    def push_batch(self, entries: list[tuple[int, int]] | np.ndarray) -> None:
        """Publish (head, bytes written) pairs on the used ring, then the new used idx."""
        ...

    def push_used(self, heads: np.ndarray, length: int) -> None:
        """Publish every head of ``heads`` with the same used ``length``."""
        ...

    def need_notify(self) -> bool:
        """Whether the guest asked to be interrupted for what we pushed since last time."""
        ...

    def disable_kicks(self) -> None:
        """Tell the guest not to kick while we are draining the ring anyway."""
        ...

    def enable_kicks(self) -> bool:
        """Ask for a kick on the next buffer; True if buffers raced in meanwhile."""
        ...

    def fill_rx(self, messages: Sequence[bytes]) -> Filled:
        """Write ``messages`` in order, one per available chain, and publish them.

        A chain that cannot take its message (an error, a device-readable buffer, too few
        writable bytes) is refused and given back empty, and the message tries the next
        one.  Looks at no more chains than one read of the avail idx shows.
        """
        ...

    def put_one(self, message: bytes) -> Put:
        """:meth:`fill_rx` of one message, then :meth:`need_notify` (see :data:`Put`):
        the single-message path of a sender, without a :class:`Filled` per message."""
        ...

    def read_chain(self, chain: Chain, limit: int | None = None, offset: int = 0) -> bytes:
        """Up to ``limit`` device-readable bytes of ``chain``, from ``offset`` on."""
        ...

    def write_chain(self, chain: Chain, data: bytes | bytearray | memoryview,
                    offset: int = 0) -> int:
        """Copy ``data`` into the writable buffers of ``chain``; returns bytes written."""
        ...

