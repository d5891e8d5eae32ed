"""The cffi engine against the Python reference: same results on any ring, however hostile.

Each scenario builds two guest memories with identical layout and bytes (memfds mapped by
GuestMemory, as the back-end maps them), one queue per engine over each, and drives both
with the same random operations: pops (with every malformed-chain case: loops, next and
head out of range, buffers outside memory or straddling two regions or wrapping 2^64,
indirect tables nested / badly sized / larger than the queue / with NEXT / not
negotiated, readable after writable, zero-length descriptors), raw (array) pops, payload
reads and writes at offsets (negative ones too), header splits of raw batches, used-ring
pushes as lists, arrays and push_used, notification decisions with and without event idx,
kick toggles, guest memory changes under outstanding chains (stale chains), unmaps.  After
every operation both must agree on the result or exception, the queue state and stats, the
state of a vhost-user ring around each queue (broken, as the device breaks it on
QueueBroken), and every byte of guest memory.

Skipped, with the reason, only when the extension is not built; CI sets
VHOST_RPMSG_REQUIRE_CFFI=1 so that a missing build fails instead.
"""

from __future__ import annotations

import functools
import logging
import os
import random
import sys
from collections import Counter
from collections.abc import Callable
from operator import methodcaller
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vhost_rpmsg.guest.ring import DriverRing, RingLayout
from vhost_rpmsg.vhost_user.ring_state import Event
from vhost_rpmsg.vhost_user.vring import Vring
from vhost_rpmsg.virtio import engines
from vhost_rpmsg.virtio.constants import (
    VRING_DESC_F_INDIRECT,
    VRING_DESC_F_NEXT,
    VRING_DESC_F_WRITE,
)
from vhost_rpmsg.virtio.engines import QueueFactory
from vhost_rpmsg.virtio.memory import GuestMemory, RegionSpec
from vhost_rpmsg.virtio.queue import (
    RX_READABLE,
    RX_TOO_SMALL,
    WALK_BUDGET,
    Chain,
    ChainError,
    Queue,
    QueueBroken,
    QueueState,
    RawBatch,
    StaleChain,
)
from vhost_rpmsg.virtio.queue_python import PythonQueue

from .helpers import Outcome, agree, outcome, setup_queue

try:
    from vhost_rpmsg.virtio import queue_cffi
    from vhost_rpmsg.virtio.queue_cffi import CffiQueue
except ImportError as e:  # the extension is not built
    IMPORT_ERROR: ImportError | None = e
else:
    IMPORT_ERROR = None

needs_cffi = pytest.mark.skipif(
    IMPORT_ERROR is not None,
    reason=f"cffi engine not built (_vhost_rpmsg_vring: {IMPORT_ERROR}); "
    "build it with `pip install .` or `python cext/build_vring.py`",
)

NEXT, WRITE, INDIRECT = VRING_DESC_F_NEXT, VRING_DESC_F_WRITE, VRING_DESC_F_INDIRECT
M64 = (1 << 64) - 1
KB = 1024

# Region layouts (gpa, size); region 0 holds the ring, the indirect tables and buffers.
LAYOUTS: list[list[tuple[int, int]]] = [
    [(0, 64 * KB)],
    [(0, 64 * KB), (64 * KB, 16 * KB)],  # adjacent: a range may straddle the two
    [(0, 64 * KB), (0x100000, 16 * KB), ((1 << 64) - 64 * KB, 64 * KB)],  # gap; ends at 2^64
    [(0x20000, 64 * KB), (0x10000, 64 * KB), (0x30000, 4 * KB)],  # unsorted, both sides
]
NTABLES, TABLE_SLOTS = 4, 16
SPLIT_SIZES = (0, 1, 16, 40)  # header sizes cut out of every raw batch


def test_cffi_engine_is_built() -> None:
    """With VHOST_RPMSG_REQUIRE_CFFI=1 (CI), a missing or broken build is a failure."""
    if IMPORT_ERROR is None:
        assert "cffi" in engines.available_engines()
        return
    if os.environ.get("VHOST_RPMSG_REQUIRE_CFFI") == "1":
        pytest.fail(f"VHOST_RPMSG_REQUIRE_CFFI=1 but the cffi engine cannot be imported: "
                    f"{IMPORT_ERROR!r}")
    pytest.skip(f"cffi engine not built: {IMPORT_ERROR}")


# -- guest memory and queues ------------------------------------------------------------


