"""The simulated guest's C fast path (``_vhost_rpmsg_guest``, cext/guest_ring.c).

:class:`SimGuest` picks it when the extension is importable (``fast=None``), requires it
(``fast=True``) or leaves it out (``fast=False``).  It changes how fast the guest runs,
nothing else: the rings get the same bytes, the same kick decisions are made, the stats
and counting endpoints end the same, the same messages reach the same inboxes in the same
order as on the Python path (tests/test_guest_fastpath.py compares the two).

Split of the work:

* tx bursts (send_burst) run in C from start to end except for the select() while
  waiting for buffers: C fills tx buffers, descriptors and avail slots, publishes and
  kicks, takes the interrupt eventfd and the used entries, and waits the way
  SimGuest._get_tx_buf does (enable interrupts, look again, then hand back to Python to
  sleep).  For that C holds a copy of the tx bookkeeping for the burst (DriverRing.free,
  chain_len, avail_idx, last_used, last_kicked; SimGuest.tx_free, tx_inflight), loaded
  from the Python objects when the burst starts and stored back into them when it ends
  (or before any step the Python path must take itself): one sync per burst, nothing per
  message.  Bursts smaller than TX_C_MIN, whose sync would cost more than the Python
  loop, stay on the Python path.
* rx drains: C reads used entries, checks received buffers, counts the ones for
  counting endpoints and re-posts rx buffers; Python keeps the rx bookkeeping where the
  Python path keeps it (DriverRing.free, chain_len; SimGuest.rx_bufs), hands C the values
  it would pop (the tops of its stacks) and applies C's results with bulk list and dict
  operations.
* Python paths used elsewhere (send, send_chain, post_rx_chain, reclaim, reset) work on
  the Python objects, which are always what the Python path would have left between
  operations.
* Anything unusual goes to the Python path before any state changes: used entries that
  are not outstanding one-descriptor chains (hostile devices, test chains), rx buffers
  kept instead of re-posted (``repost_rx = False``), a descriptor stack too short for a
  batch, bookkeeping C cannot represent.  So do rx batches too small for C to pay off
  (RX_C_MIN): single-message round trips cost what they cost on the Python path.
  Messages for the name service and inbox endpoints are copied out by C and dispatched
  by SimGuest.deliver in ring order.

Memory safety: C works on an export of the guest RAM array taken for one operation (a
drain, a burst) and released when it ends, so the mapping cannot go away under C and
closing the guest is never held up by a stale export; C checks every range against the
RAM's size, and validates every value the device wrote before using it.
"""

from __future__ import annotations

import array
import collections
import logging
import os
import select
import time
import weakref
from itertools import repeat
from typing import TYPE_CHECKING, Any, Literal

from ..rpmsg import codec as rp
from ..virtio.constants import VIRTIO_RPMSG_F_NS
from .ring import DriverRing

if TYPE_CHECKING:
    from .rpmsg_guest import SimGuest

try:
    from _vhost_rpmsg_guest import ffi, lib
except ImportError as e:  # the extension is not built
    IMPORT_ERROR: ImportError | None = e
    ffi = lib = None
else:
    IMPORT_ERROR = None

__all__ = ["IMPORT_ERROR", "FastPathUnavailable", "GuestFastPath", "available", "load"]

# The Python path's logger: the same records whichever path runs.
log = logging.getLogger(__package__ + ".rpmsg_guest")

RX, TX = 0, 1  # SimGuest's queue indices
RX_CAP = 1024  # most used entries one C rx drain takes (the Linux driver posts <= 256)
# Fewer used entries than this are drained by the Python loop: below it the fixed cost
# of a C drain (binding, bulk bookkeeping) exceeds the Python per-message cost, and
# single-message round trips (echo latency) would get slower.  Same results either way.
RX_C_MIN = 3
# send_burst counts below this stay on the Python loop: loading the tx bookkeeping into C
# and storing it back (20-50 us, more with more chains outstanding) costs what the
# Python loop spends on 16-32 messages.  Same results either way.
TX_C_MIN = 32


