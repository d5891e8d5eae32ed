"""Guest memory: mapping, translation and its bounds."""

from __future__ import annotations

import mmap
from collections.abc import Iterator

import pytest

from vhost_rpmsg.vhost_user.addresses import FrontEndAddresses
from vhost_rpmsg.vhost_user.codec import MemoryRegion
from vhost_rpmsg.virtio.memory import BadAddress, GuestMemory, RegionSpec

from .helpers import Memfd

UVA = 0x7F00_0000_0000


@pytest.fixture
def memfd() -> Iterator[Memfd]:
    m = Memfd(1 << 16)
    yield m
    m.close()


def test_translate_inside_and_at_the_edges(memfd: Memfd) -> None:
    gm = memfd.guest_memory(gpa=0x10000)
    assert gm.find_gpa(0x10000, 1) == (0, 0)
    assert gm.find_gpa(0x10000 + (1 << 16) - 8, 8) == (0, (1 << 16) - 8)
    for gpa, n in [(0xFFFF, 1), (0x10000 + (1 << 16) - 7, 8), (0x20000, 1), (2**64 - 1, 2)]:
        with pytest.raises(BadAddress):
            gm.find_gpa(gpa, n)
    gm.clear()


def test_read_write_round_trip_and_shared(memfd: Memfd) -> None:
    gm = memfd.guest_memory()
    gm.write_gpa(100, b"hello")
    assert bytes(memfd.mem[100:105]) == b"hello"
    memfd.mem[200:203] = list(b"abc")
    assert gm.read_gpa(200, 3) == b"abc"
    gm.clear()


def test_region_larger_than_its_file_is_refused() -> None:
    m = Memfd(4096)
    gm = GuestMemory()
    with pytest.raises(BadAddress, match="exceeds"):
        gm.set_table([RegionSpec(0, 1 << 20, 0, m.fd)])
    assert len(gm) == 0
    m.close()


def test_unaligned_mmap_offset_is_honoured() -> None:
    m = Memfd(3 * mmap.PAGESIZE)
    m.mem[mmap.PAGESIZE + 100 : mmap.PAGESIZE + 104] = list(b"DATA")
    gm = GuestMemory()
    gm.set_table([RegionSpec(0, 4096, mmap.PAGESIZE + 100, m.fd)])
    assert gm.read_gpa(0, 4) == b"DATA"
    gm.clear()
    m.close()


def test_overlapping_regions_are_refused_and_nothing_changes(memfd: Memfd) -> None:
    gm = GuestMemory()
    gm.add(RegionSpec(0, 4096, 0, memfd.fd))
    with pytest.raises(BadAddress, match="overlaps"):
        gm.add(RegionSpec(2048, 4096, 0, memfd.fd))
    assert len(gm) == 1
    with pytest.raises(BadAddress, match="overlaps"):
        gm.set_table([RegionSpec(0, 4096, 0, memfd.fd), RegionSpec(4095, 10, 0, memfd.fd)])
    assert len(gm) == 1  # the old table survives a refused replacement
    gm.clear()


def test_add_remove_and_slot_limit(memfd: Memfd) -> None:
    gm = GuestMemory(max_regions=2)
    a = RegionSpec(0, 4096, 0, memfd.fd)
    b = RegionSpec(8192, 4096, 8192, memfd.fd)
    gm.add(a)
    gm.add(b)
    with pytest.raises(BadAddress, match="slot"):
        gm.add(RegionSpec(16384, 4096, 16384, memfd.fd))
    gen = gm.generation
    gm.remove(a.gpa, a.size)
    assert gm.generation > gen
    with pytest.raises(BadAddress):
        gm.find_gpa(0, 1)
    assert gm.find_gpa(8192, 4096) == (0, 0)
    with pytest.raises(BadAddress, match="no region"):
        gm.remove(a.gpa, a.size)
    gm.clear()


def test_ranges_never_span_two_regions(memfd: Memfd) -> None:
    gm = GuestMemory()
    gm.add(RegionSpec(0, 4096, 0, memfd.fd))
    gm.add(RegionSpec(4096, 4096, 4096, memfd.fd))
    with pytest.raises(BadAddress):
        gm.find_gpa(4000, 200)
    gm.clear()


def test_size_zero_region_is_refused(memfd: Memfd) -> None:
    with pytest.raises(BadAddress):
        GuestMemory().add(RegionSpec(0, 0, 0, memfd.fd))


def test_front_end_addresses_become_guest_physical_at_the_edge() -> None:
    fe = FrontEndAddresses()
    a = MemoryRegion(0x10000, 1 << 16, UVA + 0x10000, 0)
    fe.set_table([a])
    assert fe.to_gpa(UVA + 0x10000 + 16, 16) == 0x10000 + 16
    assert fe.to_gpa(UVA + 0x10000 + (1 << 16) - 8, 8) == 0x10000 + (1 << 16) - 8
    for uva, n in [(UVA + 0xFFFF, 1), (UVA + 0x10000 + (1 << 16) - 7, 8), (0x10000, 1)]:
        with pytest.raises(BadAddress, match="outside guest memory"):
            fe.to_gpa(uva, n)
    with pytest.raises(BadAddress, match="no region"):
        fe.check_remove(MemoryRegion(0x10000, 1 << 16, UVA, 0))  # same gpa, other address
    fe.check_remove(a)
    fe.remove(a)
    with pytest.raises(BadAddress):
        fe.to_gpa(UVA + 0x10000, 1)
