"""Hostile or broken front-ends and guests: clear errors, no stray memory access, and the
server keeps serving (the next connection works)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from vhost_rpmsg.endpoints import Echo, Endpoint, Sink
from vhost_rpmsg.guest.frontend import Frontend, FrontendError, GuestRam
from vhost_rpmsg.guest.rpmsg_guest import GuestTimeout, SimGuest
from vhost_rpmsg.rpmsg import codec as rp
from vhost_rpmsg.rpmsg.batch import MessageBatch
from vhost_rpmsg.rpmsg.device import DRAIN_BUDGET, RpmsgDevice
from vhost_rpmsg.rpmsg.outbox import FILL_CALLS
from vhost_rpmsg.rpmsg.ratelimit import RateLimitedLog
from vhost_rpmsg.rpmsg.sessions import MAX_GUEST_SERVICES
from vhost_rpmsg.vhost_user import codec
from vhost_rpmsg.vhost_user.codec import MemoryRegion, VringAddr
from vhost_rpmsg.vhost_user.protocol import ProtocolFeature, Request
from vhost_rpmsg.vhost_user.ring_state import RingState
from vhost_rpmsg.virtio.constants import (
    VRING_DESC_F_INDIRECT,
    VRING_DESC_F_NEXT,
    VRING_DESC_F_WRITE,
)
from vhost_rpmsg.virtio.engines import available_engines, queue_factory
from vhost_rpmsg.virtio.queue import WALK_BUDGET

from .conftest import Running, Serve
from .helpers import serving, wait_until

PF = ProtocolFeature
EchoServer = Running[RpmsgDevice]  # what the echo_server fixture serves
TAIL = 1 << 16  # guest RAM left out of the memory table, filled with a canary


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def _next_guest_works(r: Running) -> None:
    """The acid test after every bad input: a fresh, correct guest is served."""
    wait_until(lambda: r.server.conn is None)
    with SimGuest(r.path) as g:
        g.open(3000)
        g.send(3000, 1024, b"still alive")
        assert g.recv(3000) == (1024, b"still alive")


@pytest.fixture
def echo_server(serve: Serve) -> EchoServer:
    return serve([Echo(1024), Sink(1025)])


def _raw(r: Running) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(5)
    s.connect(r.path)
    return s


@pytest.mark.parametrize("junk", [
    codec.encode(Request.SET_FEATURES, codec.encode_u64(1))[:7],  # truncated header
    codec.encode(Request.SET_FEATURES, codec.encode_u64(1))[:15],  # truncated payload
    (1).to_bytes(4, "little") + (1).to_bytes(4, "little") + (1 << 24).to_bytes(4, "little"),
    (1).to_bytes(4, "little") + (0).to_bytes(4, "little") + bytes(4),  # version 0
    os.urandom(64),
], ids=["short-header", "short-payload", "oversized", "bad-version", "random"])
def test_garbage_stream_drops_the_connection_only(echo_server: EchoServer, junk: bytes) -> None:
    before = echo_server.counters().get("connections", 0)
    s = _raw(echo_server)
    s.sendall(junk)
    s.shutdown(socket.SHUT_WR)
    try:
        assert s.recv(100) == b""  # the server closes without answering
    except ConnectionResetError:
        pass  # ... or resets, when our unread bytes were still queued
    s.close()
    wait_until(lambda: echo_server.counters().get("connections", 0) == before + 1)
    _next_guest_works(echo_server)


def test_second_front_end_is_refused_while_one_is_connected(echo_server: EchoServer) -> None:
    with SimGuest(echo_server.path):
        s = _raw(echo_server)
        assert s.recv(10) == b""  # closed at once
        s.close()
        wait_until(lambda: echo_server.counters().get("rejected") == 1)
    _next_guest_works(echo_server)


def test_wrong_fd_counts_fail_cleanly_and_leak_nothing(echo_server: EchoServer) -> None:
    ram = GuestRam(1 << 20)
    fe = Frontend(echo_server.path, ram)
    fe.negotiate((1 << PF.MQ) | (1 << PF.REPLY_ACK))
    base = _open_fds()
    r, w = os.pipe()
    with pytest.raises(FrontendError):  # kick without an fd and without the no-fd bit
        fe.request(Request.SET_VRING_KICK, codec.encode_vring_file(0), [], need_reply=True)
    with pytest.raises(FrontendError):  # an fd where none belongs
        fe.request(Request.SET_OWNER, b"", [r], need_reply=True)
    with pytest.raises(FrontendError):  # two regions, one fd
        fe.request(Request.SET_MEM_TABLE, codec.encode_mem_table(
            [ram.region(), MemoryRegion(1 << 30, 4096, 0, 0)]), [ram.fd], need_reply=True)
    with pytest.raises(FrontendError):  # two fds for one region
        fe.request(Request.ADD_MEM_REG, codec.encode_single_region(ram.region()),
                   [ram.fd, r], need_reply=True)
    with pytest.raises(FrontendError):  # bad payload size
        fe.request(Request.SET_VRING_NUM, b"\0" * 5, need_reply=True)
    with pytest.raises(FrontendError):  # queue index out of range
        fe.request(Request.SET_VRING_NUM, codec.encode_vring_state(7, 256), need_reply=True)
    with pytest.raises(FrontendError):  # not a power of two
        fe.request(Request.SET_VRING_NUM, codec.encode_vring_state(0, 100), need_reply=True)
    os.close(r)
    os.close(w)
    # every fd the server received with those refused requests was closed again
    assert _open_fds() <= base
    b = echo_server.server.backend
    assert b is not None and b.errors["bad_request"] == 7
    fe.close()
    ram.close()
    _next_guest_works(echo_server)


def test_ring_outside_guest_memory_is_refused(echo_server: EchoServer) -> None:
    ram = GuestRam(1 << 20)
    fe = Frontend(echo_server.path, ram)
    fe.negotiate((1 << PF.MQ) | (1 << PF.REPLY_ACK))
    fe.request(Request.SET_FEATURES, codec.encode_u64(fe.backend_features))
    fe.set_memory()
    k = os.eventfd(0)
    fe.request(Request.SET_VRING_NUM, codec.encode_vring_state(0, 256))
    # used ring runs past the end of the only region
    region = ram.region()
    fe.request(Request.SET_VRING_ADDR, codec.encode_vring_addr(VringAddr(
        0, 0, region.userspace_addr, region.userspace_addr + region.memory_size - 64,
        region.userspace_addr + 4096, 0)))
    with pytest.raises(FrontendError):
        fe.request(Request.SET_VRING_KICK, codec.encode_vring_file(0), [k], need_reply=True)
    with pytest.raises(FrontendError):  # misaligned descriptor table
        fe.request(Request.SET_VRING_ADDR, codec.encode_vring_addr(VringAddr(
            0, 0, region.userspace_addr + 8, region.userspace_addr + 8192,
            region.userspace_addr + 4096, 0)), need_reply=True)
    os.close(k)
    fe.close()
    ram.close()
    _next_guest_works(echo_server)


def _canary(g: SimGuest) -> np.ndarray:
    assert g.ram is not None
    return g.ram.mem[g.ram.size - TAIL :]


#: how the device counts each hostile tx chain: a bad chain (the ring level: addresses,
#: loops, nesting, direction) or a bad message (a good chain too short for a header)
TX_BAD_AS = {"outside": "bad_chains", "straddles": "bad_chains", "loop": "bad_chains",
             "longer_than_ring": "bad_chains", "indirect_in_indirect": "bad_chains",
             "zero_length": "bad_messages", "wrong_direction": "bad_chains",
             "too_short_for_header": "bad_messages"}


@pytest.mark.parametrize("chain", list(TX_BAD_AS))
def test_hostile_tx_chains(echo_server: EchoServer, chain: str) -> None:
    g = echo_server.guest(hidden_tail=TAIL).start()
    assert g.ram is not None
    canary = _canary(g)
    canary[:] = 0xA5
    edge = g.ram.size - TAIL  # first byte the backend was not given
    scratch = g.ram.alloc(4096, 4096)
    ring = g.rings[1]
    N, W, IND = VRING_DESC_F_NEXT, VRING_DESC_F_WRITE, VRING_DESC_F_INDIRECT
    stats = echo_server.device.stats
    assert stats["bad_chains"] == stats["bad_messages"] == 0
    if chain == "outside":
        g.send_chain([(edge + 64, 32, 0)])
    elif chain == "straddles":
        g.send_chain([(edge - 8, 32, 0)])
    elif chain in ("loop", "longer_than_ring"):
        # descriptors whose next fields form a cycle: one onto itself, or four in a ring
        k = 1 if chain == "loop" else 4
        with g._tx_lock:
            ids = [ring.free.pop() for _ in range(k)]
            for j, i in enumerate(ids):
                ring.write_desc(i, scratch, 4, N, ids[(j + 1) % k])
            ring.chain_len[ids[0]] = k
            ring.add_raw(ids[0])
            g.tx_inflight[ids[0]] = -1
            if ring.publish():
                g.kick_queue(1)
    elif chain == "indirect_in_indirect":
        tbl = g.ram.mem[scratch : scratch + 16].view("<u8")
        tbl[0], tbl[1] = scratch, 16 | (IND << 32)
        g.send_chain([(scratch, 16, IND)])
    elif chain == "zero_length":
        g.send_chain([(scratch, 0, 0)])
    elif chain == "wrong_direction":
        g.send_chain([(scratch, 512, W)])
    elif chain == "too_short_for_header":
        g.send_chain([(scratch, 8, 0)])
    # the buffer comes back to the guest and is counted as bad
    wait_until(lambda: stats["bad_chains"] + stats["bad_messages"] == 1)
    # the hostile chain (scratch memory, not a tx buffer) must come back too
    wait_until(lambda: g.reclaim() >= 0 and not g.tx_inflight)
    # nothing outside the regions was written (and the server is still serving this guest)
    assert (canary == 0xA5).all()
    g.open(3001)
    g.send(3001, 1024, b"after")
    assert g.recv(3001) == (1024, b"after")
    # counted once, as what it is, and the good message after it is no bad one
    other = "bad_messages" if TX_BAD_AS[chain] == "bad_chains" else "bad_chains"
    assert (stats[TX_BAD_AS[chain]], stats[other]) == (1, 0)
    assert stats["to_host_messages"] == 1
    g.close()
    _next_guest_works(echo_server)


#: how the device counts each hostile rx chain
RX_BAD_AS = {"outside": "bad_chains", "readable": "bad_chains", "too_small": "rx_buffer_too_small"}


@pytest.mark.parametrize("chain", list(RX_BAD_AS))
def test_hostile_rx_chains_are_returned_and_skipped(echo_server: EchoServer, chain: str) -> None:
    g = echo_server.guest(hidden_tail=TAIL, queue_size=8).start()
    assert g.ram is not None
    canary = _canary(g)
    canary[:] = 0x5A
    edge = g.ram.size - TAIL
    scratch = g.ram.alloc(4096, 4096)
    g.open(3002)
    # Linux fills the rx ring; take one buffer out of circulation to make room
    g.repost_rx = False
    echo_server.device.send_nowait(1024, 3002, b"fill")
    assert g.recv(3002)[1] == b"fill"
    g.repost_rx = True
    head_buf = {"outside": [(edge, 512, VRING_DESC_F_WRITE)],
                "readable": [(scratch, 512, 0)],
                "too_small": [(scratch, 8, VRING_DESC_F_WRITE)]}[chain]
    g.post_rx_chain(head_buf)
    # 7 good buffers are ahead of the hostile one in the ring; 12 messages pass it
    for i in range(12):
        echo_server.device.send(1024, 3002, b"msg%d" % i, timeout=5)
    got = [g.recv(3002)[1] for _ in range(12)]
    assert got == [b"msg%d" % i for i in range(12)]  # nothing lost, order kept
    wait_until(lambda: g.stats.events["rx_test_chain_returned"] == 1)
    assert (canary == 0x5A).all()
    stats = echo_server.device.stats
    other = "rx_buffer_too_small" if RX_BAD_AS[chain] == "bad_chains" else "bad_chains"
    assert (stats[RX_BAD_AS[chain]], stats[other]) == (1, 0)  # skipped once, counted once
    assert stats["to_guest_messages"] == 13
    g.close()


def test_disconnect_mid_stream_then_next_guest(echo_server: EchoServer) -> None:
    g = echo_server.guest().start()
    for i in range(200):
        g.send(4000, 1025, b"z" * (i % 100))
    g.disconnect()  # no shutdown sequence: QEMU died
    _next_guest_works(echo_server)
    assert echo_server.counters()["connections"] == 2


def test_avail_index_jump_breaks_only_that_ring(echo_server: EchoServer) -> None:
    g = echo_server.guest().start()
    ring = g.rings[1]
    with g._tx_lock:
        ring.avail[1] = (ring.avail_idx + 1000) & 0xFFFF
        g.kick_queue(1)
    b = echo_server.server.backend
    assert b is not None
    wait_until(lambda: b.errors["queue_broken"] == 1)
    # the guest gets an error notification on its err eventfd, as the spec provides
    wait_until(lambda: g.take_error(1))
    # the rx ring (0) is untouched: still ready, no error, and host messages still reach
    # the guest through it, in the same guest session
    assert echo_server.call(lambda: [v.state for v in b.vrings]) == [
        RingState.STARTED_ENABLED, RingState.BROKEN]
    dev = echo_server.device
    assert dev.guest_ready and dev.stats["guest_sessions"] == 1
    g.open(3003)
    for i in range(3):
        dev.send(1024, 3003, b"rx %d" % i, timeout=5)
        assert g.recv(3003) == (1024, b"rx %d" % i)
    assert not g.take_error(0)
    counters = echo_server.counters()
    assert {k: v for k, v in counters.items() if k.startswith("errors.")} == {
        "errors.queue_broken": 1}
    assert (counters["q0.pushed"], counters["q1.popped"], counters["q1.pushed"]) == (3, 0, 0)
    assert dev.stats["to_guest_messages"] == 3 and dev.stats["to_host_messages"] == 0
    g.disconnect()
    _next_guest_works(echo_server)


def test_ring_size_and_base_only_change_on_a_stopped_ring(echo_server: EchoServer) -> None:
    """SET_VRING_NUM / SET_VRING_BASE on a running ring are refused: they used to be taken
    without remapping the ring, and the next buffers were neither served nor returned."""
    g = echo_server.guest().start()
    assert g.fe is not None
    for request, value in ((Request.SET_VRING_NUM, 8), (Request.SET_VRING_BASE, 5)):
        with pytest.raises(FrontendError, match="refused"):
            g.fe.request(request, codec.encode_vring_state(1, value), need_reply=True)
    b = echo_server.server.backend
    assert b is not None and b.errors["bad_request"] == 2
    state = echo_server.call(lambda: [(v.queue.state.size, v.queue.state.last_avail_idx)
                                      for v in b.vrings])
    assert state[1][0] == 256  # unchanged
    g.open(3004)
    for i in range(20):  # the ring keeps working, buffers served and returned
        g.send(3004, 1024, b"m%d" % i)
        assert g.recv(3004) == (1024, b"m%d" % i)
    g.close()
    _next_guest_works(echo_server)


def test_ring_fds_must_be_eventfds(echo_server: EchoServer) -> None:
    g = echo_server.guest().start()
    assert g.fe is not None
    r, w = os.pipe()
    for request in (Request.SET_VRING_KICK, Request.SET_VRING_CALL, Request.SET_VRING_ERR):
        with pytest.raises(FrontendError, match="refused"):
            g.fe.request(request, codec.encode_vring_file(1), [r], need_reply=True)
    os.close(r)
    os.close(w)
    b = echo_server.server.backend
    assert b is not None and b.errors["bad_request"] == 3
    g.open(3005)
    g.send(3005, 1024, b"ring untouched")  # the old kick fd still serves ring 1
    assert g.recv(3005) == (1024, b"ring untouched")
    g.close()
    _next_guest_works(echo_server)


def test_a_full_blocking_call_eventfd_cannot_hang_the_server(serve: Serve) -> None:
    """A call eventfd without EFD_NONBLOCK whose counter is at its maximum: writing it
    blocked the loop for ever.  The server makes every ring fd non-blocking."""
    r = serve([Echo(1024)])
    other = serve([Echo(1024)])  # another guest of the same process keeps being served
    g = r.guest().start()
    assert g.fe is not None
    call = os.eventfd(0)  # blocking
    os.eventfd_write(call, 0xFFFF_FFFF_FFFF_FFFE)  # the largest count: the next write blocks
    g.fe.request(Request.SET_VRING_CALL, codec.encode_vring_file(0), [call], need_reply=True)
    assert not os.get_blocking(call)  # made non-blocking for both of us (one description)
    r.device.send_nowait(1024, 3006, b"to a guest that cannot be interrupted")
    wait_until(lambda: r.counters().get("q0.notify_failures", 0) >= 1)
    with SimGuest(other.path) as g2:  # the loop goes on
        g2.open(3007)
        g2.send(3007, 1024, b"alive")
        assert g2.recv(3007) == (1024, b"alive")
    assert g.fe.get_u64(Request.GET_QUEUE_NUM) == 2  # and so does this connection
    os.close(call)
    g.disconnect()


def test_a_blocking_kick_eventfd_read_back_by_the_peer_cannot_hang_the_server(
        echo_server: EchoServer) -> None:
    """The peer writes a blocking kick eventfd and reads it back itself: epoll woke the
    server, whose read then blocked for ever.  The fd is made non-blocking on receipt."""
    g = echo_server.guest().start()
    assert g.fe is not None
    kick = os.eventfd(0)  # blocking
    g.fe.request(Request.SET_VRING_KICK, codec.encode_vring_file(1), [kick], need_reply=True)
    assert not os.get_blocking(kick)
    for _ in range(2000):  # race the server for the count
        os.eventfd_write(kick, 1)
        try:
            os.eventfd_read(kick)
        except BlockingIOError:
            pass  # the server took it first
    assert g.fe.get_u64(Request.GET_QUEUE_NUM) == 2  # the loop is not stuck in a read
    os.close(kick)
    g.disconnect()
    _next_guest_works(echo_server)


def test_one_oversized_message_costs_no_other_reply_of_its_batch(
        echo_server: EchoServer) -> None:
    """A message longer than a reply may be, in one batch with good ones: the good ones
    are echoed (they used to be lost with it), the long one is counted."""
    g = echo_server.guest().start()
    assert g.ram is not None
    for addr in (3010, 3011, 3012):
        g.open(addr)
    scratch = g.ram.alloc(4096, 4096)
    msgs = [rp.encode_message(3010, 1024, b"first"),
            rp.encode_message(3012, 1024, b"L" * 600),
            rp.encode_message(3011, 1024, b"second")]
    ring = g.rings[1]
    with g._tx_lock:  # one kick for the three: one batch, one run for the echo endpoint
        for k, m in enumerate(msgs):
            gpa = scratch + 1024 * k
            g.ram.mem[gpa : gpa + len(m)] = np.frombuffer(m, np.uint8)
            head = ring.add([(gpa, len(m), 0)])
            g.tx_inflight[head] = -1
        if ring.publish():
            g.kick_queue(1)
    assert g.recv(3010) == (1024, b"first")
    assert g.recv(3011) == (1024, b"second")
    dev = echo_server.device
    wait_until(lambda: dev.stats["to_host_messages"] == 3)
    echo = dev.endpoints[1024]
    assert isinstance(echo, Echo) and echo.refused == 1
    assert dev.stats["handler_failed_messages"] == 0 and dev.stats["handler_errors"] == 0
    with pytest.raises(GuestTimeout):
        g.recv(3012, timeout=0.2)
    g.close()
    _next_guest_works(echo_server)


def test_a_front_end_that_never_reads_replies_is_dropped_not_waited_for(
        serve: Serve, caplog: pytest.LogCaptureFixture) -> None:
    """Requests that each want a reply, never read: the replies pile up in a bounded
    queue and the front-end is dropped; the loop never waits on its socket (it used to
    block in sendall for 5 s per connection)."""
    flooded = serve([Echo(1024)])
    other = serve([Echo(1024)])
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(flooded.path)
    wait_until(lambda: flooded.server.conn is not None)
    request = codec.encode(Request.GET_FEATURES, b"")
    try:
        s.sendall(request * 20000)  # 20000 replies due, none read
    except OSError:
        pass  # dropped while we were still writing
    wait_until(lambda: flooded.server.conn is None)
    assert flooded.server.stats["dropped"] == 1
    assert "does not read its replies" in caplog.text
    s.close()
    with SimGuest(other.path) as g:  # the other socket of the process is served
        g.open(3013)
        g.send(3013, 1024, b"alive")
        assert g.recv(3013) == (1024, b"alive")
    _next_guest_works(flooded)  # and the flooded one takes its next front-end


def _serve_process(path: Path, *extra: str) -> contextlib.AbstractContextManager[
        subprocess.Popen[bytes]]:
    """``vhost-rpmsg serve`` in a process of its own: a fatal signal shows as its death,
    not as the test runner's."""
    return serving([sys.executable, "-m", "vhost_rpmsg.cli", "serve", "-s", str(path),
                    "-e", "echo@1024", *extra], path)


