"""Guest memory: the regions the front-end shares, mmapped, with bounds-checked access.

Every access the backend makes to guest memory goes through :class:`GuestMemory`: an
address range is translated to (region, offset) only if it lies wholly inside one
region, so a hostile descriptor can never make us read or write outside what the
front-end handed over.  It knows guest-physical addresses only: the vhost-user back-end
turns the front-end's regions and virtual addresses into these at the protocol edge.
"""

from __future__ import annotations

import fcntl
import logging
import mmap
import os
from dataclasses import dataclass, field

import numpy as np

log = logging.getLogger(__name__)

_PAGE = mmap.PAGESIZE


class BadAddress(Exception):
    """An address, range or region the front-end gave us is not usable guest memory."""


@dataclass(frozen=True)
class RegionSpec:
    """Where a region of guest RAM is: ``size`` bytes at ``gpa``, ``mmap_offset`` into ``fd``."""

    gpa: int
    size: int
    mmap_offset: int
    fd: int


@dataclass(eq=False)
class Region:
    """One mmapped region of guest RAM."""

    gpa: int
    size: int
    _map: mmap.mmap | None = None
    mem: np.ndarray = field(default_factory=lambda: np.empty(0, np.uint8))
    mv: memoryview = field(default_factory=lambda: memoryview(b""))

    @classmethod
    def map(cls, spec: RegionSpec, *, allow_unsealed: bool = False) -> Region:
        """mmap ``spec.fd`` as described.  The caller keeps the fd: the mapping outlives it.

        The file must not be able to shrink under the mapping (see :func:`pin_size`)
        unless ``allow_unsealed`` says the front-end is trusted with our life."""
        if spec.size == 0:
            raise BadAddress("region of size 0")
        if spec.gpa + spec.size > 1 << 64:
            raise BadAddress("region wraps the 64-bit address space")
        # ":mmap offset: 64-bit offset where region starts in the mapped memory" (vhost-user.rst,
        # Memory region description).  mmap offsets must be page aligned: map from the page
        # below and skip the rest.
        aligned = spec.mmap_offset - spec.mmap_offset % _PAGE
        skip = spec.mmap_offset - aligned
        try:
            pin_size(spec.fd, allow_unsealed=allow_unsealed)
            st = os.fstat(spec.fd)
            if st.st_size and aligned + skip + spec.size > st.st_size:
                raise BadAddress(
                    f"region of {spec.size} bytes at offset {spec.mmap_offset} "
                    f"exceeds its file of {st.st_size} bytes"
                )
            m = mmap.mmap(
                spec.fd,
                skip + spec.size,
                flags=mmap.MAP_SHARED,
                prot=mmap.PROT_READ | mmap.PROT_WRITE,
                offset=aligned,
            )
        except (OSError, ValueError, OverflowError) as e:
            raise BadAddress(f"cannot map region gpa 0x{spec.gpa:x}: {e}") from e
        mem = np.frombuffer(m, dtype=np.uint8, count=spec.size, offset=skip)
        log.info("mapped guest memory: gpa 0x%x size 0x%x file offset 0x%x",
                 spec.gpa, spec.size, spec.mmap_offset)
        return cls(spec.gpa, spec.size, m, mem, mem.data)

    def close(self) -> None:
        """Unmap.  Views still held elsewhere keep the pages alive, never dangling."""
        try:
            self.mv.release()
        except BufferError:
            pass  # a slice is still alive; it keeps the mapping valid until it dies
        self.mem = np.empty(0, np.uint8)
        if self._map is not None:
            try:
                self._map.close()
            except BufferError:
                log.debug("region 0x%x still viewed; unmapped when the last view goes", self.gpa)
            self._map = None


