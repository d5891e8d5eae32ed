"""The RPMsg device against the simulated guest: name service, echo, bulk traffic,
flow control, handler failures, resets."""

from __future__ import annotations

import asyncio
import random
import time
from pathlib import Path
from typing import Any

import pytest

from vhost_rpmsg.endpoints import Echo, Endpoint, Sink
from vhost_rpmsg.guest import GuestTimeout
from vhost_rpmsg.rpmsg import codec as rp
from vhost_rpmsg.rpmsg.batch import MessageBatch
from vhost_rpmsg.rpmsg.device import PayloadTooLarge, RpmsgDevice, WouldBlock, _call_soon
from vhost_rpmsg.virtio.engines import available_engines, queue_factory

from .conftest import Serve
from .helpers import wait_until


class Recorder(Endpoint):
    def __init__(self, addr: int, name: str | None = None) -> None:
        super().__init__(addr, name)
        self.got: list[tuple[int, bytes]] = []

    def on_message(self, src: int, data: bytes) -> None:
        self.got.append((src, data))


class Boom(Endpoint):
    calls = 0

    def on_message(self, src: int, data: bytes) -> None:
        Boom.calls += 1
        raise RuntimeError("handler bug")


def test_announcements_reach_the_guest_in_order(serve: Serve) -> None:
    r = serve([Echo(1024, "rpmsg-raw"), Echo(1025, "rpmsg-client-sample"), Sink(1026)])
    g = r.guest().start()
    first = g.ns_events.get(timeout=5)
    second = g.ns_events.get(timeout=5)
    assert (first.name, first.addr) == ("rpmsg-raw", 1024)
    assert (second.name, second.addr) == ("rpmsg-client-sample", 1025)
    assert g.ns_events.empty()  # the unnamed sink is not announced
    g.close()


def test_announcements_made_before_the_guest_are_delivered_once(serve: Serve) -> None:
    r = serve()
    dev = r.device
    for i in range(5):  # before any guest exists
        dev.announce(f"early-{i}", 1100 + i)
    g = r.guest().start()
    names = [g.ns_events.get(timeout=5).name for _ in range(5)]
    assert names == [f"early-{i}" for i in range(5)]
    dev.announce("late", 1200)  # while the guest runs: immediate
    assert g.ns_events.get(timeout=5).name == "late"
    time.sleep(0.1)
    assert g.ns_events.empty()  # exactly once each
    assert g.stats.events["ns_create"] == 6
    assert dev.stats["ns_announced"] == 6
    g.close()


def test_announcement_racing_the_guest_start_is_not_lost(serve: Serve) -> None:
    r = serve()
    dev = r.device
    g = r.guest()
    import threading

    def announce_all() -> None:
        for i in range(50):
            dev.announce(f"race-{i}", 1300 + i)

    t = threading.Thread(target=announce_all)
    t.start()
    g.start()
    t.join()
    names = [g.ns_events.get(timeout=5).name for _ in range(50)]
    assert names == [f"race-{i}" for i in range(50)]
    time.sleep(0.1)
    assert g.ns_events.empty()  # exactly once each
    assert g.stats.events["ns_create"] == 50
    assert dev.stats["ns_announced"] == 50
    g.close()


def test_guest_reset_and_reconnect_reannounce(serve: Serve) -> None:
    r = serve([Echo(1024, "rpmsg-raw")])
    g = r.guest().start()
    g.wait_channel("rpmsg-raw")
    g.reset()  # driver unbind/rebind: rings set up again, memory table not re-sent
    assert g.ns_events.get(timeout=5).name == "rpmsg-raw"
    assert g.ns_events.get(timeout=5).name == "rpmsg-raw"
    g.open(2000)
    g.send(2000, 1024, b"after reset")
    assert g.recv(2000) == (1024, b"after reset")
    g.close()
    g2 = r.guest().start()  # a new connection (QEMU restarted)
    assert g2.wait_channel("rpmsg-raw").addr == 1024
    assert r.device.stats["guest_sessions"] == 3
    g2.close()


