"""The "cffi" engine: the :class:`~.queue.Queue` contract with its loops in C.

:class:`CffiQueue` gives the same results as the Python reference engine on every
ring, well formed or hostile (tests/test_engine_differential.py holds it to that): the
same :class:`~.queue.Chain` objects, errors, exceptions, stats, ring
bytes and payload bytes.  The chain walks, used-ring stores, fences and payload copies
run in ``cext/vring.c``; everything with policy in it (stats, logging, QueueBroken)
stays in Python.

Memory safety.  C gets raw pointers, so this module makes sure they always point at live
mappings and that C never goes outside them:

* the region table handed to C holds a buffer export (``ffi.from_buffer``) of each
  region's array, so a region unmapped by the back-end (``Region.close``) stays mapped
  until the last table that names it is dropped;
* a table is rebuilt whenever ``GuestMemory.generation`` moves, and each C call works on
  an immutable snapshot (ring pointers + table) taken into a local first, so a table
  change on another thread never swaps pointers under a running call;
* while the state is unmapped, or when the queue size no longer matches the mapped
  rings, every method hands over to the Python engine it holds (composition: one
  ``PythonQueue`` over the same state), which fails exactly as it does there;
* a chain records the table generation it was translated under, and copies through a
  chain from another generation raise :class:`~.queue.StaleChain`;
  payload copies still re-check every byte range against the current table, and a chain
  that does not fit it (made up or modified by the caller) is handed to the Python
  engine, which gives its own result for it;
* :meth:`CffiQueue.pop_raw_batch` has C write the per-chain results straight into
  a fresh block, bounded by its capacity, whose numpy views the returned
  :class:`~.queue.RawBatch` owns, and the payloads into a scratch buffer
  copied out as one ``bytes``: nothing the caller holds is ever reused.
"""

from __future__ import annotations

import itertools
import operator
from array import array
from collections.abc import Sequence
from typing import Any, ClassVar

import numpy as np
from _vhost_rpmsg_vring import ffi, lib  # cext/build_vring.py

from .memory import GuestMemory
from .queue import (
    U32_MAX,
    Chain,
    ChainError,
    Filled,
    Located,
    Put,
    QueueBroken,
    QueueState,
    RawBatch,
    Segment,
    Taken,
    ring_sizes,
    stale_chain,
    used_entries_array,
    used_heads_array,
    used_length,
)
from .queue_python import PythonQueue

__all__ = ["CffiQueue", "full_fence"]

_ERRORS: list[ChainError] = sorted(ChainError, key=int)
if [int(e) for e in _ERRORS] != list(range(len(_ERRORS))) or lib.VR_CHAIN_OK != 0:
    raise ImportError("ChainError values no longer match cext/vring.h")

_raw_alloc = ffi.new_allocator(should_clear_after_alloc=False)

_CHAINS0 = 64  # initial per-chain capacity (grows to the queue size at most)
_SEGS0 = 256  # initial segment capacity (grows as chains need)
_DATA0 = 1 << 16  # initial payload buffer of pop_raw_batch (grows as chains need)


def full_fence() -> None:
    """A real full memory barrier (``__atomic_thread_fence(__ATOMIC_SEQ_CST)``)."""
    lib.vr_full_fence()


class _Table:
    """A C region table for one generation of a GuestMemory.

    Holds an export of every region's array: while this object lives, no mapping it names
    can be unmapped (``mmap.close`` refuses while exports exist).
    """

    __slots__ = ("count", "generation", "keep", "mem", "ok", "regions", "sizes", "views")

    def __init__(self, mem: GuestMemory) -> None:
        self.mem = mem
        self.generation = mem.generation  # read before the list: a race only rebuilds again
        regs = list(mem.regions)
        self.count = len(regs)
        self.regions = ffi.new("vr_region[]", max(1, len(regs)))
        self.keep: list[Any] = []
        # For one-segment copies, checked here and done without a C call: the region's
        # bytes as a memoryview (another export that keeps the mapping) and its size.
        self.views: list[memoryview] = []
        self.sizes: list[int] = []
        self.ok = True
        for i, r in enumerate(regs):
            arr = r.mem
            if arr.size < r.size or arr.size == 0:
                self.ok = False  # a closed region still listed: let Python handle it
                continue
            buf = ffi.from_buffer("uint8_t[]", arr, require_writable=True)
            self.keep.append(buf)
            self.views.append(arr.data[: r.size])
            self.sizes.append(r.size)
            e = self.regions[i]
            e.base = buf
            e.gpa = r.gpa
            e.size = r.size


