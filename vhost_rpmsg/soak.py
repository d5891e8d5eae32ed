"""Soak: one ``vhost-rpmsg serve`` process with several sockets, under long mixed traffic.

Why: every other test runs for seconds.  Leaks (memory, file descriptors) and lost
messages that only show after thousands of reconnects and hostile inputs need a long run
against the real server process, watched from outside as an operator would watch it.

    python -m vhost_rpmsg.soak --duration 1800 --sockets 3

What it does:

* starts ``vhost-rpmsg serve --socket-count N`` with, per socket, an echo announced as
  ``rpmsg-raw`` (1024), a sink (1025), a ``unix`` bridge (1026, its host side held by
  this process) and a source streaming to guest address 2001 (1027);
* drives one simulated Linux guest (:class:`~vhost_rpmsg.guest.SimGuest`) per socket,
  each on a thread of its own, through random steps: pipelined echoes of 0..496 bytes
  (byte-exact), sink floods of one size per burst, guest→host and host→guest datagrams
  through the bridge (byte-exact, in order), and the source's stream (consecutive
  sequence numbers within a guest session);
* reconnects each guest every few seconds, in turn a clean shutdown, a driver rebind
  (rings set up again without a new memory table) and a crash in the middle of a flood
  (the connection vanishes with buffers in flight);
* at intervals replaces a guest by a hostile front-end or makes the guest hostile: a
  garbage stream, wrong fd counts, a ring outside guest memory, malformed descriptor
  chains, an avail index jump, a second front-end, a front-end that never reads replies;
* samples the server's RSS and open fd count (/proc/PID/status, /proc/PID/fd).

Accounting, on the guest side: every echo request gets exactly one reply, byte for
byte; every sink message's buffer comes back; every bridge datagram arrives, in order;
messages in flight when a guest crashes are lost with it and counted as such (at most
its ring's worth).  At the end, with no guest connected, the server's own counters (its
control socket's stats, docs/control.md) must agree: what it received and sent per
endpoint, and what it counted as dropped.  A server without a control socket is
checked on the guest side only.  The server's log is read for tracebacks and counted
errors.

Exit status 0 when nothing is unaccounted, the server's RSS after the warm-up grew less
than ``--rss-tolerance-mib``, its fd count with no guest connected is the same at the
end as after the first round of connections (``--fd-tolerance``), the server never
logged a traceback and it exited 0 on SIGTERM; 1 otherwise (the report says why).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .guest import GuestTimeout, SimGuest
from .guest.frontend import Frontend, FrontendError, GuestRam
from .rpmsg import codec as rp
from .vhost_user import codec as vuc
from .vhost_user.codec import MemoryRegion, VringAddr
from .vhost_user.protocol import ProtocolFeature, Request
from .virtio.constants import VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE

ECHO, SINK, BRIDGE, SOURCE = 1024, 1025, 1026, 1027
#: guest addresses: echo replies, sink sender, bridge (both ways), source stream
G_ECHO, G_SINK, G_BRIDGE, G_SOURCE = 3000, 3001, 2000, 2001
SOURCE_SIZE = 24
TX_BUFS = 256  # a SimGuest with 256-entry rings has 256 tx buffers: what a crash can lose
#: how long a step may wait for the server; generous: the machine is shared
WAIT = 30.0

#: server log lines the report counts: (key, pattern); a "n" group is summed
LOG_PATTERNS = {
    "traceback": re.compile(r"^Traceback "),
    "dropped_on_reset": re.compile(r"(?P<n>\d+) queued message\(s\) for the old guest "
                                   r"discarded"),
    "bridge_not_delivered": re.compile(r"the process does not read|no host client"),
    "frontend_dropped": re.compile(r"dropping front-end"),
    "vhost_user_refused": re.compile(r"vhost-user \S+ \(flags"),
    "bad_chain": re.compile(r"bad descriptor chain|device-readable|malformed message"),
    "queue_broken": re.compile(r"(?i)broken"),
    "second_frontend_refused": re.compile(r"already connected; refusing"),
}


# -- accounting ----------------------------------------------------------------------------


@dataclass
class Tally:
    """What one socket's guests sent and got back (message counts unless named), and
    what happened to them."""

    echo_sent: int = 0
    echo_ok: int = 0
    echo_bad: int = 0  #: a reply that differs from its request: never expected
    echo_missing: int = 0  #: a reply that never came: never expected
    echo_lost_in_crash: int = 0  #: requests outstanding when the guest crashed
    sink_sent: int = 0
    sink_bytes: int = 0
    #: messages (sink floods, echo requests) still in a crashed guest's tx ring
    crash_in_flight: int = 0
    crash_over_bound: int = 0  #: crashes with more in flight than a ring holds: never
    sink_unreturned: int = 0  #: tx buffers the server never gave back: never expected
    g2h_sent: int = 0
    g2h_received: int = 0
    g2h_bad: int = 0
    h2g_sent: int = 0
    h2g_received: int = 0
    h2g_bad: int = 0
    h2g_missing: int = 0
    source_received: int = 0
    source_gaps: int = 0  #: messages missing inside one guest session: never expected
    sessions: int = 0
    reconnects: Counter[str] = field(default_factory=Counter)
    hostile: Counter[str] = field(default_factory=Counter)
    errors: list[str] = field(default_factory=list)


@dataclass
class Sample:
    """The server's resident memory and open fds, ``t`` seconds into the run."""

    t: float
    rss_kib: int
    fds: int


