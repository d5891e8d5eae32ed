"""The sans-I/O vhost-user codec: round trips, framing, fd attribution, fuzzing."""

from __future__ import annotations

import os
from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vhost_rpmsg.vhost_user import codec
from vhost_rpmsg.vhost_user.codec import (
    Decoder,
    FramingError,
    MemoryRegion,
    Message,
    PayloadError,
    VringAddr,
)
from vhost_rpmsg.vhost_user.protocol import FLAG_NEED_REPLY, FLAG_REPLY, Request

u32 = st.integers(0, 2**32 - 1)
u64 = st.integers(0, 2**64 - 1)


def _one(data: bytes, fds: tuple[int, ...] = ()) -> Message:
    d = Decoder()
    d.feed(data, fds)
    msg = d.next_message()
    assert msg is not None
    assert d.next_message() is None
    return msg


@given(u64)
def test_u64_round_trip(v: int) -> None:
    msg = _one(codec.encode(Request.SET_FEATURES, codec.encode_u64(v)))
    assert msg.request == Request.SET_FEATURES
    assert codec.parse_u64(msg) == v


@given(u32, u32)
def test_vring_state_round_trip(i: int, n: int) -> None:
    msg = _one(codec.encode(Request.SET_VRING_NUM, codec.encode_vring_state(i, n)))
    assert codec.parse_vring_state(msg) == codec.VringState(i, n)


@given(u32, u32, u64, u64, u64, u64)
def test_vring_addr_round_trip(i: int, f: int, d: int, u: int, a: int, lg: int) -> None:
    addr = VringAddr(i, f, d, u, a, lg)
    msg = _one(codec.encode(Request.SET_VRING_ADDR, codec.encode_vring_addr(addr)))
    assert codec.parse_vring_addr(msg) == addr


@given(st.lists(st.tuples(u64, u64, u64, u64), min_size=1, max_size=8))
def test_mem_table_round_trip(raw: list[tuple[int, int, int, int]]) -> None:
    regions = [MemoryRegion(*r) for r in raw]
    msg = _one(codec.encode(Request.SET_MEM_TABLE, codec.encode_mem_table(regions)))
    assert codec.parse_mem_table(msg) == regions


def test_mem_table_full_array_form_is_accepted() -> None:
    # QEMU always sends all 8 slots; only nregions of them count.
    r = MemoryRegion(0, 4096, 0x1000, 0)
    payload = codec.encode_mem_table([r]) + bytes(7 * 32)
    msg = _one(codec.encode(Request.SET_MEM_TABLE, payload))
    assert codec.parse_mem_table(msg) == [r]


@given(st.tuples(u64, u64, u64, u64))
def test_single_region_round_trip(raw: tuple[int, int, int, int]) -> None:
    r = MemoryRegion(*raw)
    msg = _one(codec.encode(Request.ADD_MEM_REG, codec.encode_single_region(r)))
    assert codec.parse_single_region(msg) == r


@given(st.integers(0, 255), st.booleans())
def test_vring_file_round_trip(i: int, nofd: bool) -> None:
    msg = _one(codec.encode(Request.SET_VRING_KICK, codec.encode_vring_file(i, nofd)))
    assert codec.parse_vring_file(msg) == codec.VringFile(i, nofd)


@given(st.integers(0, 256), st.binary(max_size=256))
def test_config_round_trip(offset: int, data: bytes) -> None:
    msg = _one(codec.encode(Request.GET_CONFIG, codec.encode_config(offset, data)))
    if offset + len(data) > 256:
        with pytest.raises(PayloadError):
            codec.parse_config(msg)
    else:
        c = codec.parse_config(msg)
        assert (c.offset, c.size, c.data) == (offset, len(data), data)


def test_flags_survive() -> None:
    msg = _one(codec.encode(Request.SET_OWNER, need_reply=True))
    assert msg.flags & FLAG_NEED_REPLY and msg.need_reply and not msg.is_reply
    msg = _one(codec.encode(Request.GET_FEATURES, codec.encode_u64(1), reply=True))
    assert msg.flags & FLAG_REPLY and msg.is_reply