class FastPathUnavailable(RuntimeError):
    """``fast=True`` where ``_vhost_rpmsg_guest`` cannot be imported."""


def available() -> bool:
    return IMPORT_ERROR is None


def load(fast: bool | None, queue_size: int) -> GuestFastPath | None:
    """The fast path a guest with ``fast`` (None: auto) should use, or None for Python."""
    if fast is False:
        return None
    if IMPORT_ERROR is not None:
        if fast:
            raise FastPathUnavailable(
                "the simulated guest's C fast path is not built (_vhost_rpmsg_guest "
                f"cannot be imported: {IMPORT_ERROR}); build it with `pip install .` "
                "(needs a C compiler and cffi), or for a work tree "
                "`python cext/build_guest.py`")
        return None
    return GuestFastPath(queue_size)


_raw_alloc = ffi.new_allocator(should_clear_after_alloc=False) if ffi is not None else None


class _Scratch:
    """C arrays for one direction (tx or rx: each used under its own SimGuest lock)."""

    def __init__(self, cap: int, data: bool) -> None:
        assert ffi is not None and _raw_alloc is not None
        self.cap = cap
        self.ring = ffi.new("gr_ring *")
        self.depth = 0  # nesting of binds (see GuestFastPath._enter)
        self.buf: Any = None  # the RAM export while bound
        self.ring_of: weakref.ref[DriverRing] | None = None  # what self.ring describes
        self.heads = ffi.new("uint32_t[]", cap)
        self.lens = ffi.new("uint32_t[]", cap)
        self.gpas = ffi.new("uint64_t[]", cap)
        self.ids = ffi.new("uint32_t[]", cap)
        if data:
            self.actions = ffi.new("uint8_t[]", cap)
            self.rest = ffi.new("uint32_t[]", cap)
            self.post_gpas = ffi.new("uint64_t[]", cap)
            self.data = _raw_alloc("uint8_t[]", cap * rp.BUF_SIZE)
            self.data_mv = memoryview(ffi.buffer(self.data))
            x = self.rx = ffi.new("gr_rx *")
            x.lens, x.gpas, x.stack = self.lens, self.gpas, self.heads
            x.actions, x.rest, x.post_ids, x.post_gpas = (self.actions, self.rest, self.ids,
                                                          self.post_gpas)
            x.data = self.data
            self.ncounters = 0
            self.addrs: list[int] = []  # what caddr holds
            self.grow_counters(4)

    def grow_counters(self, n: int) -> None:
        assert ffi is not None
        self.ncounters = n
        self.caddr = ffi.new("uint32_t[]", n)
        self.cmsgs = ffi.new("uint64_t[]", n)
        self.cbytes = ffi.new("uint64_t[]", n)
        x = self.rx
        x.counter_addr, x.counter_msgs, x.counter_bytes = self.caddr, self.cmsgs, self.cbytes


# array type codes of the C types the tx bookkeeping is copied through
_Code = Literal["I", "Q", "q"]
U32: _Code = "I"
U64: _Code = "Q"
I64: _Code = "q"


def _view(arr: Any, code: _Code) -> memoryview:
    assert ffi is not None
    return memoryview(ffi.buffer(arr)).cast(code)


def _put(dst: Any, code: _Code, values: Any) -> int:
    """Copy ``values`` (a list) into the C array ``dst``; how many.  TypeError or
    OverflowError where a value is not an int of that C type."""
    assert ffi is not None
    a = array.array(code, values)
    if a:
        ffi.memmove(dst, a, len(a) * a.itemsize)
    return len(a)


