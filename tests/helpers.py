"""Guest memory and rings built directly (no socket), for ring-level tests."""

from __future__ import annotations

import mmap
import os
import time
from collections.abc import Callable

import numpy as np

from vhost_rpmsg.guest.ring import DriverRing, RingLayout
from vhost_rpmsg.memory import GuestMemory
from vhost_rpmsg.vhost_user.codec import MemoryRegion
from vhost_rpmsg.virtqueue import SplitQueue

UVA = 0x7F00_0000_0000


class Memfd:
    """A memfd seen by the 'guest' (``mem``) and handed to a GuestMemory region."""

    def __init__(self, size: int, file_size: int | None = None) -> None:
        self.size = size
        self.fd = os.memfd_create("test", os.MFD_CLOEXEC)
        os.ftruncate(self.fd, file_size or size)
        self._map = mmap.mmap(self.fd, file_size or size)
        self.mem = np.frombuffer(self._map, np.uint8)

    def guest_memory(self, gpa: int = 0) -> GuestMemory:
        gm = GuestMemory()
        gm.set_table([MemoryRegion(gpa, self.size, UVA + gpa, 0)], [self.fd])
        return gm

    def close(self) -> None:
        del self.mem
        try:
            self._map.close()
        except BufferError:
            pass  # ring views still alive in the test; the mapping goes with them
        os.close(self.fd)


def make_queue(
    memfd: Memfd, size: int = 8, *, event_idx: bool = False, indirect: bool = True,
    base: int = 0, cls: type[SplitQueue] = SplitQueue,
) -> tuple[SplitQueue, DriverRing, GuestMemory]:
    """A started, enabled device queue and the driver view of the same ring."""
    gm = memfd.guest_memory()
    layout = RingLayout(base, size)
    drv = DriverRing(memfd.mem, layout, event_idx)
    q = cls(0, 1024)
    q.set_size(size)
    q.set_addresses(UVA + layout.desc, UVA + layout.avail, UVA + layout.used)
    q.event_idx = event_idx
    q.indirect = indirect
    q.map(gm)
    q.started = q.enabled = True
    return q, drv, gm


def wait_until(cond: Callable[[], object], timeout: float = 10.0) -> None:
    """Poll ``cond`` until it is true; fail the test after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached")
        time.sleep(0.002)