@pytest.mark.parametrize(
    ("parse", "payload"),
    [
        (codec.parse_u64, b"\0" * 7),
        (codec.parse_u64, b"\0" * 9),
        (codec.parse_vring_state, b"\0" * 4),
        (codec.parse_vring_addr, b"\0" * 39),
        (codec.parse_mem_table, b""),
        (codec.parse_mem_table, (0).to_bytes(4, "little") + bytes(4)),  # zero regions
        (codec.parse_mem_table, (9).to_bytes(4, "little") + bytes(4 + 9 * 32)),
        (codec.parse_mem_table, (2).to_bytes(4, "little") + bytes(4 + 32)),  # short
        (codec.parse_single_region, bytes(32)),
        (codec.parse_vring_file, (1 << 9).to_bytes(8, "little")),  # reserved bit
        (codec.parse_config, bytes(8)),
        (codec.parse_config, (0).to_bytes(4, "little") + (10).to_bytes(4, "little")
         + bytes(4) + bytes(3)),  # size says 10, 3 bytes follow
    ],
)
def test_bad_payloads_raise_payload_error(parse: Callable[[Message], object],
                                          payload: bytes) -> None:
    msg = Message(Request.SET_FEATURES, 1, payload)
    with pytest.raises(PayloadError):
        parse(msg)


def test_bad_version_is_a_framing_error() -> None:
    d = Decoder()
    d.feed((1).to_bytes(4, "little") + (2).to_bytes(4, "little") + bytes(4))
    with pytest.raises(FramingError, match="version"):
        d.next_message()
    with pytest.raises(FramingError):  # and it stays broken
        d.next_message()


def test_oversized_payload_is_a_framing_error() -> None:
    d = Decoder()
    d.feed((1).to_bytes(4, "little") + (1).to_bytes(4, "little")
           + (1 << 20).to_bytes(4, "little"))
    with pytest.raises(FramingError, match="exceeds"):
        d.next_message()


def test_fds_attach_to_the_message_they_arrived_with() -> None:
    a = codec.encode(Request.SET_VRING_NUM, codec.encode_vring_state(0, 256))
    b = codec.encode(Request.SET_VRING_KICK, codec.encode_vring_file(0))
    r, w = os.pipe()
    try:
        d = Decoder()
        d.feed(a)
        d.feed(b, (r,))
        m1, m2 = d.next_message(), d.next_message()
        assert m1 is not None and m2 is not None
        assert m1.fds == () and m2.fds == (r,)
    finally:
        os.close(r)
        os.close(w)


def test_decoder_close_releases_undelivered_fds() -> None:
    r, w = os.pipe()
    d = Decoder()
    d.feed(b"\x01\x00", (r,))  # half a header, with an fd
    d.close()
    with pytest.raises(OSError):
        os.fstat(r)
    os.close(w)


def test_wanted_never_crosses_a_message_boundary() -> None:
    d = Decoder()
    assert d.wanted() == 12
    msg = codec.encode(Request.SET_FEATURES, codec.encode_u64(5))
    d.feed(msg[:5])
    assert d.wanted() == 7
    d.feed(msg[5:12])
    assert d.wanted() == 8


@settings(max_examples=300)
@given(st.lists(st.tuples(st.sampled_from(list(Request)), st.binary(max_size=300)),
                max_size=8),
       st.lists(st.integers(1, 50), max_size=20))
def test_any_chunking_yields_the_same_messages(
    msgs: list[tuple[Request, bytes]], cuts: list[int]
) -> None:
    stream = b"".join(codec.encode(r, p) for r, p in msgs)
    d = Decoder()
    out = []
    pos = 0
    for c in [*cuts, len(stream)]:
        d.feed(stream[pos : pos + c])
        pos += c
        while (m := d.next_message()) is not None:
            out.append((m.request, m.payload))
    assert out == [(int(r), p) for r, p in msgs]


@settings(max_examples=500)
@given(st.binary(max_size=600))
def test_garbage_never_raises_anything_but_framing_error(data: bytes) -> None:
    d = Decoder()
    d.feed(data)
    try:
        while d.next_message() is not None:
            pass
    except FramingError:
        pass