def _echo(g: SimGuest, addr: int, data: bytes) -> None:
    g.open(addr)
    g.send(addr, 1024, data)
    assert g.recv(addr) == (1024, data)


def test_guest_memory_that_shrinks_cannot_kill_the_server(tmp_path: Path) -> None:
    """A front-end truncates its memfd after SET_MEM_TABLE and kicks: touching the pages
    past the new end used to raise SIGBUS and kill the process.  The server seals the
    memfd against shrinking when it maps it, so the truncation itself fails."""
    path = tmp_path / "vu.sock"
    with _serve_process(path) as proc:
        with SimGuest(str(path), memory_seals=0) as g:  # sealable, not sealed: seal=off-ish
            _echo(g, 3020, b"before")
            assert g.ram is not None
            with pytest.raises(PermissionError):
                os.ftruncate(g.ram.fd, 4096)
            _echo(g, 3021, b"after")
        assert proc.poll() is None
        with SimGuest(str(path)) as g:  # QEMU's default (seal=on) memfd is taken as it is
            _echo(g, 3022, b"sealed")


def test_guest_memory_that_cannot_be_sealed_is_refused_unless_trusted(
        tmp_path: Path) -> None:
    """A memfd made without MFD_ALLOW_SEALING (QEMU's seal=off) could shrink under us:
    the memory table is refused with a message saying why and what to do; with
    --allow-unsealed-memory the operator trusts the front-end and it is mapped."""
    path = tmp_path / "vu.sock"
    with _serve_process(path) as proc:
        with pytest.raises(FrontendError):
            SimGuest(str(path), memory_seals=-1).start()
        with SimGuest(str(path)) as g:  # the server goes on
            _echo(g, 3023, b"next")
    assert proc.stderr is not None
    err = proc.stderr.read().decode()
    assert "cannot be sealed against shrinking" in err and "--allow-unsealed-memory" in err
    with _serve_process(path, "--allow-unsealed-memory"), \
            SimGuest(str(path), memory_seals=-1) as g:
        _echo(g, 3024, b"trusted")