class _State:
    """Immutable snapshot: ring pointers (exports of the queue's ring views) + a table."""

    __slots__ = ("keep", "ring", "size", "table")

    def __init__(self, q: QueueState, table: _Table, keep: tuple[Any, ...] | None = None) -> None:
        self.table = table
        self.size = q.size
        if keep is None:
            keep = (
                ffi.from_buffer("uint8_t[]", q.desc, require_writable=True),
                ffi.from_buffer("uint8_t[]", q.avail, require_writable=True),
                ffi.from_buffer("uint8_t[]", q.used16, require_writable=True),
            )
        self.keep = keep
        desc, avail, used = keep
        n = self.size
        dlen, alen, ulen = ring_sizes(n)
        if len(desc) < dlen or len(avail) < alen or len(used) < ulen:
            raise ValueError("ring views smaller than the queue size")  # not reached via map()
        ring = ffi.new("vr_ring *")
        ring.desc = desc
        ring.avail = avail
        ring.used = used
        ring.size = n
        ring.nregions = table.count
        ring.regions = table.regions
        self.ring = ring

    def with_table(self, q: QueueState, table: _Table) -> _State:
        return _State(q, table, self.keep)


class _Batch:
    """Reusable output arrays for vr_pop_batch (used under the queue lock only)."""

    def __init__(self, chains: int = _CHAINS0, segs: int = _SEGS0) -> None:
        self.b = ffi.new("vr_batch *")
        self.keep: dict[str, Any] = {}
        self.chain_cap = 0
        self.seg_cap = 0
        self.grow_chains(chains)
        self.grow_segs(segs)

    def _arr(self, name: str, ctype: str, n: int) -> None:
        a = ffi.new(f"{ctype}[]", n)
        self.keep[name] = a
        setattr(self.b, name, a)

    def grow_chains(self, n: int) -> None:
        for name, ctype in (
            ("heads", "uint32_t"), ("errors", "uint8_t"), ("seg_start", "uint32_t"),
            ("nread", "uint32_t"), ("nwrite", "uint32_t"), ("read_len", "uint64_t"),
            ("write_len", "uint64_t"),
        ):
            self._arr(name, ctype, n)
        self.chain_cap = n

    def grow_segs(self, n: int) -> None:
        for name, ctype in (
            ("seg_region", "uint32_t"), ("seg_off", "uint64_t"), ("seg_len", "uint32_t"),
            ("seg_writable", "uint8_t"),
        ):
            self._arr(name, ctype, n)
        self.seg_cap = n
        self.b.seg_cap = n