def test_echo_round_trip(serve: Serve) -> None:
    r = serve([Echo(1024)])
    with r.guest() as g:
        g.open(1500)
        for size in (0, 1, 15, 16, 495, 496):
            data = bytes(range(256)) * 2
            g.send(1500, 1024, data[:size])
            assert g.recv(1500) == (1024, data[:size])


@pytest.mark.parametrize("guest_kind", ["old-linux", "new-linux", "no-event-idx"])
def test_ten_thousand_each_way_byte_for_byte(serve: Serve, guest_kind: str) -> None:
    rec = Recorder(1024)
    r = serve([rec])
    dev = r.device
    g = r.guest(tx_interrupts=guest_kind == "new-linux",
                event_idx=guest_kind != "no-event-idx").start()
    rng = random.Random(7)
    n = 10_000
    to_host = [rng.randbytes(i % 497) for i in range(n)]
    to_guest = [rng.randbytes((i * 7) % 497) for i in range(n)]
    g.open(2000)
    t0 = time.perf_counter()
    for p in to_host:
        g.send(2000, 1024, p)
    wait_until(lambda: len(rec.got) == n)
    t1 = time.perf_counter()
    received = []
    for p in to_guest:
        dev.send(1024, 2000, p, timeout=10)
    for _ in range(n):
        received.append(g.recv(2000, timeout=10))
    t2 = time.perf_counter()
    assert rec.got == [(2000, p) for p in to_host]
    assert received == [(1024, p) for p in to_guest]
    assert g.stats.too_big == 0 and g.stats.no_recipient == 0
    print(f"\n{guest_kind}: guest->host {n / (t1 - t0):,.0f} msg/s, "
          f"host->guest {n / (t2 - t1):,.0f} msg/s, tx interrupts {g.stats.tx_interrupts}")
    if guest_kind == "new-linux":
        assert g.stats.tx_interrupts > 0  # it asked for tx-complete interrupts: it got them
    g.close()


def test_tx_starved_guest_gets_its_interrupt(serve: Serve) -> None:
    """An old guest that runs out of tx buffers enables interrupts and sleeps: the host
    must notify when it returns them, or the guest would stall for 15 s."""
    sink = Sink(1024)
    r = serve([sink])
    with r.guest(queue_size=8) as g:  # 8 tx buffers
        t0 = time.perf_counter()
        for _ in range(200):
            g.send(2000, 1024, b"x" * 100, timeout=2.0)
        assert time.perf_counter() - t0 < 10
        wait_until(lambda: sink.messages == 200)


def test_oversize_is_refused_before_the_ring(serve: Serve) -> None:
    r = serve()
    dev = r.device
    with r.guest() as g:
        with pytest.raises(PayloadTooLarge, match="496"):
            dev.send_nowait(1024, 2000, b"x" * 497)
        assert dev.stats["refused_too_large"] == 1
        assert dev.stats["to_guest_messages"] == 0
        assert g.stats.too_big == 0


def test_handler_exception_is_counted_and_server_goes_on(serve: Serve) -> None:
    Boom.calls = 0
    r = serve([Boom(1024), Echo(1025)])
    with r.guest() as g:
        for _ in range(3):
            g.send(2000, 1024, b"crash")
        g.open(2000)
        g.send(2000, 1025, b"fine")
        assert g.recv(2000) == (1025, b"fine")
        # a per-message handler: each failing message is counted, and only those
        wait_until(lambda: r.device.stats["handler_errors"] == 3)
        assert Boom.calls == 3
        assert r.device.stats["handler_failed_messages"] == 3
        slots = r.device.dispatcher.slots
        assert slots[1024].stats == {"messages": 3, "bytes": 15, "failed_messages": 3}
        assert slots[1025].stats == {"messages": 1, "bytes": 4, "to_guest": 1, "to_guest_bytes": 4}