def test_a_slow_async_handler_has_a_bounded_queue_and_old_messages_die_with_the_session(
        serve: Serve, caplog: pytest.LogCaptureFixture) -> None:
    """An ``async def`` handler that cannot keep up: its queue stops at its bound, the
    rest is counted per endpoint (never queued without limit), and what still waits when
    the guest goes away is discarded, not answered to the next guest."""
    gate = threading.Event()

    class Stuck(Endpoint):
        async def on_message(self, src: int, data: bytes) -> None:
            while not gate.is_set():
                await asyncio.sleep(0.01)
            assert self.port is not None
            await self.port.asend(src, data)

    dev = RpmsgDevice([Stuck(1024), Echo(1025)], handler_queue_limit=100)
    r = serve(dev)
    slot = dev.dispatcher.slots[1024]
    with r.guest() as g:
        g.open(3030)
        g.send_burst(3030, 1024, b"x", 3000)
        wait_until(lambda: dev.stats["to_host_messages"] == 3000)
        q = slot.queue
        assert q is not None
        # one message is in the handler; at most 100 wait; the rest were counted as dropped
        wait_until(lambda: slot.stats["dropped_queue_full"] + q.qsize() == 3000 - 1)
        waiting = q.qsize()
        assert 99 <= waiting <= 100
        assert dev.stats["handler_queue_full"] == slot.stats["dropped_queue_full"]
        assert "its handler is behind" in caplog.text
        g.send(3030, 1025, b"others are served")  # the other endpoint is not held up
        assert g.recv(3030) == (1025, b"others are served")
    # what waited, and the message in the handler (cancelled: its reply would go to a
    # guest that never sent it)
    wait_until(lambda: slot.stats["dropped_on_reset"] == waiting + 1)
    with r.guest() as g:
        g.open(3030)
        gate.set()
        g.send(3030, 1025, b"new session")
        assert g.recv(3030) == (1025, b"new session")
        with pytest.raises(GuestTimeout):
            g.recv(3030, timeout=0.5)
    assert dev.stats["handler_queue_dropped_on_reset"] == waiting + 1
    assert slot.stats["messages"] == 3000  # every one accounted for: dropped, or...


