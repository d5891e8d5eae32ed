"""Micro-benchmark of the ring engines on the rpmsg to_host hot path.

A simulated guest (DriverRing) posts batches of one-descriptor chains, each an rpmsg
message (16-byte header + payload); the device side is timed, in one of two modes:

* ``read_chain``: pop_batch(64), read_chain of each chain, push_batch of all, then the
  ring's notify (need_notify, and the notify stats; no call eventfd is set);
* ``raw``: pop_raw_batch(64) (arrays, no object per chain), push_used of the returnable
  heads, need_notify.

The guest's own work (adding, reaping) is not timed.  It runs in this process, though,
and its allocations make the cyclic GC collect, often inside the timed section;
``--isolate-gc`` runs a generation-0 collection after the guest's work, so each path pays
only for the collections its own allocations cause.

    PYTHONPATH=. python cext/bench_engines.py [--batches 3000] [--payload 16] [--mode raw]
        [--isolate-gc]

(PYTHONPATH=. makes the work tree win over any other installed copy; the queue is set up
by the tests' helper, ``tests/helpers.py``, so run it from the work tree.)
"""

from __future__ import annotations

import argparse
import gc
import mmap
import os
import statistics
import struct
import time
from collections.abc import Callable

import numpy as np

from tests.helpers import setup_queue
from vhost_rpmsg.guest.ring import DriverRing, RingLayout
from vhost_rpmsg.vhost_user.ring_state import Event
from vhost_rpmsg.vhost_user.vring import Vring
from vhost_rpmsg.virtio.engines import available_engines, queue_factory
from vhost_rpmsg.virtio.memory import GuestMemory, RegionSpec
from vhost_rpmsg.virtio.queue import Chain

MEM = 1 << 20
BATCH = 64
QSIZE = 256
BUFS = 0x10000
MODES = ("read_chain", "raw")


def _setup(engine: str) -> tuple[Vring, DriverRing, GuestMemory, np.ndarray]:
    """A started ring of ``engine`` (event idx, indirect) and the guest's side of it."""
    fd = os.memfd_create("bench", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    os.ftruncate(fd, MEM)
    guest = np.frombuffer(mmap.mmap(fd, MEM), np.uint8)
    gm = GuestMemory()
    gm.set_table([RegionSpec(0, MEM, 0, fd)])
    os.close(fd)
    layout = RingLayout(0, QSIZE)
    drv = DriverRing(guest, layout, event_idx=True)
    q = setup_queue(queue_factory(engine), gm, layout, event_idx=True, indirect=True)
    vr = Vring(q, lambda vr, change: None)
    vr.apply(Event.START)
    return vr, drv, gm, guest


def _post(drv: DriverRing, guest: np.ndarray, msg_len: int) -> None:
    for k in range(BATCH):
        drv.add([(BUFS + 256 * k, msg_len, 0)])
    drv.publish()


def run(engine: str, batches: int, payload: int, mode: str, isolate_gc: bool = False) -> float:
    """Chains per second of the device side."""
    vr, drv, gm, guest = _setup(engine)
    q = vr.queue
    msg_len = 16 + payload
    for k in range(BATCH):
        hdr = struct.pack("<IIIHH", 1024 + k, 0x35, 0, payload, 0)
        guest[BUFS + 256 * k : BUFS + 256 * k + msg_len] = np.frombuffer(
            hdr + bytes([k]) * payload, np.uint8)
    device: Callable[[], int]
    if mode == "raw":
        pop_raw = q.pop_raw_batch
        push_used = q.push_used
        need_notify = q.need_notify

        def device() -> int:
            rb = pop_raw(BATCH, 16 + 0xFFFF)
            push_used(rb.returnable_heads(), 0)
            need_notify()
            return rb.count
    elif mode == "read_chain":
        def device() -> int:
            chains: list[Chain] = q.pop_batch(BATCH)
            data = [q.read_chain(c, 16 + 0xFFFF) for c in chains]
            q.push_batch([(c.head, 0) for c in chains if c.returnable])
            vr.notify()
            return len(data)
    else:
        raise ValueError(f"unknown mode {mode!r}: choose one of {', '.join(MODES)}")

    spent = 0.0
    done = 0
    for _ in range(batches):
        _post(drv, guest, msg_len)
        if isolate_gc:
            gc.collect(0)
        t0 = time.perf_counter()
        done += device()
        spent += time.perf_counter() - t0
        drv.get_used()
    assert done == batches * BATCH, done
    q.state.unmap()
    gm.clear()
    return done / spent


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", type=int, default=3000)
    ap.add_argument("--payload", type=int, default=16)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--mode", choices=["all", *MODES], default="all",
                    help="which device-side path to time (default: every one)")
    ap.add_argument("--isolate-gc", action="store_true",
                    help="collect generation 0 after the (untimed) guest work")
    args = ap.parse_args()
    cases = [("python", "read_chain"), ("python", "raw")]
    if "cffi" in available_engines():
        cases += [("cffi", "read_chain"), ("cffi", "raw")]
    if args.mode != "all":
        cases = [c for c in cases if c[1] == args.mode]
    print(f"{BATCH}-chain batches of {16 + args.payload}-byte rpmsg messages "
          f"(16-byte header + {args.payload}), {args.batches} batches, best/median of "
          f"{args.repeat}{', GC isolated' if args.isolate_gc else ''}")
    for engine, mode in cases:
        rates = [run(engine, args.batches, args.payload, mode, args.isolate_gc)
                 for _ in range(args.repeat)]
        best = max(rates)
        print(f"  {engine:6} {mode:15} best {best:>11,.0f} chains/s "
              f"({1e6 / best:6.3f} us/chain)   median {statistics.median(rates):>11,.0f}")


if __name__ == "__main__":
    main()
