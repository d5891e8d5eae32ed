"""The control socket: requests and their errors, endpoints at run time, endpoint fds
and their lifetime, per-endpoint flow control, and who may connect."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from vhost_rpmsg.client import Control, ControlError, EndpointSocket
from vhost_rpmsg.control import protocol as cp
from vhost_rpmsg.control.metrics import MetricsServer, parse_address
from vhost_rpmsg.control.protocol import ErrorCode, Op
from vhost_rpmsg.control.server import ControlServer
from vhost_rpmsg.control.stats import snapshot
from vhost_rpmsg.endpoints import Echo, Sink
from vhost_rpmsg.rpmsg.device import RpmsgDevice
from vhost_rpmsg.virtio.queue import QueueBroken

from .conftest import Running, Serve
from .helpers import wait_until


@dataclass
class Ctl:
    running: Running[RpmsgDevice]
    server: ControlServer
    path: str

    def client(self) -> Control:
        return Control(self.path)


@pytest.fixture
def ctl(serve: Serve, tmp_path: Path) -> Iterator[Ctl]:
    r = serve([Echo(1024, "rpmsg-raw"), Sink(1025)])
    path = str(tmp_path / "vu.ctl")
    server = ControlServer(path, [r.server])
    r.call(server.start)
    yield Ctl(r, server, path)
    r.call(server.close)


def _raw_request(path: str, data: bytes) -> dict[str, object]:
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as s:
        s.settimeout(5)
        s.connect(path)
        s.send(data)
        reply = json.loads(s.recv(65536))
        assert isinstance(reply, dict)
        return reply


@pytest.mark.parametrize("data, code", [
    (b"not json", "bad-request"),
    (b"[1, 2]", "bad-request"),
    (b'{"op": "stats"}', "bad-version"),
    (b'{"v": 2, "op": "stats"}', "bad-version"),
    (b'{"v": 1, "op": "reboot"}', "unknown-op"),
    (b'{"v": 1, "op": "endpoint.remove"}', "bad-request"),
    (b'{"v": 1, "op": "endpoint.remove", "addr": "1024"}', "bad-request"),
    (b'{"v": 1, "op": "endpoint.remove", "addr": true}', "bad-request"),
    (b'{"v": 1, "op": "endpoint.remove", "addr": 77}', "no-such-endpoint"),
    (b'{"v": 1, "op": "stats", "socket": 3}', "no-such-socket"),
    (b'{"v": 1, "op": "endpoint.add", "spec": "nosuchplugin@1030"}', "bad-endpoint"),
    (b'{"v": 1, "op": "endpoint.add", "spec": "echo@1024"}', "address-in-use"),
    (b'{"v": 1, "op": "endpoint.open", "addr": 53}', "bad-endpoint"),
    (b"[" * 60000, "bad-request"),  # deeper than json's recursion limit
])
def test_bad_requests_get_a_clear_error_and_the_connection_goes_on(
        ctl: Ctl, data: bytes, code: str) -> None:
    reply = _raw_request(ctl.path, data)
    assert reply["v"] == 1 and reply["ok"] is False and reply["error"] == code
    assert isinstance(reply["message"], str) and reply["message"]
    with ctl.client() as c:  # and the server answers the next one
        assert c.request(Op.HELLO)["version"] == cp.VERSION



def test_a_client_that_does_not_read_its_replies_is_dropped_and_others_served(
        ctl: Ctl) -> None:
    stats = ctl.server.stats
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as s:
        s.connect(ctl.path)
        s.settimeout(5)
        request = cp.encode({"v": cp.VERSION, "op": Op.STATS.value})
        with pytest.raises(OSError):  # EPIPE or ECONNRESET once the server has let go
            for _ in range(100_000):
                s.send(request)
    wait_until(lambda: stats["dropped_not_reading"] == 1)
    with ctl.client() as c:
        assert c.request(Op.HELLO)["version"] == cp.VERSION
    wait_until(lambda: not ctl.server._clients)  # both connections closed and forgotten

def test_stats_cover_server_session_queues_and_endpoints(ctl: Ctl) -> None:
    with ctl.running.guest() as g, ctl.client() as c:
        g.open(3000)
        for i in range(10):
            g.send(3000, 1024, b"%d" % i)
            g.recv(3000)
        g.send_burst(3000, 1025, b"x" * 100, 50)
        wait_until(lambda: ctl.running.device.stats["to_host_messages"] == 60)
        snap = c.stats()
    (srv,) = snap["servers"]
    assert srv["connected"] is True and srv["session"]["memory_regions"] == 1
    assert {q["index"]: q["state"] for q in srv["queues"]} == {
        0: "started_enabled", 1: "started_enabled"}
    assert srv["queues"][1]["popped"] == 60
    eps = {e["addr"]: e for e in srv["endpoints"]}
    assert eps[1024]["to_host_messages"] == 10 and eps[1024]["to_guest_messages"] == 10
    assert eps[1025]["to_host_messages"] == 50 and eps[1025]["to_host_bytes"] == 5000
    assert srv["device"]["counters"]["to_host_messages"] == 60
    json.dumps(snap)  # all of it is plain JSON


def test_endpoints_added_and_removed_at_run_time_are_announced_and_withdrawn(
        ctl: Ctl) -> None:
    with ctl.running.guest() as g, ctl.client() as c:
        g.wait_channel("rpmsg-raw")
        addr = c.add_endpoint("late-echo:echo@1040")
        assert addr == 1040
        assert g.wait_channel("late-echo").addr == 1040
        g.open(3001)
        g.send(3001, 1040, b"late")
        assert g.recv(3001) == (1040, b"late")
        assert {e["addr"] for e in c.endpoints()} == {1024, 1025, 1040}
        c.remove_endpoint(1040)
        wait_until(lambda: "late-echo" not in g.channels)
        assert {e["addr"] for e in c.endpoints()} == {1024, 1025}
        before = ctl.running.device.stats["unknown_destination"]
        g.send(3001, 1040, b"gone")
        wait_until(lambda: ctl.running.device.stats["unknown_destination"] == before + 1)


def test_an_endpoint_added_before_the_guest_is_announced_to_its_session(ctl: Ctl) -> None:
    with ctl.client() as c:
        c.add_endpoint("early:echo")  # the first free address from 1024
    with ctl.running.guest() as g:
        assert g.wait_channel("early").addr == 1026


def test_an_opened_endpoint_is_in_the_guest_ring_before_the_reply_is_sent(ctl: Ctl) -> None:
    """The announcement is written while the request is answered, in the same turn of
    the loop, not in a later one: a client holding its fd knows the guest was told."""
    dev = ctl.running.device
    with ctl.running.guest() as g:
        g.wait_channel("rpmsg-raw")

        def answer() -> tuple[dict[str, object], list[int], int]:
            request = {"v": cp.VERSION, "op": Op.ENDPOINT_OPEN.value, "name": "now"}
            reply, fds = ctl.server.handle(cp.encode(request))
            return json.loads(reply), fds, len(dev.outbox)

        reply, fds, waiting = ctl.running.call(answer)
        try:
            assert reply["ok"] is True
            assert waiting == 0  # written to the rx ring already, nothing left to flush
            assert g.wait_channel("now").addr == reply["addr"]
        finally:
            for fd in fds:
                os.close(fd)



def test_an_open_whose_flush_finds_the_tx_ring_broken_still_gets_its_fd(
        ctl: Ctl, monkeypatch: pytest.MonkeyPatch) -> None:
    """The flush of an announcement resumes a paused tx drain; a guest whose tx ring is
    found corrupt then has that ring broken, and the control request is answered."""
    dev = ctl.running.device
    with ctl.running.guest() as g, ctl.client() as c:
        g.wait_channel("rpmsg-raw")

        def corrupt(vr: object, q: object) -> None:
            raise QueueBroken("avail idx 9999 ahead of used idx 0")

        monkeypatch.setattr(dev, "_drain_to_host", corrupt)
        ctl.running.call(lambda: setattr(dev.outbox, "to_host_paused", True))
        with c.open_endpoint("still") as ep:
            assert g.wait_channel("still").addr == ep.addr
        assert dev.stats["to_host_broken_off_kick"] == 1
        assert dev.to_host is not None and dev.to_host.broken
        assert ctl.server.stats["internal_errors"] == 0
        assert c.request(Op.HELLO)["version"] == cp.VERSION



def test_a_request_that_fails_inside_the_server_is_answered_and_counted(
        ctl: Ctl, monkeypatch: pytest.MonkeyPatch) -> None:
    def bug(req: object, fds: list[int]) -> dict[str, object]:
        fds.append(os.dup(0))  # passed fds are closed, not sent, when the request fails
        raise KeyError("a bug")

    fds_before = len(os.listdir("/proc/self/fd"))
    monkeypatch.setattr(ctl.server, "_dispatch", bug)
    with ctl.client() as c:
        with pytest.raises(ControlError, match="internal error: KeyError"):
            c.request(Op.HELLO)
        monkeypatch.undo()
        assert c.request(Op.HELLO)["version"] == cp.VERSION  # and the connection goes on
    assert ctl.server.stats["internal_errors"] == 1
    wait_until(lambda: len(os.listdir("/proc/self/fd")) <= fds_before)



def test_an_open_looks_endpoints_up_without_copying_the_table(
        ctl: Ctl, monkeypatch: pytest.MonkeyPatch) -> None:
    """Opening, adding and closing with many endpoints held touch the table by address:
    copying all of it per address tried made each open cost O(held²), 55 ms of the
    loop (every guest's) with 1,000 held."""
    dispatcher = type(ctl.running.device.dispatcher)
    copies = 0
    table = dispatcher.endpoints

    def counted(self: object) -> object:
        nonlocal copies
        copies += 1
        return table.fget(self)  # type: ignore[attr-defined]

    with ctl.client() as c:
        held = [c.open_endpoint() for _ in range(50)]
        monkeypatch.setattr(dispatcher, "endpoints", property(counted))
        before = copies
        c.open_endpoint().close()
        c.add_endpoint("late:echo")
        wait_until(lambda: ctl.server.stats["fd_endpoints_closed"] == 1)
        assert copies == before  # none
        monkeypatch.undo()
        for ep in held:
            ep.close()
        wait_until(lambda: ctl.server.stats["fd_endpoints_closed"] == 51)


def test_fd_endpoint_echoes_through_the_holder_and_goes_with_its_fd(ctl: Ctl) -> None:
    with ctl.running.guest() as g, ctl.client() as c:
        ep = c.open_endpoint("fd-svc")
        ch = g.wait_channel("fd-svc")
        assert ch.addr == ep.addr
        g.open(3002)
        for payload in (b"", b"one", bytes(range(256)) + b"x" * 240):
            g.send(3002, ep.addr, payload)
            src, data = ep.recv()
            assert (src, data) == (None, payload)
            ep.send(data[::-1])  # to the last writer
            assert g.recv(3002) == (ep.addr, payload[::-1])
        ep.close()
        wait_until(lambda: "fd-svc" not in g.channels)
        wait_until(lambda: ep.addr not in ctl.running.device.endpoints)
        assert ctl.server.stats["fd_endpoints_closed"] == 1


def test_an_empty_datagram_written_just_before_close_still_reaches_the_guest(
        ctl: Ctl) -> None:
    """SOCK_SEQPACKET reads an empty datagram and the hang-up alike (0 bytes); the
    server used to check the hang-up flag after the read, so an empty message written
    right before close was taken for the end and lost.  Credentials (SO_PASSCRED) come
    with every datagram, none with the end: now each is what it is."""
    with ctl.running.guest() as g, ctl.client() as c:
        g.open(3009)
        for _ in range(20):  # the close always lands right behind the writes
            ep = c.open_endpoint(dst=3009)
            ep.send(b"")
            ep.send(b"")
            ep.close()
            assert [g.recv(3009) for _ in range(2)] == [(ep.addr, b"")] * 2
            addr = ep.addr
            wait_until(lambda: addr not in ctl.running.device.endpoints)  # noqa: B023


def test_the_client_tells_an_empty_guest_message_from_the_endpoint_closing() -> None:
    """The client sets SO_PASSCRED on its end: the empty datagram just before the end
    is an empty message, the end a ConnectionError."""
    server_end, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    ep = EndpointSocket(theirs, 1024)
    server_end.send(b"")
    server_end.send(b"x")
    server_end.send(b"")
    server_end.close()
    assert [ep.recv() for _ in range(3)] == [(None, b""), (None, b"x"), (None, b"")]
    with pytest.raises(ConnectionError, match="closed"):
        ep.recv()
    ep.close()


def test_addressed_fd_endpoint_talks_to_several_guest_addresses(ctl: Ctl) -> None:
    with ctl.running.guest() as g, ctl.client() as c:
        ep = c.open_endpoint(addressed=True)
        for a in (3003, 3004):
            g.open(a)
            g.send(a, ep.addr, b"from %d" % a)
        got = dict([ep.recv(), ep.recv()])
        assert got == {3003: b"from 3003", 3004: b"from 3004"}
        ep.send(b"to 3004", dst=3004)
        ep.send(b"to 3003", dst=3003)
        assert g.recv(3004) == (ep.addr, b"to 3004")
        assert g.recv(3003) == (ep.addr, b"to 3003")
        with pytest.raises(ValueError):
            ep.send(b"nowhere")
        ep.sock.send(b"ab")  # shorter than the address header: refused, counted
        wait_until(lambda: ctl.running.device.endpoints[ep.addr].stats  # type: ignore[attr-defined]
                   ["bad_datagrams"] == 1)
        ep.close()


_HOLDER = """
import sys, time
from vhost_rpmsg.client import Control
with Control(sys.argv[1]) as c:
    ep = c.open_endpoint("held", dst=3005)
print(ep.addr, flush=True)
while True:
    src, data = ep.recv()
    ep.send(b"held:" + data)
"""


def test_kill_9_of_the_holder_removes_the_endpoint_and_its_announcement(ctl: Ctl) -> None:
    with ctl.running.guest() as g:
        proc = subprocess.Popen([sys.executable, "-c", _HOLDER, ctl.path],
                                stdout=subprocess.PIPE, text=True)
        try:
            assert proc.stdout is not None
            addr = int(proc.stdout.readline())
            assert g.wait_channel("held").addr == addr
            g.open(3005)
            g.send(3005, addr, b"ping")
            assert g.recv(3005) == (addr, b"held:ping")
            os.kill(proc.pid, signal.SIGKILL)
        finally:
            proc.kill()
            proc.wait()
        wait_until(lambda: "held" not in g.channels)
        assert addr not in ctl.running.device.endpoints


def test_a_holder_that_stops_reading_costs_only_its_own_messages(ctl: Ctl) -> None:
    with ctl.running.guest() as g, ctl.client() as c:
        ep = c.open_endpoint("slow")
        g.open(3006)
        n = 3000
        g.send_burst(3006, ep.addr, b"s" * 200, n)
        dev = ctl.running.device
        wait_until(lambda: dev.stats["to_host_messages"] == n)
        (info,) = [e for e in c.endpoints() if e["addr"] == ep.addr]
        own = info["endpoint"]
        # in the socket buffer, in our bounded queue, or counted as dropped: none lost
        assert own["queued_to_process"] <= 1024
        assert own["dropped_slow_reader"] > 0
        assert own["to_process"] + own["queued_to_process"] + own["dropped_slow_reader"] == n
        g.send(3006, 1024, b"others")  # the echo is not held up
        assert g.recv(3006) == (1024, b"others")
        received = 0
        ep.sock.settimeout(0.5)
        try:
            while True:
                ep.recv()
                received += 1
        except TimeoutError:
            pass
        assert received == n - own["dropped_slow_reader"]
        ep.close()


def test_many_clients_opening_and_closing_leak_nothing(ctl: Ctl) -> None:
    dev = ctl.running.device
    with ctl.running.guest() as g:
        g.wait_channel("rpmsg-raw")
        fds_before = len(os.listdir("/proc/self/fd"))
        errors: list[BaseException] = []

        def client(i: int) -> None:
            try:
                with Control(ctl.path) as c:
                    for _ in range(5):
                        c.open_endpoint(f"c{i}").close()
            except BaseException as e:
                errors.append(e)

        threads = [threading.Thread(target=client, args=(i,)) for i in range(100)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert not errors, errors[:3]
        wait_until(lambda: ctl.server.stats["fd_endpoints_closed"] == 500)
        wait_until(lambda: set(dev.endpoints) == {1024, 1025})
        wait_until(lambda: set(g.channels) == {"rpmsg-raw"})
        # every announcement withdrawn: delivered and withdrawn, or withdrawn unseen
        cancelled = dev.stats["ns_cancelled"]
        assert g.stats.events["ns_create"] + cancelled == 501
        assert g.stats.events["ns_destroy"] + cancelled == 500
        wait_until(lambda: len(os.listdir("/proc/self/fd")) <= fds_before)


def test_the_fd_works_in_another_namespace(ctl: Ctl) -> None:
    """The endpoint is an fd: it works in a process with its own network and mount
    namespaces, where the control socket's path means nothing."""
    with ctl.running.guest() as g, ctl.client() as c:
        ep = c.open_endpoint("ns-echo")
        code = ("import socket, sys; s = socket.socket(fileno=int(sys.argv[1])); "
                "s.send(b'ns:' + s.recv(600))")
        proc = subprocess.Popen(["unshare", "--net", "--mount", sys.executable, "-c", code,
                                 str(ep.fileno())], pass_fds=(ep.fileno(),))
        g.open(3007)
        g.send(3007, ep.addr, b"hello")
        assert g.recv(3007) == (ep.addr, b"ns:hello")
        assert proc.wait(30) == 0
        ep.close()


def test_a_peer_of_another_uid_is_refused(serve: Serve) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to run a client as another user")
    # a directory nobody may enter and a socket mode that lets anyone connect: the file
    # system would refuse the peer before the server could, and this tests the server
    where = tempfile.mkdtemp(prefix="vr-ctl-")
    os.chmod(where, 0o755)
    r_ = serve([Echo(1024)])
    server = ControlServer(os.path.join(where, "ctl"), [r_.server], mode=0o666)
    r_.call(server.start)
    ctl = Ctl(r_, server, server.path)
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: become nobody, ask, report what came back
        try:
            os.setgid(65534)
            os.setuid(65534)
            s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            s.settimeout(5)
            s.connect(ctl.path)
            try:  # refused: closed before or after our request reached it
                s.send(cp.request(Op.HELLO))
                got = s.recv(100)
            except (BrokenPipeError, ConnectionResetError):
                got = b""
            os.write(w, b"closed" if got == b"" else b"answered")
        except BaseException as e:
            os.write(w, repr(e).encode())
        finally:
            os._exit(0)
    os.close(w)
    try:
        assert os.read(r, 100) == b"closed"
    finally:
        os.close(r)
        os.waitpid(pid, 0)
    assert ctl.server.stats["refused_peer"] == 1
    with ctl.client() as c:  # root is served
        assert c.request(Op.HELLO)["version"] == cp.VERSION
    r_.call(server.close)
    os.rmdir(where)


def test_endpoints_opened_and_closed_while_the_guest_does_not_read_cost_nothing(
        ctl: Ctl) -> None:
    """The guest takes no rx buffers: each announcement waits in the outbox, and its
    withdrawal cancels it there instead of queueing a second message behind it."""
    dev = ctl.running.device
    g = ctl.running.guest(queue_size=8).start()
    g.repost_rx = False
    g.wait_channel("rpmsg-raw")
    with ctl.client() as c:
        for i in range(200):
            c.open_endpoint(f"churn{i}").close()
        wait_until(lambda: ctl.server.stats["fd_endpoints_closed"] == 200)
    assert dev.queued <= 16
    assert dev.stats["ns_cancelled"] > 150
    g.close()


def test_fd_endpoint_without_a_destination_refuses_and_counts(ctl: Ctl) -> None:
    with ctl.running.guest(), ctl.client() as c:
        ep = c.open_endpoint("quiet")
        ep.send(b"to whom?")  # nobody wrote to it yet, and no dst was given
        fd_ep = ctl.running.device.endpoints[ep.addr]
        wait_until(lambda: fd_ep.stats["no_dst"] == 1)  # type: ignore[attr-defined]
        ep.close()


def test_control_errors_reach_the_client_as_exceptions(ctl: Ctl) -> None:
    with ctl.client() as c:
        with pytest.raises(ControlError) as e:
            c.remove_endpoint(999)
        assert e.value.code is ErrorCode.NO_SUCH_ENDPOINT


def test_metrics_expose_the_same_counters_in_prometheus_text(ctl: Ctl) -> None:
    r = ctl.running

    def take() -> dict[str, object]:
        return snapshot([r.server], 0.0)

    exporter = MetricsServer(("127.0.0.1", 0))
    exporter.attach(take, r.loop.loop)
    host, port = exporter.address
    with r.guest() as g:
        g.open(3008)
        for _ in range(7):
            g.send(3008, 1024, b"m")
            g.recv(3008)
        text = urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=10).read()
    body = text.decode()
    assert ('vhost_rpmsg_endpoint_messages_total{addr="1024",direction="to_host",'
            'name="rpmsg-raw",socket="0"} 7.0') in body
    assert 'vhost_rpmsg_queue_popped_total{queue="1",socket="0"} 7.0' in body
    assert 'vhost_rpmsg_connected{socket="0"} 1.0' in body
    assert "process_resident_memory_bytes" in body
    exporter.close()


@pytest.mark.parametrize("text, want", [
    ("9100", ("127.0.0.1", 9100)), (":9100", ("127.0.0.1", 9100)),
    ("0.0.0.0:80", ("0.0.0.0", 80)), ("[::1]:81", ("::1", 81)),
])
def test_metrics_addresses(text: str, want: tuple[str, int]) -> None:
    assert parse_address(text) == want


@pytest.mark.parametrize("text", ["", "host", "1:2:x", "70000"])
def test_bad_metrics_addresses(text: str) -> None:
    with pytest.raises(ValueError):
        parse_address(text)