def test_guest_name_service_floods_are_bounded_and_not_logged_per_message(
        echo_server: EchoServer, caplog: pytest.LogCaptureFixture) -> None:
    """Thousands of distinct guest CREATE announcements: the table stops at its bound
    (the rest counted) and the log gets a rate-limited handful of lines, not one each."""
    caplog.set_level(logging.INFO)
    dev = echo_server.device
    n = MAX_GUEST_SERVICES + 2000
    with SimGuest(echo_server.path) as g:
        for i in range(n):
            g.announce(f"svc-{i}", 5000 + i)
        wait_until(lambda: dev.stats["guest_ns_create"] + dev.stats["guest_ns_refused"] == n)
        assert len(dev.guest_services) == MAX_GUEST_SERVICES
        assert dev.stats["guest_ns_refused"] == 2000
        lines = [rec for rec in caplog.records if rec.name.startswith("vhost_rpmsg.rpmsg")]
        assert 0 < len(lines) < 100
        g.open(3031)
        g.send(3031, 1024, b"still served")
        assert g.recv(3031) == (1024, b"still served")


def test_rate_limited_log_lets_a_burst_through_then_one_a_second() -> None:
    logger = logging.getLogger("vhost_rpmsg.test.ratelimit")
    logger.setLevel(logging.INFO)
    seen: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            seen.append(record.getMessage())

    logger.addHandler(Keep())
    rl = RateLimitedLog(logger, interval=0.2, burst=3)
    for i in range(1000):
        rl.info("k", "line %d", i)
    assert seen == ["line 0", "line 1", "line 2"]
    time.sleep(0.25)
    rl.info("k", "later")
    assert seen[-1] == "later (997 similar suppressed)"
    rl.info("other", "own bucket")
    assert seen[-1] == "own bucket"