class Triple(Endpoint):
    """Answers each message with three, sent one by one; notes whether a flush was left
    for a later turn of the loop when it returned."""

    left_for_later: list[bool] = []

    def on_message(self, src: int, data: bytes) -> None:
        assert self.port is not None
        for i in range(3):
            self.port.send(src, data + b"%d" % i)
        Triple.left_for_later.append(self.device._flush_pending)

    device: RpmsgDevice


def test_what_a_handler_of_one_message_sends_goes_when_it_returns(serve: Serve) -> None:
    """One message per kick takes the single-message path; the handler's sends reach the
    ring when it returns, in order, with no flush scheduled for a later turn."""
    Triple.left_for_later = []
    ep = Triple(1024)
    r = serve([ep])
    ep.device = r.device
    with r.guest() as g:
        g.open(2100)
        for k in range(5):
            g.send(2100, 1024, b"m%d-" % k)
            for i in range(3):
                assert g.recv(2100) == (1024, b"m%d-%d" % (k, i))
    assert Triple.left_for_later == [False] * 5
    assert r.device.dispatcher.slots[1024].stats["to_guest"] == 15


def test_a_malformed_single_message_is_counted_as_in_a_batch(serve: Serve) -> None:
    """The single-message path checks the header as the batch parse does."""
    r = serve([Echo(1024)])
    with r.guest() as g:
        assert g.ram is not None
        g.open(2200)
        scratch = g.ram.alloc(4096, 4096)
        cut = rp.encode_message(2200, 1024, b"cut")[:-1]  # the header says 3 bytes, 2 follow
        g.ram.mv[scratch : scratch + len(cut)] = cut
        g.send_chain([(scratch, len(cut), 0)])
        wait_until(lambda: r.device.stats["bad_messages"] == 1)
        g.send(2200, 1024, b"after")
        assert g.recv(2200) == (1024, b"after")
        assert r.device.stats["to_host_messages"] == 1
        assert r.device.stats["bad_chains"] == 0


def test_unknown_destination_counted_and_buffer_returned(serve: Serve) -> None:
    r = serve([Echo(1024)])
    with r.guest(queue_size=8) as g:
        for _ in range(50):  # more than the 8 tx buffers: they must come back
            g.send(2000, 4242, b"nobody home", timeout=2)
        wait_until(lambda: r.device.stats["unknown_destination"] == 50)


def test_guest_announcement_reaches_the_host(serve: Serve) -> None:
    r = serve()
    dev = r.device
    seen: list[rp.NsMessage] = []
    dev.guest_ns_listeners.append(seen.append)
    with r.guest() as g:
        g.announce("guest-svc", 1030)
        wait_until(lambda: "guest-svc" in dev.guest_services)
        assert dev.guest_services["guest-svc"].addr == 1030
        g.announce("guest-svc", 1030, rp.NsFlags.DESTROY)
        wait_until(lambda: "guest-svc" not in dev.guest_services)
    assert [(m.name, m.flags) for m in seen] == [
        ("guest-svc", rp.NsFlags.CREATE), ("guest-svc", rp.NsFlags.DESTROY)]


