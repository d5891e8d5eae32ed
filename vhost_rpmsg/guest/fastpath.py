"""The simulated guest's C fast path (``vhost_rpmsg._guest_c``, cext/guest_ring.c).

:class:`SimGuest` picks it when the extension is importable (``fast=None``), requires it
(``fast=True``) or leaves it out (``fast=False``).  It changes how fast the guest runs,
nothing else: the rings get the same bytes, the same kick decisions are made, the stats
and counting endpoints end the same, the same messages reach the same inboxes in the same
order as on the Python path (tests/test_guest_fastpath.py compares the two).

Split of the work:

* C does the per-message loops: filling tx buffers, descriptors and avail slots;
  reading used entries; checking received buffers, counting the ones for counting
  endpoints and re-posting rx buffers; publishing with release ordering and a real fence.
* Python keeps all bookkeeping where the Python path keeps it (DriverRing.free,
  chain_len, avail_idx, last_used, last_kicked; SimGuest.tx_free, tx_inflight,
  rx_bufs), hands C the values it would pop (the tops of its stacks) and applies C's
  results with bulk list and dict operations.  Python paths used elsewhere (send,
  send_chain, post_rx_chain, reset) therefore keep working on consistent state.
* Anything unusual goes to the Python path before any state changes: used entries that
  are not outstanding one-descriptor chains (hostile devices, test chains), rx buffers
  kept instead of re-posted (``repost_rx = False``), a descriptor stack too short for a
  batch.  So do batches too small for C to pay off (RX_C_MIN, TX_C_MIN): single-message
  round trips cost what they cost on the Python path.  Messages for the name service and
  inbox endpoints are copied out by C and dispatched by SimGuest._dispatch in ring order.

Memory safety: C works on an export of the guest RAM array taken for one operation (a
drain, a burst) and released when it ends, so the mapping cannot go away under C and
closing the guest is never held up by a stale export; C checks every range against the
RAM's size, and validates every value the device wrote before using it.
"""

from __future__ import annotations

import collections
import logging
import os
import select
import time
import weakref
from itertools import repeat
from typing import TYPE_CHECKING, Any

from ..rpmsg import codec as rp
from .ring import DriverRing

if TYPE_CHECKING:
    from .rpmsg_guest import SimGuest

try:
    from .._guest_c import ffi, lib
except ImportError as e:  # the extension is not built
    IMPORT_ERROR: ImportError | None = e
    ffi = lib = None
else:
    IMPORT_ERROR = None

__all__ = ["IMPORT_ERROR", "FastPathUnavailable", "GuestFastPath", "available", "load"]

# The Python path's logger: the same records whichever path runs.
log = logging.getLogger(__package__ + ".rpmsg_guest")

RX, TX = 0, 1  # SimGuest's queue indices
VIRTIO_RPMSG_F_NS = 0
RX_CAP = 1024  # most used entries one C rx drain takes (the Linux driver posts <= 256)
# Fewer used entries than this are drained by the Python loop: below it the fixed cost
# of a C drain (binding, bulk bookkeeping) exceeds the Python per-message cost, and
# single-message round trips (echo latency) would get slower.  Same results either way.
RX_C_MIN = 3
TX_C_MIN = 3  # likewise for send_burst batches


class FastPathUnavailable(RuntimeError):
    """``fast=True`` where ``vhost_rpmsg._guest_c`` cannot be imported."""


def available() -> bool:
    return IMPORT_ERROR is None