class _Raw:
    """Reusable scratch of vr_pop_raw: the struct, one chain's segments, the payload buffer.

    Used under the queue lock only; the per-chain arrays are fresh for every batch.
    """

    def __init__(self, segs: int = _SEGS0, data: int = _DATA0) -> None:
        self.r = ffi.new("vr_raw *")
        self.keep: dict[str, Any] = {}
        self.seg_cap = 0
        self.data_cap = 0
        self.data_view: Any = None  # ffi.buffer of the whole data buffer, sliced to bytes
        self.grow_segs(segs)
        self.grow_data(data, 0)

    def grow_segs(self, n: int) -> None:
        for name, ctype in (
            ("seg_region", "uint32_t"), ("seg_off", "uint64_t"), ("seg_len", "uint32_t"),
            ("seg_writable", "uint8_t"),
        ):
            a = ffi.new(f"{ctype}[]", n)
            self.keep[name] = a
            setattr(self.r, name, a)
        self.seg_cap = n
        self.r.seg_cap = n

    def grow(self, status: int) -> None:
        """Grow what a vr_pop_raw that returned ``status`` (VR_POP_NEED_*) ran short of,
        keeping the data the batch has so far."""
        r = self.r
        if status == lib.VR_POP_NEED_SEGS:
            self.grow_segs(max(2 * self.seg_cap, r.need))
        else:
            self.grow_data(max(2 * self.data_cap, r.need), r.data_used)

    def grow_data(self, n: int, keep: int) -> None:
        """A data buffer of ``n`` bytes holding the first ``keep`` bytes of the old one."""
        a = _raw_alloc("uint8_t[]", n)
        if keep:
            ffi.memmove(a, self.keep["data"], keep)
        self.keep["data"] = a
        self.r.data = a
        self.r.data_cap = n
        self.data_cap = n
        self.data_view = ffi.buffer(a)


