"""Guest messages to an fd endpoint's process: the C batch writer (sendmmsg) and the
per-message Python path give the same datagrams, in order, and lose none when the
socket fills.

Driven through :class:`FdEndpoint` over a real socketpair, as the device drives it;
each case runs with the C writer and with it switched off.  Skipped without the C
module only where CI does not require it (VHOST_RPMSG_REQUIRE_CFFI=1).
"""

from __future__ import annotations

import asyncio
import errno
import os
import socket
import struct
from collections.abc import Iterator

import numpy as np
import pytest

from vhost_rpmsg.endpoints import peer as peer_mod
from vhost_rpmsg.endpoints.fd import FdEndpoint
from vhost_rpmsg.rpmsg.batch import MessageBatch

native = pytest.param(True, id="c-writer")
python = pytest.param(False, id="python")


@pytest.fixture(params=[native, python])
def writer(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[bool]:
    if request.param and peer_mod._lib is None:
        if os.environ.get("VHOST_RPMSG_REQUIRE_CFFI") == "1":
            pytest.fail("_vhost_rpmsg_headers is not built (VHOST_RPMSG_REQUIRE_CFFI=1)")
        pytest.skip("_vhost_rpmsg_headers is not built")
    if not request.param:
        monkeypatch.setattr(peer_mod, "_lib", None)
    yield request.param


class _Port:
    src = 1024
    guest_ready = True

    def send(self, dst: int, data: bytes) -> None:
        raise AssertionError("nothing is written in these tests")

    def send_many(self, messages: list[tuple[int, bytes]]) -> None:
        raise AssertionError("nothing is written in these tests")

    async def asend(self, dst: int, data: bytes) -> None:
        raise AssertionError("nothing is written in these tests")


def _batch(payloads: list[bytes], srcs: list[int], arrays: bool) -> MessageBatch:
    """The payloads behind 16-byte stand-ins for headers, as a parsed batch holds them."""
    data = b"".join(b"h" * 16 + p for p in payloads)
    offsets, o = [], 0
    for p in payloads:
        offsets.append(o + 16)
        o += 16 + len(p)
    lengths = [len(p) for p in payloads]
    if arrays:
        return MessageBatch(data, 1024, np.array(srcs, np.int64), np.array(offsets, np.int64),
                            np.array(lengths, np.int64))
    return MessageBatch(data, 1024, srcs, offsets, lengths)


def _read_all(sock: socket.socket) -> list[bytes]:
    got = []
    while True:
        try:
            got.append(sock.recv(65536, socket.MSG_DONTWAIT))
        except BlockingIOError:
            return got


@pytest.mark.parametrize("arrays", [False, True], ids=["lists", "arrays"])
@pytest.mark.parametrize("addressed", [False, True], ids=["plain", "addressed"])
def test_a_batch_arrives_as_one_datagram_per_message_in_order(
        writer: bool, addressed: bool, arrays: bool) -> None:
    payloads = [bytes([i]) * (i % 7) for i in range(150)]  # empty ones too
    srcs = [0x400 + i for i in range(150)]

    async def main() -> tuple[list[bytes], dict[str, int]]:
        a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        ep = FdEndpoint(2000, sock=a, addressed=addressed)
        ep.bind(_Port())
        try:
            ep.on_message_batch(_batch(payloads, srcs, arrays))
            return _read_all(b), dict(ep.stats)
        finally:
            ep.close()
            b.close()

    got, stats = asyncio.run(main())
    want = [struct.pack("<I", s) + p for s, p in zip(srcs, payloads, strict=True)] \
        if addressed else payloads
    assert got == want
    assert stats["to_process"] == 150
    assert stats["to_process_bytes"] == sum(map(len, want))


def test_a_full_socket_keeps_the_rest_queued_in_order_until_it_is_read(writer: bool) -> None:
    n = 600
    payloads = [i.to_bytes(2, "little") * 200 for i in range(n)]  # 400 bytes each

    async def main() -> tuple[list[bytes], int, dict[str, int]]:
        a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)  # room for a few
        ep = FdEndpoint(2000, sock=a, limit=n)
        ep.bind(_Port())
        try:
            half = n // 2
            ep.on_message_batch(_batch(payloads[:half], [5] * half, True))
            ep.on_message_batch(_batch(payloads[half:], [5] * (n - half), False))
            queued = ep.peer.queued
            got: list[bytes] = []
            for _ in range(10_000):  # read, and let the loop's writer refill the socket
                got += _read_all(b)
                if len(got) >= n:
                    break
                await asyncio.sleep(0)
            return got, queued, dict(ep.stats)
        finally:
            ep.close()
            b.close()

    got, queued, stats = asyncio.run(main())
    assert queued > 0  # the socket did fill: the queue and the writable path were used
    assert got == payloads
    assert stats["to_process"] == n and stats["to_process_bytes"] == 400 * n
    assert stats.get("dropped_slow_reader", 0) == 0


def test_the_c_writer_checks_every_datagram_before_sending_any() -> None:
    lib, ffi = peer_mod._lib, peer_mod._ffi
    if lib is None:
        if os.environ.get("VHOST_RPMSG_REQUIRE_CFFI") == "1":
            pytest.fail("_vhost_rpmsg_headers is not built (VHOST_RPMSG_REQUIRE_CFFI=1)")
        pytest.skip("_vhost_rpmsg_headers is not built")
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        data = ffi.from_buffer("uint8_t[]", b"0123456789")

        def send(offsets: list[int], lengths: list[int], addrs: list[int] | None = None,
                 fd: int = a.fileno()) -> int:
            return int(lib.rp_send_datagrams(
                fd, data, 10, ffi.new("int64_t[]", offsets), ffi.new("int64_t[]", lengths),
                ffi.new("int64_t[]", addrs) if addrs is not None else ffi.NULL, len(offsets)))

        assert send([0, 8], [4, 3]) == -errno.EINVAL  # the second runs past the end
        assert send([0, -1], [4, 1]) == -errno.EINVAL
        assert send([0, 2], [4, -1]) == -errno.EINVAL
        assert send([0], [4], [1 << 32]) == -errno.EINVAL
        assert _read_all(b) == []  # nothing of a refused batch was sent
        assert send([0, 6], [4, 4], [1, 0xFFFFFFFF]) == 2
        assert _read_all(b) == [b"\x01\x00\x00\x000123", b"\xff\xff\xff\xff6789"]
        closed = os.dup(a.fileno())
        os.close(closed)
        assert send([0], [1], fd=closed) == -errno.EBADF
        b.close()
        assert send([0], [1]) == -errno.EPIPE  # the reader went: an error, not a full socket
    finally:
        a.close()
        b.close()
