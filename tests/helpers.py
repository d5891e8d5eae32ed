"""Test helpers: guest memory and rings built directly (no socket), a ``serve`` process,
and the real-guest image check."""

from __future__ import annotations

import contextlib
import mmap
import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from vhost_rpmsg.guest.ring import DriverRing, RingLayout
from vhost_rpmsg.virtio.engines import QueueFactory
from vhost_rpmsg.virtio.memory import GuestMemory, RegionSpec
from vhost_rpmsg.virtio.queue import Queue, QueueState
from vhost_rpmsg.virtio.queue_python import PythonQueue


class Memfd:
    """A memfd seen by the 'guest' (``mem``) and handed to a GuestMemory region."""

    def __init__(self, size: int, file_size: int | None = None) -> None:
        self.size = size
        self.fd = os.memfd_create("test", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        os.ftruncate(self.fd, file_size or size)
        self._map = mmap.mmap(self.fd, file_size or size)
        self.mem = np.frombuffer(self._map, np.uint8)

    def guest_memory(self, gpa: int = 0) -> GuestMemory:
        gm = GuestMemory()
        gm.set_table([RegionSpec(gpa, self.size, 0, self.fd)])
        return gm

    def close(self) -> None:
        del self.mem
        try:
            self._map.close()
        except BufferError:
            pass  # ring views still alive in the test; the mapping goes with them
        os.close(self.fd)


def setup_queue(engine: QueueFactory, gm: GuestMemory, layout: RingLayout, *,
                event_idx: bool = False, indirect: bool = True, used_base: int = 0,
                index: int = 0) -> Queue:
    """The one queue-setup helper: a mapped queue of ``engine`` over ``layout`` in ``gm``
    (guest-physical addresses), configured as the back-end would."""
    st = QueueState(index, 1024)
    st.set_size(layout.size)
    st.set_addresses(layout.desc, layout.avail, layout.used)
    st.set_base(used_base)
    st.event_idx = event_idx
    st.indirect = indirect
    st.map(gm)
    return engine(st)


def make_queue(
    memfd: Memfd, size: int = 8, *, event_idx: bool = False, indirect: bool = True,
    base: int = 0, engine: QueueFactory = PythonQueue,
) -> tuple[Queue, DriverRing, GuestMemory]:
    """A mapped device queue and the driver view of the same ring."""
    gm = memfd.guest_memory()
    layout = RingLayout(base, size)
    drv = DriverRing(memfd.mem, layout, event_idx)
    return setup_queue(engine, gm, layout, event_idx=event_idx, indirect=indirect), drv, gm


def wait_until(cond: Callable[[], object], timeout: float = 10.0) -> None:
    """Poll ``cond`` until it is true; fail the test after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached")
        time.sleep(0.002)


#: Where qemu-configs/provision.sh caches the guest image, and what a boot needs of it.
GUEST_CACHE = Path(os.environ.get("VHOST_RPMSG_CACHE",
                                  Path.home() / ".cache" / "vhost-rpmsg"))
GUEST_IMAGE = [GUEST_CACHE / "bin" / "qemu-system-x86_64", GUEST_CACHE / "kernel" / "vmlinux",
               GUEST_CACHE / "initramfs-base.cpio"]


def require_guest_image() -> None:
    """Skip (fail under VHOST_RPMSG_REQUIRE_QEMU=1, as in CI) without the guest image."""
    missing = [str(p) for p in GUEST_IMAGE if not p.exists()]
    if missing:
        reason = (f"guest image not provisioned ({', '.join(missing)} missing): "
                  "run qemu-configs/provision.sh")
        if os.environ.get("VHOST_RPMSG_REQUIRE_QEMU") == "1":
            pytest.fail(reason)
        pytest.skip(reason)


def kill_group(proc: subprocess.Popen[str]) -> None:
    """End ``proc`` and whatever it started (it leads a session of its own)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def wait_path(p: Path, proc: subprocess.Popen[bytes], seconds: float = 30) -> None:
    """Wait until a server process publishes ``p``; its stderr if it dies first."""
    deadline = time.monotonic() + seconds
    while not p.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise AssertionError(proc.stderr.read().decode() if proc.stderr else "no socket")
        time.sleep(0.01)


@contextlib.contextmanager
def serving(argv: list[str], path: Path) -> Iterator[subprocess.Popen[bytes]]:
    """A server process from ``argv``, once ``path`` exists; it must exit 0 on SIGTERM."""
    proc = subprocess.Popen(argv, stderr=subprocess.PIPE)
    try:
        wait_path(path, proc)
        yield proc
    except BaseException:
        proc.kill()  # the body failed: its error is the one to see
        proc.wait()
        raise
    proc.send_signal(signal.SIGTERM)
    try:
        code = proc.wait(20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise AssertionError("the server did not exit within 20 s of SIGTERM") from None
    assert code == 0, proc.stderr.read().decode() if proc.stderr else code


Outcome = tuple[Any, ...]


def outcome(fn: Callable[[], Any]) -> Outcome:
    try:
        return ("ok", fn())
    except Exception as e:
        return ("raise", type(e), str(e))


def agree(a: Outcome, b: Outcome) -> bool:
    """Two engines did the same: the same result (arrays: same dtype, shape and bytes)
    or the same exception and text.  Shared by the differential tests and fuzz_rings."""
    if a[0] == b[0] == "ok" and isinstance(a[1], np.ndarray):
        x, y = a[1], b[1]
        return (isinstance(y, np.ndarray) and x.dtype == y.dtype and x.shape == y.shape
                and x.tobytes() == y.tobytes())
    return a == b