def test_a_guest_refilling_as_fast_as_we_drain_cannot_hold_the_loop(serve: Serve) -> None:
    """A guest infinitely fast: each time the server hands a batch to the endpoint, the
    guest's tx ring is full again (every head is one the server just gave back, so the
    ring stays valid).  The server takes a bounded number of batches per turn of its
    loop, so other guests' kicks and callbacks run in between; it used to drain for as
    long as the guest kept up."""
    refills = 200
    seen: list[int] = []  # batches handled when a callback queued on the loop ran
    r: Running[RpmsgDevice]

    class Refill(Endpoint):
        def __init__(self, addr: int) -> None:
            super().__init__(addr)
            self.batches = 0

        def on_message_batch(self, batch: MessageBatch) -> None:
            self.batches += 1
            if self.batches == 1:  # what another guest's kick would be: the next turn
                asyncio.get_running_loop().call_soon(lambda: seen.append(self.batches))
            if self.batches <= refills:
                ring.avail[1] = (int(ring.used16[1]) + ring.size) & 0xFFFF

    ep = Refill(1025)
    r = serve([ep])
    with r.guest() as g:
        ring = g.rings[1]
        assert g.ram is not None
        msg = rp.encode_message(3040, 1025, b"f" * 64)
        g.tx_free.sort()
        for head in range(ring.size):  # one buffer per descriptor, each a message
            gpa = g.tx_free[head]
            g.ram.mv[gpa : gpa + len(msg)] = msg
            ring.write_desc(head, gpa, len(msg), 0)
            ring.avail[2 + head] = head
        ring.avail[1] = ring.size
        g.kick_queue(1)
        wait_until(lambda: ep.batches == refills + 1)
        assert r.device.stats["to_host_messages"] == (refills + 1) * ring.size
        # a few batches, not all of them (DRAIN_BUDGET is 8 today)
        assert seen and seen[0] <= 16
        assert r.device.stats["to_host_yields"] >= refills // 16