class _TxState:
    """The C copy of the tx bookkeeping during a burst (gr_tx) and the arrays it uses."""

    def __init__(self, size: int) -> None:
        assert ffi is not None and _raw_alloc is not None
        assert (array.array(U32).itemsize, array.array(U64).itemsize,
                array.array(I64).itemsize) == (4, 8, 8)
        self.size = size
        t = self.t = ffi.new("gr_tx *")
        self.chain_len = _raw_alloc("uint32_t[]", size)
        self.inflight = _raw_alloc("int64_t[]", size)
        self.heads = _raw_alloc("uint32_t[]", size)
        t.chain_len, t.inflight, t.heads = self.chain_len, self.inflight, self.heads
        # chain_len and tx_inflight as key and value lists (no more keys than size)
        self.keys = _raw_alloc("uint32_t[]", size)
        self.lens = _raw_alloc("uint32_t[]", size)
        self.ikeys = _raw_alloc("uint32_t[]", size)
        self.gpas = _raw_alloc("int64_t[]", size)
        self.keys_v, self.lens_v = _view(self.keys, U32), _view(self.lens, U32)
        self.ikeys_v, self.gpas_v = _view(self.ikeys, U32), _view(self.gpas, I64)
        self.free: Any = None
        self.bufs: Any = None
        self.reserve(2 * size, 2 * size)
        # the Python objects loaded (DriverRing.free, SimGuest.tx_free, DriverRing.chain_len,
        # SimGuest.tx_inflight) while C holds their copy
        self.objects: tuple[list[int], list[int], dict[int, int], dict[int, int]] | None = None

    def reserve(self, nfree: int, nbufs: int) -> None:
        """Room for stacks of nfree ids and nbufs buffers."""
        assert _raw_alloc is not None
        t = self.t
        if self.free is None or nfree > t.free_cap:
            self.free = _raw_alloc("uint32_t[]", nfree)
            self.free_v = _view(self.free, U32)
            t.free, t.free_cap = self.free, nfree
        if self.bufs is None or nbufs > t.buf_cap:
            self.bufs = _raw_alloc("uint64_t[]", nbufs)
            self.bufs_v = _view(self.bufs, U64)
            t.bufs, t.buf_cap = self.bufs, nbufs