def test_flow_control_would_block_and_backpressure(serve: Serve) -> None:
    r = serve(RpmsgDevice([Echo(1024)], outbox_limit=4))
    dev = r.device
    g = r.guest(queue_size=8).start()  # 8 rx buffers
    g.open(2000)
    g.repost_rx = False  # the guest stops reading: its rx buffers run out
    for i in range(8 + 4):  # 8 into rx buffers, 4 queued
        dev.send_nowait(1024, 2000, b"m%d" % i)
    with pytest.raises(WouldBlock):
        dev.send_nowait(1024, 2000, b"one too many")
    assert dev.queued == 4 and dev.stats["would_block"] == 1
    # guest messages to echo now stay in the ring (the echo could not reply)
    g.send(2000, 1024, b"echo me")
    wait_until(lambda: dev.stats["to_host_paused"] == 1)
    assert dev.stats["to_host_messages"] == 0 and dev.queued == 4
    # the guest reads again: everything arrives, in order, including the echo
    got = [g.recv(2000)[1] for _ in range(8)]
    g.repost_rx = True
    with g._rx_lock:
        for gpa in g.rx_held:
            g.rx_bufs[g.rings[0].add([(gpa, 512, 2)])] = gpa
        g.rx_held.clear()
        if g.rings[0].publish():
            g.kick_queue(0)
    got += [g.recv(2000)[1] for _ in range(5)]
    assert got == [b"m%d" % i for i in range(12)] + [b"echo me"]
    assert dev.stats["to_host_messages"] == 1 and dev.stats["to_guest_messages"] == 13
    assert dev.stats["to_host_paused"] == 1 and dev.stats["would_block"] == 1
    g.close()


def test_async_send_waits_for_room(serve: Serve) -> None:
    r = serve(RpmsgDevice(outbox_limit=1))
    dev = r.device
    g = r.guest(queue_size=8).start()
    g.open(2000)

    async def produce() -> None:
        for i in range(40):
            await dev.asend(1024, 2000, b"a%d" % i)

    fut = asyncio.run_coroutine_threadsafe(produce(), r.loop.loop)
    got = [g.recv(2000)[1] for _ in range(40)]
    fut.result(5)
    assert got == [b"a%d" % i for i in range(40)]
    g.close()


def test_async_handler_runs_in_order(serve: Serve) -> None:
    class AsyncEcho(Endpoint):
        async def on_message(self, src: int, data: bytes) -> None:
            await asyncio.sleep(0)
            assert self.port is not None
            await self.port.asend(src, data)

    r = serve([AsyncEcho(1024)])
    with r.guest() as g:
        g.open(2000)
        for i in range(100):
            g.send(2000, 1024, b"%d" % i)
        assert [g.recv(2000)[1] for _ in range(100)] == [b"%d" % i for i in range(100)]


def test_no_name_service_feature_means_no_announcements(serve: Serve) -> None:
    r = serve([Echo(1024, "rpmsg-raw")])
    with r.guest(name_service=False) as g:
        with pytest.raises(GuestTimeout):
            g.wait_channel("rpmsg-raw", timeout=0.3)
        g.open(2000)
        g.send(2000, 1024, b"direct")
        assert g.recv(2000) == (1024, b"direct")


def test_two_guests_two_devices_independent(serve: Serve) -> None:
    a, b = serve([Echo(1024, "svc-a")]), serve([Echo(1024, "svc-b")])
    with a.guest() as ga, b.guest() as gb:
        assert ga.wait_channel("svc-a") and gb.wait_channel("svc-b")
        assert "svc-b" not in ga.channels and "svc-a" not in gb.channels
        for g in (ga, gb):
            g.open(2000)
            g.send(2000, 1024, b"mine")
            assert g.recv(2000) == (1024, b"mine")


def test_unix_bridge_lets_a_host_process_answer(serve: Serve, tmp_path: Path) -> None:
    import socket

    from vhost_rpmsg.endpoints.unix import UnixBridge

    path = str(tmp_path / "ep.sock")
    bridge = UnixBridge(1024, "rpmsg-raw", path=path)
    r = serve([bridge])
    with r.guest() as g:
        g.wait_channel("rpmsg-raw")
        client = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        client.settimeout(5)
        client.connect(path)
        wait_until(lambda: len(bridge.clients) == 1)
        g.open(2000)
        for i in range(20):  # guest -> host process -> guest, datagram boundaries kept
            g.send(2000, 1024, b"q%d" % i)
            assert client.recv(1000) == b"q%d" % i
            client.send(b"answer %d" % i)
            assert g.recv(2000) == (1024, b"answer %d" % i)
        client.send(b"x" * 497)  # too large for the guest: refused, counted
        wait_until(lambda: bridge.stats["too_large"] == 1)
        client.close()
        wait_until(lambda: not bridge.clients)


