"""Guest memory: the regions the front-end shares, mmapped, with bounds-checked access.

Every access the backend makes to guest memory goes through :class:`GuestMemory`: an
address range is translated to (region, offset) only if it lies wholly inside one
region, so a hostile descriptor can never make us read or write outside what the
front-end handed over.
"""

from __future__ import annotations

import logging
import mmap
import os
from dataclasses import dataclass, field

import numpy as np

from .vhost_user.codec import MemoryRegion

log = logging.getLogger(__name__)

_PAGE = mmap.PAGESIZE


class BadAddress(Exception):
    """An address, range or region the front-end gave us is not usable guest memory."""


@dataclass(eq=False)
class Region:
    """One mmapped region of guest RAM."""

    gpa: int
    size: int
    uva: int  # front-end (QEMU) virtual address of the region start
    mmap_offset: int
    _map: mmap.mmap | None = None
    mem: np.ndarray = field(default_factory=lambda: np.empty(0, np.uint8))
    mv: memoryview = field(default_factory=lambda: memoryview(b""))

    @classmethod
    def map(cls, desc: MemoryRegion, fd: int) -> Region:
        """mmap ``fd`` as described.  The caller keeps ``fd``: the mapping outlives it."""
        if desc.memory_size == 0:
            raise BadAddress("region of size 0")
        end = desc.guest_phys_addr + desc.memory_size
        if end > 1 << 64 or desc.userspace_addr + desc.memory_size > 1 << 64:
            raise BadAddress("region wraps the 64-bit address space")
        # mmap offsets must be page aligned: map from the page below and skip the rest.
        aligned = desc.mmap_offset - desc.mmap_offset % _PAGE
        skip = desc.mmap_offset - aligned
        try:
            st = os.fstat(fd)
            if st.st_size and aligned + skip + desc.memory_size > st.st_size:
                raise BadAddress(
                    f"region of {desc.memory_size} bytes at offset {desc.mmap_offset} "
                    f"exceeds its file of {st.st_size} bytes"
                )
            m = mmap.mmap(
                fd,
                skip + desc.memory_size,
                flags=mmap.MAP_SHARED,
                prot=mmap.PROT_READ | mmap.PROT_WRITE,
                offset=aligned,
            )
        except (OSError, ValueError, OverflowError) as e:
            raise BadAddress(f"cannot map region gpa 0x{desc.guest_phys_addr:x}: {e}") from e
        mem = np.frombuffer(m, dtype=np.uint8, count=desc.memory_size, offset=skip)
        log.info("mapped guest memory: gpa 0x%x size 0x%x front-end va 0x%x file offset 0x%x",
                 desc.guest_phys_addr, desc.memory_size, desc.userspace_addr,
                 desc.mmap_offset)
        return cls(
            desc.guest_phys_addr, desc.memory_size, desc.userspace_addr, desc.mmap_offset,
            m, mem, mem.data,
        )

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

    def matches(self, desc: MemoryRegion) -> bool:
        return (
            self.gpa == desc.guest_phys_addr
            and self.size == desc.memory_size
            and self.uva == desc.userspace_addr
        )


class GuestMemory:
    """The set of mapped regions, with GPA and front-end-VA translation."""

    def __init__(self, max_regions: int = 32) -> None:
        self.max_regions = max_regions
        self.regions: list[Region] = []
        self.generation = 0  # bumped on every change, so cached translations can expire

    # -- table changes -------------------------------------------------------

    def set_table(self, descs: list[MemoryRegion], fds: list[int]) -> None:
        """Replace every region (SET_MEM_TABLE); all or nothing.  The caller keeps ``fds``."""
        if len(descs) != len(fds):
            raise BadAddress(f"{len(descs)} regions but {len(fds)} file descriptors")
        new: list[Region] = []
        try:
            for d, fd in zip(descs, fds, strict=True):
                region = Region.map(d, fd)
                new.append(region)
                self._check_overlap(region, new[:-1])
        except BadAddress:
            for r in new:
                r.close()
            raise
        self.clear()
        self.regions = new
        self.generation += 1

    def add(self, desc: MemoryRegion, fd: int) -> None:
        """Add one region (ADD_MEM_REG).  The caller keeps ``fd``."""
        if len(self.regions) >= self.max_regions:
            raise BadAddress(f"no free memory slot (max {self.max_regions})")
        region = Region.map(desc, fd)
        try:
            self._check_overlap(region, self.regions)
        except BadAddress:
            region.close()
            raise
        self.regions.append(region)
        self.generation += 1

    def remove(self, desc: MemoryRegion) -> None:
        """Remove the region matching ``desc`` (REM_MEM_REG)."""
        for i, r in enumerate(self.regions):
            if r.matches(desc):
                del self.regions[i]
                r.close()
                self.generation += 1
                return
        raise BadAddress(
            f"no region at gpa 0x{desc.guest_phys_addr:x} size 0x{desc.memory_size:x}"
        )

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
        for i, r in enumerate(self.regions):
            off = gpa - r.gpa
            if off >= 0 and off + length <= r.size:
                return i, off
        raise BadAddress(f"guest range 0x{gpa:x}+{length} is outside guest memory")

    def find_uva(self, uva: int, length: int) -> tuple[int, int]:
        """(region index, offset) of a front-end virtual range (ring addresses)."""
        for i, r in enumerate(self.regions):
            off = uva - r.uva
            if off >= 0 and off + length <= r.size:
                return i, off
        raise BadAddress(f"front-end range 0x{uva:x}+{length} is outside guest memory")

    def view(self, region: int, offset: int, length: int) -> np.ndarray:
        """A uint8 view of a range already translated by find_gpa/find_uva."""
        return self.regions[region].mem[offset : offset + length]

    def read_gpa(self, gpa: int, length: int) -> bytes:
        i, off = self.find_gpa(gpa, length)
        return self.regions[i].mem[off : off + length].tobytes()

    def write_gpa(self, gpa: int, data: bytes) -> None:
        i, off = self.find_gpa(gpa, len(data))
        self.regions[i].mem[off : off + len(data)] = np.frombuffer(data, np.uint8)

    def __len__(self) -> int:
        return len(self.regions)