class GuestFastPath:
    """The C loops of one SimGuest (see the module docstring)."""

    def __init__(self, queue_size: int) -> None:
        # A batch of used entries that are all distinct outstanding chains is at most
        # the ring size; more goes to the Python path, which raises as it does.
        self.tx = _Scratch(1, data=False)  # the tx binding (bursts keep their own arrays)
        self.rx = _Scratch(max(1, min(queue_size, RX_CAP)), data=True)
        self.txs = _TxState(max(1, queue_size))

    # -- plumbing -------------------------------------------------------------------

    def _enter(self, s: _Scratch, g: SimGuest, ring: DriverRing) -> Any:
        """s.ring describing ``ring`` over an export of the guest RAM, until _exit.

        The export keeps the mapping alive while C uses it; it is released when the
        outermost bind ends, so closing the guest is never held up by a stale one.
        """
        assert ffi is not None
        if s.depth:
            if s.ring_of is None or s.ring_of() is not ring:
                raise RuntimeError("fast path bound to another ring")
            s.depth += 1
            return s.ring
        ram = g.ram
        if ram is None:
            raise ValueError("guest RAM is gone")
        buf = ffi.from_buffer("uint8_t[]", ram.mem)
        r = s.ring
        r.ram = buf
        r.ram_size = len(buf)
        if s.ring_of is None or s.ring_of() is not ring:
            lay = ring.layout
            r.desc, r.avail, r.used = lay.desc, lay.avail, lay.used
            r.size = ring.size
            r.event_idx = 1 if ring.event_idx else 0
            s.ring_of = weakref.ref(ring)
        s.buf = buf
        s.depth = 1
        return r

    @staticmethod
    def _exit(s: _Scratch) -> None:
        assert ffi is not None
        s.depth -= 1
        if not s.depth:
            s.ring.ram = ffi.NULL
            buf, s.buf = s.buf, None
            ffi.release(buf)

    def _read_used(self, s: _Scratch, r: Any,
                   ring: DriverRing) -> tuple[list[int], set[int]] | None:
        """The heads of DriverRing.get_used's entries (lens stay in s.lens), read only,
        and the same as a set.

        None when any entry is not an outstanding chain of one descriptor (or the ring
        cannot be read here): the caller then runs the Python path, which handles or
        raises exactly as it does.
        """
        assert ffi is not None and lib is not None
        n = lib.gr_used_read(r, ring.last_used, s.cap, s.heads, s.lens)
        if n <= 0:
            return ([], set()) if n == 0 else None
        heads: list[int] = ffi.unpack(s.heads, n)
        chain_len = ring.chain_len
        distinct = set(heads)
        if len(distinct) != n or not distinct <= chain_len.keys():
            return None
        if sum(map(chain_len.__getitem__, heads)) != n:  # every chain is >= 1 long
            return None
        return heads, distinct

    @staticmethod
    def _take_used(ring: DriverRing, heads: list[int]) -> None:
        """What DriverRing.get_used leaves behind for ``heads`` (from _read_used)."""
        collections.deque(map(ring.chain_len.pop, heads), 0)
        ring.free.extend(heads)
        ring.last_used = (ring.last_used + len(heads)) & 0xFFFF

    # -- tx -------------------------------------------------------------------------

    def send_burst(self, g: SimGuest, ring: DriverRing, msg: bytes, count: int,
                   timeout: float) -> bool:
        """SimGuest.send_burst of ``count`` copies of the encoded ``msg`` in C.

        False, having changed nothing, where the Python loop must run instead (a small
        count, bookkeeping C cannot take).  Otherwise True once the burst is done, or
        whatever the Python path raises (GuestTimeout, BufferError, ValueError,
        OSError) with the bookkeeping and stats as the Python path leaves them.
        """
        assert ffi is not None and lib is not None
        st = self.txs
        if not TX_C_MIN <= count < 1 << 63 or ring.size != st.size or g.ram is None:
            return False
        s = self.tx
        r = self._enter(s, g, ring)
        t = st.t
        src = ffi.from_buffer(msg)
        try:
            if not self._tx_load(g, ring, r):
                st.objects = None
                return False
            t.msg, t.len, t.left = src, len(msg), count
            t.call_fd, t.kick_fd = g.call[TX], g.kick[TX]
            t.want_irq = 1 if g.tx_interrupts else 0
            t.phase, t.wait_new = lib.GR_TX_TOP, 0
            self._tx_run(g, ring, r, msg, timeout)
            return True
        finally:
            t.msg = ffi.NULL
            ffi.release(src)
            self._exit(s)

    def _tx_run(self, g: SimGuest, ring: DriverRing, r: Any, msg: bytes,
                timeout: float) -> None:
        assert lib is not None
        t = self.txs.t
        owned = True  # the C copy is the bookkeeping (else the Python objects are)
        deadline = 0.0
        try:
            while True:
                rc = lib.gr_tx_run(r, t)
                if rc == lib.GR_TX_WAIT:  # _get_tx_buf's wait loop: nothing came back
                    now = time.monotonic()
                    if t.wait_new:
                        t.wait_new = 0
                        deadline = now + timeout
                    left = deadline - now
                    if left <= 0:
                        from .rpmsg_guest import GuestTimeout

                        raise GuestTimeout(f"no tx buffer came back in {timeout}s")
                    select.select([t.call_fd], [], [], left)
                    continue
                if rc == lib.GR_TX_DONE:
                    return
                if rc == lib.GR_TX_OS_ERROR:
                    raise OSError(t.err, os.strerror(t.err))
                if rc not in (lib.GR_TX_PY_RECLAIM, lib.GR_TX_PY_FILL):
                    raise RuntimeError(f"gr_tx_run failed ({rc})")
                # A step for the Python path, on the Python objects (it may raise).
                self._tx_store(g, ring, r)
                owned = False
                if rc == lib.GR_TX_PY_RECLAIM:
                    g.reclaim_used()
                else:
                    batch = t.batch
                    g.fill_tx(ring, msg, batch)
                    t.left -= batch
                    t.phase = lib.GR_TX_TOP
                if not self._tx_load(g, ring, r):
                    raise RuntimeError("tx bookkeeping the C path cannot take back")
                owned = True
        finally:
            if owned:
                self._tx_store(g, ring, r)

    def _tx_load(self, g: SimGuest, ring: DriverRing, r: Any) -> bool:
        """The C copy of the tx bookkeeping; False if C cannot represent it."""
        assert lib is not None
        st = self.txs
        t = st.t
        free, bufs, chain_len, inflight = ring.free, g.tx_free, ring.chain_len, g.tx_inflight
        m, mi = len(chain_len), len(inflight)
        nfree, nbufs = len(free), len(bufs)
        if max(m, mi) > st.size:
            return False
        st.reserve(nfree + m, nbufs + mi)
        try:
            _put(st.free, U32, free)
            _put(st.bufs, U64, bufs)
            if m:
                _put(st.keys, U32, list(chain_len))
                _put(st.lens, U32, list(chain_len.values()))
            if mi:
                _put(st.ikeys, U32, list(inflight))
                _put(st.gpas, I64, list(inflight.values()))
            t.avail_idx, t.last_kicked, t.last_used = (ring.avail_idx, ring.last_kicked,
                                                       ring.last_used)
        except (TypeError, OverflowError):  # not ids, lengths and addresses C can hold
            return False
        t.nfree, t.nbufs = nfree, nbufs
        st.objects = (free, bufs, chain_len, inflight)  # what _tx_store writes back into
        return lib.gr_tx_load(r, t, m, st.keys, st.lens, mi, st.ikeys, st.gpas) == 0

    def _tx_store(self, g: SimGuest, ring: DriverRing, r: Any) -> None:
        """The C copy back into the Python objects, and its stats into g.stats."""
        assert ffi is not None and lib is not None
        st = self.txs
        t = st.t
        assert st.objects is not None
        free, bufs, chain_len, inflight = st.objects
        st.objects = None
        free[:] = st.free_v[: t.nfree].tolist()
        bufs[:] = st.bufs_v[: t.nbufs].tolist()
        lib.gr_tx_store(r, t, st.keys, st.lens, st.ikeys, st.gpas)
        m, mi = t.nout, t.ninfl
        chain_len.clear()
        chain_len.update(zip(st.keys_v[:m].tolist(), st.lens_v[:m].tolist(), strict=True))
        inflight.clear()
        inflight.update(zip(st.ikeys_v[:mi].tolist(), st.gpas_v[:mi].tolist(), strict=True))
        ring.avail_idx, ring.last_kicked, ring.last_used = (t.avail_idx, t.last_kicked,
                                                           t.last_used)
        stats = g.stats
        stats.tx_messages += t.sent
        stats.tx_kicks += t.kicks
        stats.tx_interrupts += t.interrupts
        t.sent = t.kicks = t.interrupts = 0

    def enable_interrupts(self, g: SimGuest, ring: DriverRing, rx: bool = False) -> bool:
        """DriverRing.enable_interrupts with a real fence."""
        assert lib is not None
        s = self.rx if rx else self.tx
        r = self._enter(s, g, ring)
        try:
            more = lib.gr_enable_interrupts(r, ring.last_used)
        finally:
            self._exit(s)
        if more < 0:
            return ring.enable_interrupts()
        return bool(more)

    # -- rx -------------------------------------------------------------------------

    def rx_drain(self, g: SimGuest, ring: DriverRing) -> bool:
        """SimGuest._rx_drain; False, having changed nothing, if Python must do it."""
        assert ffi is not None and lib is not None
        if not g.repost_rx or g.ram is None:
            return False
        pending = (ring.used16.item(1) - ring.last_used) & 0xFFFF  # what get_used reads
        if not pending:
            return True  # nothing new: no need to bind
        if pending < RX_C_MIN:
            return False  # the Python loop is quicker for so few
        s = self.rx
        r = self._enter(s, g, ring)
        try:
            return self._rx_drain(s, r, g, ring)
        finally:
            self._exit(s)

    def _rx_drain(self, s: _Scratch, r: Any, g: SimGuest, ring: DriverRing) -> bool:
        assert ffi is not None and lib is not None
        rx_bufs = g.rx_bufs
        got = self._read_used(s, r, ring)
        if got is None:
            return False
        heads, distinct = got
        n = len(heads)
        if n == 0:
            return True
        if not rx_bufs.keys() >= distinct:
            return False
        gpas = list(map(rx_bufs.__getitem__, heads))
        if None in gpas:  # a chain a test posted on purpose
            return False
        self._take_used(ring, heads)
        collections.deque(map(rx_bufs.pop, heads), 0)
        s.gpas[0:n] = gpas

        # Counting endpoints C may count: not shadowed by the name service or an inbox.
        ns = bool(g.features & (1 << VIRTIO_RPMSG_F_NS))
        inbox = g.inbox
        addrs = [a for a in list(g.counts)
                 if a not in inbox and not (ns and a == rp.NS_ADDR) and 0 <= a <= 0xFFFFFFFF]
        k = len(addrs)
        if addrs != s.addrs:
            if k > s.ncounters:
                s.grow_counters(2 * k)
            s.caddr[0:k] = addrs
            s.addrs = addrs
        x = s.rx  # its array pointers were set with the scratch
        x.n = n
        x.nstack = n  # the top of ring.free (x.stack = s.heads): the heads just freed
        x.ncounters = k
        x.avail_idx = ring.avail_idx
        rc = lib.gr_rx_process(r, x)
        if rc != 0:  # cannot happen with buffers SimGuest allocated; nothing was stored
            raise RuntimeError(f"gr_rx_process failed ({rc})")

        # Bookkeeping for the re-posts, as DriverRing.add leaves it.
        reposted = x.reposted
        if reposted:
            post_ids: list[int] = ffi.unpack(s.ids, reposted)
            del ring.free[len(ring.free) - reposted:]
            ring.chain_len.update(zip(post_ids, repeat(1)))
            rx_bufs.update(zip(post_ids, ffi.unpack(s.post_gpas, reposted), strict=True))
            ring.avail_idx = (ring.avail_idx + reposted) & 0xFFFF
        if x.counted:
            counters = g.counts
            for c, addr in enumerate(addrs):
                m = s.cmsgs[c]
                if m:
                    counter = counters[addr]
                    counter[0] += m
                    counter[1] += s.cbytes[c]
            g.stats.rx_messages += x.counted
        # Everything else, in ring order, the way _rx_drain handles it.
        data = s.data_mv
        for i in ffi.unpack(s.rest, x.nrest):
            length = s.lens[i]
            if s.actions[i] == lib.GR_RX_BAD_LEN:
                g.stats.too_big += 1
                log.error("simguest: inbound msg too big (%d bytes); buffer lost", length)
                continue
            off = i * rp.BUF_SIZE
            try:
                hdr, payload = rp.decode_message(bytes(data[off : off + length]))
            except rp.RpmsgFormatError as e:  # GR_RX_BAD_HDR: the same test on the same bytes
                g.stats.too_big += 1
                log.error("simguest: inbound msg too big: %s; buffer lost", e)
                continue
            g.deliver(hdr, payload)

        kick = lib.gr_publish(r, ring.last_kicked, ring.avail_idx)
        ring.last_kicked = ring.avail_idx
        if kick:
            g.kick_queue(RX)
        return True