def test_unix_bridge_counts_what_no_client_or_a_slow_client_misses(
        serve: Serve, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Guest messages with no client connected are counted and logged (they used to
    vanish without a trace); a client that does not read has a bounded queue, and what
    overflows it is counted, with a rate-limited log line rather than one per message."""
    import socket

    from vhost_rpmsg.endpoints.unix import UnixBridge

    path = str(tmp_path / "ep.sock")
    bridge = UnixBridge(1024, "rpmsg-raw", path=path)
    r = serve([bridge])
    with r.guest() as g:
        g.wait_channel("rpmsg-raw")
        g.open(2001)
        g.send_burst(2001, 1024, b"nobody", 10)
        wait_until(lambda: bridge.stats["no_client"] == 10)
        assert "no host client connected" in caplog.text
        client = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        client.connect(path)
        wait_until(lambda: len(bridge.clients) == 1)
        (peer,) = bridge.clients.values()
        n = 3000
        g.send_burst(2001, 1024, b"s" * 200, n)
        wait_until(lambda: r.device.stats["to_host_messages"] == 10 + n)
        dropped = peer.stats["dropped_slow_reader"]
        assert dropped > 0 and peer.queued <= 1024
        assert peer.stats["to_process"] + peer.queued + dropped == n
        lines = [rec for rec in caplog.records if "does not read" in rec.getMessage()]
        assert 0 < len(lines) <= 5
        client.settimeout(0.5)
        got = 0
        try:
            while client.recv(1000):
                got += 1
        except TimeoutError:
            pass
        assert got == n - dropped
        client.close()
        wait_until(lambda: not bridge.clients)
        assert bridge.stats["dropped_slow_reader"] == dropped


def test_send_many_is_all_or_nothing(serve: Serve) -> None:
    r = serve(RpmsgDevice(outbox_limit=4))
    dev = r.device
    g = r.guest(queue_size=8).start()
    g.open(2000)
    g.repost_rx = False  # 8 rx buffers, then the guest stops taking more
    dev.send_many(1024, [(2000, b"%d" % i) for i in range(8 + 4)])  # 8 written, 4 queued
    with pytest.raises(WouldBlock):
        dev.send_many(1024, [(2000, b"x")])
    assert dev.queued == 4
    with pytest.raises(PayloadTooLarge):
        dev.send_many(1024, [(2000, b"ok"), (2000, b"x" * 497)])
    assert dev.queued == 4  # the good message before the refused one was not queued
    assert dev.stats["would_block"] == 1 and dev.stats["refused_too_large"] == 1
    assert [g.recv(2000)[1] for _ in range(8)] == [b"%d" % i for i in range(8)]
    g.close()


class _CountingLoop(asyncio.SelectorEventLoop):
    """Counts the calls that write the loop's self-pipe."""

    threadsafe = 0

    def call_soon_threadsafe(self, *args, **kw):  # type: ignore[no-untyped-def]
        self.threadsafe += 1
        return super().call_soon_threadsafe(*args, **kw)


def test_work_scheduled_from_the_loop_does_not_wake_it_through_its_self_pipe() -> None:
    """On the loop's own thread a deferred flush is a plain call_soon; another thread
    (an API user's) still wakes a loop that may be asleep."""
    loop = _CountingLoop()
    ran: list[str] = []
    try:
        async def on_the_loop() -> None:
            _call_soon(loop, ran.append, "loop")
            await asyncio.sleep(0)
            await loop.run_in_executor(None, _call_soon, loop, ran.append, "thread")
            while len(ran) < 2:
                await asyncio.sleep(0.001)

        loop.run_until_complete(on_the_loop())
        threadsafe = loop.threadsafe
    finally:
        loop.close()
    assert ran == ["loop", "thread"]
    # run_in_executor's own completion comes back through call_soon_threadsafe too
    assert threadsafe == 2


# -- zero-copy receive ----------------------------------------------------------------------


class Peek(Endpoint):
    """A zero-copy endpoint that records what its batches looked like while it ran."""

    zero_copy = True

    def __init__(self, addr: int) -> None:
        super().__init__(addr)
        self.seen: list[bytes] = []
        self.kinds: set[str] = set()
        self.used_while_running: list[int] = []
        self.kept: list[memoryview] = []
        self.ring: Any = None

    def on_message_batch(self, batch: MessageBatch) -> None:
        data = batch.data
        self.kinds.add(type(data).__name__ + ("-ro" if isinstance(data, memoryview)
                                              and data.readonly else ""))
        if self.ring is not None:
            self.used_while_running.append(int(self.ring.used16[1]))
        for i in range(len(batch)):
            self.seen.append(bytes(batch.view(i)))
        self.kept.append(batch.view(0))


def _post_batch(g: Any, chains: list[list[tuple[int, int, int]]]) -> None:
    """Several chains made available at once: one publish, one kick (a batch)."""
    with g._tx_lock:
        ring = g.rings[1]
        for bufs in chains:
            g.tx_inflight[ring.add(bufs)] = -1
        if ring.publish():
            g.kick_queue(1)


@pytest.mark.parametrize("engine", available_engines())
def test_a_zero_copy_endpoint_reads_in_guest_memory_and_buffers_wait_for_it(
        serve: Serve, engine: str) -> None:
    """Batches reach a zero-copy handler as read-only views of guest memory; the buffers
    go back only after it returned; a view it kept stays readable (and harmless) after
    the guest is gone; an endpoint without zero_copy still gets bytes."""
    peek = Peek(1024)
    sink = Sink(1025)
    r = serve([peek, sink], queue_factory=queue_factory(engine))
    with r.guest() as g:
        assert g.ram is not None
        peek.ring = g.rings[1]
        scratch = g.ram.alloc(8192, 4096)
        msgs = [rp.encode_message(3000 + i, 1024, b"zero-copy %d" % i) for i in range(6)]
        msgs.append(rp.encode_message(3009, 1025, b"to the copying sink"))
        chains = []
        for i, m in enumerate(msgs):
            gpa = scratch + 512 * i
            g.ram.mv[gpa : gpa + len(m)] = m
            if i == 3:  # header and payload in two buffers: copied, still delivered
                chains.append([(gpa, 16, 0), (gpa + 16, len(m) - 16, 0)])
            else:
                chains.append([(gpa, len(m), 0)])
        before = int(peek.ring.used16[1])
        _post_batch(g, chains)
        wait_until(lambda: sink.messages == 1 and len(peek.seen) == 6)
        assert peek.seen == [b"zero-copy %d" % i for i in range(6)]
        assert "memoryview-ro" in peek.kinds  # in place, not writable
        assert all(u == before for u in peek.used_while_running)  # nothing back yet
        wait_until(lambda: int(peek.ring.used16[1]) == before + 7)
        assert sink.bytes == len(b"to the copying sink")
        assert r.device.stats["to_host_messages"] == 7
    # the guest and its memory are gone; what the handler kept is still memory we mapped
    assert all(isinstance(bytes(v), bytes) for v in peek.kept)
    with r.guest() as g2:  # and the server goes on
        g2.open(3100)
        g2.send(3100, 1024, b"one")  # a single message: taken copied (take_one)
        wait_until(lambda: peek.seen[-1:] == [b"one"])


@pytest.mark.parametrize("engine", available_engines())
def test_zero_copy_batches_check_every_header_against_the_whole_chain(
        serve: Serve, engine: str) -> None:
    """A header claiming more bytes than its chain holds, a chain too short for a header
    and a chain outside guest memory are refused and counted in a zero-copy batch as in
    a copied one; the good messages around them arrive; every buffer comes back."""
    peek = Peek(1024)
    r = serve([peek], queue_factory=queue_factory(engine))
    with r.guest(hidden_tail=4096) as g:
        assert g.ram is not None
        ring = g.rings[1]
        scratch = g.ram.alloc(8192, 4096)
        good = rp.encode_message(3000, 1024, b"good")
        liar = rp.encode_message(3000, 1024, b"x" * 40)[:30]  # says 40, holds 14
        for k, m in enumerate((good, liar, good)):
            g.ram.mv[scratch + 512 * k : scratch + 512 * k + len(m)] = m
        edge = g.ram.size - 4096
        before = int(ring.used16[1])
        _post_batch(g, [[(scratch, len(good), 0)], [(scratch + 512, len(liar), 0)],
                        [(scratch + 1024, 8, 0)], [(edge + 64, 32, 0)],
                        [(scratch + 1024, len(good), 0)]])
        stats = r.device.stats
        wait_until(lambda: int(ring.used16[1]) == before + 5)
        wait_until(lambda: stats["bad_messages"] == 2 and stats["bad_chains"] == 1)
        assert peek.seen == [b"good", b"good"]


def test_zero_copy_needs_a_synchronous_batch_handler() -> None:
    class Single(Endpoint):
        zero_copy = True

        def on_message(self, src: int, data: bytes) -> None:
            pass

    class Later(Endpoint):
        zero_copy = True

        async def on_message_batch(self, batch: MessageBatch) -> None:  # type: ignore[override]
            pass

    with pytest.raises(TypeError, match="zero_copy needs"):
        RpmsgDevice([Single(1024)])
    with pytest.raises(TypeError, match="on_message_batch cannot be async def"):
        RpmsgDevice([Later(1024)])


def test_only_on_message_may_be_async() -> None:
    """An async batch handler would be called and never awaited: its messages would
    vanish without a count or a log line.  Registration refuses it instead."""

    class AsyncPairs(Endpoint):
        async def on_batch(self, messages: list[tuple[int, bytes]]) -> None:  # type: ignore[override]
            pass

    class AsyncArrays(Endpoint):
        async def on_message_batch(self, batch: MessageBatch) -> None:  # type: ignore[override]
            pass

    with pytest.raises(TypeError, match="on_batch cannot be async def"):
        RpmsgDevice([AsyncPairs(1024)])
    with pytest.raises(TypeError, match="on_message_batch cannot be async def"):
        RpmsgDevice([AsyncArrays(1024)])


def test_a_zero_copy_handler_that_keeps_an_export_cannot_keep_the_buffers(
        serve: Serve) -> None:
    """A handler holding a buffer export of batch.data (so the view cannot be released)
    still gets its buffers given back, and it is counted."""
    ffi = pytest.importorskip("_vhost_rpmsg_vring").ffi  # cffi's from_buffer holds one
    kept: list[Any] = []

    class Keeper(Endpoint):
        zero_copy = True

        def on_message_batch(self, batch: MessageBatch) -> None:
            kept.append(ffi.from_buffer("uint8_t[]", batch.data))  # an export, kept

    r = serve([Keeper(1024)])
    with r.guest() as g:
        assert g.ram is not None
        ring = g.rings[1]
        scratch = g.ram.alloc(4096, 4096)
        m = rp.encode_message(3000, 1024, b"kept")
        g.ram.mv[scratch : scratch + len(m)] = m
        before = int(ring.used16[1])
        _post_batch(g, [[(scratch, len(m), 0)]] * 3)
        wait_until(lambda: int(ring.used16[1]) == before + 3)
        wait_until(lambda: r.device.stats["zero_copy_views_kept"] >= 1)
        g.send(3000, 1024, b"still served")  # taken copied: no view to keep
    assert kept
