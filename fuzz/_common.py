"""What the fuzz targets share: the input format, guest memory with guard pages, the ASan
build switch, log capture and the atheris entry point.

Inputs are read with :class:`Reader`, a little-endian byte consumer that never runs out
(past the end it yields zeros), so every byte string is a valid input and seeds can be
written with :class:`Writer`, its mirror (fuzz/gen_seeds.py).  Both stay deliberately
dumb: the structure lives in each target, which reads fields in a fixed order.
"""

from __future__ import annotations

import ctypes
import logging
import mmap
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
#: where fuzz/build_asan.py puts the AddressSanitizer builds of the C extensions
ASAN_DIR = HERE / "build-asan"
#: set to 1 to import the ASan builds (and fail if they are not the ones imported)
ASAN_ENV = "VHOST_RPMSG_FUZZ_ASAN"
PAGE = mmap.PAGESIZE

T = TypeVar("T")


# -- the input format ----------------------------------------------------------------------


class Reader:
    """Consumes an input front to back; zeros once it is used up (every input is valid)."""

    __slots__ = ("data", "pos")

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def left(self) -> int:
        return len(self.data) - self.pos

    def take(self, n: int) -> bytes:
        """Up to ``n`` bytes (fewer at the end of the input)."""
        out = self.data[self.pos : self.pos + max(n, 0)]
        self.pos += len(out)
        return out

    def _int(self, size: int) -> int:
        return int.from_bytes(self.take(size).ljust(size, b"\0"), "little")

    def u8(self) -> int:
        return self._int(1)

    def u16(self) -> int:
        return self._int(2)

    def u32(self) -> int:
        return self._int(4)

    def u64(self) -> int:
        return self._int(8)

    def flag(self) -> bool:
        return bool(self.u8() & 1)

    def pick(self, seq: Sequence[T]) -> T:
        return seq[self.u8() % len(seq)]

    def blob(self) -> bytes:
        """A length-prefixed byte string: u8 length, 255 meaning a u16 length follows."""
        n = self.u8()
        if n == 255:
            n = self.u16()
        return self.take(n)


class Writer:
    """Builds inputs for :class:`Reader` (seed corpora)."""

    def __init__(self) -> None:
        self.buf = bytearray()

    def u8(self, v: int) -> Writer:
        self.buf += (v & 0xFF).to_bytes(1, "little")
        return self

    def u16(self, v: int) -> Writer:
        self.buf += (v & 0xFFFF).to_bytes(2, "little")
        return self

    def u32(self, v: int) -> Writer:
        self.buf += (v & 0xFFFF_FFFF).to_bytes(4, "little")
        return self

    def u64(self, v: int) -> Writer:
        self.buf += (v & (1 << 64) - 1).to_bytes(8, "little")
        return self

    def raw(self, b: bytes) -> Writer:
        self.buf += b
        return self

    def blob(self, b: bytes) -> Writer:
        if len(b) < 255:
            return self.u8(len(b)).raw(b)
        return self.u8(255).u16(len(b)).raw(b)

    def bytes(self) -> bytes:
        return bytes(self.buf)


# -- the ASan build ------------------------------------------------------------------------


def use_asan_build_if_asked() -> None:
    """With VHOST_RPMSG_FUZZ_ASAN=1, import the C extensions from fuzz/build-asan.

    Must run before anything imports them.  Fails loudly if the build is missing or if
    the ASan runtime is not preloaded (an instrumented module cannot load without it), so
    that a run that claims to be an ASan run is one.
    """
    if os.environ.get(ASAN_ENV) != "1":
        return
    if not any(ASAN_DIR.glob("_vhost_rpmsg_vring*.so")):
        raise SystemExit(f"{ASAN_ENV}=1 but {ASAN_DIR} has no build: run "
                         "`python fuzz/build_asan.py` first")
    if "libasan" not in os.environ.get("LD_PRELOAD", ""):
        raise SystemExit(f"{ASAN_ENV}=1 needs LD_PRELOAD=$(gcc -print-file-name=libasan.so)")
    if "libcovshim" not in os.environ["LD_PRELOAD"]:
        print(f"warning: {ASAN_DIR}/libcovshim.so is not preloaded before libasan: "
              "Python coverage is lost (see fuzz/covshim.c)", file=sys.stderr)
    sys.path.insert(0, str(ASAN_DIR))
    import _vhost_rpmsg_headers
    import _vhost_rpmsg_vring

    for mod in (_vhost_rpmsg_vring, _vhost_rpmsg_headers):
        where = Path(mod.__file__ or "").resolve().parent
        if where != ASAN_DIR:
            raise SystemExit(f"{mod.__name__} came from {where}, not {ASAN_DIR}")


