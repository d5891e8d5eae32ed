#!/usr/bin/env python3
"""Differential fuzzing of the two ring engines (PythonQueue and CffiQueue).

One input describes guest memory (regions, each between PROT_NONE guard pages), where
the three rings lie in it, and then a sequence of steps: the guest's writes (descriptors
with hostile addresses and lengths, indirect tables, avail entries, the avail idx, ring
flags, raw bytes) and the device's calls (pops, raw pops, reads and writes at offsets,
pushes in all three forms, notification decisions, kick toggles, header splits, memory
table changes under outstanding chains, unmaps and remaps).  Both engines run on
identical copies; after every step they must agree on the result or exception, on the
queue and ring state, and on every byte of guest memory.  The only exceptions allowed on
a mapped queue are the clean refusals of the engine contract: QueueBroken, StaleChain,
and ValueError where the step passed a value the contract refuses (a negative offset, a
head or length outside uint32, a made-up raw batch).

    python fuzz/fuzz_rings.py fuzz/corpus/rings -runs=1000     # see fuzz/README.md
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from functools import partial
from typing import Any

import atheris
import numpy as np
from _common import (
    ROOT,
    Reader,
    Writer,
    capture_logs,
    guarded_region,
    main,
    use_asan_build_if_asked,
)

use_asan_build_if_asked()

with atheris.instrument_imports(include=["vhost_rpmsg"]):
    from vhost_rpmsg.vhost_user.ring_state import Event
    from vhost_rpmsg.vhost_user.vring import Vring
    from vhost_rpmsg.virtio import queue_cffi
    from vhost_rpmsg.virtio.memory import BadAddress, GuestMemory
    from vhost_rpmsg.virtio.queue import (
        Chain,
        Located,
        QueueBroken,
        QueueState,
        RawBatch,
        StaleChain,
        ring_sizes,
    )
    from vhost_rpmsg.virtio.queue_cffi import CffiQueue
    from vhost_rpmsg.virtio.queue_python import PythonQueue

# after the instrumented imports, so the modules it imports are instrumented
sys.path.insert(0, str(ROOT))  # tests.helpers: the one definition of "the engines agree"
from tests.helpers import Outcome, agree, outcome  # noqa: E402

M64 = (1 << 64) - 1
MAX_STEPS = 48
KEEP = 32  # chains and raw batches remembered for later reads, writes and pushes
CLEAN: tuple[type[Exception], ...] = (QueueBroken, StaleChain)

# Steps.  Guest side first, then the device's calls.
(W_DESC, W_AVAIL, PUBLISH, W_IDX, W_FLAGS, W_RAW, W_TABLE,
 POP, POP_RAW, READ, WRITE, PUSH_LIST, PUSH_ARRAY, PUSH_USED, NOTIFY, KICKS_OFF, KICKS_ON,
 PENDING, UNPOP, SPLIT, SPLIT_MADE_UP, MADE_UP_COPY, MEM_ADD, MEM_REMOVE, REMAP, UNMAP,
 FEATURES, RESTART, TAKE_ONE, POP_LOCATED, PUT_ONE) = range(31)
NSTEPS = 31



# -- guest memory layout ------------------------------------------------------------------


def overlaps(gpa: int, size: int, regions: list[tuple[int, int]]) -> bool:
    return any(gpa < g + s and g < gpa + size for g, s in regions)


def read_layout(r: Reader, ring_size: int) -> list[tuple[int, int, bool]] | None:
    """Regions (gpa, size, flush against the guard after it); None if they overlap."""
    dlen, alen, ulen = ring_sizes(ring_size)
    need = dlen + alen + ulen + 64
    out: list[tuple[int, int, bool]] = []
    end = 0
    for i in range(1 + r.u8() % 3):
        kind = r.u8()
        size = 8 * (1 + r.u16() % 2048)
        if i == 0:
            size = max(size, need + (-need % 16))
        sel = (kind & 0x7F) % 6
        if sel == 0:
            gpa = end  # adjacent to the one before: a range may straddle the two
        elif sel == 1:
            gpa = end + 4096 * (1 + r.u8())  # a gap
        elif sel == 2:
            gpa = (1 << 64) - size  # ends at 2^64
        elif sel == 3:
            gpa = min(r.u64() & ~0xF, (1 << 64) - size)
        elif sel == 4:
            gpa = 0x100000 * r.u8()
        else:
            gpa = (end + 0xFFFF) & ~0xFFFF
        if gpa + size > 1 << 64 or overlaps(gpa, size, [(g, s) for g, s, _ in out]):
            return None
        out.append((gpa, size, bool(kind & 0x80)))
        end = gpa + size
    return out


def read_ring_place(r: Reader, layout: list[tuple[int, int, bool]],
                    n: int) -> tuple[int, int, int]:
    """Guest-physical (desc, avail, used), aligned as virtio requires."""
    dlen, alen, ulen = ring_sizes(n)
    gpa0, size0, _ = layout[0]
    mode = r.u8() % 4
    if mode == 1:  # at the end of region 0: used_event is the region's last word
        avail = gpa0 + size0 - alen
        used = (avail - ulen) & ~3
        desc = (used - dlen) & ~15
        return desc, avail, used
    if mode == 2:  # each part anywhere (maybe not inside memory: then nothing to fuzz)
        parts = []
        for align in (16, 2, 4):
            gpa, size, _ = layout[r.u8() % len(layout)]
            parts.append((gpa + r.u16() % size) & ~(align - 1))
        return parts[0], parts[1], parts[2]
    base = gpa0 + ((r.u16() % 256) * 16 if mode == 3 else 0)
    avail = base + dlen
    used = (avail + alen + 3) & ~3
    return base, avail, used


# -- one engine over its own memory ---------------------------------------------------------


class Side:
    """One engine, its queue in a started vhost-user ring, over its own guest memory."""

    def __init__(self, engine: Any, layout: list[tuple[int, int, bool]],
                 ring: tuple[int, int, int], n: int, base: int, event_idx: bool,
                 indirect: bool) -> None:
        self.gm = GuestMemory()
        self.gm.regions = [guarded_region(g, s, at_end=e) for g, s, e in layout]
        self.gm.generation += 1
        st = QueueState(0, 1024)
        st.set_size(n)
        st.set_addresses(*ring)
        st.set_base(base)
        st.event_idx = event_idx
        st.indirect = indirect
        self.st = st
        self.q = engine(st)
        self.vr = Vring(self.q, lambda vr, change: None)
        self.chains: list[Chain] = []
        self.raws: list[RawBatch] = []
        self.last_pop = 0

    def start(self) -> None:
        self.st.map(self.gm)
        self.vr.apply(Event.START)

    def write(self, gpa: int, data: bytes) -> bool:
        """What the guest writes (to the memory the front-end has now); False if outside."""
        try:
            i, off = self.gm.find_gpa(gpa, len(data))
        except BadAddress:
            return False
        self.gm.regions[i].mem[off : off + len(data)] = np.frombuffer(data, np.uint8)
        return True

    def remap(self) -> None:
        """What the back-end does after a memory-table change (backend._remap_rings)."""
        if not self.vr.ring.started:
            self.st.unmap()
            return
        try:
            self.st.map(self.gm)
        except (BadAddress, ValueError):
            self.vr.apply(Event.STOP)

    def state(self) -> tuple[Any, ...]:
        st = self.st
        return (st.last_avail_idx, st.used_idx, st.signalled_used, st.stats, st.size,
                st.mapped, st.event_idx, st.indirect, self.vr.broken, self.vr.ready,
                self.vr.state, self.gm.generation,
                [(r.gpa, r.size) for r in self.gm.regions])

    def memory(self) -> list[bytes]:
        views = [r.mem for r in self.gm.regions]
        # the ring views too: after a region left the table they may be all that is left
        views += [self.st.desc.view(np.uint8), self.st.avail.view(np.uint8),
                  self.st.used16.view(np.uint8)]
        return [v.tobytes() for v in views]

    def remember(self, result: Any) -> None:
        if isinstance(result, Located):  # its heads go back like a raw batch's
            result = result.raw
        if isinstance(result, RawBatch):
            self.raws = [*self.raws[-KEEP + 1 :], result]
        elif isinstance(result, list):
            self.chains = [*self.chains[-KEEP + 1 :], *result][-KEEP:]
            self.last_pop = len(result)


# -- the target ---------------------------------------------------------------------------------


class Pair:
    """The two sides, driven step by step from one input."""

    def __init__(self, r: Reader) -> None:
        h = r.u8()
        self.n = 1 << ((h & 0xF) % 9)  # 1 .. 256
        event_idx, indirect, tiny = bool(h & 0x10), bool(h & 0x20), bool(h & 0x40)
        base = r.u16() if h & 0x80 else 0
        layout = read_layout(r, self.n)
        self.ok = layout is not None
        if layout is None:
            return
        ring = read_ring_place(r, layout, self.n)
        self.ring = ring
        try:
            self.sides = [Side(e, layout, ring, self.n, base, event_idx, indirect)
                          for e in (PythonQueue, CffiQueue)]
        except ValueError:  # misaligned rings: the back-end refuses them
            self.ok = False
            return
        seed = r.u8()
        if seed:  # every byte of memory random, then a quiet ring header
            for i, (_, size, _) in enumerate(layout):
                data = np.random.default_rng(seed + i).integers(0, 256, size, np.uint8)
                for s in self.sides:
                    s.gm.regions[i].mem[:] = data
        for s in self.sides:
            s.write(ring[1], bytes(4))
            s.write(ring[2], bytes(4))
        try:
            for s in self.sides:
                s.start()
        except (BadAddress, ValueError):
            self.ok = False  # the rings are not in guest memory: the back-end refuses them
            return
        if tiny:  # scratch arrays that every batch outgrows: the NEED_SEGS / NEED_DATA paths
            cf = self.sides[1].q
            assert isinstance(cf, CffiQueue)
            cf._batch = queue_cffi._Batch(chains=1 + r.u8() % 4, segs=1 + r.u8() % 4)
            cf._raw = queue_cffi._Raw(segs=1 + r.u8() % 4, data=1 + r.u8() % 64)
        self.avail_idx = base

    # -- reading values -------------------------------------------------------------------

    def addr(self, r: Reader) -> int:
        """A guest address: inside, at the edges of, around or far from the regions."""
        return self._addr(r) & M64

    def _addr(self, r: Reader) -> int:
        s = r.u8()
        regions = self.sides[0].gm.regions
        if not regions:
            return r.u64()
        reg = regions[(s >> 3) % len(regions)]
        mode = s & 7
        if mode == 0:
            return reg.gpa + r.u16() % reg.size
        if mode == 1:
            return reg.gpa + reg.size - r.u8() % 64  # the last bytes, or the end
        if mode == 2:
            return (reg.gpa - r.u8()) & M64  # just before the start
        if mode == 3:
            return r.u64()
        if mode == 4:
            return (1 << 64) - r.u16()  # wraps 2^64 with any length
        if mode == 5:
            return reg.gpa + reg.size + r.u8()  # just past the end (or the next region)
        return (reg.gpa + r.u16() % reg.size) & ~15

    def length(self, r: Reader) -> int:
        s = r.u8() % 8
        if s < 3:
            return r.u8()
        if s == 3:
            return r.u16()
        if s == 4:
            return r.u32()
        if s == 5:
            return 0
        return 16 * (r.u8() % (self.n + 2))  # indirect table lengths, around the limit

    def desc_bytes(self, r: Reader) -> bytes:
        addr, length = self.addr(r), self.length(r)
        f = r.u8()
        flags = f & 7 if not f & 0x80 else r.u16()
        nxt = r.u8() % (self.n + 2) if not f & 0x40 else r.u16()
        return (addr.to_bytes(8, "little") + length.to_bytes(4, "little")
                + flags.to_bytes(2, "little") + nxt.to_bytes(2, "little"))

    def offset(self, r: Reader) -> tuple[int, bool]:
        """An offset into a chain, and whether it is one the contract refuses."""
        s = r.u8()
        if s & 0x80:
            return -(s & 0x7F) - 1, True
        return (s if s & 0x40 else 0) + (r.u16() if s & 0x20 else 0), False

    # -- running ------------------------------------------------------------------------------

    def guest(self, gpa: int, data: bytes) -> None:
        """The guest writes ``data`` at ``gpa`` (the same bytes on both sides)."""
        for s in self.sides:
            s.write(gpa, data)

    def device(self, what: str, fn: Callable[[Side], Any], *, hostile: bool = False,
               anything: bool = False) -> Outcome:
        """Run ``fn`` on both sides inside the ring guard, as a device does; compare."""
        mapped = self.sides[0].st.mapped
        outs = []
        for s in self.sides:
            def call(s: Side = s) -> Any:
                with s.vr.guarding():
                    return fn(s)
            outs.append(outcome(call))
        py, cf = outs
        if not agree(py, cf):
            raise AssertionError(f"{what}: python {py!r} != cffi {cf!r}")
        if py[0] == "raise" and mapped and not anything:
            allowed = (*CLEAN, ValueError) if hostile else CLEAN
            if not issubclass(py[1], allowed):
                raise AssertionError(f"{what}: {py[1].__name__} is not a clean refusal: "
                                     f"{py[2]}")
        if py[0] == "ok":
            for s, o in zip(self.sides, outs, strict=True):
                s.remember(o[1])
        return py

    def check(self, what: str) -> None:
        a, b = self.sides
        if a.state() != b.state():
            raise AssertionError(f"after {what}: state differs\n{a.state()}\n{b.state()}")
        for i, (x, y) in enumerate(zip(a.memory(), b.memory(), strict=True)):
            if x != y:
                diff = np.flatnonzero(np.frombuffer(x, np.uint8) != np.frombuffer(y, np.uint8))
                raise AssertionError(f"after {what}: memory {i} differs at {diff[:8].tolist()}")

    def step(self, r: Reader) -> None:
        op = r.u8() % NSTEPS
        n = self.n
        ring_desc, ring_avail, ring_used = self.ring
        a = self.sides[0]
        what = f"step {op}"
        if op == W_DESC:
            i, d = r.u16() % n, self.desc_bytes(r)
            self.guest(ring_desc + 16 * i, d)
        elif op == W_AVAIL:
            slot, head = r.u16() % n, r.u8() if r.flag() else r.u16()
            self.guest(ring_avail + 4 + 2 * slot, head.to_bytes(2, "little"))
        elif op == PUBLISH:  # the driver's add: entries at idx, idx + 1, ..., then idx
            for _ in range(1 + r.u8() % 8):
                head = r.u8() % (n + 1)
                slot = self.avail_idx % n
                self.guest(ring_avail + 4 + 2 * slot, head.to_bytes(2, "little"))
                self.avail_idx = (self.avail_idx + 1) & 0xFFFF
            idx = self.avail_idx
            self.guest(ring_avail + 2, idx.to_bytes(2, "little"))
        elif op == W_IDX:
            s0 = r.u8()
            self.avail_idx = (self.avail_idx + s0 % (n + 2)) & 0xFFFF if s0 & 0x80 else r.u16()
            idx = self.avail_idx
            self.guest(ring_avail + 2, idx.to_bytes(2, "little"))
        elif op == W_FLAGS:
            flags, event, used_flags = r.u16(), r.u16(), r.u16()
            self.guest(ring_avail, flags.to_bytes(2, "little"))
            self.guest(ring_avail + 4 + 2 * n, event.to_bytes(2, "little"))
            if used_flags & 0x8000:
                self.guest(ring_used, (used_flags & 1).to_bytes(2, "little"))
        elif op == W_RAW:
            gpa, data = self.addr(r), r.blob()
            self.guest(gpa, data)
        elif op == W_TABLE:  # an indirect table of k descriptors somewhere, pointed at
            gpa = self.addr(r) & ~15
            table = b"".join(self.desc_bytes(r) for _ in range(1 + r.u8() % 6))
            self.guest(gpa, table)
            i = r.u16() % n
            d = (gpa.to_bytes(8, "little") + len(table).to_bytes(4, "little")
                 + (4).to_bytes(2, "little") + bytes(2))
            self.guest(ring_desc + 16 * i, d)
        elif op == POP:
            k = r.u8()
            self.device(f"pop_batch({k})", lambda s: s.q.pop_batch(k))
        elif op == POP_RAW:
            k = r.u8()
            sel = r.u8() % 10
            limit = r.u16() if sel == 8 else (-1, 0, 1, 8, 16, 20, 512, 1 << 20, 0, 1 << 70)[sel]
            self.device(f"pop_raw_batch({k}, {limit})", lambda s: s.q.pop_raw_batch(k, limit))
        elif op == TAKE_ONE:  # the single-message path: pop, give back, notify, re-arm
            sel = r.u8() % 6
            limit = r.u16() if sel == 5 else (-1, 0, 16, 512, 1 << 70)[sel]
            self.device(f"take_one({limit})", lambda s: s.q.take_one(limit))
        elif op == POP_LOCATED:  # zero-copy receive: one-segment chains left in place
            k = r.u8()
            head = (0, 16, 1 << 20, -1)[r.u8() % 4]
            limit = (-1, 0, 16, 512, 1 << 20)[r.u8() % 5]
            self.device(f"pop_located({k}, {head}, {limit})",
                        lambda s: s.q.pop_located(k, head, limit))
        elif op == PUT_ONE:
            msg = r.blob()
            self.device(f"put_one({len(msg)} bytes)", lambda s: s.q.put_one(msg))
        elif op in (READ, WRITE):
            if not a.chains:
                return
            k = r.u8() % len(a.chains)
            off, bad = self.offset(r)
            if op == READ:
                lim = None if r.flag() else r.u16()
                self.device(f"read_chain(#{k}, {lim}, {off})",
                            lambda s: s.q.read_chain(s.chains[k], lim, off), hostile=bad)
            else:
                data = r.blob()
                self.device(f"write_chain(#{k}, {len(data)}, {off})",
                            lambda s: s.q.write_chain(s.chains[k], data, off), hostile=bad)
        elif op in (PUSH_LIST, PUSH_ARRAY):
            entries = []
            for _ in range(r.u8() % 9):
                if a.chains and not r.u8() & 0x80:
                    head = a.chains[r.u8() % len(a.chains)].head
                else:
                    head = r.u32()
                entries.append((head, r.u16() if r.flag() else r.u32()))
            if op == PUSH_LIST:
                self.device(f"push_batch({entries})", lambda s: s.q.push_batch(list(entries)))
            else:
                arr = np.array(entries, np.uint32).reshape(-1, 2)
                self.device(f"push_batch(array {entries})", lambda s: s.q.push_batch(arr.copy()))
        elif op == PUSH_USED:
            heads: np.ndarray
            if a.raws and r.flag():
                k = r.u8() % len(a.raws)
                length = r.u32()
                self.device(f"push_used(raw #{k}, {length})",
                            lambda s: s.q.push_used(s.raws[k].returnable_heads(), length))
                return
            heads = np.array([r.u16() for _ in range(r.u8() % 9)], np.uint32)
            s0 = r.u8()
            length = -1 - s0 if s0 & 0x80 else r.u32()
            self.device(f"push_used({heads.tolist()}, {length})",
                        lambda s: s.q.push_used(heads.copy(), length), hostile=length < 0)
        elif op == NOTIFY:
            self.device("need_notify", lambda s: s.q.need_notify())
        elif op == KICKS_OFF:
            self.device("disable_kicks", lambda s: s.q.disable_kicks())
        elif op == KICKS_ON:
            self.device("enable_kicks", lambda s: s.q.enable_kicks())
        elif op == PENDING:
            self.device("pending", lambda s: (s.q.has_available(), s.q.pending()))
        elif op == UNPOP:
            k = r.u8() % (a.last_pop + 1)
            self.device(f"unpop({k})", lambda s: s.q.unpop(k))
            for s in self.sides:
                s.last_pop -= k
        elif op == SPLIT:  # each engine cuts the headers of each engine's last raw batch
            if not a.raws:
                return
            sel = r.u8() % 6
            size = r.u16() % 1024 if sel == 5 else (0, 1, 16, 40, 512)[sel]
            for other in self.sides:  # each engine cuts both engines' last raw batch
                self.device(f"split_headers({other.raws[-1]!r}, {size})",
                            partial(split, other.raws[-1], size))
        elif op == SPLIT_MADE_UP:
            rb = made_up_batch(r)
            size = r.pick([0, 1, 16, 40])
            self.device(f"split_headers(made up {rb!r}, {size})",
                        lambda s: s.q.split_headers(rb, size), hostile=True)
        elif op == MADE_UP_COPY:  # a chain not from a pop: either engine, same result
            c = Chain(r.u16(), generation=a.gm.generation)
            for _ in range(1 + r.u8() % 4):
                seg = (r.u8() % 4, r.u16() if r.flag() else r.u64(), r.u16())
                (c.writable if r.flag() else c.readable).append(seg)
            c.read_len = sum(x[2] for x in c.readable) + (r.u8() if r.flag() else 0)
            c.write_len = sum(x[2] for x in c.writable)
            off, _ = self.offset(r)
            if r.flag():
                self.device(f"read_chain(made up {c}, None, {off})",
                            lambda s: s.q.read_chain(c, None, off), anything=True)
            else:
                data = r.blob()
                self.device(f"write_chain(made up {c}, {len(data)}, {off})",
                            lambda s: s.q.write_chain(c, data, off), anything=True)
        elif op == MEM_ADD:
            gpa = self.addr(r) & ~7
            size = 8 * (1 + r.u16() % 1024)
            at_end = r.flag()
            if gpa + size > 1 << 64 or overlaps(gpa, size, [(x.gpa, x.size)
                                                            for x in a.gm.regions]):
                return
            for s in self.sides:
                s.gm.regions.append(guarded_region(gpa, size, at_end=at_end))
                s.gm.generation += 1
                s.remap()
        elif op == MEM_REMOVE:
            if not a.gm.regions:
                return
            k = r.u8() % len(a.gm.regions)
            reg = a.gm.regions[k]
            gpa, size = reg.gpa, reg.size
            for s in self.sides:
                s.gm.remove(gpa, size)
                s.remap()
        elif op == REMAP:
            for s in self.sides:
                if s.st.mem is not None:
                    try:
                        s.st.map(s.st.mem)
                    except (BadAddress, ValueError):
                        s.st.unmap()
        elif op == UNMAP:
            for s in self.sides:
                s.vr.apply(Event.STOP)
                s.st.unmap()
        elif op == FEATURES:  # SET_FEATURES may come at any time
            f = r.u8()
            for s in self.sides:
                s.st.event_idx, s.st.indirect = bool(f & 1), bool(f & 2)
        elif op == RESTART:  # SET_VRING_KICK again: mapped afresh, started
            for s in self.sides:
                try:
                    s.st.map(s.gm)
                except (BadAddress, ValueError):
                    continue
                s.vr.apply(Event.START)
        self.check(what)

    def close(self) -> None:
        for s in self.sides:
            s.st.unmap()
            s.gm.clear()


def split(rb: RawBatch, size: int, s: Side) -> np.ndarray:
    return s.q.split_headers(rb, size)


def made_up_batch(r: Reader) -> RawBatch:
    """A RawBatch not from a pop: offsets and lengths that may not fit its data."""
    data = r.blob()
    k = r.u8() % 6
    lengths = np.array([r.u16() % 64 - (8 if r.u8() == 0xFF else 0) for _ in range(k)],
                       np.int64)
    if r.flag():
        offsets = np.cumsum(lengths) - lengths
    else:
        offsets = np.array([r.u16() % 128 - 2 for _ in range(k)], np.int64)
    return RawBatch(np.zeros(k, np.uint32), np.zeros(k, np.uint8), np.zeros(k, np.bool_),
                    lengths, offsets.astype(np.int64), data)


LOGS = capture_logs()


def test_one_input(data: bytes) -> None:
    r = Reader(data)
    pair = Pair(r)
    if not pair.ok:
        return
    try:
        pair.check("setup")
        for _ in range(MAX_STEPS):
            if not r.left():
                break
            pair.step(r)
        tracebacks = LOGS.take()
        if tracebacks:
            raise AssertionError("exception logged by project code:\n" + "\n".join(tracebacks))
    finally:
        pair.close()


# -- seeds (fuzz/gen_seeds.py) ---------------------------------------------------------------


def _desc(w: Writer, addr_sel: int, off: int, length: int, flags: int, nxt: int) -> None:
    """A descriptor as Pair.desc_bytes reads it (region 0, ``addr_sel`` mode 0/6)."""
    w.u8(addr_sel).u16(off)
    w.u8(3).u16(length)  # length selector 3: a u16
    w.u8(flags & 7).u8(nxt)


def seeds() -> dict[str, bytes]:
    """Hand-made inputs reaching each part of both engines (fuzz/corpus/rings)."""
    out: dict[str, bytes] = {}

    def header(w: Writer, size_log: int, *, event_idx: bool = False, indirect: bool = True,
               tiny: bool = False, regions: int = 1, place: int = 0) -> Writer:
        w.u8(size_log | (0x10 if event_idx else 0) | (0x20 if indirect else 0)
             | (0x40 if tiny else 0))
        w.u8(regions - 1)
        for i in range(regions):
            w.u8(0x80 if i == 0 else (1 if i == 1 else 0)).u16(2047)  # 16 KiB each
            if i == 1:
                w.u8(0)  # the gap selector's page count
        w.u8(place)
        return w.u8(0)  # no random fill

    # a plain chain of two readable buffers, popped, read, pushed, notified
    for size_log in (3, 8):
        for tiny in (False, True):
            w = header(Writer(), size_log, tiny=tiny)
            if tiny:
                w.u8(2).u8(2).u8(2).u8(16)
            _w_desc(w, 0, 0x2000, 40, 1, 1)
            _w_desc(w, 1, 0x2100, 24, 0, 0)
            w.u8(PUBLISH).u8(0).u8(0)
            w.u8(POP_RAW).u8(8).u8(6)
            w.u8(SPLIT).u8(2)
            w.u8(PUSH_USED).u8(1).u8(0).u32(0)
            w.u8(NOTIFY).u8(KICKS_ON).u8(PENDING)
            out[f"raw-chain-{1 << size_log}{'-tiny' if tiny else ''}"] = w.bytes()
    # rx chain: readable then writable, popped as chains, written at an offset, pushed
    for ev in (False, True):
        w = header(Writer(), 4, event_idx=ev)
        _w_desc(w, 2, 0x3000, 16, 1 | 0, 3)
        _w_desc(w, 3, 0x3100, 512, 2, 0)
        w.u8(PUBLISH).u8(0).u8(2)
        w.u8(POP).u8(4)
        w.u8(WRITE).u8(0).u8(0x40 | 5).blob(b"hello rpmsg guest")
        w.u8(READ).u8(0).u8(0).u8(1)
        w.u8(PUSH_LIST).u8(1).u8(0).u8(0).u8(1).u16(17)
        w.u8(W_FLAGS).u16(0).u16(0).u16(0)
        w.u8(NOTIFY).u8(KICKS_OFF).u8(KICKS_ON)
        out[f"rx-chain{'-event-idx' if ev else ''}"] = w.bytes()
    # an indirect table, then nested / bad length variants through W_TABLE
    w = header(Writer(), 3)
    w.u8(W_TABLE).u8(6).u16(0x1800).u8(1)
    _desc(w, 0, 0x2000, 32, 1, 1)
    _desc(w, 0, 0x2100, 32, 2, 0)
    w.u16(0)
    w.u8(PUBLISH).u8(0).u8(0)
    w.u8(POP_RAW).u8(4).u8(7)
    w.u8(POP).u8(4)
    out["indirect"] = w.bytes()
    # a loop, a next out of range, an address past the end, an avail idx far ahead
    w = header(Writer(), 2)
    _w_desc(w, 0, 0x2000, 8, 1, 0)
    w.u8(PUBLISH).u8(0).u8(0)
    w.u8(POP).u8(1)
    w.u8(W_DESC).u16(1).u8(5).u8(0).u8(3).u16(64).u8(0).u8(0)
    w.u8(PUBLISH).u8(0).u8(1)
    w.u8(POP_RAW).u8(4).u8(8).u16(100)
    w.u8(W_IDX).u8(0).u16(1000)
    w.u8(POP).u8(4)
    w.u8(RESTART)
    out["hostile"] = w.bytes()
    # two regions, a chain straddling them, then the memory table changes under a chain
    w = header(Writer(), 3, regions=2)
    _w_desc(w, 0, 0x2000, 16, 0, 0)
    w.u8(PUBLISH).u8(0).u8(0)
    w.u8(POP).u8(2)
    w.u8(MEM_ADD).u8(3).u64(0x800000).u16(64).u8(0)
    w.u8(READ).u8(0).u8(0).u8(1)
    w.u8(MEM_REMOVE).u8(1)
    w.u8(WRITE).u8(0).u8(0).blob(b"stale")
    w.u8(UNMAP).u8(POP).u8(1).u8(RESTART)
    out["memory-change"] = w.bytes()
    # rings at the end of region 0 (flush against the guard page), event idx
    w = header(Writer(), 5, event_idx=True, place=1)
    _w_desc(w, 0, 0x100, 64, 0, 0)
    w.u8(PUBLISH).u8(0).u8(0)
    w.u8(KICKS_ON).u8(POP_RAW).u8(1).u8(5).u8(PUSH_USED).u8(1).u8(0).u32(64)
    w.u8(NOTIFY).u8(SPLIT_MADE_UP).blob(b"x" * 40).u8(2).u16(10).u8(0).u16(20).u8(0).u8(1)
    w.u8(2)
    w.u8(MADE_UP_COPY).u16(0).u8(0).u8(0).u8(1).u16(16).u16(16).u8(0).u8(1).u8(0)
    out["ring-at-end"] = w.bytes()
    return out


def _w_desc(w: Writer, i: int, off: int, length: int, flags: int, nxt: int) -> None:
    """A W_DESC step: descriptor ``i`` of the table -> region 0 at ``off``."""
    w.u8(W_DESC).u16(i)
    _desc(w, 0, off, length, flags, nxt)


if __name__ == "__main__":
    main(test_one_input)
