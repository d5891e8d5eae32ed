"""The simulated guest's C fast path against its Python path: the same guest, observably.

Two kinds of test:

* a differential rig without a server: two guests (``fast=True`` / ``fast=False``) with
  identical RAM, each driven by a scripted device that plays the back-end's side of both
  rings, well behaved or hostile (used heads not outstanding or repeated, lengths out of
  range, bad headers, multi-descriptor test chains, event idx and NO_NOTIFY wishes).
  After every operation both must agree on the result or exception, every byte of guest
  RAM, the ring and buffer bookkeeping, the stats, the counters, the inboxes, the
  channels and what was logged;
* against a real server (the ``serve`` fixture): sink bursts, echo bursts (byte exact,
  in order), host sources to counting and inbox endpoints, a 16-bit index wrap; the two
  paths must end with the same counts, bytes, stats and server counters.

Skipped, with the reason, only when ``_vhost_rpmsg_guest`` is not built; with
VHOST_RPMSG_REQUIRE_CFFI=1 (CI) a missing build fails instead.
"""

from __future__ import annotations

import logging
import os
import random
import select as select_mod
import struct
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict
from typing import Any, Protocol

import numpy as np
import pytest

from vhost_rpmsg.endpoints.builtin import Echo, Sink, Source
from vhost_rpmsg.guest import GuestTimeout, SimGuest, fastpath, rpmsg_guest
from vhost_rpmsg.guest.frontend import Frontend, GuestRam, QueueSetup
from vhost_rpmsg.guest.ring import RingLayout
from vhost_rpmsg.guest.rpmsg_guest import MAX_BUFS, RX, TX
from vhost_rpmsg.rpmsg import codec as rp
from vhost_rpmsg.virtio.constants import (
    VIRTIO_F_VERSION_1,
    VIRTIO_RING_F_EVENT_IDX,
    VIRTIO_RPMSG_F_NS,
    VRING_DESC_F_WRITE,
    VRING_USED_F_NO_NOTIFY,
)

from .conftest import Serve

IMPORT_ERROR = fastpath.IMPORT_ERROR

needs_fast = pytest.mark.skipif(
    IMPORT_ERROR is not None,
    reason=f"guest fast path not built (_vhost_rpmsg_guest: {IMPORT_ERROR}); "
    "build it with `pip install .` or `python cext/build_guest.py`",
)


def test_guest_fast_path_is_built() -> None:
    """With VHOST_RPMSG_REQUIRE_CFFI=1 (CI), a missing or broken build is a failure."""
    if IMPORT_ERROR is None:
        assert fastpath.available()
        assert SimGuest("/nonexistent").fast  # auto picks it
        return
    if os.environ.get("VHOST_RPMSG_REQUIRE_CFFI") == "1":
        pytest.fail(f"VHOST_RPMSG_REQUIRE_CFFI=1 but _vhost_rpmsg_guest cannot be "
                    f"imported: {IMPORT_ERROR!r}")
    pytest.skip(f"guest fast path not built: {IMPORT_ERROR}")


def test_fast_flag_selection(monkeypatch: pytest.MonkeyPatch) -> None:
    """False: Python; None: C if built; True: C or FastPathUnavailable saying why."""
    assert not SimGuest("/nonexistent", fast=False).fast
    monkeypatch.setattr(fastpath, "IMPORT_ERROR", ImportError("no _guest_c here"))
    assert not SimGuest("/nonexistent").fast
    with pytest.raises(fastpath.FastPathUnavailable, match="no _guest_c here"):
        SimGuest("/nonexistent", fast=True)


# -- the differential rig ----------------------------------------------------------------


class StubFrontend(Frontend):
    """What SimGuest._probe needs of QEMU's front-end, without a back-end (no socket:
    only what is overridden here may be called)."""

    def __init__(self, features: int) -> None:  # no super().__init__: it would connect
        self.backend_features = features

    def start(self, features: int, queues: list[QueueSetup], send_memory: bool = True) -> None:
        pass

    def stop(self, nqueues: int) -> list[int]:
        return []

    def close(self) -> None:
        pass