def pin_size(fd: int, *, allow_unsealed: bool = False) -> None:
    """Make sure the file behind a region can never shrink while we map it.

    Touching a mapped page past the end of its file raises SIGBUS, which no Python code
    can catch: a front-end that truncated its memfd after SET_MEM_TABLE would kill the
    whole server, every other guest with it.  A memfd sealed with ``F_SEAL_SHRINK``
    cannot shrink (memfd_create(2)), so we add that seal ourselves when it is missing
    (QEMU's ``memory-backend-memfd`` with its default ``seal=on`` already has it), and
    refuse a file that cannot take it: one created without ``MFD_ALLOW_SEALING``
    (``seal=off``), or any other file (``memory-backend-file``: /dev/shm, hugetlbfs
    files), unless ``allow_unsealed``.
    """
    try:
        seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
    except OSError as e:
        if allow_unsealed:
            return
        raise BadAddress(
            f"guest memory fd is not a memfd ({e.strerror}): its owner could shrink it and "
            "kill this server; use memory-backend-memfd, or trust the front-end with "
            "--allow-unsealed-memory") from e
    if seals & fcntl.F_SEAL_SHRINK:
        return
    if seals & fcntl.F_SEAL_SEAL:
        if allow_unsealed:
            return
        raise BadAddress(
            "guest memory memfd cannot be sealed against shrinking (created without "
            "MFD_ALLOW_SEALING, e.g. memory-backend-memfd seal=off): its owner could "
            "shrink it and kill this server; use seal=on, or trust the front-end with "
            "--allow-unsealed-memory")
    try:
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK)
    except OSError as e:
        raise BadAddress(f"cannot seal guest memory memfd against shrinking: {e}") from e


class GuestMemory:
    """The set of mapped regions, and guest-physical address translation."""

    def __init__(self, max_regions: int = 32, *, allow_unsealed: bool = False) -> None:
        self.max_regions = max_regions
        #: map files that could shrink under us (a trusted front-end only: see pin_size)
        self.allow_unsealed = allow_unsealed
        self.regions: list[Region] = []
        self.generation = 0  # bumped on every change, so cached translations can expire

    # -- table changes -------------------------------------------------------

    def set_table(self, specs: list[RegionSpec]) -> None:
        """Replace every region (SET_MEM_TABLE); all or nothing.  The caller keeps the fds."""
        new: list[Region] = []
        try:
            for spec in specs:
                region = Region.map(spec, allow_unsealed=self.allow_unsealed)
                new.append(region)
                self._check_overlap(region, new[:-1])
        except BadAddress:
            for r in new:
                r.close()
            raise
        self.clear()
        self.regions = new
        self.generation += 1

    def add(self, spec: RegionSpec) -> None:
        """Add one region (ADD_MEM_REG).  The caller keeps the fd."""
        # GET_MAX_MEM_SLOTS answers max_regions: "the maximum number of memory slots"
        if len(self.regions) >= self.max_regions:
            raise BadAddress(f"no free memory slot (max {self.max_regions})")
        region = Region.map(spec, allow_unsealed=self.allow_unsealed)
        try:
            self._check_overlap(region, self.regions)
        except BadAddress:
            region.close()
            raise
        self.regions.append(region)
        self.generation += 1

    def remove(self, gpa: int, size: int) -> None:
        """Remove the region of ``size`` bytes at ``gpa`` (REM_MEM_REG)."""
        for i, r in enumerate(self.regions):
            if r.gpa == gpa and r.size == size:
                del self.regions[i]
                r.close()
                self.generation += 1
                return
        raise BadAddress(f"no region at gpa 0x{gpa:x} size 0x{size:x}")

    def clear(self) -> None:
        """Unmap everything (reset, disconnect)."""
        for r in self.regions:
            r.close()
        if self.regions:
            self.generation += 1
        self.regions = []

    @staticmethod
    def _check_overlap(region: Region, others: list[Region]) -> None:
        for o in others:
            if region.gpa < o.gpa + o.size and o.gpa < region.gpa + region.size:
                raise BadAddress(
                    f"region gpa 0x{region.gpa:x}+0x{region.size:x} overlaps 0x{o.gpa:x}"
                )

    # -- translation ---------------------------------------------------------

    def find_gpa(self, gpa: int, length: int) -> tuple[int, int]:
        """(region index, offset) of ``[gpa, gpa+length)``, which must lie in one region."""
        # "Guest addresses map to the vhost memory region containing that guest address."
        # (vhost-user.rst, Memory access)
        for i, r in enumerate(self.regions):
            off = gpa - r.gpa
            if off >= 0 and off + length <= r.size:
                return i, off
        raise BadAddress(f"guest range 0x{gpa:x}+{length} is outside guest memory")

    def view(self, region: int, offset: int, length: int) -> np.ndarray:
        """A uint8 view of a range already translated by find_gpa."""
        return self.regions[region].mem[offset : offset + length]

    def read_gpa(self, gpa: int, length: int) -> bytes:
        i, off = self.find_gpa(gpa, length)
        return self.regions[i].mem[off : off + length].tobytes()

    def write_gpa(self, gpa: int, data: bytes) -> None:
        i, off = self.find_gpa(gpa, len(data))
        self.regions[i].mem[off : off + len(data)] = np.frombuffer(data, np.uint8)

    def __len__(self) -> int:
        return len(self.regions)