@pytest.mark.parametrize("engine", available_engines())
def test_a_tx_ring_of_looping_chains_is_walked_a_bounded_amount_per_turn(
        serve: Serve, engine: str) -> None:
    """Fuzz finding F2: every descriptor chains to the next and the last to the first, and
    every one is a head, so each of the 256 chains reads the whole table before it is
    refused: 256^2 reads, which one pop used to do in one go (3.8 s with the Python
    engine).  A pop now stops at WALK_BUDGET queue sizes of reads, the drain yields after
    DRAIN_BUDGET pops, and every chain still comes back, counted as bad."""
    r = serve([Echo(1024)], queue_factory=queue_factory(engine))
    with r.guest(queue_size=256) as g:
        assert g.ram is not None
        ring = g.rings[1]
        n = ring.size
        scratch = g.ram.alloc(4096, 4096)
        with g._tx_lock:
            for i in range(n):
                ring.write_desc(i, scratch, 16, VRING_DESC_F_NEXT, (i + 1) % n)
                ring.avail[2 + i] = i
            ring.avail[1] = n
        g.kick_queue(1)
        stats = r.device.stats
        # (the chains go back before they are counted: wait for both)
        wait_until(lambda: int(ring.used16[1]) == n and stats["bad_chains"] == n, timeout=60)
        assert stats["to_host_messages"] == 0
        # 256 chains of 256 reads at 4 x 256 reads a pop: 64 pops, 8 a turn
        assert stats["to_host_yields"] >= n // (WALK_BUDGET * DRAIN_BUDGET) - 1
    with r.guest() as g2:  # the server still serves
        g2.open(3003)
        g2.send(3003, 1024, b"after")
        assert g2.recv(3003) == (1024, b"after")