class Mem:
    """A GuestMemory over memfds, written through its own (bounds-checked) regions."""

    def __init__(self, layout: list[tuple[int, int]]) -> None:
        self.gm = GuestMemory()
        specs = [self._memfd(gpa, size) for gpa, size in layout]
        try:
            self.gm.set_table(specs)
        finally:
            for spec in specs:
                os.close(spec.fd)  # the mappings outlive the fds; the back-end closes its own

    @staticmethod
    def _memfd(gpa: int, size: int) -> RegionSpec:
        fd = os.memfd_create("vr-diff", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        os.ftruncate(fd, size)
        return RegionSpec(gpa, size, 0, fd)

    def add(self, gpa: int, size: int) -> None:
        spec = self._memfd(gpa, size)
        try:
            self.gm.add(spec)
        finally:
            os.close(spec.fd)

    def remove(self, index: int) -> None:
        r = self.gm.regions[index]
        self.gm.remove(r.gpa, r.size)

    def write(self, gpa: int, data: bytes) -> None:
        self.gm.write_gpa(gpa, data)

    def snapshot(self) -> list[tuple[int, bytes]]:
        return [(r.gpa, r.mem.tobytes()) for r in self.gm.regions]

    def close(self) -> None:
        self.gm.clear()


def queue_on(engine: QueueFactory, mem: Mem, size: int, base: int = 0, *,
             event_idx: bool = False, indirect: bool = True) -> Queue:
    """A mapped queue of ``engine`` with its rings at the start of region 0 of ``mem``."""
    return setup_queue(engine, mem.gm, RingLayout(mem.gm.regions[0].gpa, size),
                       event_idx=event_idx, indirect=indirect, used_base=base)


def both_engines() -> tuple[QueueFactory, QueueFactory]:
    """The reference engine and the C one, in that order."""
    return PythonQueue, CffiQueue


def remap(q: Queue) -> None:
    """Map the rings again in the memory they are mapped in (if they are)."""
    if q.state.mem is not None:
        q.state.map(q.state.mem)


def started_vring(q: Queue) -> Vring:
    """``q`` in a started, enabled vhost-user ring (as the back-end sets it up)."""
    vr = Vring(q, lambda vr, change: None)
    vr.apply(Event.START)
    assert vr.ready
    return vr




def qstate(vr: Vring) -> tuple[Any, ...]:
    """A queue's state and its ring's: what both engines must keep identical."""
    q = vr.queue.state
    return (q.last_avail_idx, q.used_idx, q.signalled_used, vr.broken, q.stats, q.size,
            vr.ready, q.mapped, q.desc.tobytes(), q.avail.tobytes(), q.used16.tobytes())


class Engines:
    """A queue of each engine, each in a started vhost-user ring."""

    def __init__(self, queues: list[Queue]) -> None:
        py, cf = queues
        assert isinstance(py, PythonQueue) and isinstance(cf, CffiQueue)
        self.queues = queues
        self.cffi = cf  # for its scratch
        self.vrings = [started_vring(q) for q in queues]
        self.last: tuple[Outcome, Outcome] = (("ok", None), ("ok", None))  # of run_rings

    def run_rings(self, fn: Callable[[Vring], Any]) -> tuple[Outcome, Outcome]:
        """``fn`` on each ring; a QueueBroken breaks the ring it came from, as a device does."""
        out = []
        for vr in self.vrings:
            res = outcome(functools.partial(fn, vr))
            if res[0] == "raise" and res[1] is QueueBroken:
                vr.break_(res[2])
            out.append(res)
        self.last = out[0], out[1]
        return self.last

    def run(self, fn: Callable[[Queue], Any]) -> tuple[Outcome, Outcome]:
        return self.run_rings(lambda vr: fn(vr.queue))

    def same_state(self) -> bool:
        return qstate(self.vrings[0]) == qstate(self.vrings[1])


# -- ring content --------------------------------------------------------------------------


class Guest:
    """Random, mostly well-formed-then-mutated ring content for one scenario."""

    def __init__(self, rng: random.Random, layout: list[tuple[int, int]], size: int,
                 base: int) -> None:
        self.rng = rng
        self.regions = layout
        self.size = size
        g0 = layout[0][0]
        self.ring = RingLayout(g0, size)
        self.tables = (self.ring.end + 255) & ~255
        self.bufs = self.tables + NTABLES * TABLE_SLOTS * 16
        self.avail_idx = base
        self.heads: list[int] = []

    # addresses and lengths, from sane to hostile
    def in_bounds(self, length: int) -> int:
        gpa, size = self.rng.choice(self.regions)
        if length > size:
            return gpa
        if self.rng.random() < 0.5 and gpa == self.regions[0][0]:
            lo = self.bufs - gpa
            if lo + length <= size:
                return gpa + self.rng.randrange(lo, size - length + 1)
        return gpa + self.rng.randrange(0, size - length + 1)

    def addr(self, length: int) -> int:
        rng = self.rng
        k = rng.random()
        gpa, size = rng.choice(self.regions)
        if k < 0.5:
            return self.in_bounds(length)
        if k < 0.6:  # over the end of a region (into the next one, a gap, or past 2^64)
            return (gpa + size - length + rng.randrange(1, 9)) & M64
        if k < 0.67:  # ends exactly at the end of a region
            return (gpa + size - length) & M64
        if k < 0.74:  # starts just before a region
            return (gpa - rng.randrange(1, 17)) & M64
        if k < 0.82:  # near the top of the address space
            return (M64 + 1 - rng.randrange(1, 1 << 17)) & M64
        if k < 0.9:  # a region's first byte
            return gpa
        return rng.getrandbits(64)

    def length(self) -> int:
        rng = self.rng
        k = rng.random()
        if k < 0.12:
            return 0
        if k < 0.6:
            return rng.randrange(1, 65)
        if k < 0.8:
            return rng.randrange(1, 4097)
        if k < 0.88:
            return rng.randrange(1, 1 << 17)
        if k < 0.94:
            return 0xFFFFFFFF
        return rng.getrandbits(32)

    def table_addr(self) -> int:
        t = self.rng.randrange(NTABLES)
        return self.tables + t * TABLE_SLOTS * 16 + self.rng.choice([0, 0, 0, 0, 8, 1, 16])

    def well_formed(self, slots: int, *, allow_indirect: bool
                    ) -> tuple[list[list[int]], list[int]]:
        """Descriptors [addr, len, flags, next] forming well-formed chains, and their heads."""
        rng = self.rng
        out: list[list[int]] = []
        heads = []
        i = 0
        while i < slots:
            n = min(rng.randrange(1, 5), slots - i)
            heads.append(i)
            nr = rng.randrange(0, n + 1)
            indirect_last = allow_indirect and rng.random() < 0.3
            for k in range(n):
                last = k == n - 1
                if last and indirect_last:
                    out.append([self.table_addr() & ~15,
                                16 * rng.randrange(1, TABLE_SLOTS + 1), INDIRECT, 0])
                    continue
                length = rng.randrange(1, 65) if rng.random() < 0.9 else 0
                flags = (WRITE if k >= nr else 0) | (0 if last else NEXT)
                out.append([self.in_bounds(max(length, 1)), length, flags,
                            0 if last else i + k + 1])
            i += n
        return out, heads

    def mutate(self, descs: list[list[int]], limit: int) -> None:
        rng = self.rng
        d = rng.choice(descs)
        field = rng.randrange(6)
        if field == 0:
            d[1] = self.length()
            d[0] = self.addr(d[1])
        elif field == 1:
            d[1] = self.length()
        elif field == 2:
            d[2] ^= rng.choice([NEXT, WRITE, INDIRECT, NEXT | INDIRECT, 1 << rng.randrange(16)])
        elif field == 3:
            d[3] = rng.choice([rng.randrange(limit), limit, limit + rng.randrange(1, 9),
                               rng.getrandbits(16), 0])
        elif field == 4:  # an indirect descriptor, maybe badly sized or placed
            d[2] = INDIRECT | (rng.choice([0, 0, NEXT, WRITE]))
            d[0] = rng.choice([self.table_addr(), self.addr(16)])
            d[1] = rng.choice([16 * rng.randrange(1, TABLE_SLOTS + 1), 0, 8, 24 + 4,
                               16 * (TABLE_SLOTS + 4), 0xFFFFFFF0, rng.getrandbits(32)])
        else:  # loop to itself or back
            d[3] = 0
            d[2] |= NEXT

    def build(self) -> tuple[bytes, bytes, int]:
        """(descriptor table bytes, indirect tables bytes, mutations done)."""
        rng = self.rng
        descs, self.heads = self.well_formed(self.size, allow_indirect=True)
        tables = [self.well_formed(TABLE_SLOTS, allow_indirect=False)[0]
                  for _ in range(NTABLES)]
        flat_tables = [d for t in tables for d in t]
        nmut = rng.choice([0, 0, 1, 2, 3, 5, self.size // 4 + 1, self.size + 1])
        for _ in range(nmut):
            if rng.random() < 0.7:
                self.mutate(descs, self.size)
            else:
                self.mutate(flat_tables, TABLE_SLOTS)
        return pack(descs), pack(flat_tables), nmut

    def avail_entries(self, count: int) -> list[tuple[int, int]]:
        """(ring slot, head) writes making ``count`` more chains available."""
        rng = self.rng
        out = []
        for _ in range(count):
            k = rng.random()
            if k < 0.85 and self.heads:
                head = rng.choice(self.heads)
            elif k < 0.93:
                head = rng.randrange(self.size)
            else:
                head = rng.choice([self.size, self.size + 1, 0xFFFF, rng.getrandbits(16)])
            out.append((self.avail_idx % self.size, head))
            self.avail_idx = (self.avail_idx + 1) & 0xFFFF
        return out


def pop_and_read(q: Queue, max_chains: int, limit: int
                 ) -> tuple[list[Chain], list[bytes | None]]:
    """pop_batch, then read_chain of each chain without error (None for one with)."""
    chains = q.pop_batch(max_chains)
    return chains, [q.read_chain(c, limit) if c.ok else None for c in chains]


def pack(descs: list[list[int]]) -> bytes:
    arr = np.zeros((len(descs), 2), "<u8")
    for i, (addr, length, flags, nxt) in enumerate(descs):
        arr[i, 0] = addr & M64
        arr[i, 1] = (length & 0xFFFFFFFF) | ((flags & 0xFFFF) << 32) | ((nxt & 0xFFFF) << 48)
    return arr.tobytes()


# -- the scenario ------------------------------------------------------------------------


class Pair(Engines):
    """The two engines over two identical memories, checked after every step."""

    def __init__(self, seed: int, layout_no: int, size_log: int, event_idx: bool,
                 indirect: bool, tiny: bool) -> None:
        self.rng = random.Random(seed)
        rng = self.rng
        self.layout = LAYOUTS[layout_no]
        self.size = 1 << size_log
        base = rng.choice([0, 0xFFFF - self.size // 2, rng.getrandbits(16)])
        self.mems = [Mem(self.layout), Mem(self.layout)]
        fill = np.random.default_rng(seed)
        for r0, r1 in zip(self.mems[0].gm.regions, self.mems[1].gm.regions, strict=True):
            data = fill.integers(0, 256, r0.size, dtype=np.uint8)
            r0.mem[:] = data
            r1.mem[:] = data
        # The guest's own view of region 0 (ring, tables): it outlives the back-end's maps.
        self.ram0 = [m.gm.regions[0].mem for m in self.mems]
        self.guest = Guest(rng, self.layout, self.size, base)
        desc, tables, self.mutations = self.guest.build()
        self.write_both(self.guest.ring.desc, desc)
        self.write_both(self.guest.tables, tables)
        self.write_both(self.guest.ring.used, bytes(4))  # flags 0, idx 0
        super().__init__([
            queue_on(engine, mem, self.size, base, event_idx=event_idx, indirect=indirect)
            for engine, mem in zip(both_engines(), self.mems, strict=True)])
        if tiny:  # make every batch outgrow its arrays: the NEED_SEGS / NEED_DATA paths
            self.cffi._batch = queue_cffi._Batch(chains=1, segs=1)
            self.cffi._raw = queue_cffi._Raw(segs=1, data=1)
        self.chains: list[Chain] = []
        self.raw_heads: list[int] = []  # returnable heads taken by raw pops
        self.raised: Counter[type[BaseException]] = Counter()  # exceptions both engines gave
        self.errors_seen: set[ChainError] = set()
        self.broke = False
        self.filled = 0  # messages fill_rx wrote
        self.takes = 0  # chains take_one took
        self.located = 0  # chains pop_located left in place
        self.refusals: set[int] = set()  # kinds of chain fill_rx refused

    def close(self) -> None:
        for m in self.mems:
            m.close()

    def write_both(self, gpa: int, data: bytes) -> None:
        """Write to region 0 as the guest does (whatever the back-end has mapped)."""
        off = gpa - self.layout[0][0]
        for ram in self.ram0:
            ram[off : off + len(data)] = np.frombuffer(data, np.uint8)

    def publish(self, count: int) -> None:
        ring = self.guest.ring
        for slot, head in self.guest.avail_entries(count):
            self.write_both(ring.avail + 4 + 2 * slot, head.to_bytes(2, "little"))
        self.write_both(ring.avail + 2, self.guest.avail_idx.to_bytes(2, "little"))

    def both(self, what: str, fn: Callable[[Queue], Any]) -> Any:
        return self.both_rings(what, lambda vr: fn(vr.queue))

    def both_rings(self, what: str, fn: Callable[[Vring], Any]) -> Any:
        py, cf = self.run_rings(fn)
        assert agree(py, cf), f"{what}: python {py!r} != cffi {cf!r}"
        self.check_state(what)
        if py[0] == "raise":
            self.raised[py[1]] += 1
        return py

    def check_state(self, what: str) -> None:
        assert self.same_state(), f"{what}: queue state differs"
        a, b = ([(-1, ram.tobytes()), *m.snapshot()]
                for m, ram in zip(self.mems, self.ram0, strict=True))
        assert [g for g, _ in a] == [g for g, _ in b]
        for (gpa, x), (_, y) in zip(a, b, strict=True):
            if x != y:
                diff = np.flatnonzero(np.frombuffer(x, np.uint8) != np.frombuffer(y, np.uint8))
                raise AssertionError(f"{what}: memory differs in region 0x{gpa:x} at "
                                     f"offsets {diff[:8].tolist()}")

    def split_both(self) -> None:
        """Both engines cut the headers of both engines' last raw batch: all the same."""
        py, cf = self.last
        if py[0] != "ok":
            return
        for size in SPLIT_SIZES:
            for rb in (py[1], cf[1]):
                self.both(f"split_headers({rb!r}, {size})",
                          methodcaller("split_headers", rb, size))

    def note(self, res: tuple[Any, ...]) -> None:
        if res[0] == "ok" and isinstance(res[1], RawBatch):
            self.raw_heads.extend(res[1].returnable_heads().tolist())
            self.errors_seen.update(ChainError(e) for e in res[1].errors.tolist())
            return
        if res[0] == "ok" and isinstance(res[1], list):
            chains = res[1]
        elif res[0] == "ok" and isinstance(res[1], tuple):
            chains = res[1][0]
        else:
            if res[0] == "raise" and res[1] is QueueBroken:
                self.broke = True
            return
        self.chains.extend(chains)
        self.errors_seen.update(c.error for c in chains)

    def note_fill(self, res: tuple[Any, ...]) -> None:
        if res[0] == "ok":
            self.filled += res[1].written
            self.refusals.update(k for _, k, _, _ in res[1].refused)
        elif res[0] == "raise" and res[1] is QueueBroken:
            self.broke = True

    def step(self) -> None:
        rng = self.rng
        op = rng.choices(
            ["pop", "popread", "popraw", "read", "write", "push", "notify", "kicks",
             "publish", "features", "memory", "rebase", "fill", "take", "located"],
            weights=[20, 8, 8, 14, 10, 12, 8, 5, 12, 3, 1, 2, 10, 8, 6],
        )[0]
        if op == "pop":
            n = rng.choice([1, 2, 3, 8, 64, self.size, self.size + 3, 0, -1, 1 << 40])
            self.note(self.both(f"pop_batch({n})", lambda q: q.pop_batch(n)))
        elif op == "popread":  # each chain read as soon as it is popped
            n = rng.choice([1, 4, 64, self.size])
            limit = rng.choice([0, 1, 16, 100, 64 * KB + 15, 1 << 70, -1])
            self.note(self.both(f"pop_batch({n}) + read_chain(each, {limit})",
                                lambda q: pop_and_read(q, n, limit)))
        elif op == "popraw":
            n = rng.choice([1, 4, 64, self.size, self.size + 3, 0, -1, 1 << 40])
            limit = rng.choice([0, 1, 16, 100, 64 * KB + 15, 1 << 70, -1])
            self.note(self.both(f"pop_raw_batch({n}, {limit})",
                                lambda q: q.pop_raw_batch(n, limit)))
            self.split_both()
        elif op == "located":
            n = rng.choice([1, 4, 64, self.size, self.size + 3, 0, -1])
            head = rng.choice([0, 16, 100, -1])
            limit = rng.choice([0, 1, 16, 100, 64 * KB + 15, 1 << 70, -1])
            res = self.both(f"pop_located({n}, {head}, {limit})",
                            lambda q: q.pop_located(n, head, limit))
            if res[0] == "ok":
                self.note(("ok", res[1].raw))
                self.located += int((res[1].region >= 0).sum())
            elif res[0] == "raise" and res[1] is QueueBroken:
                self.broke = True
        elif op == "take":
            limit = rng.choice([0, 1, 16, 100, 64 * KB + 15, 1 << 70, -1])
            res = self.both(f"take_one({limit})", lambda q: q.take_one(limit))
            if res[0] == "ok" and res[1] is not None:
                self.errors_seen.add(ChainError(res[1][1]))
                self.takes += 1
            elif res[0] == "raise" and res[1] is QueueBroken:
                self.broke = True
        elif op in ("read", "write") and self.chains:
            useful = [c for c in self.chains if (c.readable if op == "read" else c.writable)]
            c = rng.choice(useful if useful and rng.random() < 0.8 else self.chains)
            total = c.read_len if op == "read" else c.write_len
            offset = rng.choice([0, 0, 0, 1, rng.randrange(total + 2), total, total + 5, -3])
            if op == "read":
                upto = rng.choice([None, None, 0, 1, 7, rng.randrange(total + 2), -1, 1 << 70])
                self.both(f"read_chain({c}, {upto}, {offset})",
                          lambda q: q.read_chain(c, upto, offset))
            else:
                data = rng.randbytes(rng.choice([0, 1, 5, 16, 100, total, total + 3]))
                kind = rng.choice([bytes, bytearray, memoryview])
                self.both(f"write_chain({c}, {len(data)}, {offset})",
                          lambda q: q.write_chain(c, kind(data), offset))
        elif op == "push":
            k = rng.randrange(0, 6) if rng.random() < 0.9 else rng.randrange(self.size + 9)
            known = [c.head for c in self.chains] + self.raw_heads
            entries = [(rng.choice(known) if known and rng.random() < 0.9
                        else rng.randrange(self.size + 1), rng.getrandbits(32))
                       for _ in range(k)]
            if rng.random() < 0.05:
                entries.append((rng.choice([-1, 1 << 32]), 0))  # garbage from a buggy caller
            form = rng.choice(["list", "list", "array", "used"])
            if form == "list":
                self.both(f"push_batch({entries})", lambda q: q.push_batch(entries))
            elif form == "array":
                arr: np.ndarray = np.array(entries, np.int64).reshape(-1, 2)
                if rng.random() < 0.7 and all(0 <= h < 1 << 32 for h, _ in entries):
                    arr = arr.astype(np.uint32)
                if rng.random() < 0.2:  # not C-contiguous: converted first
                    arr = np.asfortranarray(arr)
                if rng.random() < 0.03:
                    arr = arr.reshape(-1)  # wrong shape
                self.both(f"push_batch(array {arr.tolist()})", lambda q: q.push_batch(arr))
            else:
                heads = np.array([h for h, _ in entries], np.int64)
                if rng.random() < 0.7 and all(0 <= h < 1 << 32 for h in heads.tolist()):
                    heads = heads.astype(np.uint32)
                if rng.random() < 0.1:
                    heads = heads[::-1]  # a strided view
                length = rng.choice([0, 16, rng.getrandbits(32), 0xFFFFFFFF])
                if rng.random() < 0.05:
                    length = rng.choice([-1, 1 << 32])
                self.both(f"push_used({heads.tolist()}, {length})",
                          lambda q: q.push_used(heads, length))
        elif op == "notify":
            if rng.random() < 0.5:
                ring = self.guest.ring
                self.write_both(ring.avail, rng.choice([0, 1, 3]).to_bytes(2, "little"))
                event = rng.choice([self.queues[0].state.used_idx, rng.getrandbits(16), 0])
                self.write_both(ring.avail + 4 + 2 * self.size, event.to_bytes(2, "little"))
            if rng.choice(["need_notify", "notify"]) == "need_notify":
                self.both("need_notify", lambda q: q.need_notify())
            else:  # the ring's: need_notify, the call eventfd and the notify stats
                self.both_rings("notify", lambda vr: vr.notify())
        elif op == "kicks":
            name = rng.choice(["enable_kicks", "disable_kicks"])
            self.both(name, lambda q: getattr(q, name)())
        elif op == "publish":
            room = self.size - ((self.guest.avail_idx - self.queues[0].state.last_avail_idx)
                                & 0xFFFF)
            count = max(0, min(room, rng.choice([1, 2, 3, self.size // 2, self.size])))
            if rng.random() < 0.08:  # too far ahead: the queue breaks
                count = rng.choice([self.size + 1, rng.randrange(1 << 16)])
            if count > 2 * self.size:  # jump the index rather than writing 64k entries
                self.guest.avail_idx = (self.guest.avail_idx + count) & 0xFFFF
                count = 0
            self.publish(count)
            self.check_state("publish")
        elif op == "fill":  # rx: messages into whatever chains are there
            count = rng.choice([0, 1, 2, 5, self.size, self.size + 4])
            msgs = [rng.randbytes(rng.choice([0, 1, 16, 40, 64, 200, 600]))
                    for _ in range(count)]
            self.note_fill(self.both(f"fill_rx({[len(m) for m in msgs]})",
                                     lambda q: q.fill_rx(msgs)))
        elif op == "features":
            attr = rng.choice(["event_idx", "indirect"])
            for q in self.queues:
                setattr(q.state, attr, not getattr(q.state, attr))
        elif op == "memory":
            self.memory_change()
        elif op == "rebase":  # the front-end sets the ring up again (SET_VRING_BASE)
            base = (self.guest.avail_idx - rng.randrange(self.size + 1)) & 0xFFFF
            self.both(f"set_base({base})", lambda q: q.state.set_base(base))

    def memory_change(self) -> None:
        """Change the region table under the queues (and outstanding chains)."""
        rng = self.rng
        action = rng.choice(["remove", "add", "remap", "unmap", "clear"])
        if action == "remove" and len(self.mems[0].gm.regions) > 1:
            i = rng.randrange(1, len(self.mems[0].gm.regions))
            for m in self.mems:
                m.remove(i)
        elif action == "add" and len(self.mems[0].gm.regions) < 6:
            gpa = rng.choice([0x4000_0000, 0x8000_0000, 0x1_0000_0000])
            if all(not (g <= gpa < g + s) for g, s in self.layout) and all(
                    r.gpa != gpa for r in self.mems[0].gm.regions):
                for m in self.mems:
                    m.add(gpa, 8 * KB)
        elif action == "remap":
            self.both("map", remap)
        elif action == "unmap":
            self.both("unmap", lambda q: q.state.unmap())
        elif action == "clear":
            for m in self.mems:
                m.gm.clear()
        self.check_state(f"memory {action}")


def run_scenario(seed: int, layout_no: int, size_log: int, event_idx: bool, indirect: bool,
                 tiny: bool, steps: int) -> Pair:
    p = Pair(seed, layout_no, size_log, event_idx, indirect, tiny)
    try:
        p.check_state("setup")
        p.publish(p.rng.choice([0, 1, p.size // 2, p.size, p.size]))
        for _ in range(steps):
            p.step()
        # drain what is left, return everything, and compare the final notification
        p.note(p.both("final pop", lambda q: q.pop_batch(p.size)))
        entries = [(c.head, 0) for c in p.chains if c.returnable][: p.size]
        p.both("final push", lambda q: q.push_batch(entries))
        heads = np.array(p.raw_heads[: p.size], np.uint32)
        p.both("final push_used", lambda q: q.push_used(heads, 0))
        p.both("final notify", lambda q: q.need_notify())
    finally:
        p.close()
    return p


# -- the differential tests ------------------------------------------------------------------


@needs_cffi
@settings(max_examples=400, deadline=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(
    seed=st.integers(0, 2**32 - 1),
    layout_no=st.integers(0, len(LAYOUTS) - 1),
    size_log=st.integers(0, 8),
    event_idx=st.booleans(),
    indirect=st.booleans(),
    tiny=st.booleans(),
    steps=st.integers(1, 40),
)
def test_engines_agree_on_random_rings(seed: int, layout_no: int, size_log: int,
                                       event_idx: bool, indirect: bool, tiny: bool,
                                       steps: int) -> None:
    run_scenario(seed, layout_no, size_log, event_idx, indirect, tiny, steps)


@needs_cffi
def test_engines_agree_on_a_seed_sweep() -> None:
    """A fixed sweep that must meet every ChainError and a broken queue on the way."""
    seen: set[ChainError] = set()
    broke = 0
    chains = 0
    raw = 0
    filled = 0
    takes = 0
    located = 0
    refusals: set[int] = set()
    raised: Counter[type[BaseException]] = Counter()
    for seed in range(600):
        rng = random.Random(seed)
        p = run_scenario(seed, seed % len(LAYOUTS), rng.randrange(0, 9), rng.random() < 0.5,
                         rng.random() < 0.8, seed % 5 == 0, 30)
        seen |= p.errors_seen
        broke += p.broke
        chains += len(p.chains)
        raw += len(p.raw_heads)
        filled += p.filled
        takes += p.takes
        located += p.located
        refusals |= p.refusals
        raised += p.raised
    assert seen == set(ChainError), f"never produced: {set(ChainError) - seen}"
    assert broke > 0
    assert chains > 3000
    assert raw > 500
    assert filled > 200
    assert takes > 40  # only a ring showing one chain is taken from
    assert located > 200
    assert {RX_READABLE, RX_TOO_SMALL, int(ChainError.HEAD_OUT_OF_RANGE),
            int(ChainError.LOOP)} <= refusals, refusals
    # copies through chains from before a memory change, negative offsets, bad push input
    assert raised[StaleChain] > 0 and raised[ValueError] > 0, raised


# -- targeted cases -----------------------------------------------------------------------


class Duo(Engines):
    """Both engines on two one-region memories, driven through DriverRing views."""

    def __init__(self, size: int = 8, *, event_idx: bool = False, indirect: bool = True,
                 layout: list[tuple[int, int]] | None = None) -> None:
        self.layout = layout or [(0, 64 * KB)]
        self.mems = [Mem(self.layout), Mem(self.layout)]
        self.rl = RingLayout(self.layout[0][0], size)
        self.drivers = [DriverRing(m.gm.regions[0].mem, RingLayout(0, size), event_idx)
                        for m in self.mems]
        super().__init__([
            queue_on(engine, m, size, event_idx=event_idx, indirect=indirect)
            for engine, m in zip(both_engines(), self.mems, strict=True)])

    def each(self, fn: Callable[[DriverRing, Mem], Any]) -> list[Any]:
        return [fn(d, m) for d, m in zip(self.drivers, self.mems, strict=True)]

    def both(self, fn: Callable[[Queue], Any]) -> Any:
        return self.both_rings(lambda vr: fn(vr.queue))

    def both_rings(self, fn: Callable[[Vring], Any]) -> Any:
        py, cf = self.run_rings(fn)
        assert agree(py, cf), f"python {py!r} != cffi {cf!r}"
        assert self.same_state()
        assert self.mems[0].snapshot() == self.mems[1].snapshot()
        return py

    def close(self) -> None:
        for m in self.mems:
            m.close()


BUF = 0x8000


def _indirect_table(m: Mem, entries: list[tuple[int, int, int, int]]) -> int:
    at = 0x4000
    m.write(at, pack([list(e) for e in entries]))
    return at


@needs_cffi
@pytest.mark.parametrize("case", [
    "ok", "head", "next", "loop", "addr_gap", "addr_straddle", "addr_wrap", "nested",
    "bad_len", "with_next", "not_negotiated", "raw", "raw_zero_len", "zero_len_ok",
])
def test_each_chain_error_identically(case: str) -> None:
    duo = Duo(indirect=case != "not_negotiated",
              layout=[(0, 64 * KB), (64 * KB, 16 * KB)])
    expected = {
        "ok": ChainError.OK, "head": ChainError.HEAD_OUT_OF_RANGE,
        "next": ChainError.NEXT_OUT_OF_RANGE, "loop": ChainError.LOOP,
        "addr_gap": ChainError.ADDR_OUT_OF_BOUNDS, "addr_straddle": ChainError.ADDR_OUT_OF_BOUNDS,
        "addr_wrap": ChainError.ADDR_OUT_OF_BOUNDS, "nested": ChainError.INDIRECT_NESTED,
        "bad_len": ChainError.INDIRECT_BAD_LEN, "with_next": ChainError.INDIRECT_WITH_NEXT,
        "not_negotiated": ChainError.INDIRECT_NOT_NEGOTIATED,
        "raw": ChainError.READABLE_AFTER_WRITABLE,
        "raw_zero_len": ChainError.READABLE_AFTER_WRITABLE, "zero_len_ok": ChainError.OK,
    }[case]

    def setup(d: DriverRing, m: Mem) -> None:
        if case == "ok":
            d.add([(BUF, 4, 0), (BUF + 64, 0, 0), (BUF + 128, 8, WRITE)])
        elif case == "head":
            d.add_raw(8)
        elif case == "next":
            h = d.add([(BUF, 4, 0)])
            d.write_desc(h, BUF, 4, NEXT, 8)
        elif case == "loop":
            h = d.add([(BUF, 4, 0), (BUF, 4, 0)])
            d.write_desc(h + 1, BUF, 4, NEXT, h)
        elif case == "addr_gap":
            d.add([(BUF, 4, 0), (0x100000, 4, 0)])
        elif case == "addr_straddle":
            d.add([(64 * KB - 2, 4, 0)])  # half in each of two adjacent regions
        elif case == "addr_wrap":
            d.add([((1 << 64) - 2, 4, 0)])
        elif case in ("nested", "bad_len", "with_next", "not_negotiated"):
            tbl = _indirect_table(m, [(BUF, 4, NEXT, 1),
                                         (0x4000, 16, INDIRECT if case == "nested" else 0, 0)])
            length = 24 if case == "bad_len" else 32
            flags = INDIRECT | (NEXT if case == "with_next" else 0)
            d.add([(tbl, length, flags)])
        elif case == "raw":
            d.add([(BUF, 4, WRITE), (BUF + 64, 4, 0)])
        elif case == "raw_zero_len":
            d.add([(BUF, 4, WRITE), (BUF + 64, 0, 0)])
        elif case == "zero_len_ok":  # zero-length buffers are skipped, even out of memory
            d.add([(BUF, 4, 0), (1 << 63, 0, WRITE), (BUF + 64, 4, WRITE)])
        d.publish()

    duo.each(setup)
    res = duo.both(lambda q: q.pop_batch(4))
    (chain,) = res[1]
    assert chain.error is expected
    duo.both(lambda q: q.read_chain(chain))
    duo.both(lambda q: q.write_chain(chain, b"0123456789abcdef", 1))
    duo.both(lambda q: q.push_batch([(chain.head, 3)]) if chain.returnable else None)
    duo.close()


@needs_cffi
def test_queue_broken_identically() -> None:
    duo = Duo(size=4)
    duo.each(lambda d, m: m.write(d.layout.avail + 2, (9).to_bytes(2, "little")))
    res = duo.both(lambda q: q.pop_batch(0))
    assert res[:2] == ("raise", QueueBroken)
    assert res[2] == "avail idx 9 is 9 ahead of 0"
    with pytest.raises(QueueBroken) as exc:  # the cffi engine's own message; nothing taken
        duo.cffi.pop_batch(0)
    assert str(exc.value) == "avail idx 9 is 9 ahead of 0"
    assert all(vr.broken == "avail idx 9 is 9 ahead of 0" and not vr.ready
               for vr in duo.vrings)
    duo.close()


@needs_cffi
@pytest.mark.parametrize("event_idx", [False, True])
def test_notify_decisions_identically(event_idx: bool) -> None:
    duo = Duo(size=8, event_idx=event_idx)
    for round_ in range(40):
        duo.each(lambda d, m: d.add([(BUF, 16, 0)]))
        duo.each(lambda d, m: d.publish())
        res = duo.both(lambda q: q.pop_batch(8))
        (c,) = res[1]
        duo.both(methodcaller("push_batch", [(c.head, 0)]))
        if round_ % 3 == 0:
            duo.each(lambda d, m: d.enable_interrupts())
        elif round_ % 3 == 1:
            duo.each(lambda d, m: d.disable_interrupts())
        duo.both(lambda q: q.need_notify())
        duo.both(methodcaller("enable_kicks" if round_ % 2 else "disable_kicks"))
        duo.each(lambda d, m: d.get_used())
    duo.close()


@needs_cffi
def test_stale_chains_after_the_table_changes() -> None:
    """Chains kept across a memory change raise StaleChain in both engines, copying nothing."""
    layout = [(0, 64 * KB), (64 * KB, 16 * KB), (0x100000, 16 * KB)]
    duo = Duo(layout=layout)
    duo.each(lambda d, m: d.add([(64 * KB + 16, 32, 0), (0x100000 + 8, 32, WRITE)]))
    duo.each(lambda d, m: d.add([(BUF, 8, 0), (BUF + 64, 8, WRITE)]))
    duo.each(lambda d, m: d.publish())
    (c, c2) = duo.both(lambda q: q.pop_batch(2))[1]
    assert c.generation == c2.generation == duo.mems[0].gm.generation
    for m in duo.mems:
        m.remove(1)  # the last region is now index 1, the chain's region 2 is gone
    want = (f"chain at head {c.head} was taken under memory table generation {c.generation}; "
            f"the memory table changed since the chain was taken (now generation "
            f"{c.generation + 1}), so its buffers are no longer valid")
    assert duo.both(lambda q: q.read_chain(c)) == ("raise", StaleChain, want)
    assert duo.both(lambda q: q.write_chain(c, b"x" * 40)) == ("raise", StaleChain, want)
    # also a chain whose region did not move: any change of the table makes it stale
    for fn in (lambda q: q.read_chain(c2), lambda q: q.write_chain(c2, b"z" * 8),
               lambda q: q.read_chain(c2, 4, 2)):
        assert duo.both(fn)[:2] == ("raise", StaleChain)
    # an added region too; remapping the rings (same table) is no change
    for m in duo.mems:
        m.add(0x4000_0000, 8 * KB)
    duo.both(remap)
    duo.each(lambda d, m: d.add([(BUF, 8, 0), (BUF + 64, 8, WRITE)]))
    duo.each(lambda d, m: d.publish())
    (c3,) = duo.both(lambda q: q.pop_batch(1))[1]
    duo.both(remap)
    assert duo.both(lambda q: q.read_chain(c3))[0] == "ok"
    assert duo.both(lambda q: q.write_chain(c3, b"w" * 8)) == ("ok", 8)
    for m in duo.mems:
        m.add(0x8000_0000, 8 * KB)
    assert duo.both(lambda q: q.read_chain(c3))[:2] == ("raise", StaleChain)
    # a chain not from a pop (generation -1)
    made = Chain(c3.head, readable=c3.readable, read_len=c3.read_len)
    assert duo.both(lambda q: q.read_chain(made))[:2] == ("raise", StaleChain)
    # the stale chains are still outstanding: they go back like any other
    duo.both(lambda q: q.push_batch([(c.head, 0), (c2.head, 0), (c3.head, 0)]))
    for m in duo.mems:
        m.gm.clear()
    duo.both(lambda q: q.read_chain(c))
    duo.both(lambda q: q.write_chain(c, b"y" * 8))
    duo.both(lambda q: q.pop_batch(4))  # the rings stay mapped through the queue's views
    duo.close()


@needs_cffi
def test_negative_offsets_are_value_errors() -> None:
    duo = Duo()
    duo.each(lambda d, m: d.add([(BUF, 8, 0), (BUF + 64, 8, WRITE)]))
    duo.each(lambda d, m: d.add([(BUF, 4, 0), (BUF + 8, 4, 0), (BUF + 64, 4, WRITE),
                                 (BUF + 72, 4, WRITE)]))
    duo.each(lambda d, m: d.publish())
    for c in duo.both(lambda q: q.pop_batch(2))[1]:
        for off in (-1, -8, -(1 << 70)):
            assert duo.both(methodcaller("read_chain", c, None, off)) == (
                "raise", ValueError, f"offset {off} is negative")
            assert duo.both(methodcaller("read_chain", c, 4, off))[:2] == (
                "raise", ValueError)
            assert duo.both(methodcaller("write_chain", c, b"abcdef", off)) == (
                "raise", ValueError, f"offset {off} is negative")
        assert duo.both(methodcaller("read_chain", c, None, 0))[0] == "ok"
        assert duo.both(methodcaller("write_chain", c, b"abcdef", 1))[0] == "ok"
    duo.close()


@needs_cffi
@pytest.mark.parametrize("size", [1, 8, 64])
def test_indirect_tables_are_capped_at_the_queue_size(size: int) -> None:
    duo = Duo(size=size)
    for entries in (1, size, size + 1, 4 * size, 1 << 24, 1 << 28):
        def setup(d: DriverRing, m: Mem, entries: int = entries) -> None:
            # a one-descriptor chain first; the rest of the table is never walked
            m.write(0x4000, pack([[BUF, 4, 0, 0]]))
            d.write_desc(0, 0x4000, (16 * entries) & 0xFFFFFFFF, INDIRECT, 0)
            d.add_raw(0)
            d.publish()

        duo.each(setup)
        (c,) = duo.both(lambda q: q.pop_batch(4))[1]
        assert c.error is (ChainError.OK if entries <= size else ChainError.INDIRECT_BAD_LEN)
        duo.each(setup)
        rb = duo.both(lambda q: q.pop_raw_batch(4, 64))[1]
        assert rb.errors.tolist() == [c.error]
        duo.both(lambda q: q.push_used(np.zeros(2, np.uint32), 0))
    duo.close()


def _fill_raw(d: DriverRing, m: Mem) -> None:
    """A mix for pop_raw_batch: good (direct, split, indirect), writable, bad, empty."""
    msgs = [bytes(range(i, i + 16 + i)) for i in range(12)]
    for i, msg in enumerate(msgs):
        m.write(BUF + 256 * i, msg)
    d.add([(BUF, len(msgs[0]), 0)])
    d.add([(BUF + 256, 8, 0), (BUF + 256 + 8, len(msgs[1]) - 8, 0)])
    d.add([(BUF + 512, 4, WRITE)])  # writable only: OK, has_writable, no bytes
    d.add([(BUF + 768, len(msgs[3]), 0), (BUF + 0x1000, 64, WRITE)])  # both directions
    d.add([(BUF + 1024, 8, WRITE), (BUF + 1024, 8, 0)])  # READABLE_AFTER_WRITABLE
    d.add([(BUF + 1280, 0, 0)])  # empty
    tbl = 0x4000
    m.write(tbl, pack([[BUF + 1536, 5, NEXT, 1], [BUF + 1536 + 5, len(msgs[6]) - 5, 0, 0]]))
    d.add([(tbl, 32, INDIRECT)])
    d.add([(1 << 40, 16, 0)])  # ADDR_OUT_OF_BOUNDS
    d.add_raw(d.layout.size + 3)  # HEAD_OUT_OF_RANGE
    d.add([(BUF + 256 * 9, len(msgs[9]), 0)])
    d.publish()


@needs_cffi
@pytest.mark.parametrize("limit", [-1, 0, 1, 8, 20, 1 << 20, 1 << 70])
def test_pop_raw_batch_identically(limit: int) -> None:
    duo = Duo(size=16)
    duo.each(_fill_raw)
    res = duo.both(lambda q: q.pop_raw_batch(64, limit))
    assert res[0] == "ok"
    rb: RawBatch = res[1]
    assert rb.count == len(rb) == 10
    for name, dtype in (("heads", np.uint32), ("errors", np.uint8), ("has_writable", np.bool_),
                        ("lengths", np.int64), ("offsets", np.int64)):
        arr = getattr(rb, name)
        assert arr.dtype == dtype and arr.shape == (10,) and arr.flags.c_contiguous, name
    assert isinstance(rb.data, bytes)
    E = ChainError
    assert rb.errors.tolist() == [E.OK, E.OK, E.OK, E.OK, E.READABLE_AFTER_WRITABLE, E.OK,
                                  E.OK, E.ADDR_OUT_OF_BOUNDS, E.HEAD_OUT_OF_RANGE, E.OK]
    assert rb.has_writable.tolist() == [False, False, True, True, False, False, False, False,
                                        False, False]
    assert rb.returnable_heads().tolist() == [h for h, e in zip(rb.heads.tolist(),
                                                                  rb.errors.tolist(),
                                                                  strict=True) if e != 1]
    assert rb.offsets.tolist() == (np.cumsum(rb.lengths) - rb.lengths).tolist()
    assert len(rb.data) == int(rb.lengths.sum())
    # the same as pop_batch + read_chain on a third, identical ring
    ref = Duo(size=16)
    ref.each(_fill_raw)
    q = ref.queues[0]
    chains = q.pop_batch(64)
    for i, c in enumerate(chains):
        assert rb.heads[i] == c.head and rb.errors[i] == c.error
        assert rb.payload(i) == (q.read_chain(c, limit) if c.ok else b"")
    assert rb.data == b"".join(rb.payload(i) for i in range(rb.count))
    assert duo.queues[1].state.stats == q.state.stats  # popped 10, bad 3
    ref.close()
    # nothing left; a second pop is empty in both
    res = duo.both(lambda q: q.pop_raw_batch(64, limit))
    assert res[1] == RawBatch.empty() and res[1].count == 0
    duo.both(lambda q: q.push_used(rb.returnable_heads(), 0))
    assert duo.drivers[0].get_used() == duo.drivers[1].get_used()
    duo.close()


def _fill_rx_mix(d: DriverRing, m: Mem) -> None:
    """rx chains: good, device-readable, too small, bad address, bad head, split, good."""
    d.add([(BUF, 64, WRITE)])
    d.add([(BUF + 256, 64, 0)])  # device-readable: refused
    d.add([(BUF + 512, 4, WRITE)])  # too small for what comes next
    d.add([(1 << 40, 64, WRITE)])  # ADDR_OUT_OF_BOUNDS
    d.add_raw(d.layout.size + 3)  # HEAD_OUT_OF_RANGE: refused, never given back
    d.add([(BUF + 768, 3, WRITE), (BUF + 1024, 61, WRITE)])  # split over two buffers
    d.add([(BUF + 1280, 64, WRITE)])
    d.publish()


@needs_cffi
def test_fill_rx_identically() -> None:
    """What each chain of the mix gets, the refusals in ring order, and what is left."""
    duo = Duo(size=16)
    duo.each(_fill_rx_mix)
    msgs = [b"a" * 10, b"b" * 20, b"", b"d" * 40]
    res = duo.both(lambda q: q.fill_rx(msgs))
    assert res[0] == "ok"
    filled = res[1]
    E = ChainError
    assert filled.written == 3 and filled.exhausted  # no chain left for the fourth
    assert [(k, detail, m) for _, k, detail, m in filled.refused] == [
        (RX_READABLE, 0, 1), (RX_TOO_SMALL, 4, 1), (int(E.ADDR_OUT_OF_BOUNDS), 0, 1),
        (int(E.HEAD_OUT_OF_RANGE), 0, 1)]
    m = duo.mems[0]
    assert m.gm.read_gpa(BUF, 10) == msgs[0]
    assert m.gm.read_gpa(BUF + 768, 3) + m.gm.read_gpa(BUF + 1024, 17) == msgs[1]
    # the empty message took the last chain; the refused ones went back with length 0
    lengths = [n for _, n in duo.drivers[0].get_used()]
    assert lengths == [10, 0, 0, 0, 20, 0]
    stats = duo.queues[1].state.stats
    assert (stats.popped, stats.bad_chains, stats.pushed) == (7, 2, 6)
    # nothing new in the ring: the fourth still finds no chain
    res = duo.both(lambda q: q.fill_rx(msgs[3:]))
    assert res[1].written == 0 and res[1].exhausted and not res[1].refused
    duo.close()


@needs_cffi
def test_fill_rx_queue_broken_identically() -> None:
    duo = Duo(size=8)
    for d in duo.drivers:
        d.avail[1] = 9  # nine ahead of a ring of eight
    py = duo.both(lambda q: q.fill_rx([b"x"]))
    assert py[0] == "raise" and py[1] is QueueBroken
    duo.close()


def _looping_ring(d: DriverRing, m: Mem, flags: int) -> None:
    """Every descriptor chains to the next, the last to the first: each of the ring's
    chains reads the whole table before it is found to loop."""
    n = d.size
    for i in range(n):
        d.write_desc(i, BUF + 64 * i, 64, flags | NEXT, (i + 1) % n)
        d.add_raw(i)
    d.publish()


@needs_cffi
@pytest.mark.parametrize("op", ["pop_raw_batch", "pop_batch", "fill_rx"])
def test_a_ring_of_looping_chains_costs_each_call_a_bounded_walk(op: str) -> None:
    """Fuzz finding F2: 64 chains that each loop through all 64 descriptors cost 64^2
    reads in one call.  Each call now starts walks only while fewer than WALK_BUDGET
    queue sizes were read, both engines alike, and the next call goes on."""
    size = 64
    per_call = WALK_BUDGET  # each chain reads size descriptors
    duo = Duo(size=size)
    duo.each(lambda d, m: _looping_ring(d, m, WRITE if op == "fill_rx" else 0))
    taken = 0
    for _ in range(size // per_call):
        if op == "pop_raw_batch":
            rb = duo.both(lambda q: q.pop_raw_batch(size, 512))[1]
            assert rb.count == per_call and set(rb.errors) == {int(ChainError.LOOP)}
            heads = rb.returnable_heads()
            duo.both(lambda q: q.push_used(heads, 0))  # noqa: B023 (called at once)
        elif op == "pop_batch":
            chains = duo.both(lambda q: q.pop_batch(size))[1]
            assert [c.error for c in chains] == [ChainError.LOOP] * per_call
        else:
            f = duo.both(lambda q: q.fill_rx([b"m"] * 4))[1]
            # chains are left, so not exhausted (call again), until the last four
            assert f.written == 0 and f.exhausted == (taken + per_call == size)
            assert [k for _, k, _, _ in f.refused] == [int(ChainError.LOOP)] * per_call
        taken += per_call
    assert duo.queues[1].state.stats.popped == taken == size
    assert duo.queues[1].state.stats.bad_chains == size
    if op == "fill_rx":  # all refused: now the ring is exhausted, nothing was written
        f = duo.both(lambda q: q.fill_rx([b"m"]))[1]
        assert f.written == 0 and f.exhausted and not f.refused
    duo.close()


@needs_cffi
def test_a_full_ring_of_well_formed_chains_is_one_batch_within_the_budget() -> None:
    """The budget never splits a batch of direct chains: together they read at most
    a queue size of descriptors."""
    duo = Duo(size=64)

    def fill(d: DriverRing, m: Mem) -> None:
        for i in range(32):
            d.add([(BUF + 64 * i, 8, 0), (BUF + 64 * i + 8, 8, 0)])
        d.publish()

    duo.each(fill)
    rb = duo.both(lambda q: q.pop_raw_batch(64, 512))[1]
    assert rb.count == 32 and rb.nbad == 0
    duo.close()


def _headers(rb: RawBatch, size: int) -> list[bytes]:
    """What split_headers must give: each chain's first ``size`` bytes, zero-filled."""
    return [(p := rb.payload(i)[:size]) + bytes(size - len(p)) for i in range(rb.count)]


def _split_both(duo: Duo, batches: list[RawBatch], size: int) -> None:
    """Both engines cut every batch of ``batches``: the same array, the expected bytes."""
    for rb in batches:
        res = duo.both(methodcaller("split_headers", rb, size))
        assert res[0] == "ok", res
        arr = res[1]
        assert isinstance(arr, np.ndarray)
        assert arr.dtype == np.uint8 and arr.shape == (rb.count, size)
        assert [row.tobytes() for row in arr] == _headers(rb, size)


@needs_cffi
@pytest.mark.parametrize("limit", [-1, 0, 1, 8, 16, 20, 1 << 20])
def test_split_headers_identically(limit: int) -> None:
    """Raw batches with short, empty and bad chains: both engines cut the same headers."""
    duo = Duo(size=16)
    duo.each(_fill_raw)
    py, cf = duo.run(lambda q: q.pop_raw_batch(64, limit))
    assert py[0] == cf[0] == "ok" and py == cf
    batches = [py[1], cf[1]]  # each engine on its own batch and on the other's
    assert batches[0].count == 10
    for size in (0, 1, 4, 15, 16, 17, 40, 64 * KB):
        _split_both(duo, batches, size)
    # nothing left: the empty batch of each engine, and the shared RawBatch.empty()
    py, cf = duo.run(lambda q: q.pop_raw_batch(64, limit))
    assert py == cf == ("ok", RawBatch.empty())
    for size in (0, 16):
        _split_both(duo, [py[1], cf[1], RawBatch.empty()], size)
    duo.close()


@needs_cffi
def test_split_headers_of_full_and_made_up_batches() -> None:
    """Every chain at least as long as the header (one gather), and hand-made batches."""
    duo = Duo(size=16)

    def fill(d: DriverRing, m: Mem) -> None:
        for i in range(6):
            m.write(BUF + 256 * i, bytes(range(i, i + 48)))
            d.add([(BUF + 256 * i, 8, 0), (BUF + 256 * i + 8, 24 + i, 0)])
        d.publish()

    duo.each(fill)
    py, cf = duo.run(lambda q: q.pop_raw_batch(8, 32))
    assert py == cf and py[1].lengths.tolist() == [32] * 6
    for size in (1, 16, 31, 32, 33):  # all full, then all one byte short
        _split_both(duo, [py[1], cf[1]], size)
    data = bytes(range(1, 80))
    lengths = [0, 3, 16, 20, 0, 1, 39]
    offsets = np.cumsum([0, *lengths[:-1]])
    made = RawBatch(np.arange(7, dtype=np.uint32), np.zeros(7, np.uint8), np.zeros(7, np.bool_),
                    np.array(lengths, np.int64), offsets.astype(np.int64), data[: sum(lengths)])
    single = RawBatch(np.zeros(1, np.uint32), np.zeros(1, np.uint8), np.zeros(1, np.bool_),
                      np.array([5], np.int64), np.zeros(1, np.int64), data[:5])
    for size in (0, 1, 3, 4, 16, 17, 20, 21, 64):
        _split_both(duo, [made, single], size)
    duo.close()


@needs_cffi
def test_pop_raw_batch_limits_and_partial_batches() -> None:
    duo = Duo(size=8)
    for rounds in range(6):
        k = rounds + 1

        def post(d: DriverRing, m: Mem, k: int = k) -> None:
            for j in range(k):
                d.add([(BUF + 64 * j, 16 + j, 0)])

        duo.each(post)
        duo.each(lambda d, m: d.publish())
        for want in (0, -5, 2, 64):
            rb = duo.both(methodcaller("pop_raw_batch", want, 12))[1]
            assert rb.count == (0 if want <= 0 else min(want, k))
            if rb.count:
                duo.both(methodcaller("push_used", rb.heads, 0))
                k -= rb.count
        duo.each(lambda d, m: d.get_used())
    duo.close()


@needs_cffi
def test_pop_raw_batch_queue_broken_identically() -> None:
    duo = Duo(size=4)
    duo.each(lambda d, m: m.write(d.layout.avail + 2, (9).to_bytes(2, "little")))
    for n in (0, 4):
        res = duo.both(methodcaller("pop_raw_batch", n, 16))
        assert res == ("raise", QueueBroken, "avail idx 9 is 9 ahead of 0")
    duo.close()


@needs_cffi
def test_pop_raw_batch_grows_its_scratch() -> None:
    """Chains with more readable segments than the scratch holds, payloads beyond it."""
    size = 512
    duo = Duo(size=size, layout=[(0, 64 * KB), (64 * KB, 64 * KB)])
    big = bytes(range(256)) * 200  # 51200 bytes
    tbl = 0x5000

    def fill(d: DriverRing, m: Mem) -> None:
        m.write(64 * KB, big)
        # 400 one-byte readable descriptors: more than the 256 scratch segments
        m.write(tbl, pack([[64 * KB + i, 1, NEXT if i < 399 else 0, i + 1 if i < 399 else 0]
                           for i in range(400)]))
        d.add([(tbl, 16 * 400, INDIRECT)])
        for _ in range(3):  # 3 * 51200 bytes: more than the 64 KiB data buffer
            d.add([(64 * KB, len(big), 0)])
        d.add([(64 * KB + 7, 100, 0)])
        d.publish()

    duo.each(fill)
    rb = duo.both(lambda q: q.pop_raw_batch(64, 1 << 20))[1]
    assert rb.lengths.tolist() == [400, len(big), len(big), len(big), 100]
    assert rb.payload(0) == big[:400] and rb.payload(3) == big and rb.payload(4) == big[7:107]
    raw = duo.cffi._raw
    assert raw is not None and raw.seg_cap >= 400 and raw.data_cap >= 3 * len(big) + 500
    duo.close()


@needs_cffi
def test_raw_batches_own_their_arrays() -> None:
    duo = Duo(size=8)
    q = duo.queues[1]
    d, m = duo.drivers[1], duo.mems[1]
    m.write(BUF, b"A" * 32)
    m.write(BUF + 64, b"B" * 32)
    d.add([(BUF, 32, 0)])
    d.publish()
    first = q.pop_raw_batch(8, 64)
    snapshot = (first.heads.copy(), first.lengths.copy(), first.data)
    q.push_used(first.heads, 0)
    d.get_used()
    d.add([(BUF + 64, 16, 0)])
    d.add([(BUF + 64, 16, WRITE)])
    d.publish()
    second = q.pop_raw_batch(8, 64)
    assert second.count == 2 and second.data == b"B" * 16
    assert first.data == b"A" * 32
    assert (first.heads == snapshot[0]).all() and (first.lengths == snapshot[1]).all()
    duo.close()


@needs_cffi
def test_push_forms_write_the_same_ring() -> None:
    """push_batch(list), push_batch(array) and push_used: same ring, idx and stats."""
    size = 8
    heads = [3, 1, 7, 0, 5, 2, 6, 4, 1, 3, 0]  # more than the ring: it wraps over itself
    for n in (1, 3, 8, 11):
        rings = []
        for engine in (PythonQueue, CffiQueue):
            for form in ("list", "array", "strided", "int64", "used"):
                mem = Mem([(0, 64 * KB)])
                q = queue_on(engine, mem, size, 0xFFFE)
                hs = heads[:n]
                if form == "list":
                    q.push_batch([(h, 77) for h in hs])
                elif form == "array":
                    q.push_batch(np.array([(h, 77) for h in hs], np.uint32))
                elif form == "strided":
                    q.push_batch(np.array([(77, h) for h in hs], np.uint32)[:, ::-1])
                elif form == "int64":
                    q.push_batch(np.array([(h, 77) for h in hs], np.int64))
                else:
                    q.push_used(np.array(hs, np.uint32), 77)
                rings.append((engine.name, form, q.state.used_idx, q.state.stats.pushed,
                              q.state.used16.tobytes()))
                q.state.unmap()
                mem.close()
        first = rings[0][2:]
        assert first[0] == (0xFFFE + n) & 0xFFFF
        for r in rings:
            assert r[2:] == first, r[:2]


GOOD_HEADS = np.array([1, 2], np.uint32)
GOOD_ENTRIES = np.array([[1, 0], [2, 0]], np.uint32)


@needs_cffi
@pytest.mark.parametrize(("call", "error"), [
    (lambda q: q.push_used(np.array([1, -2]), 0), ValueError),
    (lambda q: q.push_used(np.array([1, 1 << 32]), 0), ValueError),
    (lambda q: q.push_used(np.array([1.0, 2.0]), 0), TypeError),
    (lambda q: q.push_used(np.array([[1, 2]], np.uint32), 0), ValueError),
    (lambda q: q.push_used(GOOD_HEADS, -1), ValueError),
    (lambda q: q.push_used(GOOD_HEADS, 1 << 32), ValueError),
    (lambda q: q.push_used(GOOD_HEADS, 1.5), TypeError),
    (lambda q: q.push_batch(np.array([[1, 0], [-2, 0]])), ValueError),
    (lambda q: q.push_batch(np.array([[1, 1 << 32], [2, 0]])), ValueError),
    (lambda q: q.push_batch(np.array([[1.0, 0.0]])), TypeError),
    (lambda q: q.push_batch(np.zeros((2, 2, 2), np.uint32)), ValueError),
    (lambda q: q.push_batch(np.array([1, 0], np.uint32)), ValueError),
    (lambda q: q.push_batch(np.zeros((2, 3), np.uint32)), ValueError),
    (lambda q: q.pop_raw_batch(1.5, 0), TypeError),
    (lambda q: q.pop_raw_batch(1, None), TypeError),
])
def test_bad_array_input_fails_identically_before_any_write(
        call: Callable[[Queue], Any], error: type[Exception]) -> None:
    duo = Duo(size=8)
    duo.each(lambda d, m: d.add([(BUF, 8, 0)]))
    duo.each(lambda d, m: d.publish())
    assert duo.both(call)[:2] == ("raise", error)
    assert all(q.state.used_idx == 0 and q.state.last_avail_idx == 0 for q in duo.queues)
    assert duo.both(lambda q: q.push_used(GOOD_HEADS, 0xFFFFFFFF)) == ("ok", None)
    assert duo.both(lambda q: q.push_batch(GOOD_ENTRIES)) == ("ok", None)
    duo.close()


@needs_cffi
def test_push_used_on_an_unmapped_queue_fails_identically() -> None:
    duo = Duo()
    duo.both(lambda q: q.state.unmap())
    heads = np.array([0], np.uint32)
    assert duo.both(lambda q: q.push_used(heads, 0))[:2] == ("raise", RuntimeError)
    assert duo.both(lambda q: q.push_used(heads[:0], 0)) == ("ok", None)
    assert duo.both(lambda q: q.push_batch(np.zeros((1, 2), np.uint32)))[0] == "raise"
    assert duo.both(lambda q: q.pop_raw_batch(4, 4))[0] == "raise"
    duo.close()


@needs_cffi
def test_unmapped_queue_fails_identically() -> None:
    duo = Duo()
    duo.each(lambda d, m: d.add([(BUF, 16, 0)]))
    duo.each(lambda d, m: d.publish())
    (c,) = duo.both(lambda q: q.pop_batch(1))[1]
    duo.both(lambda q: q.state.unmap())
    for fn in (lambda q: q.pop_batch(1), lambda q: q.push_batch([(0, 0)]),
               lambda q: q.read_chain(c), lambda q: q.write_chain(c, b"abc"),
               lambda q: q.enable_kicks(), lambda q: q.disable_kicks()):
        assert duo.both(fn)[0] == "raise"
    assert duo.both(lambda q: q.need_notify()) == ("ok", False)  # nothing pushed since
    for q in duo.queues:
        q.state.used_idx += 1
    assert duo.both(lambda q: q.need_notify())[0] == "raise"
    duo.close()


@needs_cffi
def test_unmap_releases_the_mapping() -> None:
    """After unmap() the C engine holds nothing: clearing memory really unmaps it."""
    mem = Mem([(0, 64 * KB)])
    q = queue_on(CffiQueue, mem, 8)
    q.pop_batch(1)
    m = mem.gm.regions[0]._map
    assert m is not None
    q.state.unmap()
    mem.gm.clear()
    assert m.closed


@needs_cffi
def test_regions_stay_mapped_while_the_engine_uses_them() -> None:
    """Memory cleared under a mapped queue: its pages live on until the queue lets go."""
    mem = Mem([(0, 64 * KB)])
    q = queue_on(CffiQueue, mem, 8)
    m = mem.gm.regions[0]._map
    assert m is not None
    mem.gm.clear()
    assert not m.closed
    q.pop_batch(8)  # reads the ring through mappings that are still there
    q.state.unmap()


# -- engine selection --------------------------------------------------------------------------


def test_engine_selection() -> None:
    assert engines.queue_factory("python") is PythonQueue
    assert "python" in engines.available_engines()
    with pytest.raises(ValueError, match="unknown engine"):
        engines.queue_factory("rust")
    if IMPORT_ERROR is None:
        assert engines.queue_factory("cffi") is CffiQueue
        assert engines.queue_factory("auto") is CffiQueue
        assert engines.queue_factory()(QueueState(3, 256)).name == "cffi"


def test_auto_falls_back_with_a_warning(monkeypatch: pytest.MonkeyPatch,
                                        caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setitem(sys.modules, "_vhost_rpmsg_vring", None)  # import fails
    monkeypatch.delitem(sys.modules, "vhost_rpmsg.virtio.queue_cffi", raising=False)
    with caplog.at_level(logging.WARNING, "vhost_rpmsg.virtio.engines"):
        assert engines.queue_factory("auto") is PythonQueue
    assert engines.AUTO_FALLBACK_WARNING in caplog.text
    assert engines.available_engines() == ["python"]
    with pytest.raises(engines.EngineUnavailable, match="cffi engine is not built"):
        engines.queue_factory("cffi")


@needs_cffi
@pytest.mark.parametrize("event_idx", [False, True])
@pytest.mark.parametrize("limit", [-1, 0, 20, 1 << 20])
def test_take_one_is_pop_push_notify_and_rearm_identically(event_idx: bool,
                                                          limit: int) -> None:
    """take_one, chain by chain, takes what one pop_raw_batch would, gives each back,
    decides each notification, and re-arms kicks after the last chain shown."""
    duo = Duo(size=16, event_idx=event_idx)
    duo.each(_fill_raw)  # ten chains: good, writable, bad, out-of-range head
    assert duo.both(lambda q: q.take_one(limit)) == ("ok", None)  # for the batch path
    assert duo.queues[1].state.stats.popped == 0
    # the guest makes them available one at a time, as a guest waiting for replies does
    for d in duo.drivers:
        d.avail[1] = (int(d.avail[1]) - 9) & 0xFFFF
    taken = []
    for _ in range(10):
        res = duo.both(lambda q: q.take_one(limit))
        assert res[0] == "ok" and res[1] is not None
        taken.append(res[1])
        assert res[1][5] is False  # nothing raced in
        for d in duo.drivers:
            d.avail[1] = (int(d.avail[1]) + 1) & 0xFFFF
    for d in duo.drivers:
        d.avail[1] = (int(d.avail[1]) - 1) & 0xFFFF
    assert duo.both(lambda q: q.take_one(limit)) == ("ok", None)
    ref = Duo(size=16, event_idx=event_idx)
    ref.each(_fill_raw)
    rb = ref.queues[0].pop_raw_batch(64, limit)
    assert [t[0] for t in taken] == rb.heads.tolist()
    assert [t[1] for t in taken] == rb.errors.tolist()
    assert [t[2] for t in taken] == rb.has_writable.tolist()
    assert [t[3] for t in taken] == [rb.payload(i) for i in range(rb.count)]
    # interrupts: for every chain given back without event idx (flags 0; the chain with
    # an out-of-range head is not), only for the first with it (used_event stays 0)
    returned = [e != ChainError.HEAD_OUT_OF_RANGE for e in rb.errors.tolist()]
    assert [t[4] for t in taken] == (returned if not event_idx else [True] + [False] * 9)
    stats = duo.queues[1].state.stats
    assert (stats.popped, stats.bad_chains, stats.pushed) == (10, 3, 9)
    # every returnable head came back empty, in order
    for d in duo.drivers:
        assert d.get_used() == [(h, 0) for h in rb.returnable_heads().tolist()]
    # the ring was drained and kicks re-armed: the guest's next buffer kicks
    duo.each(lambda d, m: d.add([(BUF, 16, 0)]))
    assert duo.each(lambda d, m: d.publish()) == [True, True]
    ref.close()
    duo.close()


@needs_cffi
@pytest.mark.parametrize("head", [0, 16, 1 << 20])
def test_pop_located_leaves_one_segment_chains_in_place_identically(head: int) -> None:
    """pop_located copies what pop_raw_batch copies, except the tail of a chain whose
    readable bytes are one segment: that one is located instead, in the region it lies in."""
    duo = Duo(size=16)
    duo.each(_fill_raw)
    res = duo.both(lambda q: q.pop_located(64, head, 1 << 20))
    assert res[0] == "ok"
    lb = res[1]
    ref = Duo(size=16)
    ref.each(_fill_raw)
    rb = ref.queues[0].pop_raw_batch(64, 1 << 20)
    assert lb.raw.heads.tolist() == rb.heads.tolist()
    assert lb.raw.errors.tolist() == rb.errors.tolist()
    ram = duo.mems[0].gm.regions[0].mem
    # chains 0, 3 (also writable) and 9 are one readable segment; 1 and 6 (indirect) are
    # two; 2 (writable only) and 5 (an empty buffer) have none; 4, 7 and 8 have errors
    assert (lb.region >= 0).tolist() == [True, False, False, True, False, False, False,
                                         False, False, True]
    for i in range(rb.count):
        whole = rb.payload(i)
        if lb.region[i] >= 0:
            o, n = int(lb.offset[i]), int(lb.read_len[i])
            assert n == len(whole) and ram[o : o + n].tobytes() == whole
            assert lb.raw.payload(i) == whole[:head]
        else:
            assert lb.raw.payload(i) == whole
            assert lb.read_len[i] == (len(whole) if rb.errors[i] == 0 else 0)
    ref.close()
    duo.close()