@dataclass
class Limits:
    """The tolerances the verdict applies (stated in the report)."""

    warmup: float
    rss_tolerance_kib: int
    fd_tolerance: int


def server_accounts(servers: Sequence[dict[str, Any]], tallies: Sequence[Tally]
                    ) -> tuple[list[str], list[dict[str, int]]]:
    """What the guests sent and got, against the server's own counters (its control
    socket's stats snapshot, read with no guest connected): why they disagree, and per
    socket the figures compared."""
    why: list[str] = []
    rows: list[dict[str, int]] = []
    for i, (srv, t) in enumerate(zip(servers, tallies, strict=True)):
        eps = {e["addr"]: e for e in srv.get("endpoints", [])}
        dev = srv.get("device", {}).get("counters", {})

        def ep(addr: int, key: str, eps: dict[int, Any] = eps) -> int:
            return int(eps.get(addr, {}).get(key, 0))

        bridge = eps.get(BRIDGE, {}).get("endpoint", {})
        row = {
            "echo_to_host": ep(ECHO, "to_host_messages"),
            "echo_to_guest": ep(ECHO, "to_guest_messages"),
            "sink_to_host": ep(SINK, "to_host_messages"),
            "bridge_to_host": ep(BRIDGE, "to_host_messages"),
            "bridge_to_clients": int(bridge.get("to_clients", 0)),
            "bridge_not_delivered": int(bridge.get("no_client", 0))
            + int(bridge.get("dropped_slow_reader", 0)),
            "bridge_from_clients": int(bridge.get("from_clients", 0)),
            "bridge_to_guest": ep(BRIDGE, "to_guest_messages"),
            "source_to_guest": ep(SOURCE, "to_guest_messages"),
            "dropped_on_reset": int(dev.get("dropped_on_reset", 0)),
            "handler_failed": int(dev.get("handler_failed_messages", 0))
            + int(dev.get("handler_queue_full", 0)),
        }
        rows.append(row)
        crash = t.crash_in_flight
        checks = [
            # every echo request reached it but those in crashed guests' rings
            ("echo requests", t.echo_sent - t.echo_lost_in_crash <= row["echo_to_host"]
             <= t.echo_sent),
            ("echo replies", row["echo_to_guest"] == row["echo_to_host"]),
            ("sink", t.sink_sent - crash <= row["sink_to_host"] <= t.sink_sent),
            ("bridge guest->host", row["bridge_to_host"] == t.g2h_sent and
             t.g2h_received == row["bridge_to_clients"] and
             row["bridge_to_host"] - row["bridge_to_clients"] == row["bridge_not_delivered"]),
            ("bridge host->guest", row["bridge_from_clients"] == t.h2g_sent ==
             row["bridge_to_guest"] == t.h2g_received),
            ("source", row["source_to_guest"] >= t.source_received),
            ("handlers", row["handler_failed"] == 0),
        ]
        why += [f"socket {i}: {what}: the guests' and the server's counts disagree: "
                f"{ {k: v for k, v in row.items()} } vs {_ints(t)}"
                for what, ok in checks if not ok]
    return why, rows


def _ints(t: Tally) -> dict[str, int]:
    return {k: v for k, v in asdict(t).items() if isinstance(v, int)}


def verdict(samples: Sequence[Sample], idle_fds: tuple[int, int], tallies: Sequence[Tally],
            log_counts: dict[str, int], server_rc: int | None, limits: Limits,
            servers: Sequence[dict[str, Any]] | None = None) -> list[str]:
    """Why the soak failed (empty: it passed).  Pure, so its rules are tested directly.

    ``servers``: the server's stats snapshot per socket, when it has a control socket;
    without, guest-side accounting only.
    """
    why: list[str] = []
    after = [s for s in samples if s.t >= limits.warmup]
    if len(after) < 2:
        why.append(f"only {len(after)} sample(s) after the {limits.warmup:.0f} s warm-up")
    else:
        base = after[0].rss_kib
        top = max(s.rss_kib for s in after)
        if top - base > limits.rss_tolerance_kib or after[-1].rss_kib - base > \
                limits.rss_tolerance_kib:
            why.append(f"RSS grew after warm-up: {base} KiB at {after[0].t:.0f} s, max {top}, "
                       f"last {after[-1].rss_kib} (tolerance {limits.rss_tolerance_kib} KiB)")
    start, end = idle_fds
    if end - start > limits.fd_tolerance:
        why.append(f"open fds with no guest connected: {start} after the first round, "
                   f"{end} at the end (tolerance {limits.fd_tolerance})")
    total = Counter[str]()
    for t in tallies:
        total.update({k: v for k, v in asdict(t).items() if isinstance(v, int)})
        why += [f"error: {e}" for e in t.errors]
    for key in ("echo_bad", "echo_missing", "sink_unreturned", "crash_over_bound",
                "g2h_bad", "h2g_bad", "h2g_missing", "source_gaps"):
        if total[key]:
            why.append(f"{key}: {total[key]} message(s) unaccounted")
    if total["echo_sent"] != total["echo_ok"] + total["echo_lost_in_crash"] + \
            total["echo_bad"] + total["echo_missing"]:
        why.append(f"echo: {total['echo_sent']} sent but {total['echo_ok']} ok + "
                   f"{total['echo_lost_in_crash']} lost in crashes")
    if servers is not None:
        why += server_accounts(servers, tallies)[0]
    elif total["g2h_sent"] != total["g2h_received"]:
        why.append(f"bridge guest->host: {total['g2h_sent']} sent, {total['g2h_received']} "
                   f"received ({log_counts.get('bridge_not_delivered', 0)} log lines about "
                   "undelivered datagrams)")
    if log_counts.get("traceback"):
        why.append(f"the server logged {log_counts['traceback']} traceback(s)")
    if server_rc != 0:
        why.append(f"the server's exit status on SIGTERM was {server_rc}")
    return why