@pytest.mark.parametrize("engine", available_engines())
def test_an_rx_ring_of_looping_chains_is_refused_a_bounded_amount_per_turn(
        serve: Serve, engine: str) -> None:
    """F2 on the rx side: a flush fills at most FILL_CALLS times per turn of the loop and
    comes back for the rest; the message waits in the outbox, is never lost, and reaches
    the guest once it posts good buffers."""
    r = serve([Echo(1024)], queue_factory=queue_factory(engine))
    dev = r.device
    with r.guest(queue_size=64) as g:
        assert g.ram is not None
        ring = g.rings[0]
        n = ring.size
        g.open(3004)
        g.repost_rx = False  # the guest takes its rx buffers out of circulation
        for i in range(n):
            dev.send(1024, 3004, b"%d" % i, timeout=5)
        assert [g.recv(3004)[1] for _ in range(n)] == [b"%d" % i for i in range(n)]
        scratch = g.ram.alloc(4096, 4096)
        with g._rx_lock:
            ids = [ring.free.pop() for _ in range(n)]
            for j, i in enumerate(ids):
                ring.write_desc(i, scratch, 64, VRING_DESC_F_WRITE | VRING_DESC_F_NEXT,
                                ids[(j + 1) % n])
                ring.chain_len[i] = 1
                g.rx_bufs[i] = None
                ring.add_raw(i)
            ring.publish()
        g.kick_queue(0)
        dev.send_nowait(1024, 3004, b"late")
        wait_until(lambda: g.stats.events["rx_test_chain_returned"] == n)
        assert dev.stats["bad_chains"] == n
        # 64 chains of 64 reads, 4 x 64 reads a call, 8 calls a turn: two turns
        assert dev.stats["to_guest_yields"] >= n // (WALK_BUDGET * FILL_CALLS) - 1
        assert len(dev.outbox) == 1  # waiting, not lost
        with g._rx_lock:
            for gpa in g.rx_held:
                g.rx_bufs[ring.add([(gpa, rp.BUF_SIZE, VRING_DESC_F_WRITE)])] = gpa
            g.rx_held.clear()
            g.repost_rx = True
            ring.publish()
        g.kick_queue(0)
        assert g.recv(3004) == (1024, b"late")


