"""Micro-benchmark of the ring engines on the rpmsg to_host hot path.

A simulated guest (DriverRing) posts batches of one-descriptor chains, each an rpmsg
message (16-byte header + payload); the device side is timed, in one of three modes:

* ``read_chain``: pop_batch(64), read_chain of each chain, push_batch of all, notify;
* ``pop_read_batch``: the chains and their payloads in one call (cffi only), then
  push_batch, notify;
* ``raw``: pop_raw_batch(64) (arrays, no object per chain), push_used of the returnable
  heads, need_notify.

The guest's own work (adding, reaping) is not timed.  It runs in this process, though,
and its allocations make the cyclic GC collect, often inside the timed section;
``--isolate-gc`` runs a generation-0 collection after the guest's work, so each path pays
only for the collections its own allocations cause.

    PYTHONPATH=. python cext/bench_engines.py [--batches 3000] [--payload 16] [--mode raw]
        [--isolate-gc]

(PYTHONPATH=. makes the work tree win over any other installed copy.)
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

from vhost_rpmsg.engines import available_engines, queue_factory
from vhost_rpmsg.guest.ring import DriverRing, RingLayout
from vhost_rpmsg.memory import GuestMemory
from vhost_rpmsg.vhost_user.codec import MemoryRegion
from vhost_rpmsg.virtqueue import Chain, SplitQueue

UVA = 0x7F00_0000_0000
MEM = 1 << 20
BATCH = 64
QSIZE = 256
BUFS = 0x10000
MODES = ("read_chain", "pop_read_batch", "raw")


def _setup(engine: str) -> tuple[SplitQueue, DriverRing, GuestMemory, np.ndarray]:
    fd = os.memfd_create("bench", os.MFD_CLOEXEC)
    os.ftruncate(fd, MEM)
    guest = np.frombuffer(mmap.mmap(fd, MEM), np.uint8)
    gm = GuestMemory()
    gm.set_table([MemoryRegion(0, MEM, UVA, 0)], [fd])
    os.close(fd)
    layout = RingLayout(0, QSIZE)
    drv = DriverRing(guest, layout, event_idx=True)
    q = queue_factory(engine)(0, 1024)
    q.set_size(QSIZE)
    q.set_addresses(UVA + layout.desc, UVA + layout.avail, UVA + layout.used)
    q.event_idx = True
    q.indirect = True
    q.map(gm)
    q.started = q.enabled = True
    return q, drv, gm, guest


def _post(drv: DriverRing, guest: np.ndarray, msg_len: int) -> None:
    for k in range(BATCH):
        drv.add([(BUFS + 256 * k, msg_len, 0)])
    drv.publish()


def run(engine: str, batches: int, payload: int, mode: str, isolate_gc: bool = False) -> float:
    """Chains per second of the device side."""
    q, drv, gm, guest = _setup(engine)
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
            q.notify()
            return len(data)
    else:
        pop_read = q.pop_read_batch  # type: ignore[attr-defined]

        def device() -> int:
            chains, data = pop_read(BATCH, 16 + 0xFFFF)
            q.push_batch([(c.head, 0) for c in chains if c.returnable])
            q.notify()
            return len(data)

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
    q.unmap()
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
        cases += [("cffi", "read_chain"), ("cffi", "pop_read_batch"), ("cffi", "raw")]
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