def load(fast: bool | None, queue_size: int) -> GuestFastPath | None:
    """The fast path a guest with ``fast`` (None: auto) should use, or None for Python."""
    if fast is False:
        return None
    if IMPORT_ERROR is not None:
        if fast:
            raise FastPathUnavailable(
                "the simulated guest's C fast path is not built (vhost_rpmsg._guest_c "
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


class _Holding:
    """``with fast.holding(g, ring):`` keeps one RAM export for a whole operation.

    One per scratch, reused (it is only entered under that scratch's guest lock)."""

    __slots__ = ("fast", "g", "ring", "s")

    def __init__(self, fast: GuestFastPath, s: _Scratch) -> None:
        self.fast, self.s = fast, s
        self.g: SimGuest | None = None
        self.ring: DriverRing | None = None

    def __enter__(self) -> None:
        g, ring = self.g, self.ring
        self.g = self.ring = None  # no references kept past the operation
        assert g is not None and ring is not None
        self.fast._enter(self.s, g, ring)

    def __exit__(self, *exc: object) -> None:
        self.fast._exit(self.s)


class GuestFastPath:
    """The C loops of one SimGuest (see the module docstring)."""

    def __init__(self, queue_size: int) -> None:
        # A batch of used entries that are all distinct outstanding chains is at most
        # the ring size; more goes to the Python path, which raises as it does.
        self.tx = _Scratch(max(1, queue_size), data=False)
        self.rx = _Scratch(max(1, min(queue_size, RX_CAP)), data=True)
        self._holding = (_Holding(self, self.tx), _Holding(self, self.rx))

    # -- plumbing -------------------------------------------------------------------

    def holding(self, g: SimGuest, ring: DriverRing, rx: bool = False) -> _Holding:
        """Bind ``ring``'s C description (and an export of the guest RAM) for a whole
        operation: the calls made inside reuse it instead of binding each time.  Only
        under the guest's lock for that ring (tx or rx), like every other method."""
        h = self._holding[rx]
        h.g, h.ring = g, ring
        return h

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

    def tx_fill(self, g: SimGuest, ring: DriverRing, msg: bytes, batch: int) -> bool:
        """send_burst's inner loop for ``batch`` buffers off the top of g.tx_free.

        False, having changed nothing, where the Python loop must run instead (it then
        raises BufferError where it does).
        """
        assert ffi is not None and lib is not None
        s = self.tx
        tx_free, free = g.tx_free, ring.free
        if not TX_C_MIN <= batch <= s.cap or len(tx_free) < batch or len(free) < batch:
            return False
        gpas = tx_free[-batch:]
        ids = free[-batch:]
        s.gpas[0:batch] = gpas
        s.ids[0:batch] = ids
        src = ffi.from_buffer(msg)
        r = self._enter(s, g, ring)
        try:
            done = lib.gr_tx_fill(r, ring.avail_idx, src, len(msg), s.gpas, s.ids, batch)
        finally:
            self._exit(s)
            ffi.release(src)
        if done != batch:
            return False
        del tx_free[-batch:]
        del free[-batch:]
        gpas.reverse()  # pop order
        ids.reverse()
        ring.chain_len.update(zip(ids, repeat(1)))
        g.tx_inflight.update(zip(ids, gpas, strict=True))
        ring.avail_idx = (ring.avail_idx + batch) & 0xFFFF
        return True

    def publish(self, g: SimGuest, ring: DriverRing, rx: bool = False) -> bool:
        """DriverRing.publish with a release store and a real fence."""
        assert lib is not None
        s = self.rx if rx else self.tx
        r = self._enter(s, g, ring)
        try:
            kick = lib.gr_publish(r, ring.last_kicked, ring.avail_idx)
        finally:
            self._exit(s)
        if kick < 0:
            return ring.publish()
        ring.last_kicked = ring.avail_idx
        return bool(kick)

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

    def reclaim_tx(self, g: SimGuest) -> None:
        """SimGuest._reclaim_tx with the used ring read in C."""
        try:
            os.eventfd_read(g.call[TX])
            g.stats.tx_interrupts += 1
        except BlockingIOError:
            pass
        ring = g.rings[TX]
        r = self._enter(self.tx, g, ring)
        try:
            got = self._read_used(self.tx, r, ring)
        finally:
            self._exit(self.tx)
        if got is None:
            heads = [head for head, _length in ring.get_used()]
            distinct = set(heads)
        else:
            heads, distinct = got
            self._take_used(ring, heads)
        inflight, tx_free = g.tx_inflight, g.tx_free
        if heads and inflight.keys() >= distinct:
            gpas = list(map(inflight.pop, heads))
            if min(gpas) >= 0:
                tx_free.extend(gpas)
                return
            tx_free.extend(gpa for gpa in gpas if gpa >= 0)
            return
        for head in heads:  # a KeyError surfaces where the Python path raises it
            gpa = inflight.pop(head)
            if gpa >= 0:
                tx_free.append(gpa)

    def get_tx_buf(self, g: SimGuest, timeout: float) -> int:
        """SimGuest._get_tx_buf, step for step, with the C reclaim and fence."""
        if g.tx_free:
            return g.tx_free.pop()
        self.reclaim_tx(g)
        if g.tx_free:
            return g.tx_free.pop()
        ring = g.rings[TX]
        deadline = time.monotonic() + timeout
        while not g.tx_free:
            if self.enable_interrupts(g, ring):
                self.reclaim_tx(g)
                continue
            left = deadline - time.monotonic()
            if left <= 0:
                from .rpmsg_guest import GuestTimeout

                raise GuestTimeout(f"no tx buffer came back in {timeout}s")
            select.select([g.call[TX]], [], [], left)
            self.reclaim_tx(g)
        if not g.tx_interrupts:
            ring.disable_interrupts()
        return g.tx_free.pop()

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
        inbox = g._inbox
        addrs = [a for a in list(g._counters)
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
            counters = g._counters
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
            g._dispatch(hdr, payload)

        kick = lib.gr_publish(r, ring.last_kicked, ring.avail_idx)
        ring.last_kicked = ring.avail_idx
        if kick:
            g._kick(RX)
        return True