def test_a_front_end_writing_without_pause_cannot_hold_the_loop(
        echo_server: EchoServer) -> None:
    """Thousands of requests that want no reply, written as fast as the socket takes
    them: the server reads a bounded number per turn of its loop (counted as
    read_yields) instead of reading until the socket is empty."""
    s = _raw(echo_server)
    s.sendall(codec.encode(Request.SET_OWNER, b""))
    n = 20000
    s.sendall(codec.encode(Request.SET_FEATURES, codec.encode_u64(0)) * n)
    wait_until(lambda: echo_server.counters().get("messages", 0) == n + 1)
    assert echo_server.counters().get("read_yields", 0) > 0
    s.close()
    _next_guest_works(echo_server)


def test_a_blocking_sync_handler_is_seen_counted_and_costs_no_message(
        serve: Serve, caplog: pytest.LogCaptureFixture) -> None:
    """A synchronous handler that sleeps holds the loop (every guest of the server waits:
    nothing can take the loop back from it).  The server says so: the call is timed,
    counted per endpoint and logged, rate-limited; once it returns, every message that
    arrived meanwhile is served."""

    class Sleepy(Endpoint):
        def on_message(self, src: int, data: bytes) -> None:
            if data == b"sleep":
                time.sleep(0.3)

    dev = RpmsgDevice([Sleepy(1025), Echo(1024)])
    r = serve(dev)
    with r.guest() as g:
        g.open(3050)
        g.send(3050, 1025, b"sleep")
        for i in range(20):  # these wait while the handler sleeps; none is lost
            g.send(3050, 1024, b"%d" % i)
        assert [g.recv(3050)[1] for _ in range(20)] == [b"%d" % i for i in range(20)]
    slot = dev.dispatcher.slots[1025]
    assert slot.stats["slow_calls"] == 1 and dev.stats["slow_handler_calls"] == 1
    assert "held the loop for" in caplog.text
    assert dev.dispatcher.slots[1024].stats["slow_calls"] == 0


def test_a_broken_rx_ring_stops_the_send_not_the_sender(
        echo_server: EchoServer, caplog: pytest.LogCaptureFixture) -> None:
    """The guest corrupts its rx avail index, then a host endpoint sends: the flush that
    finds it breaks the ring (err eventfd) and stops there.  QueueBroken used to escape
    flush(): into the sender's send() call, an echo's handler (counted as its failure)
    and the loop's exception handler (found by fuzz/fuzz_vhost_user.py)."""
    g = echo_server.guest().start()
    g.open(3060)
    rx = g.rings[0]
    with g._rx_lock:
        rx.avail[1] = (rx.avail_idx + 1000) & 0xFFFF
    dev = echo_server.device
    dev.send(1024, 3060, b"to a broken ring")  # no exception for the sender
    b = echo_server.server.backend
    assert b is not None
    wait_until(lambda: echo_server.call(lambda: b.vrings[0].state) is RingState.BROKEN)
    wait_until(lambda: g.take_error(0))
    g.send(3060, 1024, b"echo into it")  # the echo's reply meets the broken ring too
    wait_until(lambda: dev.stats["to_host_messages"] == 1)
    assert dev.stats["handler_errors"] == 0
    assert "Exception in callback" not in caplog.text
    g.disconnect()
    _next_guest_works(echo_server)