# -- the server process ---------------------------------------------------------------------


class ServerProcess:
    """``vhost-rpmsg serve`` as a child process, its log in a file."""

    def __init__(self, workdir: Path, sockets: int, engine: str, echo_plugin: str,
                 extra: list[str]) -> None:
        self.sock = workdir / "g.sock"
        self.bridge = workdir / "b.sock"
        self.log = workdir / "server.log"
        self.paths = [str(self.sock) if sockets == 1 else f"{self.sock}{i}"
                      for i in range(sockets)]
        self.bridges = [str(self.bridge) if sockets == 1 else f"{self.bridge}{i}"
                        for i in range(sockets)]
        argv = [sys.executable, "-m", "vhost_rpmsg.cli", "serve", "--socket-path",
                str(self.sock), "--socket-count", str(sockets), "--engine", engine,
                "--log-level", "info",
                "-e", f"rpmsg-raw:{echo_plugin}@{ECHO}", "-e", f"sink@{SINK}",
                "-e", f"unix@{BRIDGE},path={self.bridge},dst={G_BRIDGE}",
                "-e", f"source@{SOURCE},dst={G_SOURCE},size={SOURCE_SIZE},rate=100", *extra]
        with self.log.open("w") as err:
            self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL,
                                         stdout=subprocess.DEVNULL, stderr=err)
        deadline = time.monotonic() + 60
        while not all(os.path.exists(p) for p in self.paths + self.bridges):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"serve did not start:\n{self.log.read_text()}")
            time.sleep(0.05)

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    def sample(self, t: float) -> Sample:
        pid = self.proc.pid
        rss = 0
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    rss = int(line.split()[1])
        return Sample(round(t, 1), rss, len(os.listdir(f"/proc/{pid}/fd")))

    def cpu_seconds(self) -> float:
        with open(f"/proc/{self.proc.pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stop(self) -> int | None:
        """SIGTERM, as a supervisor stops it; its exit status (None: it had to be killed)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            return None

    def stats(self) -> list[dict[str, Any]] | None:
        """Every socket's counters from the server's control socket (None: it has none)."""
        ctl = f"{self.sock}.ctl"  # serve's default: the socket path + .ctl
        if not os.path.exists(ctl):
            return None
        try:
            from .client import Control
        except ImportError:
            return None
        with Control(ctl, timeout=WAIT) as c:
            servers: list[dict[str, Any]] = c.stats()["servers"]
        return servers

    def log_counts(self) -> dict[str, int]:
        counts: Counter[str] = Counter()
        for line in self.log.read_text(errors="replace").splitlines():
            for key, pattern in LOG_PATTERNS.items():
                m = pattern.search(line)
                if m:
                    counts[key] += int(m["n"]) if "n" in pattern.groupindex else 1
        counts["lines"] = self.log.read_text(errors="replace").count("\n")
        return dict(counts)


# -- the host side of the bridge --------------------------------------------------------------


def _g2h_payload(seq: int, size: int) -> bytes:
    head = b"G" + seq.to_bytes(4, "little")
    return (head + bytes((seq + k) & 0xFF for k in range(max(size - 5, 0))))[: max(size, 5)]


def _h2g_payload(seq: int, size: int) -> bytes:
    head = b"H" + seq.to_bytes(4, "little")
    return (head + bytes((seq * 7 + k) & 0xFF for k in range(max(size - 5, 0))))[: max(size, 5)]


class BridgeClient:
    """This process's end of one socket's ``unix`` bridge: it checks what the guest sends
    through the bridge and sends the guest datagrams of its own."""

    def __init__(self, path: str, tally: Tally) -> None:
        self.tally = tally
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        self.sock.connect(path)
        self.next_seq = 0  #: the guest→host sequence number expected next
        self.cond = threading.Condition()
        self._stop = False
        self._thread = threading.Thread(target=self._read, name=f"bridge-{path}", daemon=True)
        self._thread.start()

    def _read(self) -> None:
        self.sock.settimeout(0.2)
        while not self._stop:
            try:
                data = self.sock.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                return
            if not data:
                return
            seq = int.from_bytes(data[1:5], "little") if len(data) >= 5 else -1
            with self.cond:
                if data[:1] != b"G" or seq < self.next_seq or \
                        data != _g2h_payload(seq, len(data)):
                    self.tally.g2h_bad += 1
                    self.tally.errors.append(f"bridge: unexpected datagram {data[:16]!r}")
                else:
                    # A gap is a datagram the bridge did not deliver (and logged).
                    self.tally.g2h_received += 1
                    self.next_seq = seq + 1
                self.cond.notify_all()

    def wait_for(self, seq: int, timeout: float) -> bool:
        """Until datagram ``seq`` (or a later one) arrived."""
        with self.cond:
            return self.cond.wait_for(lambda: self.next_seq > seq, timeout)

    def send(self, data: bytes) -> None:
        self.sock.send(data)

    def close(self) -> None:
        self._stop = True
        self._thread.join(5)
        self.sock.close()


# -- hostile front-ends and guests --------------------------------------------------------------


PF = ProtocolFeature


def _raw(path: str) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(WAIT)
    s.connect(path)
    return s


def _drain_until_closed(s: socket.socket) -> None:
    with contextlib.suppress(OSError):
        while s.recv(65536):
            pass
    s.close()


def hostile_garbage(path: str, rng: random.Random) -> None:
    """A stream that is not vhost-user (random bytes or a truncated header)."""
    s = _raw(path)
    junk = rng.choice([rng.randbytes(64), vuc.encode(Request.SET_FEATURES, b"\0" * 8)[:7],
                       (1).to_bytes(4, "little") * 2 + (1 << 24).to_bytes(4, "little")])
    with contextlib.suppress(OSError):
        s.sendall(junk)
        s.shutdown(socket.SHUT_WR)
    _drain_until_closed(s)


def _refused(fe: Frontend, request: int, payload: bytes, fds: list[int]) -> None:
    try:
        fe.request(request, payload, fds, need_reply=True)
    except FrontendError:
        return
    raise AssertionError(f"request {Request(request).name} was accepted")


def hostile_bad_requests(path: str, rng: random.Random) -> None:
    """Requests with wrong fd counts, bad sizes and out-of-range values: each refused."""
    ram = GuestRam(1 << 20)
    r, w = os.pipe()
    try:
        fe = Frontend(path, ram, timeout=WAIT)
        fe.negotiate((1 << PF.MQ) | (1 << PF.REPLY_ACK))
        _refused(fe, Request.SET_VRING_KICK, vuc.encode_vring_file(0), [])
        _refused(fe, Request.SET_OWNER, b"", [r])
        _refused(fe, Request.SET_MEM_TABLE, vuc.encode_mem_table(
            [ram.region(), MemoryRegion(1 << 30, 4096, 0, 0)]), [ram.fd])
        _refused(fe, Request.ADD_MEM_REG, vuc.encode_single_region(ram.region()), [ram.fd, r])
        _refused(fe, Request.SET_MEM_TABLE, vuc.encode_mem_table([ram.region()]), [r])
        _refused(fe, Request.SET_VRING_NUM, b"\0" * 5, [])
        _refused(fe, Request.SET_VRING_NUM, vuc.encode_vring_state(7, 256), [])
        _refused(fe, Request.SET_VRING_CALL, vuc.encode_vring_file(0), [r])  # not an eventfd
        fe.close()
    finally:
        os.close(r)
        os.close(w)
        ram.close()


def hostile_ring_outside(path: str, rng: random.Random) -> None:
    """Ring addresses past the end of guest memory, then a misaligned table."""
    ram = GuestRam(1 << 20)
    k = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
    try:
        fe = Frontend(path, ram, timeout=WAIT)
        fe.negotiate((1 << PF.MQ) | (1 << PF.REPLY_ACK))
        fe.request(Request.SET_FEATURES, vuc.encode_u64(fe.backend_features))
        fe.set_memory()
        fe.request(Request.SET_VRING_NUM, vuc.encode_vring_state(0, 256))
        reg = ram.region()
        base = reg.userspace_addr
        fe.request(Request.SET_VRING_ADDR, vuc.encode_vring_addr(VringAddr(
            0, 0, base, base + reg.memory_size - 64, base + 4096, 0)))
        _refused(fe, Request.SET_VRING_KICK, vuc.encode_vring_file(0), [k])
        _refused(fe, Request.SET_VRING_ADDR, vuc.encode_vring_addr(VringAddr(
            0, 0, base + 8, base + 8192, base + 4096, 0)), [])
        fe.close()
    finally:
        os.close(k)
        ram.close()


def hostile_no_reads(path: str, rng: random.Random) -> None:
    """Thousands of requests that each want a reply, none read: the server must drop us."""
    s = _raw(path)
    s.settimeout(2)
    with contextlib.suppress(OSError):
        s.sendall(vuc.encode(Request.GET_FEATURES, b"") * 20000)
    s.settimeout(WAIT)
    _drain_until_closed(s)


HOSTILE_FRONTENDS: dict[str, Callable[[str, random.Random], None]] = {
    "garbage": hostile_garbage, "bad_requests": hostile_bad_requests,
    "ring_outside": hostile_ring_outside, "no_reads": hostile_no_reads,
}


def hostile_chain(g: SimGuest, rng: random.Random) -> str:
    """A malformed chain on the live guest's tx ring; the server returns it and goes on."""
    assert g.ram is not None
    kind = rng.choice(["outside", "straddles", "wrong_direction", "too_short", "zero_length",
                       "loop", "indirect_in_indirect"])
    scratch = g.ram.alloc(4096, 4096)
    edge = g.ram.size
    ring = g.rings[1]
    if kind == "outside":
        g.send_chain([(edge + 4096, 32, 0)])
    elif kind == "straddles":
        g.send_chain([(edge - 8, 32, 0)])
    elif kind == "wrong_direction":
        g.send_chain([(scratch, 512, VRING_DESC_F_WRITE)])
    elif kind == "too_short":
        g.send_chain([(scratch, 8, 0)])
    elif kind == "zero_length":
        g.send_chain([(scratch, 0, 0)])
    elif kind == "loop":
        with g._tx_lock:
            i = ring.free.pop()
            ring.write_desc(i, scratch, 4, VRING_DESC_F_NEXT, i)
            ring.chain_len[i] = 1
            ring.add_raw(i)
            g.tx_inflight[i] = -1
            if ring.publish():
                g.kick_queue(1)
    else:
        table = g.ram.mem[scratch : scratch + 16].view("<u8")
        table[0], table[1] = scratch, 16 | (VRING_DESC_F_INDIRECT << 32)
        g.send_chain([(scratch, 16, VRING_DESC_F_INDIRECT)])
    return kind


def hostile_avail_jump(g: SimGuest) -> None:
    """An avail index 1000 ahead of the ring: the server breaks that ring (only)."""
    ring = g.rings[1]
    with g._tx_lock:
        ring.avail[1] = (ring.avail_idx + 1000) & 0xFFFF
        g.kick_queue(1)


def hostile_second_frontend(path: str) -> None:
    """Another front-end while one is connected: refused at once."""
    s = _raw(path)
    _drain_until_closed(s)


# -- one socket's guest -------------------------------------------------------------------------


class SoakGuest(SimGuest):
    """A SimGuest that says when a driver rebind ends its session: by then every message
    of the old session is in the inboxes, and none of the new one yet."""

    def __init__(self, path: str, session_ended: Callable[[], None]) -> None:
        super().__init__(path)
        self.session_ended = session_ended

    def reset(self) -> None:
        self._stop_rx()
        self.session_ended()
        super().reset()


class Worker(threading.Thread):
    """Drives the guests of one socket until ``deadline``."""

    def __init__(self, index: int, path: str, bridge: BridgeClient, tally: Tally,
                 opts: argparse.Namespace, stop: threading.Event) -> None:
        super().__init__(name=f"guest{index}", daemon=True)
        self.index = index
        self.path = path
        self.bridge = bridge
        self.tally = tally
        self.opts = opts
        self.stop_event = stop
        self.rng = random.Random(opts.seed * 1000 + index)
        self.g: SimGuest | None = None
        self.source_next: int | None = None
        self.g2h_seq = 0
        self.h2g_seq = 0
        self.h2g_expect = 0
        now = time.monotonic()
        self.next_reconnect = now + self._jitter(opts.reconnect_every)
        self.next_hostile = now + self._jitter(opts.hostile_every)
        self.reconnect_kinds = ["close", "rebind", "crash"]
        self.hostile_kinds = [*HOSTILE_FRONTENDS, "chain", "avail_jump", "second_frontend"]

    def _jitter(self, every: float) -> float:
        return every * (0.5 + self.rng.random())

    # -- connections ---------------------------------------------------------------------

    def connect(self) -> SimGuest:
        """A fresh guest on the socket; retried while the server still holds the last one."""
        deadline = time.monotonic() + WAIT
        while True:
            g = SoakGuest(self.path, self._session_ended)
            for addr in (G_ECHO, G_BRIDGE, G_SOURCE):
                g.open(addr)
            try:
                g.start()
                g.wait_channel("rpmsg-raw", WAIT)
                break
            except (OSError, FrontendError, GuestTimeout) as e:
                g.disconnect()
                if time.monotonic() > deadline:
                    raise AssertionError(f"no guest could connect for {WAIT:.0f} s: "
                                         f"{e!r}") from e
                time.sleep(0.05)
        self.g = g
        self.tally.sessions += 1
        self.source_next = None
        return g

    def _session_ended(self) -> None:
        self.drain_source()
        self.source_next = None  # a new session: the old one's queued tail was dropped

    def guest(self) -> SimGuest:
        return self.g if self.g is not None else self.connect()

    def close(self) -> None:
        if self.g is not None:
            self.drain_source()
            self.g.close()
            self.g = None

    def crash(self) -> None:
        if self.g is not None:
            self.g.disconnect()
            self.g = None

    # -- steps ---------------------------------------------------------------------------

    def step(self) -> None:
        now = time.monotonic()
        if now >= self.next_hostile:
            self.hostile()
            self.next_hostile = time.monotonic() + self._jitter(self.opts.hostile_every)
        elif now >= self.next_reconnect:
            self.reconnect()
            self.next_reconnect = time.monotonic() + self._jitter(self.opts.reconnect_every)
        else:
            steps: list[Callable[[], None]] = [self.echo, self.echo, self.sink, self.g2h,
                                               self.h2g]
            self.rng.choice(steps)()
        self.drain_source()

    def echo(self, n: int | None = None, window: int = 16) -> None:
        g = self.guest()
        for _ in range(n if n is not None else self.rng.randint(20, 200) // window + 1):
            sent = [self.rng.randbytes(self.rng.randint(0, rp.MAX_PAYLOAD))
                    for _ in range(window)]
            for data in sent:
                g.send(G_ECHO, ECHO, data)
                self.tally.echo_sent += 1
            for k, data in enumerate(sent):
                try:
                    src, back = g.recv(G_ECHO, timeout=WAIT)
                except GuestTimeout:
                    self.tally.echo_missing += len(sent) - k
                    raise AssertionError(f"socket {self.index}: {len(sent) - k} echo "
                                         f"replies missing") from None
                if (src, back) == (ECHO, data):
                    self.tally.echo_ok += 1
                else:
                    self.tally.echo_bad += 1
                    self.tally.errors.append(f"socket {self.index}: echo of {len(data)} "
                                             f"bytes came back as {len(back)} from {src}")

    def sink(self, crash: bool = False) -> None:
        g = self.guest()
        size = self.rng.choice([0, 1, 16, 64, 256, 496, self.rng.randint(0, rp.MAX_PAYLOAD)])
        count = self.rng.randint(100, 4000)
        g.send_burst(G_SINK, SINK, bytes([size & 0xFF]) * size, count)
        self.tally.sink_sent += count
        self.tally.sink_bytes += count * size
        if crash:
            return
        self._all_returned(g)  # every message's buffer comes back: the server took them

    def g2h(self) -> None:
        g = self.guest()
        n = self.rng.randint(1, 32)
        for _ in range(n):
            g.send(G_BRIDGE, BRIDGE, _g2h_payload(self.g2h_seq, self.rng.randint(5, 496)))
            self.g2h_seq += 1
            self.tally.g2h_sent += 1
        if not self.bridge.wait_for(self.g2h_seq - 1, WAIT):
            # the datagrams not delivered are logged by the server; the verdict compares
            self.tally.errors.append(f"socket {self.index}: bridge datagram {self.g2h_seq - 1} "
                                     f"did not arrive in {WAIT:.0f} s")

    def h2g(self) -> None:
        g = self.guest()
        n = self.rng.randint(1, 32)
        for _ in range(n):
            self.bridge.send(_h2g_payload(self.h2g_seq, self.rng.randint(5, 496)))
            self.h2g_seq += 1
            self.tally.h2g_sent += 1
        while self.h2g_expect < self.h2g_seq:
            try:
                src, data = g.recv(G_BRIDGE, timeout=WAIT)
            except GuestTimeout:
                self.tally.h2g_missing += self.h2g_seq - self.h2g_expect
                self.h2g_expect = self.h2g_seq
                raise AssertionError(f"socket {self.index}: host->guest datagrams "
                                     "missing") from None
            seq = int.from_bytes(data[1:5], "little")
            if src != BRIDGE or seq != self.h2g_expect or data != _h2g_payload(seq, len(data)):
                self.tally.h2g_bad += 1
                self.tally.errors.append(f"socket {self.index}: host->guest datagram "
                                         f"{self.h2g_expect} came as {data[:8]!r} from {src}")
            else:
                self.tally.h2g_received += 1
            self.h2g_expect += 1

    def drain_source(self) -> None:
        """The source's messages so far: consecutive within this guest session."""
        g = self.g
        if g is None:
            return
        box = g.inbox[G_SOURCE]
        while not box.empty():
            src, data = box.get_nowait()
            seq = int.from_bytes(data[:4], "little")
            if src != SOURCE or len(data) != SOURCE_SIZE:
                self.tally.errors.append(f"socket {self.index}: source message {data[:8]!r}")
            elif self.source_next is not None and seq != self.source_next:
                self.tally.source_gaps += abs(seq - self.source_next)
                self.tally.errors.append(f"socket {self.index}: source seq {seq}, expected "
                                         f"{self.source_next}")
            self.source_next = seq + 1
            self.tally.source_received += 1

    # -- reconnects and hostile inputs ----------------------------------------------------

    def reconnect(self) -> None:
        kind = self.reconnect_kinds[sum(self.tally.reconnects.values()) %
                                    len(self.reconnect_kinds)]
        self.tally.reconnects[kind] += 1
        g = self.guest()
        if kind == "close":
            self.close()
        elif kind == "rebind":
            g.reset()  # _session_ended() runs between the two sessions
            g.wait_channel("rpmsg-raw", WAIT)
            self.tally.sessions += 1
            return
        else:
            # a crash in the middle of a flood, with echo requests outstanding
            window = self.rng.randint(1, 16)
            for _ in range(window):
                g.send(G_ECHO, ECHO, self.rng.randbytes(self.rng.randint(0, 496)))
            self.tally.echo_sent += window
            self.tally.echo_lost_in_crash += window
            self.sink(crash=True)
            lost = len(g.tx_inflight)  # not (yet) returned when the guest vanished
            self.crash()
            self.tally.crash_in_flight += lost
            if lost > TX_BUFS:
                self.tally.crash_over_bound += 1
        self.connect()

    def hostile(self) -> None:
        kind = self.rng.choice(self.hostile_kinds)
        self.tally.hostile[kind] += 1
        if kind in HOSTILE_FRONTENDS:
            self.close()
            HOSTILE_FRONTENDS[kind](self.path, self.rng)
            self.connect()
            self.echo(1, 4)  # the next correct guest is served
        elif kind == "chain":
            g = self.guest()
            # The chain takes a descriptor but no tx buffer: free every descriptor the
            # server returned first, and take the chain back before sending again.
            self._all_returned(g)
            self.tally.hostile[f"chain_{hostile_chain(g, self.rng)}"] += 1
            self._all_returned(g)
            self.echo(1, 4)
        elif kind == "avail_jump":
            g = self.guest()
            hostile_avail_jump(g)
            deadline = time.monotonic() + WAIT
            while not g.take_error(1):  # the server signals the broken ring
                if time.monotonic() > deadline:
                    raise AssertionError(f"socket {self.index}: no error notification "
                                         "for a broken ring")
                time.sleep(0.005)
            self.crash()  # a broken ring stays broken until set up again
            self.connect()
            self.echo(1, 4)
        else:
            self.guest()
            hostile_second_frontend(self.path)
            self.echo(1, 4)  # the connected guest is still served

    def _all_returned(self, g: SimGuest) -> None:
        """Until the server has given back every tx buffer and every hostile chain."""
        deadline = time.monotonic() + WAIT
        while g.reclaim() < TX_BUFS or g.tx_inflight:
            if time.monotonic() > deadline:
                self.tally.sink_unreturned += len(g.tx_inflight)
                raise AssertionError(f"socket {self.index}: {len(g.tx_inflight)} tx "
                                     "chains not returned")
            time.sleep(0.001)

    def run(self) -> None:
        while not self.stop_event.is_set():
            try:
                self.step()
            except Exception as e:
                self.tally.errors.append(f"socket {self.index}: {e!r}\n"
                                         f"{traceback.format_exc(limit=4)}")
                self.crash()
                if len(self.tally.errors) > 20:
                    self.stop_event.set()
        with contextlib.suppress(Exception):
            self.close()


# -- the run ------------------------------------------------------------------------------------


def _series(samples: Sequence[Sample], key: str) -> dict[str, int]:
    values = [int(getattr(s, key)) for s in samples]
    return {"first": values[0], "max": max(values), "last": values[-1]} if values else {}


def _slope_kib_per_min(samples: Sequence[Sample]) -> float:
    if len(samples) < 3:
        return 0.0
    t = np.array([s.t for s in samples])
    y = np.array([s.rss_kib for s in samples], dtype=float)
    return float(np.polyfit(t, y, 1)[0] * 60)


def run(opts: argparse.Namespace) -> dict[str, Any]:
    """The soak; its report (``report["failures"]`` empty when it passed).

    The work directory (sockets, the server's log) is kept when the soak fails, and
    named in the report.
    """
    limits = Limits(opts.warmup, int(opts.rss_tolerance_mib * 1024), opts.fd_tolerance)
    report: dict[str, Any] = {"options": dict(vars(opts))}
    work = Path(opts.workdir) if opts.workdir else \
        Path(tempfile.mkdtemp(prefix="vhost-rpmsg-soak-"))
    work.mkdir(parents=True, exist_ok=True)
    server = ServerProcess(work, opts.sockets, opts.engine, opts.echo_plugin,
                           opts.serve_arg or [])
    tallies = [Tally() for _ in range(opts.sockets)]
    bridges: list[BridgeClient] = []
    samples: list[Sample] = []
    stop = threading.Event()
    workers: list[Worker] = []
    idle_fds = (0, 0)
    servers: list[dict[str, Any]] | None = None
    t0 = time.monotonic()
    try:
        bridges = [BridgeClient(p, t) for p, t in zip(server.bridges, tallies, strict=True)]
        workers = [Worker(i, p, b, t, opts, stop) for i, (p, b, t) in
                   enumerate(zip(server.paths, bridges, tallies, strict=True))]
        # A first round: every socket once connected (its bridge accepted), then idle.
        for w in workers:
            w.echo(1, 4)
            w.close()
        time.sleep(1.0)
        idle_start = server.sample(0).fds
        t0 = time.monotonic()
        for w in workers:
            w.start()
        next_sample = next_progress = t0
        while time.monotonic() - t0 < opts.duration and not stop.is_set():
            now = time.monotonic()
            if not server.alive:
                tallies[0].errors.append(f"the server died (status {server.proc.poll()})")
                break
            if now >= next_sample:
                samples.append(server.sample(now - t0))
                next_sample += opts.sample_every
            if now >= next_progress and opts.progress:
                _progress(now - t0, samples, tallies)
                next_progress += opts.progress
            time.sleep(min(0.2, max(0.0, next_sample - time.monotonic())))
        stop.set()
        for w in workers:
            w.join(WAIT * 3)
            if w.is_alive():
                tallies[w.index].errors.append(f"socket {w.index}: its guest did not stop")
        if server.alive:
            time.sleep(1.0)  # the last disconnections handled
            samples.append(server.sample(time.monotonic() - t0))
            idle_fds = (idle_start, samples[-1].fds)
            report["server_cpu_s"] = round(server.cpu_seconds(), 1)
            servers = server.stats()
    except Exception as e:
        tallies[0].errors.append(f"the soak could not go on: {e!r}\n"
                                 f"{traceback.format_exc(limit=6)}")
    finally:
        stop.set()
        for b in bridges:
            b.close()
        rc = server.stop()
    elapsed = time.monotonic() - t0
    log_counts = server.log_counts()
    failures = verdict(samples, idle_fds, tallies, log_counts, rc, limits, servers)
    after = [s for s in samples if s.t >= opts.warmup]
    total = Counter[str]()
    reconnects: Counter[str] = Counter()
    hostile: Counter[str] = Counter()
    for t in tallies:
        total.update({k: v for k, v in asdict(t).items() if isinstance(v, int)})
        reconnects.update(t.reconnects)
        hostile.update(t.hostile)
    report.update({
        "elapsed_s": round(elapsed, 1),
        "sockets": opts.sockets,
        "limits": asdict(limits),
        "rss_kib": _series(samples, "rss_kib"),
        "rss_kib_after_warmup": _series(after, "rss_kib"),
        "rss_slope_kib_per_min_after_warmup": round(_slope_kib_per_min(after), 1),
        "fds": _series(samples, "fds"),
        "idle_fds_start_end": list(idle_fds),
        "messages": dict(total),
        "messages_total": total["echo_sent"] * 2 + total["sink_sent"] + total["g2h_sent"]
        + total["h2g_sent"] + total["source_received"],
        "reconnects": dict(reconnects),
        "hostile": dict(hostile),
        "server_log": log_counts,
        "server_counts": server_accounts(servers, tallies)[1] if servers else None,
        "server_exit": rc,
        "samples": [asdict(s) for s in samples],
        "failures": failures,
    })
    if failures:
        report["workdir"] = str(work)
        report["server_log_tail"] = server.log.read_text(errors="replace")[-3000:]
    elif not opts.workdir:
        shutil.rmtree(work, ignore_errors=True)
    return report


def _progress(t: float, samples: Sequence[Sample], tallies: Sequence[Tally]) -> None:
    s = samples[-1] if samples else None
    echo = sum(x.echo_ok for x in tallies)
    sink = sum(x.sink_sent for x in tallies)
    errors = sum(len(x.errors) for x in tallies)
    rss = f"rss {s.rss_kib} KiB fds {s.fds}" if s else ""
    print(f"soak [{t:7.1f} s] {rss} echo {echo} sink {sink} "
          f"sessions {sum(x.sessions for x in tallies)} errors {errors}",
          file=sys.stderr, flush=True)


def _summary(report: dict[str, Any]) -> str:
    m = report["messages"]
    lines = [
        f"soak: {report['elapsed_s']} s, {report['sockets']} socket(s), engine "
        f"{report['options']['engine']}; server CPU {report.get('server_cpu_s', '?')} s",
        f"  RSS KiB   first/max/last {_fml(report['rss_kib'])}; after warm-up "
        f"{_fml(report['rss_kib_after_warmup'])}, slope "
        f"{report['rss_slope_kib_per_min_after_warmup']} KiB/min "
        f"(tolerance {report['limits']['rss_tolerance_kib']} KiB)",
        f"  open fds  first/max/last {_fml(report['fds'])}; idle start/end "
        f"{report['idle_fds_start_end']} (tolerance {report['limits']['fd_tolerance']})",
        f"  messages  {report['messages_total']} in all",
        f"  echo      sent {m['echo_sent']} = ok {m['echo_ok']} + lost in crashes "
        f"{m['echo_lost_in_crash']} + bad {m['echo_bad']} + missing {m['echo_missing']}",
        f"  sink      sent {m['sink_sent']} ({m['sink_bytes']} bytes); buffers never "
        f"returned {m['sink_unreturned']}; in flight at crashes (echo and sink) "
        f"{m['crash_in_flight']}",
        f"  bridge    guest->host sent {m['g2h_sent']} received {m['g2h_received']}; "
        f"host->guest sent {m['h2g_sent']} received {m['h2g_received']}",
        f"  source    received {m['source_received']}, gaps inside a session "
        f"{m['source_gaps']}; dropped at session ends (server log) "
        f"{report['server_log'].get('dropped_on_reset', 0)}",
        f"  sessions  {m['sessions']}; reconnects {report['reconnects']}",
        f"  server    counters per socket (control socket): "
        f"{report['server_counts'] if report['server_counts'] else 'none (no control socket)'}",
        f"  hostile   {report['hostile']}",
        f"  server    exit {report['server_exit']}; log "
        f"{ {k: v for k, v in report['server_log'].items() if k != 'lines'} }",
    ]
    failures = report["failures"]
    if failures:
        lines.append(f"  kept      {report['workdir']} (the server's log: server.log)")
    lines.append("PASS" if not failures else "FAIL:\n  " + "\n  ".join(failures))
    return "\n".join(lines)


def _fml(series: dict[str, int]) -> str:
    return f"{series.get('first')}/{series.get('max')}/{series.get('last')}" if series else "-"


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m vhost_rpmsg.soak", description=(
        __doc__ or "").split("\n\n")[0])
    p.add_argument("--duration", type=float, default=60.0, help="seconds of traffic")
    p.add_argument("--sockets", type=int, default=3, help="guests, one socket each")
    p.add_argument("--warmup", type=float, default=None,
                   help="seconds before RSS growth counts (default: a quarter of the "
                        "duration, at most 120)")
    p.add_argument("--sample-every", type=float, default=2.0,
                   help="seconds between RSS/fd samples")
    p.add_argument("--reconnect-every", type=float, default=4.0,
                   help="mean seconds between reconnects of one guest")
    p.add_argument("--hostile-every", type=float, default=6.0,
                   help="mean seconds between hostile inputs on one socket")
    p.add_argument("--rss-tolerance-mib", type=float, default=16.0,
                   help="RSS growth after the warm-up that still passes")
    p.add_argument("--fd-tolerance", type=int, default=0,
                   help="idle open-fd growth that still passes")
    p.add_argument("--engine", default="auto", help="the server's ring engine")
    p.add_argument("--echo-plugin", default="echo",
                   help="plugin behind the echo endpoint (to soak a plugin of your own)")
    p.add_argument("--serve-arg", action="append", help="extra argument for serve")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--json", help="write the full report (with every sample) here")
    p.add_argument("--workdir", help="keep sockets and the server log here")
    p.add_argument("--progress", type=float, default=30.0,
                   help="seconds between progress lines on stderr (0: none)")
    opts = p.parse_args(list(argv))
    if opts.sockets < 1 or opts.duration <= 0:
        p.error("--sockets must be >= 1 and --duration > 0")
    if opts.warmup is None:
        opts.warmup = min(opts.duration / 4, 120.0)
    return opts


def main(argv: Sequence[str] | None = None) -> int:
    """Run the soak; 0 if it passed, 1 if not (the report says why)."""
    opts = parse_args(sys.argv[1:] if argv is None else argv)
    report = run(opts)
    if opts.json:
        Path(opts.json).write_text(json.dumps(report, indent=1))
    print(_summary(report))
    return 1 if report["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