class _Take:
    """vr_take_one's struct and its one-chain block, over the queue's vr_pop_raw scratch
    (shared with pop_raw_batch, so buffers grown by either serve both)."""

    def __init__(self, rw: _Raw) -> None:
        self.rw = rw
        self.t = ffi.new("vr_take *")
        self.block = _raw_alloc("int64_t[]", (_RAW_BYTES + 7) // 8)
        self.t.block = self.block


class _Fill:
    """Reusable arrays of vr_fill_rx for one queue size (used under the queue lock only):
    room for the segments of any chain (2 * size + 1) and a refusal per chain shown."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.f = ffi.new("vr_fill *")
        self.keep: dict[str, Any] = {}
        self.grow_segs(2 * size + 1)
        f = self.f
        for name, ctype in (("ref_head", "uint32_t"), ("ref_kind", "uint8_t"),
                            ("ref_detail", "uint64_t"), ("ref_msg", "uint32_t")):
            a = ffi.new(f"{ctype}[]", size)
            self.keep[name] = a
            setattr(f, name, a)
        self.keep["used_ent"] = f.used_ent = ffi.new("uint32_t[]", 2 * size)
        f.ref_cap = size
        self.one = ffi.new("uint64_t[1]")  # put_one's message length

    def grow_segs(self, n: int) -> None:
        for name, ctype in (
            ("seg_region", "uint32_t"), ("seg_off", "uint64_t"), ("seg_len", "uint32_t"),
            ("seg_writable", "uint8_t"),
        ):
            a = ffi.new(f"{ctype}[]", n)
            self.keep[name] = a
            setattr(self.f, name, a)
        self.f.seg_cap = n


_U32 = np.dtype(np.uint32)
_U8 = np.dtype(np.uint8)
_BOOL = np.dtype(np.bool_)
_I64 = np.dtype(np.int64)
_RAW_BYTES = lib.VR_RAW_CHAIN_BYTES
_frombuffer = np.frombuffer


def _u64(n: int) -> int:
    """A byte limit for C: below 0 is 0, beyond uint64 is the most there is."""
    return min(max(n, 0), (1 << 64) - 1)


def _pack(segs: Sequence[Segment]) -> Any:
    """Segments as a C uint64_t[3 * n]; None if they are not plain (region, off, len)."""
    n = len(segs)
    try:
        if n == 1:
            seg = segs[0]
            if len(seg) != 3:
                return None
            return ffi.new("uint64_t[3]", seg)
        flat = list(itertools.chain.from_iterable(segs))
        if len(flat) != 3 * n:
            return None
        return ffi.new("uint64_t[]", flat)
    except (OverflowError, TypeError, ValueError):
        return None


class CffiQueue:
    """The C engine over one :class:`~.queue.QueueState`; results identical to Python's."""

    name: ClassVar[str] = "cffi"

    def __init__(self, state: QueueState) -> None:
        self.state = state
        self.reference = PythonQueue(state)  # for what only the Python engine may do
        self._batch: _Batch | None = None
        self._raw: _Raw | None = None
        self._fill: _Fill | None = None
        self._take: _Take | None = None

    def _current(self) -> _State | None:
        """The snapshot to hand C, or None where only the Python engine may act."""
        q = self.state
        mem = q.mem
        if mem is None:  # unmapped (map() sets it, unmap() clears it and the snapshot)
            return None
        st = q.snapshot
        if not isinstance(st, _State):
            st = _State(q, _Table(mem))
            q.snapshot = st
        if st.size != q.size:
            return None
        if st.table.generation != mem.generation or st.table.mem is not mem:
            st = st.with_table(q, _Table(mem))
            q.snapshot = st
        return st if st.table.ok else None

    def pending(self) -> int:
        return self.reference.pending()

    def has_available(self) -> bool:
        return self.reference.has_available()

    def unpop(self, count: int) -> None:
        self.reference.unpop(count)

    # -- batch operations ------------------------------------------------------------

    def pop_batch(self, max_chains: int) -> list[Chain]:
        """Take up to ``max_chains`` available chains, each validated and translated."""
        st = self._current()
        if st is None or type(max_chains) is not int:
            return self.reference.pop_batch(max_chains)
        return self._pop(st, max_chains)

    def _pop(self, st: _State, max_chains: int) -> list[Chain]:
        with self.state.lock:
            want = max(0, min(max_chains, st.size))
            bt = self._batch
            if bt is None:
                bt = self._batch = _Batch()
            if want > bt.chain_cap:
                bt.grow_chains(max(want, 2 * bt.chain_cap))
            b = bt.b
            b.max_chains = want
            b.flags = lib.VR_F_INDIRECT if self.state.indirect else 0
            b.last_avail = self.state.last_avail_idx
            status = lib.vr_pop_batch(st.ring, b)
            if status == lib.VR_POP_AHEAD:
                raise QueueBroken(f"avail idx {b.avail_idx} is {b.pending} ahead of "
                                  f"{self.state.last_avail_idx}")
            out: list[Chain] = []
            nbad = 0
            generation = st.table.generation
            while True:
                self._collect(bt, out, generation)
                nbad += b.nbad
                if status == lib.VR_POP_DONE:
                    break
                # VR_POP_NEED_SEGS: with no payload buffer, nothing else can run short
                bt.grow_segs(max(2 * bt.seg_cap, b.need))
                b.flags |= lib.VR_F_CONTINUE
                b.max_chains = b.total - len(out)
                status = lib.vr_pop_batch(st.ring, b)
            self.state.last_avail_idx = b.last_avail
            total = b.total  # fewer than asked when the walk budget ran out
            if total > 0:
                self.state.stats.popped += total
                self.state.stats.bad_chains += nbad
            return out

    @staticmethod
    def _collect(bt: _Batch, out: list[Chain], generation: int) -> None:
        b = bt.b
        k = b.nchains
        if not k:
            return
        unpack = ffi.unpack
        ns = b.nsegs
        segs = list(zip(unpack(b.seg_region, ns), unpack(b.seg_off, ns),
                        unpack(b.seg_len, ns), strict=True))
        heads = unpack(b.heads, k)
        errs = unpack(b.errors, k)
        starts = unpack(b.seg_start, k)
        nread = unpack(b.nread, k)
        nwrite = unpack(b.nwrite, k)
        rlen = unpack(b.read_len, k)
        wlen = unpack(b.write_len, k)
        errors = _ERRORS
        append = out.append
        for i in range(k):
            s = starts[i]
            m = s + nread[i]
            append(Chain(heads[i], errors[errs[i]], segs[s:m], segs[m : m + nwrite[i]],
                         rlen[i], wlen[i], generation))

    def pop_raw_batch(self, max_chains: int, limit: int) -> RawBatch:
        """Take up to ``max_chains`` chains with up to ``limit`` readable bytes of each.

        One C call fills the :class:`~.queue.RawBatch` arrays; no Python
        object is made per chain.
        """
        max_chains = operator.index(max_chains)
        limit = operator.index(limit)
        st = self._current()
        if st is None:
            return self.reference.pop_raw_batch(max_chains, limit)
        return self._pop_raw(st, max_chains, limit, None)

    def pop_located(self, max_chains: int, head: int, limit: int) -> Located:
        """:meth:`pop_raw_batch` with one-segment chains left in place (``VR_F_LOCATE``):
        the same C call, three more arrays."""
        max_chains = operator.index(max_chains)
        head = operator.index(head)
        limit = operator.index(limit)
        st = self._current()
        if st is None:
            return self.reference.pop_located(max_chains, head, limit)
        n = max(0, min(max_chains, st.size))
        where = (np.empty(n, np.int32), np.empty(n, np.int64), np.empty(n, np.int64))
        rb = self._pop_raw(st, max_chains, limit, (head, *where))
        k = rb.count
        return Located(rb, where[0][:k], where[1][:k], where[2][:k])

    def _pop_raw(self, st: _State, max_chains: int, limit: int,
                 locate: tuple[int, np.ndarray, np.ndarray, np.ndarray] | None) -> RawBatch:
        with self.state.lock:
            last = self.state.last_avail_idx
            # A first look at the avail idx sizes the arrays (and answers an idle poll
            # without C); C reads it again with acquire ordering and pops at most n.
            idx = int(self.state.avail[1])
            pending = (idx - last) & 0xFFFF
            if pending > st.size:
                raise QueueBroken(f"avail idx {idx} is {pending} ahead of {last}")
            n = min(pending, max_chains)
            if n <= 0:
                return RawBatch.empty()
            rw = self._raw_scratch()
            r = rw.r
            # All per-chain arrays in one fresh block (int64 units: 8-byte aligned), laid
            # out by C; the batch's arrays are views of it, made once the count is known.
            block = _raw_alloc("int64_t[]", (_RAW_BYTES * n + 7) // 8)
            flags = lib.VR_F_INDIRECT if self.state.indirect else 0
            if locate is not None:
                head, region, offset, read_len = locate
                flags |= lib.VR_F_LOCATE
                r.head_limit = _u64(head)
                r.loc_region = ffi.from_buffer("int32_t[]", region)
                r.loc_off = ffi.from_buffer("int64_t[]", offset)
                r.read_len = ffi.from_buffer("int64_t[]", read_len)
            try:
                status = lib.vr_pop_raw(st.ring, r, block, n, last, flags,
                                        _u64(limit))  # < 0: b""
                while status != lib.VR_POP_DONE:
                    if status == lib.VR_POP_AHEAD:  # it moved under us; the guest's doing
                        raise QueueBroken(f"avail idx {r.avail_idx} is {r.pending} ahead of "
                                          f"{last}")
                    rw.grow(status)
                    status = lib.vr_pop_raw(st.ring, r, block, n, last, lib.VR_F_CONTINUE, 0)
            finally:
                if locate is not None:  # no pointer into arrays that die with this call
                    r.loc_region = r.loc_off = r.read_len = ffi.NULL
            k = r.total
            self.state.last_avail_idx = r.last_avail
            nbad = r.nbad
            stats = self.state.stats
            stats.popped += k
            stats.bad_chains += nbad
            data = rw.data_view[: r.data_used]
            buf = ffi.buffer(block)
            return RawBatch(_frombuffer(buf, _U32, k, 16 * n), _frombuffer(buf, _U8, k, 20 * n),
                            _frombuffer(buf, _BOOL, k, 21 * n), _frombuffer(buf, _I64, k, 8 * n),
                            _frombuffer(buf, _I64, k, 0), data, nbad, r.nwritable, r.nhead_bad)

    def _raw_scratch(self) -> _Raw:
        rw = self._raw
        if rw is None:
            rw = self._raw = _Raw()
        return rw

    def take_one(self, limit: int) -> Taken | None:
        """The single-message path in one C call (``vr_take_one``): pop, copy, give back,
        notification decision, kicks re-armed; no array is made."""
        st = self._current()
        if st is None or type(limit) is not int:
            return self.reference.take_one(limit)
        state = self.state
        with state.lock:
            tk = self._take
            if tk is None:
                tk = self._take = _Take(self._raw_scratch())
            t = tk.t
            t.flags = lib.VR_F_INDIRECT if state.indirect else 0
            t.event_idx = state.event_idx
            t.limit = _u64(limit)
            t.last_avail = state.last_avail_idx
            t.used_idx = state.used_idx
            t.signalled = state.signalled_used
            rw = tk.rw
            status = lib.vr_take_one(st.ring, rw.r, t)
            while status:  # nothing was taken: grow what ran short and take again
                if status == lib.VR_POP_AHEAD:
                    raise QueueBroken(f"avail idx {t.avail_idx} is {t.pending} ahead of "
                                      f"{state.last_avail_idx}")
                rw.grow(status)  # (data_used is 0: nothing was taken)
                status = lib.vr_take_one(st.ring, rw.r, t)
            if not t.taken:
                return None
            state.last_avail_idx = t.last_avail
            state.used_idx = t.used_idx
            state.signalled_used = t.signalled
            error = t.error
            stats = state.stats
            stats.popped += 1
            if error:
                stats.bad_chains += 1
            stats.pushed += t.returned
            return (t.head, error, bool(t.writable), rw.data_view[0 : t.length],
                    bool(t.notify), bool(t.more))

    def split_headers(self, rb: RawBatch, size: int) -> np.ndarray:
        """The first ``size`` bytes of every chain of ``rb``, zero-filled: one C call."""
        n = rb.count
        if not n or not size:
            return np.zeros((n, size), np.uint8)
        out = np.empty((n, size), np.uint8)
        got = lib.vr_split_headers(
            ffi.from_buffer(rb.data), len(rb.data), ffi.from_buffer("int64_t[]", rb.offsets),
            ffi.from_buffer("int64_t[]", rb.lengths), n, size, ffi.from_buffer("uint8_t[]", out))
        if got < 0:
            raise ValueError("raw batch offsets and lengths do not fit its data")
        return out

    def push_used(self, heads: np.ndarray, length: int) -> None:
        """Publish every head of ``heads`` (a uint32 array) with the same used ``length``."""
        if not (type(heads) is np.ndarray and heads.dtype is _U32 and heads.ndim == 1
                and heads.flags.c_contiguous):
            heads = used_heads_array(heads)
        if type(length) is not int or not 0 <= length <= U32_MAX:
            length = used_length(length)
        n = len(heads)
        if not n:
            return None
        st = self._current()
        if st is None:
            return self.reference.push_used(heads, length)
        self.state.used_idx = lib.vr_push_used(st.ring, self.state.used_idx,
                                               ffi.from_buffer("uint32_t[]", heads), n, length)
        self.state.stats.pushed += n
        return None

    def push_batch(self, entries: list[tuple[int, int]] | np.ndarray) -> None:
        """Publish (head, bytes written) pairs on the used ring, then the new used idx.

        ``entries`` is a list of pairs or an (n, 2) array of them; a C-contiguous uint32
        array goes to C as it is.
        """
        if isinstance(entries, np.ndarray):
            arr = entries
            if not (arr.dtype is _U32 and arr.ndim == 2 and arr.shape[1] == 2
                    and arr.flags.c_contiguous):
                arr = used_entries_array(arr)
            n = len(arr)
            if not n:
                return None
            st = self._current()
            if st is None:
                return self.reference.push_batch(arr)
            self.state.used_idx = lib.vr_push_batch(st.ring, self.state.used_idx,
                                                    ffi.from_buffer("uint32_t[]", arr), n)
            self.state.stats.pushed += n
            return None
        if not entries:
            return None
        st = self._current()
        if st is None:
            return self.reference.push_batch(entries)
        try:
            flat = array("I", itertools.chain.from_iterable(entries))
        except (OverflowError, TypeError, ValueError):
            flat = None
        if flat is None or len(flat) != 2 * len(entries) or flat.itemsize != 4:
            return self.reference.push_batch(entries)  # fails (or not) exactly as Python does
        self.state.used_idx = lib.vr_push_batch(st.ring, self.state.used_idx,
                                          ffi.from_buffer("uint32_t[]", flat), len(entries))
        self.state.stats.pushed += len(entries)
        return None

    def need_notify(self) -> bool:
        """Whether the guest asked to be interrupted for what we pushed since last time."""
        st = self._current()
        if st is None:
            return self.reference.need_notify()
        return self._notify_decision(st)

    def _notify_decision(self, st: _State) -> bool:
        state = self.state
        new, old = state.used_idx, state.signalled_used
        state.signalled_used = new
        return bool(lib.vr_need_notify(st.ring, new, old, 1 if state.event_idx else 0))

    def disable_kicks(self) -> None:
        """Tell the guest not to kick while we are draining the ring anyway."""
        st = self._current()
        if st is None:
            return self.reference.disable_kicks()
        lib.vr_disable_kicks(st.ring, 1 if self.state.event_idx else 0)
        return None

    def enable_kicks(self) -> bool:
        """Ask for a kick on the next buffer; True if buffers raced in meanwhile."""
        st = self._current()
        if st is None:
            return self.reference.enable_kicks()
        return bool(lib.vr_enable_kicks(st.ring, self.state.last_avail_idx,
                                        1 if self.state.event_idx else 0))

    def fill_rx(self, messages: Sequence[bytes]) -> Filled:
        """Write ``messages`` in order, one per available chain, and publish them: one C
        call (walks, copies, used elements, one used idx store) for the whole batch."""
        st = self._current()
        if st is None:
            return self.reference.fill_rx(messages)
        try:
            data = ffi.from_buffer("uint8_t[]", b"".join(messages))
            lens = ffi.new("uint64_t[]", [len(m) for m in messages])
        except TypeError:  # not all bytes-like: whatever the Python engine makes of them
            return self.reference.fill_rx(messages)
        n = len(messages)
        with self.state.lock:
            written, refused, exhausted = self._fill_rx(st, data, lens, n)
            return Filled(written, refused, exhausted)

    def put_one(self, message: bytes) -> Put:
        """``vr_fill_rx`` of one message and ``vr_need_notify``: two C calls, no list."""
        st = self._current()
        if st is None or type(message) is not bytes:
            return self.reference.put_one(message)
        state = self.state
        with state.lock:
            one = self._fill_scratch(st).one
            one[0] = len(message)
            written, refused, exhausted = self._fill_rx(st, message, one, 1)
            return written, refused, exhausted, self._notify_decision(st)

    def _fill_scratch(self, st: _State) -> _Fill:
        fb = self._fill
        if fb is None or fb.size != st.size:
            fb = self._fill = _Fill(st.size)
        return fb

    def _fill_rx(self, st: _State, data: Any, lens: Any, n: int
                 ) -> tuple[int, list[tuple[int, int, int, int]], bool]:
        """One ``vr_fill_rx`` (under the queue lock): written, refused, exhausted."""
        f = self._fill_scratch(st).f
        state = self.state
        f.flags = lib.VR_F_INDIRECT if state.indirect else 0
        f.last_avail = state.last_avail_idx
        f.used_idx = state.used_idx
        status = lib.vr_fill_rx(st.ring, f, data, lens, n)
        if status == lib.VR_POP_AHEAD:
            raise QueueBroken(f"avail idx {f.avail_idx} is {f.pending} ahead of "
                              f"{state.last_avail_idx}")
        if status != lib.VR_POP_DONE:  # more segments than 2 * size + 1: not reached
            raise AssertionError(f"vr_fill_rx returned {status}")
        state.last_avail_idx = f.last_avail
        state.used_idx = f.used_idx
        stats = state.stats
        stats.popped += f.popped
        stats.bad_chains += f.nbad
        stats.pushed += f.pushed
        k = f.nrefused
        refused = (list(zip(ffi.unpack(f.ref_head, k), ffi.unpack(f.ref_kind, k),
                            ffi.unpack(f.ref_detail, k), ffi.unpack(f.ref_msg, k),
                            strict=True)) if k else [])
        return f.written, refused, bool(f.exhausted)

    # -- payload copies ------------------------------------------------------------------

    def read_chain(self, chain: Chain, limit: int | None = None, offset: int = 0) -> bytes:
        """Up to ``limit`` device-readable bytes of ``chain``, starting ``offset`` bytes in."""
        st = self._current()
        if st is None or type(offset) is not int or offset < 0:
            return self.reference.read_chain(chain, limit, offset)
        if chain.generation != st.table.generation:
            raise stale_chain(chain, st.table.generation)
        want = chain.read_len - offset if limit is None else min(limit, chain.read_len - offset)
        segs = chain.readable
        if want <= 0 or not segs:
            return b""
        t = st.table
        try:
            if len(segs) == 1:  # the common case: a crossing into C costs more than it saves
                r, off, length = segs[0]
                if offset >= length:
                    return b""
                take = min(length - offset, want)
                start = off + offset
                if 0 <= r < t.count and start >= 0 and start + take <= t.sizes[r]:
                    return t.views[r][start : start + take].tobytes()
            else:
                packed = _pack(segs)
                if packed is not None:
                    out = _raw_alloc("uint8_t[]", want)
                    got = lib.vr_gather(t.regions, t.count, packed, len(segs), offset, want, out)
                    if got >= 0:
                        return ffi.buffer(out, got)[:]
        except (OverflowError, TypeError, ValueError):
            pass
        # Not a chain this memory holds (it changed since the pop, or the chain was made
        # up): whatever the Python engine makes of it.
        return self.reference.read_chain(chain, limit, offset)

    def write_chain(self, chain: Chain, data: bytes | bytearray | memoryview,
                    offset: int = 0) -> int:
        """Copy ``data`` into the writable buffers of ``chain`` from ``offset`` on.

        Returns the bytes written (less than ``len(data)`` if the chain is shorter).
        """
        st = self._current()
        if st is None or type(offset) is not int or offset < 0:
            return self.reference.write_chain(chain, data, offset)
        if chain.generation != st.table.generation:
            raise stale_chain(chain, st.table.generation)
        src = memoryview(data)
        if src.format != "B" or src.ndim != 1 or not src.c_contiguous:
            return self.reference.write_chain(chain, data, offset)
        total = len(src)
        segs = chain.writable
        if total == 0 or not segs:
            return 0
        t = st.table
        try:
            if len(segs) == 1:
                r, off, length = segs[0]
                if offset >= length:
                    return 0
                take = min(length - offset, total)
                start = off + offset
                if 0 <= r < t.count and start >= 0 and start + take <= t.sizes[r]:
                    t.views[r][start : start + take] = src[:take]
                    return take
            else:
                packed = _pack(segs)
                if packed is not None:
                    got = lib.vr_scatter(t.regions, t.count, packed, len(segs), offset,
                                         ffi.from_buffer("uint8_t[]", src), total)
                    if got >= 0:  # checked before any byte was written
                        return int(got)
        except (OverflowError, TypeError, ValueError):
            pass
        return self.reference.write_chain(chain, data, offset)