# -- guest memory with guard pages -----------------------------------------------------------

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
_libc.mprotect.restype = ctypes.c_int


def _address(m: mmap.mmap) -> int:
    """Start address of a mapping (through a ctypes view, released at once)."""
    view = (ctypes.c_char * len(m)).from_buffer(m)
    try:
        return ctypes.addressof(view)
    finally:
        del view


class GuardedMapping:
    """``size`` bytes of shared anonymous memory between two PROT_NONE guard pages.

    ``at_end`` puts the bytes flush against the guard page after them (an access one byte
    past the end faults); otherwise they start at the page after the leading guard (one
    byte before the start faults).  Only C reaches past a numpy view, so a fault here is an
    out-of-region access by the C engine (or a Python one the guard turns into a crash
    instead of silent reuse of a neighbour's bytes).
    """

    def __init__(self, size: int, *, at_end: bool) -> None:
        pages = -(-size // PAGE)
        self.map = mmap.mmap(-1, (pages + 2) * PAGE)
        base = _address(self.map)
        for page in (0, pages + 1):
            if _libc.mprotect(base + page * PAGE, PAGE, 0) != 0:
                raise OSError(ctypes.get_errno(), "mprotect of a guard page failed")
        self.offset = PAGE + (pages * PAGE - size if at_end else 0)
        self.size = size


def guarded_region(gpa: int, size: int, *, at_end: bool) -> Any:
    """A :class:`~vhost_rpmsg.virtio.memory.Region` over a :class:`GuardedMapping`.

    GuestMemory maps regions from fds itself and cannot place guard pages; a harness that
    wants them builds its Region objects directly (the same fields Region.map fills).
    """
    import numpy as np

    from vhost_rpmsg.virtio.memory import Region

    g = GuardedMapping(size, at_end=at_end)
    mem = np.frombuffer(g.map, np.uint8, count=size, offset=g.offset)
    return Region(gpa, size, g.map, mem, mem.data)


# -- exceptions caught by catch-alls ---------------------------------------------------------


class TracebackLog(logging.Handler):
    """Keeps the log records that carry an exception: project code caught one in a
    catch-all (a device callback, a handler) and logged it; a fuzz run treats that as a
    finding.  Everything else is dropped without formatting, which keeps runs fast."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.exc_info:
            self.records.append(record)

    def take(self) -> list[str]:
        out = [f"{r.name}: {r.getMessage()}\n{logging.Formatter().formatException(r.exc_info)}"
               for r in self.records if r.exc_info]
        self.records.clear()
        return out


def capture_logs() -> TracebackLog:
    """Route the project's logs into a TracebackLog only (nothing printed)."""
    h = TracebackLog()
    root = logging.getLogger("vhost_rpmsg")
    root.handlers[:] = [h]
    root.setLevel(logging.ERROR)
    root.propagate = False
    return h


def open_fds() -> set[int]:
    return {int(n) for n in os.listdir("/proc/self/fd")}


# -- running ----------------------------------------------------------------------------------


def main(test_one_input: Callable[[bytes], None]) -> None:
    """``python fuzz/fuzz_X.py [libFuzzer flags] [corpus dirs or files]``: atheris runs
    ``test_one_input`` (the target imported the project under instrument_imports)."""
    import atheris

    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()