def rig_guest(fast: bool, queue_size: int, event_idx: bool, tx_interrupts: bool) -> SimGuest:
    """A probed guest (rings set up, rx posted) whose device is the test."""
    g = SimGuest("/nonexistent", queue_size=queue_size, event_idx=event_idx,
                 tx_interrupts=tx_interrupts, rx_thread=False, fast=fast)
    assert g.fast is fast
    per_init = 2 * RingLayout.bytes_needed(queue_size) + g.nbufs * rp.BUF_SIZE
    g.ram = GuestRam((per_init + (1 << 20) + 4095) // 4096 * 4096)
    offered = ((1 << VIRTIO_F_VERSION_1) | (1 << VIRTIO_RPMSG_F_NS)
               | (1 << VIRTIO_RING_F_EVENT_IDX))
    g.fe = StubFrontend(offered)
    g._probe(send_memory=True)
    return g


class Device:
    """The back-end's side of a guest's two rings, written straight into guest RAM."""

    def __init__(self, g: SimGuest) -> None:
        self.g = g
        self.last_avail = [0, 0]
        self.used_idx = [0, 0]
        self.taken: list[list[int]] = [[], []]  # chains popped, not yet returned

    def _u16(self, off: int) -> int:
        assert self.g.ram is not None
        return int(self.g.ram.mem[off : off + 2].view("<u2")[0])

    def _w(self, off: int, fmt: str, *vals: int) -> None:
        assert self.g.ram is not None
        data = struct.pack(fmt, *vals)
        self.g.ram.mem[off : off + len(data)] = np.frombuffer(data, np.uint8)

    def desc(self, q: int, i: int) -> tuple[int, int, int, int]:
        assert self.g.ram is not None
        off = self.g.rings[q].layout.desc + 16 * i
        addr, length, flags, nxt = struct.unpack_from("<QIHH", self.g.ram.mv, off)
        return addr, length, flags, nxt

    def pop(self, q: int, k: int, keep: bool = False) -> list[int]:
        """Up to k available heads; with keep, remembered in taken[q] for later."""
        lay = self.g.rings[q].layout
        idx = self._u16(lay.avail + 2)
        out: list[int] = []
        while self.last_avail[q] != idx and len(out) < k:
            slot = self.last_avail[q] % lay.size
            out.append(self._u16(lay.avail + 4 + 2 * slot))
            self.last_avail[q] = (self.last_avail[q] + 1) & 0xFFFF
        if keep:
            self.taken[q].extend(out)
        return out

    def push(self, q: int, entries: list[tuple[int, int]]) -> None:
        lay = self.g.rings[q].layout
        for head, length in entries:
            slot = self.used_idx[q] % lay.size
            self._w(lay.used + 4 + 8 * slot, "<II", head, length)
            self.used_idx[q] = (self.used_idx[q] + 1) & 0xFFFF
        self._w(lay.used + 2, "<H", self.used_idx[q])

    def set_avail_event(self, q: int, value: int) -> None:
        lay = self.g.rings[q].layout
        self._w(lay.used + 4 + 8 * lay.size, "<H", value & 0xFFFF)

    def set_used_flags(self, q: int, value: int) -> None:
        self._w(self.g.rings[q].layout.used, "<H", value)

    def write(self, gpa: int, data: bytes) -> None:
        assert self.g.ram is not None
        self.g.ram.mem[gpa : gpa + len(data)] = np.frombuffer(data, np.uint8)


COUNTER, COUNTER2, INBOX, BOTH = 3000, 3001, 3002, 3003  # BOTH: inbox and counter


def rx_message(rnd: random.Random) -> tuple[bytes, int | None]:
    """(bytes for an rx buffer, used length to report: None for len(bytes))."""
    # the guest loses the buffers of the last three kinds: keep them rare enough that the
    # small rings do not run dry
    kind = rnd.choices(
        ["counter", "counter2", "inbox", "both", "ns", "bad_ns", "nobody", "ns_counter",
         "long", "short", "bad_hdr"],
        [30, 10, 10, 5, 5, 3, 3, 3, 2, 2, 2])[0]
    src = rnd.randrange(1024, 1100)
    payload = rnd.randbytes(rnd.choice([0, 1, 16, 40, 100, 496]))
    if kind == "ns":
        name = rnd.choice(["svc-a", "svc-b", "rpmsg-raw"])
        flags = rnd.choice(list(rp.NsFlags))
        return rp.encode_message(src, rp.NS_ADDR,
                                 rp.encode_ns(rp.NsMessage(name, src, flags))), None
    if kind in ("bad_ns", "ns_counter"):
        return rp.encode_message(src, rp.NS_ADDR, payload[:39]), None
    dst = {"counter": COUNTER, "counter2": COUNTER2, "inbox": INBOX, "both": BOTH,
           "nobody": 4000}.get(kind, COUNTER)
    msg = rp.encode_message(src, dst, payload)
    if kind == "long":
        return msg, rnd.choice([513, 600, 0xFFFFFFFF])
    if kind == "short":
        return msg[:16], rnd.choice([0, 1, 15])
    if kind == "bad_hdr":
        cut = rnd.randrange(16, len(msg)) if len(msg) > 16 else 16
        bad = rp.encode_header(src, dst, len(payload) + rnd.randrange(1, 20)) + payload
        return bad, cut
    return msg, None


class ListHandler(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[tuple[str, str]] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append((record.levelname, record.getMessage()))


def snapshot(g: SimGuest) -> dict[str, Any]:
    assert g.ram is not None
    rings = [dict(free=list(r.free), chain_len=dict(r.chain_len), avail_idx=r.avail_idx,
                  last_kicked=r.last_kicked, last_used=r.last_used) for r in g.rings]
    return dict(
        ram=bytes(g.ram.mem), rings=rings, tx_free=list(g.tx_free),
        tx_inflight=dict(g.tx_inflight), rx_bufs=dict(g.rx_bufs), rx_held=list(g.rx_held),
        stats=asdict(g.stats), counters={k: list(v) for k, v in g.counts.items()},
        inbox={k: list(q.queue) for k, q in g.inbox.items()},
        channels=dict(g.channels), ns_events=list(g.ns_events.queue),
    )


def assert_same(a: dict[str, Any], b: dict[str, Any], where: str) -> None:
    for key in a:
        if key == "ram":
            if a[key] != b[key]:
                x, y = np.frombuffer(a[key], np.uint8), np.frombuffer(b[key], np.uint8)
                diff = np.flatnonzero(x != y)
                pytest.fail(f"{where}: guest RAM differs at {len(diff)} bytes from "
                            f"{hex(int(diff[0]))}")
        else:
            assert a[key] == b[key], f"{where}: {key} differs"


class Op(Protocol):
    """One operation of the rig on a guest and its device.  Positional only, so lambdas
    and functions that bind loop values as defaulted extra parameters fit."""

    def __call__(self, g: SimGuest, d: Device, /) -> object: ...


class Twins:
    """A fast and a Python guest, each with its device; every op runs on both."""

    def __init__(self, queue_size: int, event_idx: bool, tx_interrupts: bool) -> None:
        self.guests = [rig_guest(f, queue_size, event_idx, tx_interrupts)
                       for f in (True, False)]
        self.devs = [Device(g) for g in self.guests]
        for g in self.guests:
            g.open(INBOX)
            g.open(BOTH)
            g.open_counter(BOTH)
            g.open_counter(COUNTER)
            g.open_counter(COUNTER2)
            g.open_counter(rp.NS_ADDR)  # shadowed by the name service
        self.handler = ListHandler()
        self.logger = logging.getLogger("vhost_rpmsg.guest")
        self.logger.addHandler(self.handler)
        self.fast_calls = 0
        assert_same(snapshot(self.guests[0]), snapshot(self.guests[1]), "after probe")

    def run(self, what: str, op: Op) -> object:
        results = []
        logs = []
        for g, d in zip(self.guests, self.devs, strict=True):
            self.handler.records = []
            try:
                res: object = ("ok", op(g, d))
            except (ValueError, KeyError, BufferError, GuestTimeout) as e:
                res = ("raised", type(e).__name__, str(e))
            results.append(res)
            logs.append(self.handler.records)
        assert results[0] == results[1], f"{what}: {results[0]} != {results[1]}"
        assert logs[0] == logs[1], f"{what}: logs differ"
        assert_same(snapshot(self.guests[0]), snapshot(self.guests[1]), what)
        return results[0]

    def close(self) -> None:
        self.logger.removeHandler(self.handler)
        for g in self.guests:
            g.disconnect()


class RigClock:
    """time.monotonic and select.select for the rig guests: sleeping costs no real time,
    and a guest out of tx buffers sleeps where the scripted device can act.

    hooks[fd]() runs when a guest selects on ``fd``: True if the device did something
    (the guest wakes at once), else the guest sleeps its whole timeout (the clock
    advances by it) unless the fd is ready already."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.hooks: dict[int, Callable[[], bool]] = {}

    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds

    def select(self, r: list[int], w: list[int], x: list[int],
               timeout: float | None = None) -> tuple[list[int], list[int], list[int]]:
        for fd in r:
            hook = self.hooks.get(fd)
            if hook is not None and hook():
                break
        ready = _real_select(r, w, x, 0)
        if not any(ready):
            self.now += timeout or 0.0
        return ready


_real_select = select_mod.select


@pytest.fixture
def rig_clock(monkeypatch: pytest.MonkeyPatch) -> RigClock:
    clock = RigClock()
    for mod in (fastpath, rpmsg_guest):
        monkeypatch.setattr(mod, "time", clock)
        monkeypatch.setattr(mod, "select", clock)
    return clock


@pytest.fixture
def counting_calls(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """How often the C rx drain and the C tx bursts really ran (rather than handing to
    Python), and how often a C burst handed a step to the Python path.  Every burst is
    offered to C (TX_C_MIN 1), however small."""
    calls = {"rx": 0, "tx": 0, "tx_messages": 0, "py_reclaim": 0, "py_fill": 0}
    rx, tx = fastpath.GuestFastPath._rx_drain, fastpath.GuestFastPath.send_burst
    run, store = fastpath.GuestFastPath._tx_run, fastpath.GuestFastPath._tx_store
    reclaim_used, fill_tx = SimGuest.reclaim_used, SimGuest.fill_tx
    in_c = [False]

    def rx_drain(self: fastpath.GuestFastPath, s: Any, r: Any, g: SimGuest,
                 ring: Any) -> bool:
        before = ring.last_used
        done = rx(self, s, r, g, ring)
        calls["rx"] += done and ring.last_used != before
        return done

    def send_burst(self: fastpath.GuestFastPath, *a: Any) -> bool:
        done = tx(self, *a)
        calls["tx"] += done
        return done

    def tx_run(self: fastpath.GuestFastPath, *a: Any) -> None:
        in_c[0] = True
        try:
            run(self, *a)
        finally:
            in_c[0] = False

    def tx_store(self: fastpath.GuestFastPath, *a: Any) -> None:
        calls["tx_messages"] += self.txs.t.sent
        store(self, *a)

    def py_reclaim(g: SimGuest) -> None:
        calls["py_reclaim"] += in_c[0]  # a step a C burst handed to Python
        reclaim_used(g)

    def py_fill(g: SimGuest, *a: Any) -> None:
        calls["py_fill"] += in_c[0]
        fill_tx(g, *a)

    monkeypatch.setattr(fastpath, "TX_C_MIN", 1)
    monkeypatch.setattr(fastpath.GuestFastPath, "_rx_drain", rx_drain)
    monkeypatch.setattr(fastpath.GuestFastPath, "send_burst", send_burst)
    monkeypatch.setattr(fastpath.GuestFastPath, "_tx_run", tx_run)
    monkeypatch.setattr(fastpath.GuestFastPath, "_tx_store", tx_store)
    monkeypatch.setattr(SimGuest, "reclaim_used", py_reclaim)
    monkeypatch.setattr(SimGuest, "fill_tx", py_fill)
    return calls


def device_returns(d: Device, k: int, m: float, shuffle: bool, bogus: bool,
                   order_seed: float, lengths: list[int], queue_size: int) -> None:
    """The device takes up to k more tx chains and returns the share m of those it holds
    (shuffled, with a head twice or one that is no descriptor if bogus)."""
    d.pop(TX, k, keep=True)
    n = int(len(d.taken[TX]) * m)
    back, d.taken[TX] = d.taken[TX][:n], d.taken[TX][n:]
    if shuffle:
        random.Random(order_seed).shuffle(back)
    entries = list(zip(back, lengths, strict=False))
    if bogus and entries:
        entries.insert(len(entries) // 2, (entries[0][0], 7))  # twice
    if bogus and not entries:
        entries = [(queue_size + 3, 0)]  # not a descriptor
    d.push(TX, entries)


def scenario(seed: int, queue_size: int, event_idx: bool, tx_interrupts: bool,
             hostile: bool, steps: int, clock: RigClock) -> None:
    rnd = random.Random(seed)
    tw = Twins(queue_size, event_idx, tx_interrupts)
    try:
        g0 = tw.guests[1]  # the Python one: its state decides the parameters
        assert g0.ram is not None
        spare = g0.ram.alloc(4096, 4096)
        assert tw.guests[0].ram is not None and tw.guests[0].ram.alloc(4096, 4096) == spare
        for step in range(steps):
            op = rnd.choice(["burst"] * 6 + ["burst_wait"] * 3 + ["send", "dev_tx"] * 3
                            + ["dev_rx"] * 6
                            + ["rx_poll", "wish", "reclaim", "send_chain", "rx_chain",
                               "repost", "interrupt"])
            where = f"seed {seed} step {step} {op}"
            if op == "burst":
                # mostly what fits; sometimes more: both then time out the same way
                room = len(g0.tx_free) + _tx_returned(g0)
                count = rnd.randrange(1, room + 3)
                payload = rnd.randbytes(rnd.choice([0, 1, 16, 100, 496]))
                src, dst = rnd.randrange(1024, 3000), rnd.randrange(1024, 1100)
                tw.run(where, lambda g, d, c=count, p=payload, s=src, t=dst:
                       g.send_burst(s, t, p, c, timeout=0.001))
            elif op == "send":
                small = rnd.randbytes(rnd.randrange(0, 60))
                tw.run(where, lambda g, d, p=small: g.send(1500, 1024, p, timeout=0.001))
            elif op == "burst_wait":
                # more than fits: the guest runs out and sleeps, and the device returns
                # some of what it holds (or nothing, or bogus entries) each time, with
                # or without an interrupt, until its script ends (then a timeout)
                count = len(g0.tx_free) + _tx_returned(g0) + rnd.randrange(1, 3 * queue_size)
                payload = rnd.randbytes(rnd.choice([0, 16, 496]))
                acts = [(rnd.randrange(0, queue_size + 1), rnd.choice([0.0, 0.3, 1.0, 1.0]),
                         rnd.random() < 0.3, hostile and rnd.random() < 0.1, rnd.random(),
                         [rnd.randrange(0, 1000) for _ in range(queue_size * 2)],
                         rnd.random() < 0.7)
                        for _ in range(rnd.randrange(0, 8))]

                def burst_wait(g: SimGuest, d: Device, count: int = count,
                               payload: bytes = payload, acts: list[Any] = acts) -> None:
                    script = list(acts)

                    def wake() -> bool:
                        if not script:
                            return False
                        k, m, shuffle, bogus, order_seed, lengths, irq = script.pop(0)
                        device_returns(d, k, m, shuffle, bogus, order_seed, lengths,
                                       queue_size)
                        if irq:
                            os.eventfd_write(g.call[TX], 1)
                        return True

                    clock.hooks[g.call[TX]] = wake
                    try:
                        g.send_burst(1500, 1024, payload, count, timeout=0.01)
                    finally:
                        del clock.hooks[g.call[TX]]

                tw.run(where, burst_wait)
            elif op == "dev_tx":
                k, m = rnd.randrange(0, queue_size + 1), rnd.random()
                shuffle = rnd.random() < 0.3
                bogus = hostile and rnd.random() < 0.15
                order_seed = rnd.random()
                lengths = [rnd.randrange(0, 1000) for _ in range(queue_size * 2)]
                tw.run(where, lambda g, d, k=k, m=m, shuffle=shuffle, bogus=bogus,
                       order_seed=order_seed, lengths=lengths: device_returns(
                           d, k, m, shuffle, bogus, order_seed, lengths, queue_size))
            elif op == "dev_rx":
                k = rnd.randrange(0, queue_size + 1)
                msgs = [rx_message(rnd) for _ in range(queue_size)]
                shuffle_seed = rnd.random() if rnd.random() < 0.3 else None
                bogus = hostile and rnd.random() < 0.1
                drain = rnd.choice(["drain", "poll"])

                def dev_rx(g: SimGuest, d: Device, k: int = k, msgs: list[Any] = msgs,
                           shuffle_seed: float | None = shuffle_seed, bogus: bool = bogus,
                           drain: str = drain) -> None:
                    heads = d.pop(RX, k)
                    if shuffle_seed is not None:
                        random.Random(shuffle_seed).shuffle(heads)
                    entries = []
                    for head, (data, used_len) in zip(heads, msgs, strict=False):
                        addr, length, _flags, _nxt = d.desc(RX, head)
                        if length >= len(data):
                            d.write(addr, data)
                        entries.append((head, len(data) if used_len is None else used_len))
                    if bogus:
                        entries.append((entries[-1][0], 16) if entries else (queue_size, 16))
                    d.push(RX, entries)
                    if drain == "drain":
                        g._rx_drain(g.rings[RX])
                    else:
                        g._rx_poll(0)

                tw.run(where, dev_rx)
            elif op == "rx_poll":
                tw.run(where, lambda g, d: g._rx_poll(0))
            elif op == "interrupt":
                q = rnd.choice([RX, TX])
                tw.run(where, lambda g, d, q=q: os.eventfd_write(g.call[q], 1))
            elif op == "wish":
                q, v = rnd.choice([RX, TX]), rnd.randrange(0, 1 << 16)
                near = rnd.random() < 0.7
                flags = rnd.choice([0, VRING_USED_F_NO_NOTIFY])

                def wish(g: SimGuest, d: Device, q: int = q, v: int = v, near: bool = near,
                         flags: int = flags) -> None:
                    ring = g.rings[q]
                    d.set_avail_event(q, ring.avail_idx + v % 4 if near else v)
                    d.set_used_flags(q, flags)

                tw.run(where, wish)
            elif op == "reclaim":
                tw.run(where, lambda g, d: g.reclaim())
            elif op == "send_chain":
                tw.run(where, lambda g, d: g.send_chain(
                    [(spare, 16, 0), (spare + 64, 32, 0)]))
            elif op == "rx_chain":
                n = rnd.choice([1, 2])
                bufs = [(spare + 1024 * i, 512, VRING_DESC_F_WRITE) for i in range(n)]
                tw.run(where, lambda g, d, b=bufs: g.post_rx_chain(b))
            elif op == "repost":
                flip = rnd.random() < 0.8
                tw.run(where, lambda g, d, f=flip: setattr(g, "repost_rx", f))
    finally:
        tw.close()


def _tx_returned(g: SimGuest) -> int:
    """Used tx entries waiting to be reclaimed (what a burst can count on)."""
    ring = g.rings[TX]
    return (int(ring.used16[1]) - ring.last_used) & 0xFFFF


CONFIGS = [
    # (queue_size, event_idx, tx_interrupts, hostile)
    (8, True, False, False),
    (8, False, False, False),
    (16, True, True, True),
    (16, False, True, True),
    (64, True, False, True),
    (256, True, False, False),
]


@needs_fast
@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: "q{}-{}-{}-{}".format(
    c[0], "evidx" if c[1] else "flags", "txirq" if c[2] else "notxirq",
    "hostile" if c[3] else "benign"))
def test_differential(config: tuple[int, bool, bool, bool], seed: int,
                      counting_calls: dict[str, int], rig_clock: RigClock) -> None:
    queue_size, event_idx, tx_interrupts, hostile = config
    scenario(seed * 1000 + queue_size, queue_size, event_idx, tx_interrupts, hostile,
             steps=150, clock=rig_clock)
    # the C paths did the work (not only the Python fallbacks they hand over to); a
    # hostile run may have lost or held every rx buffer before the first C drain
    assert counting_calls["tx"] > 0 and counting_calls["tx_messages"] > 0
    assert counting_calls["rx"] > 0 or hostile


@needs_fast
@pytest.mark.parametrize("which", ["kick", "call"])
def test_os_errors_same(which: str, counting_calls: dict[str, int],
                        rig_clock: RigClock) -> None:
    """A kick that cannot be written, an interrupt eventfd that cannot be read: the same
    OSError, with the same state left behind, on both paths."""
    tw = Twins(16, True, False)
    pipes = [os.pipe() for _ in tw.guests]
    saved = [(g.kick[TX], g.call[TX]) for g in tw.guests]
    try:
        for g, (rd, wr) in zip(tw.guests, pipes, strict=True):
            if which == "kick":
                g.kick[TX] = rd  # not writable: EBADF
            else:
                g.call[TX] = wr  # not readable: EBADF
        errors = []
        for g in tw.guests:
            with pytest.raises(OSError) as e:
                g.send_burst(2000, 1024, b"e" * 10, 40, timeout=0.01)
            errors.append((type(e.value), e.value.errno))
        assert errors[0] == errors[1]
        assert_same(snapshot(tw.guests[0]), snapshot(tw.guests[1]), which)
        assert counting_calls["tx_messages"] > 0
    finally:
        for g, (kick, call) in zip(tw.guests, saved, strict=True):
            g.kick[TX], g.call[TX] = kick, call
        tw.close()
        for fds in pipes:
            for fd in fds:
                os.close(fd)


@needs_fast
def test_bookkeeping_c_cannot_take(counting_calls: dict[str, int],
                                   rig_clock: RigClock) -> None:
    """A chain length C does not hold (0): the burst runs on the Python path, and the
    two guests still agree; once that chain is back, C takes the bursts again."""
    tw = Twins(16, True, False)
    try:
        def odd_chain(g: SimGuest, d: Device) -> None:
            ring = g.rings[TX]
            head = ring.free.pop()
            ring.chain_len[head] = 0  # frees no descriptor when it comes back
            g.tx_inflight[head] = -1
            ring.add_raw(head)
            ring.publish()

        tw.run("odd chain", odd_chain)
        tw.run("burst", lambda g, d: g.send_burst(2000, 1024, b"o" * 5, 6))
        assert counting_calls["tx"] == 0
        tw.run("return all", lambda g, d: d.push(TX, [(h, 0) for h in d.pop(TX, 16)]))
        tw.run("reclaim", lambda g, d: g.reclaim())
        tw.run("burst", lambda g, d: g.send_burst(2000, 1024, b"p" * 5, 6))
        assert counting_calls["tx"] == 1
    finally:
        tw.close()


@needs_fast
def test_differential_index_wrap() -> None:
    """Past 2^16 avail and used entries on both rings, in big batches."""
    tw = Twins(256, True, False)
    try:
        total = 0
        while total < 70000:
            tw.run("burst", lambda g, d: g.send_burst(2000, 1024, b"w" * 20, 256))
            tw.run("dev_tx", lambda g, d: d.push(TX, [(h, 0) for h in d.pop(TX, 256)]))
            total += 256

            def rx(g: SimGuest, d: Device) -> None:
                heads = d.pop(RX, 256)
                for h in heads:
                    d.write(d.desc(RX, h)[0], rp.encode_message(1024, COUNTER, b"x" * 8))
                d.push(RX, [(h, 24) for h in heads])
                g._rx_poll(0)

            tw.run("rx", rx)
        g = tw.guests[0]
        assert g.stats.tx_messages == total
        assert g.counted(COUNTER) == (g.stats.rx_messages, 8 * g.stats.rx_messages)
        assert g.rings[TX].avail_idx == total & 0xFFFF
    finally:
        tw.close()


# -- against a real server ---------------------------------------------------------------

def _wait(cond: Callable[[], bool], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.002)


def _timing_free(g: SimGuest) -> dict[str, Any]:
    """The stats that do not depend on how the two processes interleave."""
    s = asdict(g.stats)
    for key in ("rx_kicks", "tx_kicks", "rx_interrupts", "tx_interrupts"):
        s.pop(key)
    return s


def _server_totals(counters: dict[str, int]) -> dict[str, int]:
    return {k: v for k, v in counters.items()
            if k.startswith("errors.") or k.endswith((".popped", ".pushed", ".bad_chains"))}


@pytest.fixture(params=[True, False], ids=["rx_thread", "polled"])
def rx_thread(request: pytest.FixtureRequest) -> bool:
    return bool(request.param)


def both_paths(fn: Callable[[bool], Any]) -> Iterator[Any]:
    for fast in (True, False):
        yield fn(fast)


@needs_fast
def test_sink_bursts_same_counts(serve: Serve, rx_thread: bool,
                                 counting_calls: dict[str, int]) -> None:
    def run(fast: bool) -> tuple[Any, ...]:
        sink = Sink(1024)
        r = serve([sink, Echo(1025)])
        g = r.guest(fast=fast, rx_thread=rx_thread)
        assert g.fast is fast
        g.start()
        sizes = [0, 16, 128, 496, 3]
        n = 0
        for k, size in enumerate(sizes):
            g.send_burst(2000 + k, 1024, bytes([k]) * size, 3000 + k)
            n += 3000 + k
        _wait(lambda: r.call(lambda: sink.messages) == n)
        _wait(lambda: g.reclaim() == g.nbufs // 2)
        return (r.call(lambda: (sink.messages, sink.bytes, sink.last_src)),
                _timing_free(g), _server_totals(r.counters()), g.rings[TX].outstanding)

    fast, slow = both_paths(run)
    assert fast == slow
    assert fast[0][0] == sum(3000 + k for k in range(5))
    # the fast guest's bursts ran in C from start to end, waits for buffers included
    assert counting_calls["tx"] == 5
    assert counting_calls["tx_messages"] == fast[0][0]
    assert counting_calls["py_reclaim"] == counting_calls["py_fill"] == 0


@needs_fast
def test_echo_bursts_byte_exact_in_order(serve: Serve, rx_thread: bool) -> None:
    # Bursts no bigger than the guest's 256 rx buffers: Echo drops what does not fit the
    # device's outbox, and a polled guest drains rx only once the burst is sent.
    rnd = random.Random(7)
    bursts = [(rnd.randbytes(rnd.choice([0, 1, 16, 200, 496])), rnd.randrange(1, 257))
              for _ in range(20)]

    def run(fast: bool) -> tuple[Any, ...]:
        r = serve([Sink(1024), Echo(1025)])
        g = r.guest(fast=fast, rx_thread=rx_thread)
        g.open(2000)
        g.open_counter(2001)
        g.start()
        got: list[tuple[int, bytes]] = []
        for payload, count in bursts:
            g.send_burst(2000, 1025, payload, count)
            got.extend(g.recv(2000, timeout=10) for _ in range(count))
        # echoes to a counting endpoint are counted in C, the inbox ones stay in order
        for k in range(1, 5):
            g.send_burst(2001, 1025, b"c" * 33, 250)
            g.wait_counted(2001, 250 * k)
        g.send_burst(2000, 1025, b"after", 3)
        got.extend(g.recv(2000, timeout=10) for _ in range(3))
        return got, g.counted(2001), _timing_free(g), _server_totals(r.counters())

    fast, slow = both_paths(run)
    want = [(1025, p) for p, c in bursts for _ in range(c)] + [(1025, b"after")] * 3
    assert fast[0] == want
    assert fast == slow
    assert fast[1] == (1000, 33000)


@needs_fast
def test_host_sources_to_counter_and_inbox(serve: Serve, rx_thread: bool) -> None:
    n_count, n_inbox = 20000, 3000

    def run(fast: bool) -> tuple[Any, ...]:
        s1 = Source(1030, dst=3000, size=100, rate=0, count=n_count)
        s2 = Source(1031, dst=3001, size=37, rate=0, count=n_inbox)
        r = serve([Sink(1024), s1, s2])
        g = r.guest(fast=fast, rx_thread=rx_thread)
        g.open_counter(3000)
        g.open(3001)
        g.start()
        got = [g.recv(3001, timeout=30) for _ in range(n_inbox)]
        g.wait_counted(3000, n_count)
        assert got == [(1031, s2.payload(i)) for i in range(n_inbox)]
        assert g.stats.too_big == g.stats.no_recipient == 0
        _wait(lambda: r.counters()["q0.pushed"] == g.stats.rx_messages)
        return g.counted(3000), _timing_free(g), _server_totals(r.counters())

    fast, slow = both_paths(run)
    assert fast == slow
    assert fast[0] == (n_count, 100 * n_count)


@needs_fast
def test_index_wrap_against_server(serve: Serve) -> None:
    """70000 messages each way: both rings' 16-bit indices wrap on the fast path."""
    n = 70000
    sink = Sink(1024)
    src = Source(1030, dst=3000, size=8, rate=0, count=n)
    r = serve([sink, src])
    g = r.guest(fast=True, rx_thread=False)
    g.open_counter(3000)
    g.start()
    # one direction at a time: a polled guest takes no rx while it waits for tx buffers,
    # and the device takes no guest messages while its outbox is full
    g.wait_counted(3000, n, timeout=120)
    g.send_burst(2000, 1024, b"12345678", n)
    _wait(lambda: r.call(lambda: sink.messages) == n, timeout=60)
    assert g.counted(3000) == (n, 8 * n)
    assert r.call(lambda: sink.bytes) == 8 * n
    assert g.stats.tx_messages == n and g.stats.too_big == 0


def test_nbufs_fit_the_scratch() -> None:
    """The fast path takes every used batch a Linux-shaped guest can produce."""
    assert MAX_BUFS // 2 <= fastpath.RX_CAP


def test_ring_helpers_agree_with_python(monkeypatch: pytest.MonkeyPatch) -> None:
    """gr_enable_interrupts / gr_publish bytes and answers match DriverRing's."""
    if IMPORT_ERROR is not None:
        pytest.skip(f"guest fast path not built: {IMPORT_ERROR}")
    monkeypatch.setattr(fastpath, "TX_C_MIN", 1)  # the small bursts too run in C
    for event_idx in (True, False):
        tw = Twins(8, event_idx, False)
        try:
            for v in range(0, 20):
                tw.run(f"wish {v}", lambda g, d, v=v: (d.set_avail_event(TX, v),
                                                       d.set_used_flags(TX, v & 1)))
                tw.run(f"burst {v}", lambda g, d, v=v: g.send_burst(2000, 1024, b"p", 1 + v % 3))
                tw.run(f"ret {v}", lambda g, d: d.push(TX, [(h, 0) for h in d.pop(TX, 8)]))
                tw.run(f"irq {v}", lambda g, d: (g._fast.enable_interrupts(g, g.rings[TX])
                                                 if g._fast else g.rings[TX].enable_interrupts()))
        finally:
            tw.close()



@needs_fast
@pytest.mark.parametrize("fast", [True, False], ids=["fast", "python"])
def test_close_unmaps_guest_ram(serve: Serve, fast: bool) -> None:
    """The fast path holds no export of guest RAM between operations: close unmaps it."""
    r = serve([Sink(1024), Echo(1025)])
    g = r.guest(fast=fast)
    g.open(2000)
    g.open_counter(2001)
    g.start()
    g.send_burst(2000, 1025, b"x" * 40, 200)
    g.send_burst(2001, 1025, b"y" * 40, 200)
    assert len([g.recv(2000) for _ in range(200)]) == 200
    g.wait_counted(2001, 200)
    ram = g.ram
    assert ram is not None
    g.close()
    assert ram._map.closed
