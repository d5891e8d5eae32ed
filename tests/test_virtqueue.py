"""Split-ring handling: chain walks, every malformed-chain case, notifications."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest

from vhost_rpmsg.guest.ring import need_event
from vhost_rpmsg.vhost_user.ring_state import Event
from vhost_rpmsg.vhost_user.vring import Vring
from vhost_rpmsg.virtio.constants import (
    VRING_AVAIL_F_NO_INTERRUPT,
    VRING_DESC_F_INDIRECT,
    VRING_DESC_F_NEXT,
    VRING_DESC_F_WRITE,
)
from vhost_rpmsg.virtio.engines import QueueFactory, available_engines, queue_factory
from vhost_rpmsg.virtio.memory import RegionSpec
from vhost_rpmsg.virtio.queue import ChainError, Queue, QueueBroken, RawBatch, StaleChain

from .helpers import Memfd, make_queue

MEM = 1 << 16
BUF = 0x8000  # where test buffers live


@pytest.fixture
def memfd() -> Iterator[Memfd]:
    m = Memfd(MEM)
    yield m
    m.close()


def started_vring(q: Queue) -> Vring:
    """``q`` in a started, enabled vhost-user ring (as the back-end sets it up)."""
    vr = Vring(q, lambda vr, change: None)
    vr.apply(Event.START)
    assert vr.ready
    return vr


def test_simple_chains_translate_and_copy(memfd: Memfd) -> None:
    q, drv, gm = make_queue(memfd)
    memfd.mem[BUF : BUF + 4] = list(b"abcd")
    memfd.mem[BUF + 100 : BUF + 103] = list(b"efg")
    h1 = drv.add([(BUF, 4, 0), (BUF + 100, 3, 0)])
    h2 = drv.add([(BUF + 200, 8, VRING_DESC_F_WRITE)])
    drv.publish()
    c1, c2 = q.pop_batch(10)
    assert (c1.head, c1.ok, c1.read_len, c1.write_len) == (h1, True, 7, 0)
    assert q.read_chain(c1) == b"abcdefg"
    assert q.read_chain(c1, 3, offset=2) == b"cde"
    assert (c2.head, c2.write_len) == (h2, 8)
    assert q.write_chain(c2, b"0123456789") == 8
    assert bytes(memfd.mem[BUF + 200 : BUF + 208]) == b"01234567"
    assert q.write_chain(c2, b"XY", offset=6) == 2
    assert bytes(memfd.mem[BUF + 206 : BUF + 208]) == b"XY"
    q.push_batch([(c1.head, 0), (c2.head, 8)])
    assert drv.get_used() == [(h1, 0), (h2, 8)]
    assert q.pop_batch(10) == []
    gm.clear()


def test_batches_respect_the_limit_and_wrap(memfd: Memfd) -> None:
    q, drv, gm = make_queue(memfd, size=4)
    seen = []
    for _round in range(5):  # 5 * 3 > 16-bit? no, but wraps the 4-slot ring many times
        for k in range(3):
            drv.add([(BUF + 16 * k, 16, 0)])
        drv.publish()
        got = q.pop_batch(2) + q.pop_batch(2)
        seen.append(len(got))
        q.push_batch([(c.head, 0) for c in got])
        drv.get_used()
    assert seen == [3] * 5
    gm.clear()


def test_indirect_chain(memfd: Memfd) -> None:
    q, drv, gm = make_queue(memfd)
    table = BUF + 0x1000
    # an indirect table of 2 descriptors: readable 5 bytes, writable 10 bytes
    tbl = memfd.mem[table : table + 32].view("<u8")
    tbl[0], tbl[1] = BUF, 5 | (VRING_DESC_F_NEXT << 32) | (1 << 48)
    tbl[2], tbl[3] = BUF + 64, 10 | (VRING_DESC_F_WRITE << 32)
    head = drv.add([(table, 32, VRING_DESC_F_INDIRECT)])
    drv.publish()
    (c,) = q.pop_batch(1)
    assert c.ok and c.head == head and (c.read_len, c.write_len) == (5, 10)
    gm.clear()


def _tbl(memfd: Memfd, at: int, entries: list[tuple[int, int, int, int]]) -> None:
    view = memfd.mem[at : at + 16 * len(entries)].view("<u8")
    for i, (addr, length, flags, nxt) in enumerate(entries):
        view[2 * i] = addr
        view[2 * i + 1] = length | (flags << 32) | (nxt << 48)


@pytest.mark.parametrize("case", [
    "head_out_of_range", "next_out_of_range", "loop", "out_of_bounds", "straddles_end",
    "indirect_nested", "indirect_bad_len", "indirect_zero_len", "indirect_with_next",
    "indirect_not_negotiated", "readable_after_writable", "indirect_table_outside",
    "indirect_loop", "chain_longer_than_ring", "indirect_larger_than_ring",
])
def test_malformed_chains_are_reported_not_followed(memfd: Memfd, case: str) -> None:
    q, drv, gm = make_queue(memfd, size=8, indirect=case != "indirect_not_negotiated")
    T = BUF + 0x2000
    N, W, IND = VRING_DESC_F_NEXT, VRING_DESC_F_WRITE, VRING_DESC_F_INDIRECT
    expect = {
        "head_out_of_range": ChainError.HEAD_OUT_OF_RANGE,
        "next_out_of_range": ChainError.NEXT_OUT_OF_RANGE,
        "loop": ChainError.LOOP,
        "out_of_bounds": ChainError.ADDR_OUT_OF_BOUNDS,
        "straddles_end": ChainError.ADDR_OUT_OF_BOUNDS,
        "indirect_nested": ChainError.INDIRECT_NESTED,
        "indirect_bad_len": ChainError.INDIRECT_BAD_LEN,
        "indirect_zero_len": ChainError.INDIRECT_BAD_LEN,
        "indirect_with_next": ChainError.INDIRECT_WITH_NEXT,
        "indirect_not_negotiated": ChainError.INDIRECT_NOT_NEGOTIATED,
        "readable_after_writable": ChainError.READABLE_AFTER_WRITABLE,
        "indirect_table_outside": ChainError.ADDR_OUT_OF_BOUNDS,
        "indirect_loop": ChainError.LOOP,
        "chain_longer_than_ring": ChainError.LOOP,
        "indirect_larger_than_ring": ChainError.INDIRECT_BAD_LEN,
    }[case]
    if case == "head_out_of_range":
        drv.add_raw(8)
    elif case == "next_out_of_range":
        drv.write_desc(0, BUF, 4, N, 9)
        drv.add_raw(0)
    elif case == "loop":
        drv.write_desc(0, BUF, 4, N, 1)
        drv.write_desc(1, BUF, 4, N, 0)
        drv.add_raw(0)
    elif case == "chain_longer_than_ring":
        for i in range(8):
            drv.write_desc(i, BUF, 4, N, (i + 1) % 8)
        drv.add_raw(3)
    elif case == "out_of_bounds":
        drv.add([(MEM + 4096, 16, 0)])
    elif case == "straddles_end":
        drv.add([(MEM - 8, 16, 0)])
    elif case == "indirect_nested":
        _tbl(memfd, T, [(T, 16, IND, 0)])
        drv.add([(T, 16, IND)])
    elif case == "indirect_bad_len":
        _tbl(memfd, T, [(BUF, 4, 0, 0)])
        drv.add([(T, 24, IND)])
    elif case == "indirect_zero_len":
        drv.add([(T, 0, IND)])
    elif case == "indirect_with_next":
        _tbl(memfd, T, [(BUF, 4, 0, 0)])
        drv.write_desc(0, T, 16, IND | N, 1)
        drv.write_desc(1, BUF, 4, 0, 0)
        drv.add_raw(0)
    elif case == "indirect_not_negotiated":
        _tbl(memfd, T, [(BUF, 4, 0, 0)])
        drv.add([(T, 16, IND)])
    elif case == "readable_after_writable":
        drv.add([(BUF, 4, W), (BUF + 8, 4, 0)])
    elif case == "indirect_table_outside":
        drv.add([(MEM - 16, 32, IND)])
    elif case == "indirect_loop":
        _tbl(memfd, T, [(BUF, 4, N, 1), (BUF, 4, N, 0)])
        drv.add([(T, 32, IND)])
    elif case == "indirect_larger_than_ring":  # 9 entries in an 8-entry queue
        _tbl(memfd, T, [(BUF, 4, 0, 0)] * 9)
        drv.add([(T, 16 * 9, IND)])
    drv.publish()
    (c,) = q.pop_batch(4)
    assert c.error is expect
    assert c.returnable is (expect is not ChainError.HEAD_OUT_OF_RANGE)
    assert q.state.stats.bad_chains == 1
    gm.clear()


def test_zero_length_descriptors_are_skipped(memfd: Memfd) -> None:
    q, drv, gm = make_queue(memfd)
    drv.add([(BUF, 0, 0), (BUF, 4, 0), (MEM * 4, 0, VRING_DESC_F_WRITE)])
    drv.publish()
    (c,) = q.pop_batch(1)
    assert c.ok and c.read_len == 4 and c.writable == []
    gm.clear()


def test_avail_index_running_ahead_breaks_the_queue(memfd: Memfd) -> None:
    q, drv, gm = make_queue(memfd, size=8)
    vr = started_vring(q)
    drv.avail[1] = 9  # 9 available in an 8-entry ring: impossible
    with pytest.raises(QueueBroken) as exc:
        q.pop_batch(4)
    assert str(exc.value) == "avail idx 9 is 9 ahead of 0"
    assert (q.state.last_avail_idx, q.state.stats.popped) == (0, 0)  # nothing taken
    vr.break_(str(exc.value))  # what the device does with it
    assert vr.broken and not vr.ready
    gm.clear()


@pytest.mark.parametrize("event_idx", [False, True])
def test_interrupt_suppression(memfd: Memfd, event_idx: bool) -> None:
    q, drv, gm = make_queue(memfd, event_idx=event_idx)
    for _ in range(3):
        drv.add([(BUF, 4, 0)])
    drv.publish()
    c0, c1, c2 = q.pop_batch(3)
    q.push_batch([(c0.head, 0)])
    assert q.need_notify() is True  # a fresh ring wants interrupts (used_event 0 is crossed)
    drv.get_used()
    drv.disable_interrupts()
    q.push_batch([(c1.head, 0)])
    assert q.need_notify() is False
    drv.get_used()
    assert drv.enable_interrupts() is False  # driver now wants the next one
    q.push_batch([(c2.head, 0)])
    assert q.need_notify() is True
    assert q.need_notify() is False  # nothing new since
    gm.clear()


def test_event_idx_notifies_exactly_when_crossing_used_event(memfd: Memfd) -> None:
    q, drv, gm = make_queue(memfd, size=16, event_idx=True)
    for _ in range(6):
        drv.add([(BUF, 4, 0)])
    drv.publish()
    chains = q.pop_batch(6)
    drv.avail[2 + 16] = 3  # used_event: interrupt once used idx passes 3
    decisions = []
    for c in chains:
        q.push_batch([(c.head, 0)])
        decisions.append(q.need_notify())
    assert decisions == [False, False, False, True, False, False]
    gm.clear()


def test_no_interrupt_flag_without_event_idx(memfd: Memfd) -> None:
    q, drv, gm = make_queue(memfd)
    drv.add([(BUF, 4, 0)])
    drv.publish()
    (c,) = q.pop_batch(1)
    drv.avail[0] = VRING_AVAIL_F_NO_INTERRUPT
    q.push_batch([(c.head, 0)])
    assert not q.need_notify()
    gm.clear()


@pytest.mark.parametrize("event_idx", [False, True])
def test_kick_suppression_seen_by_the_driver(memfd: Memfd, event_idx: bool) -> None:
    q, drv, gm = make_queue(memfd, event_idx=event_idx)
    drv.add([(BUF, 4, 0)])
    assert drv.publish() is True  # fresh ring: kick
    q.disable_kicks()
    q.pop_batch(1)
    drv.add([(BUF, 4, 0)])
    if not event_idx:
        assert drv.publish() is False  # NO_NOTIFY while the device drains
    else:
        drv.publish()
    assert q.enable_kicks() is True  # a buffer raced in: device keeps going
    q.pop_batch(1)
    assert q.enable_kicks() is False
    drv.add([(BUF, 4, 0)])
    assert drv.publish() is True  # now the device asked for a kick
    gm.clear()


def test_need_event_matches_the_spec_formula() -> None:
    assert need_event(0, 1, 0)
    assert not need_event(1, 1, 0)
    assert need_event(0xFFFF, 0, 0xFFFF)  # wrap-around
    assert need_event(5, 10, 2)


def test_indirect_table_of_exactly_the_queue_size_is_fine(memfd: Memfd) -> None:
    q, drv, gm = make_queue(memfd, size=8)
    T = BUF + 0x2000
    _tbl(memfd, T, [(BUF + 8 * i, 8, VRING_DESC_F_NEXT if i < 7 else 0, i + 1 if i < 7 else 0)
                    for i in range(8)])
    drv.add([(T, 16 * 8, VRING_DESC_F_INDIRECT)])
    drv.publish()
    (c,) = q.pop_batch(1)
    assert c.ok and c.read_len == 64
    gm.clear()


ENGINES = available_engines()


@pytest.fixture(params=ENGINES)
def engine(request: pytest.FixtureRequest) -> QueueFactory:
    return queue_factory(request.param)


def test_chains_from_an_older_memory_table_are_stale(memfd: Memfd,
                                                     engine: QueueFactory) -> None:
    q, drv, gm = make_queue(memfd, engine=engine)
    memfd.mem[BUF : BUF + 4] = list(b"abcd")
    drv.add([(BUF, 4, 0), (BUF + 64, 8, VRING_DESC_F_WRITE)])
    drv.publish()
    (c,) = q.pop_batch(1)
    assert c.generation == gm.generation
    assert q.read_chain(c) == b"abcd"
    # the front-end replaces the table (same memory, even): the chain's segments are void
    gm.set_table([RegionSpec(0, MEM, 0, memfd.fd)])
    q.state.map(gm)
    with pytest.raises(StaleChain, match="memory table changed since the chain was taken"):
        q.read_chain(c)
    with pytest.raises(StaleChain):
        q.write_chain(c, b"xy")
    assert bytes(memfd.mem[BUF + 64 : BUF + 66]) == b"\0\0"  # nothing written
    q.push_batch([(c.head, 0)])  # still returnable
    assert drv.get_used() == [(c.head, 0)]
    drv.add([(BUF, 4, 0)])
    drv.publish()
    (c2,) = q.pop_batch(1)  # popped under the new table: fine
    assert c2.generation == gm.generation and q.read_chain(c2) == b"abcd"
    gm.clear()


def test_negative_offsets_are_refused(memfd: Memfd, engine: QueueFactory) -> None:
    q, drv, gm = make_queue(memfd, engine=engine)
    drv.add([(BUF, 4, 0), (BUF + 64, 8, VRING_DESC_F_WRITE)])
    drv.publish()
    (c,) = q.pop_batch(1)
    with pytest.raises(ValueError, match="offset -1 is negative"):
        q.read_chain(c, offset=-1)
    with pytest.raises(ValueError, match="offset -2 is negative"):
        q.write_chain(c, b"abc", offset=-2)
    assert bytes(memfd.mem[BUF + 64 : BUF + 72]) == bytes(8)
    gm.clear()


def test_raw_batches_and_push_used(memfd: Memfd, engine: QueueFactory) -> None:
    q, drv, gm = make_queue(memfd, size=16, event_idx=True, engine=engine)
    msgs = [bytes([65 + i]) * (16 + 2 * i) for i in range(5)]
    for i, m in enumerate(msgs):
        memfd.mem[BUF + 256 * i : BUF + 256 * i + len(m)] = list(m)
    heads = [drv.add([(BUF + 256 * i, len(m), 0)]) for i, m in enumerate(msgs)]
    heads.append(drv.add([(BUF, 8, 0), (BUF + 4096, 8, VRING_DESC_F_WRITE)]))
    heads.append(drv.add([(MEM + 4096, 8, 0)]))  # outside memory
    drv.publish()
    rb = q.pop_raw_batch(64, 20)
    assert isinstance(rb, RawBatch) and rb.count == 7
    assert rb.heads.dtype == np.uint32 and rb.heads.tolist() == heads
    assert rb.errors.dtype == np.uint8
    assert rb.errors.tolist() == [0] * 6 + [ChainError.ADDR_OUT_OF_BOUNDS]
    assert rb.has_writable.tolist() == [False] * 5 + [True, False]
    assert rb.lengths.dtype == np.int64 and rb.lengths.tolist() == [16, 18, 20, 20, 20, 8, 0]
    assert rb.offsets.dtype == np.int64
    assert rb.offsets.tolist() == [0, 16, 34, 54, 74, 94, 102]
    assert [rb.payload(i) for i in range(5)] == [m[:20] for m in msgs]
    assert rb.data == b"".join(m[:20] for m in msgs) + bytes(memfd.mem[BUF : BUF + 8])
    assert q.state.stats.popped == 7 and q.state.stats.bad_chains == 1
    assert q.pop_raw_batch(64, 20).count == 0
    q.push_used(rb.returnable_heads(), 0)
    assert q.need_notify() is True
    assert drv.get_used() == [(h, 0) for h in heads]
    assert q.state.stats.pushed == 7
    gm.clear()


def test_push_batch_takes_an_array(memfd: Memfd, engine: QueueFactory) -> None:
    q, drv, gm = make_queue(memfd, size=4, engine=engine)
    hs = [drv.add([(BUF, 4, 0)]) for _ in range(3)]
    drv.publish()
    q.pop_batch(3)
    q.push_batch(np.array([[hs[0], 5], [hs[1], 6], [hs[2], 7]], np.uint32))
    assert drv.get_used() == [(hs[0], 5), (hs[1], 6), (hs[2], 7)]
    q.push_batch(np.empty((0, 2), np.uint32))
    q.push_used(np.empty(0, np.uint32), 3)
    assert q.state.used_idx == 3 and q.state.stats.pushed == 3
    gm.clear()


def test_the_reference_raw_pop_needs_no_cffi(memfd: Memfd) -> None:
    """Python-engine semantics on a broken ring: QueueBroken, as pop_batch."""
    q, drv, gm = make_queue(memfd, size=8)
    drv.avail[1] = 9
    with pytest.raises(QueueBroken, match="avail idx 9 is 9 ahead of 0") as exc:
        q.pop_raw_batch(4, 16)
    assert str(exc.value) == "avail idx 9 is 9 ahead of 0"
    gm.clear()
