"""The front-end's virtual addresses, turned into guest-physical ones at the protocol edge.

vhost-user names ring addresses in the front-end's (QEMU's) address space, and each
memory region carries its front-end address besides its guest-physical one.  Only this
module knows of them: guest memory and the queues below see guest-physical addresses.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..virtio.memory import BadAddress
from .codec import MemoryRegion


@dataclass(frozen=True)
class _Window:
    uva: int
    gpa: int
    size: int


class FrontEndAddresses:
    """Front-end VA windows of the memory table, and each ring's front-end addresses."""

    def __init__(self) -> None:
        self._windows: list[_Window] = []
        self._rings: dict[int, tuple[int, int, int]] = {}

    def set_table(self, regions: list[MemoryRegion]) -> None:
        self._windows = [_window(r) for r in regions]

    def add(self, region: MemoryRegion) -> None:
        self._windows.append(_window(region))

    def check_remove(self, region: MemoryRegion) -> None:
        """BadAddress unless ``region`` is one of the table's (gpa, size and address)."""
        if _window(region) not in self._windows:
            raise BadAddress(f"no region at gpa 0x{region.guest_phys_addr:x} "
                             f"size 0x{region.memory_size:x}")

    def remove(self, region: MemoryRegion) -> None:
        self._windows.remove(_window(region))

    def set_ring(self, index: int, addrs: tuple[int, int, int]) -> None:
        """The (desc, avail, used) front-end addresses of ring ``index``."""
        self._rings[index] = addrs

    def ring(self, index: int) -> tuple[int, int, int] | None:
        return self._rings.get(index)

    def to_gpa(self, uva: int, length: int) -> int:
        """The guest-physical address of ``[uva, uva+length)``, which must lie in one region."""
        for w in self._windows:
            off = uva - w.uva
            if off >= 0 and off + length <= w.size:
                return w.gpa + off
        raise BadAddress(f"front-end range 0x{uva:x}+{length} is outside guest memory")

    def clear_rings(self) -> None:
        self._rings.clear()

    def clear(self) -> None:
        self._windows = []
        self._rings.clear()


def _window(r: MemoryRegion) -> _Window:
    return _Window(r.userspace_addr, r.guest_phys_addr, r.memory_size)
