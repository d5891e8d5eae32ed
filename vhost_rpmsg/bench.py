"""``vhost-rpmsg bench``: throughput and latency, server and simulated guest in separate
processes, each engine side by side with floors measured in the same run.

Cases, per engine:
  * ``sink S``   guest → host: the guest sends N messages of S bytes to a sink endpoint
    as fast as it can; a final sync round trip proves the host handled them all.
  * ``source S`` host → guest: a control message asks the host to send N messages of S
    bytes as fast as the guest takes them; timed until the guest has counted them all.
  * ``zero-copy sink S``  the sink case with the sink taking the messages in guest
    memory (``Endpoint.zero_copy``): no copy out of the ring.
  * ``echo``     round trips of 16-byte messages to an echo endpoint: p50 / p99.
  * ``fd sink S`` / ``fd source S``  the same traffic through an fd endpoint from the
    control socket, held by a C program (vhost_rpmsg/cdata/bench_fd_peer.c, compiled at run time):
    what a process outside the server gets, next to the in-process endpoints.
  * ``control open+close``  an fd endpoint opened and closed through the control
    socket, timed until the guest has seen its announcement and its withdrawal.
Floors: a bare memcpy of the same bytes (numpy, one bulk copy), the same datagrams
through a bare SOCK_SEQPACKET socketpair (the fastest an fd endpoint's process could
be fed) and an eventfd ping-pong between two processes (the least any cross-process
round trip costs).
With ``pin``, server and guest (and the two ping-pong processes) run on different CPUs;
by default the scheduler places them, as it would in use.
Backend and guest CPU shares come from the kernel's per-process CPU clocks (CPU time
of all threads over the case's wall time, so 1.0 is one core busy);
the backend's peak RSS from its VmHWM.
"""

from __future__ import annotations

import itertools
import json
import math
import multiprocessing as mp
import os
import queue
import select
import shlex
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

try:  # typer 0.2x carries its own copy of click (the CLI's one-line errors catch it)
    from typer import _click as click
except ImportError:  # older typer: click itself
    import click  # type: ignore[no-redef]

from .endpoints.base import Endpoint
from .endpoints.builtin import Echo, Sink
from .endpoints.peer import PEER_QUEUE_LIMIT

if TYPE_CHECKING:
    from .client import EndpointSocket
    from .guest import SimGuest

SINK, ECHO, CTL = 1024, 1025, 1026
GUEST_ADDR = 2000
#: the C holder of the fd cases, built with the system compiler at run time
PEER_SOURCE = Path(__file__).resolve().parent / "cdata" / "bench_fd_peer.c"
#: fd sink: the C sink acknowledges every FD_ACK messages and the guest keeps at most
#: FD_WINDOW unacknowledged.  The server queues PEER_QUEUE_LIMIT messages for a reader
#: that falls behind, beyond its socket buffer (which holds over 100 even of 496 bytes),
#: and drops the rest, by design: an unbounded burst outruns a reader the scheduler
#: holds back (seen on this machine: 4,473 of 50,000 arrived).  So the window is that
#: limit, and the rate where the holder waits is about window / its wake-up latency.
FD_WINDOW, FD_ACK = PEER_QUEUE_LIMIT, 128
#: the fd cases move this share of --messages: each message costs a system call and
#: usually a wake-up of the holder, so they are several times slower, and their rate
#: (what is compared) needs no more messages to be steady
FD_SHARE = 8
CONTROL_CASE = "control open+close"


@dataclass(frozen=True)
class Target:
    """A goal for one figure of :meth:`Report.figures`, and where it was set."""

    figure: str
    what: str
    op: str  # ">=" or "<="
    goal: float
    unit: str  # "x" for a ratio
    source: str

    def met(self, value: float) -> bool:
        return value >= self.goal if self.op == ">=" else value <= self.goal


PERF_DOC = "docs/performance.md"
PERF_ISSUE = "issue 13"
CONTROL_ISSUE = "issue 10"
#: Every target the project has set, in one place: the figure, its goal, its source.
#: Figures come from the cffi engine where it ran (python otherwise), all within one run.
TARGETS: tuple[Target, ...] = (
    Target("sink16_cffi_over_python", "sink 16 B: cffi / python message rate", ">=", 20,
           "x", PERF_DOC),
    Target("sink496_over_memcpy", "sink 496 B / memcpy floor message rate", ">=", 0.10,
           "x", PERF_DOC),
    Target("sink496_over_memcpy", "sink 496 B / memcpy floor message rate", ">=", 0.8,
           "x", PERF_ISSUE),
    Target("zc_sink496_over_memcpy", "zero-copy sink 496 B / memcpy floor message rate",
           ">=", 0.8, "x", PERF_ISSUE),
    Target("source496_over_sink496", "source 496 B / sink 496 B message rate", ">=", 0.25,
           "x", PERF_ISSUE),
    Target("echo_p50_over_pingpong", "echo p50 / eventfd ping-pong p50", "<=", 2.0, "x",
           PERF_DOC),
    Target("backend_cpu_per_echo_us", "backend CPU per echo round trip", "<=", 10, "µs",
           PERF_ISSUE),
    Target("backend_peak_rss_mb", "backend peak RSS (largest engine)", "<=", 80, "MB",
           PERF_DOC),
    Target("fd_sink16_over_sink16", "fd sink 16 B / in-process sink 16 B", ">=", 0.25, "x",
           CONTROL_ISSUE),
    Target("fd_sink496_over_sink496", "fd sink 496 B / in-process sink 496 B", ">=", 0.25,
           "x", CONTROL_ISSUE),
    Target("fd_source16_over_source16", "fd source 16 B / in-process source 16 B", ">=", 0.25, "x",
           CONTROL_ISSUE),
    Target("fd_source496_over_source496", "fd source 496 B / in-process source 496 B", ">=", 0.25,
           "x", CONTROL_ISSUE),
    Target("control_open_close_us", "control open+close per pair, seen by guest", "<=", 100,
           "µs", CONTROL_ISSUE),
)


class BenchError(click.ClickException):
    """The bench cannot run here (no C compiler, no source tree): one ``error:`` line
    from the CLI, like its other refusals."""


def _sig3(value: float) -> str:
    """Three significant digits, trailing zeros kept: 1.41, 19.7, 118, 0.142."""
    if value == 0 or not math.isfinite(value):
        return f"{value:g}"
    return f"{value:.{max(0, 2 - math.floor(math.log10(abs(value))))}f}"


def human(value: float, unit: str) -> str:
    """``value`` in ``unit`` as a person reads it: 1.41 G msgs/s, 69.0 µs, 42.9 MB, 2.80x."""
    if unit == "x":
        return f"{_sig3(value)}x"
    if unit == "msgs/s":
        for scale, prefix in ((1e9, "G "), (1e6, "M "), (1e3, "k "), (0, "")):
            if abs(value) >= scale:
                return f"{_sig3(value / (scale or 1))} {prefix}msgs/s"
    return f"{value:.1f} {unit}"


def floor_unit(key: str) -> str:
    """The unit of a floor, from its name in :attr:`Report.floors`."""
    return "msgs/s" if key.endswith("_msgs_per_s") else "µs" if key.endswith("_us") else ""


def spread(rates: list[float], median: float) -> float:
    """(fastest - slowest) / median over the runs' rates: 0 with one run."""
    if len(rates) < 2 or not median:
        return 0.0
    return (max(rates) - min(rates)) / median


@dataclass
class Case:
    name: str
    engine: str
    size: int
    messages: int
    seconds: float
    backend_cpu: float  # fraction of one core
    guest_cpu: float
    p50_us: float | None = None
    p99_us: float | None = None
    #: msgs/s of every run of the case, in run order; the fields above are the median
    #: run's (by rate), latencies are over all runs
    rates: list[float] = field(default_factory=list)

    @property
    def spread(self) -> float:
        return spread(self.rates, self.msgs_per_s)

    @property
    def msgs_per_s(self) -> float:
        return self.messages / self.seconds if self.seconds else 0.0

    @property
    def mb_per_s(self) -> float:
        return self.msgs_per_s * self.size / 1e6


@dataclass
class Report:
    cases: list[Case] = field(default_factory=list)
    floors: dict[str, float] = field(default_factory=dict)
    backend_peak_rss_mb: dict[str, float] = field(default_factory=dict)
    machine: dict[str, Any] = field(default_factory=dict)

    def find(self, name: str, engine: str, size: int | None = None) -> Case | None:
        for c in self.cases:
            if c.name == name and c.engine == engine and (size is None or c.size == size):
                return c
        return None

    def ratios(self) -> dict[str, float]:
        """Ratios within this run: those the targets are stated in, and the fd sink's
        ceiling (the SOCK_SEQPACKET floor over the in-process sink)."""
        out: dict[str, float] = {}
        cf, py = self.find("sink", "cffi", 16), self.find("sink", "python", 16)
        if cf and py and py.msgs_per_s:
            out["sink16_cffi_over_python"] = cf.msgs_per_s / py.msgs_per_s
        s496 = self.find("sink", "cffi", 496) or self.find("sink", "python", 496)
        if s496 and self.floors.get("memcpy496_msgs_per_s"):
            out["sink496_over_memcpy"] = s496.msgs_per_s / self.floors["memcpy496_msgs_per_s"]
        zc = self.find("zero-copy sink", "cffi", 496) or self.find("zero-copy sink", "python",
                                                                    496)
        if zc and self.floors.get("memcpy496_msgs_per_s"):
            out["zc_sink496_over_memcpy"] = zc.msgs_per_s / self.floors["memcpy496_msgs_per_s"]
        echo = self.find("echo", "cffi") or self.find("echo", "python")
        if echo and echo.p50_us and self.floors.get("eventfd_pingpong_p50_us"):
            out["echo_p50_over_pingpong"] = echo.p50_us / self.floors["eventfd_pingpong_p50_us"]
        if s496:
            src = self.find("source", s496.engine, 496)
            if src and s496.msgs_per_s:
                out["source496_over_sink496"] = src.msgs_per_s / s496.msgs_per_s
        for kind in ("sink", "source"):  # fd endpoint / in-process, per size
            for size in sorted({c.size for c in self.cases if c.name == f"fd {kind}"}):
                fd = self.find(f"fd {kind}", "cffi", size) or self.find(f"fd {kind}",
                                                                       "python", size)
                base = self.find(kind, fd.engine, size) if fd else None
                if fd and base and base.msgs_per_s:
                    out[f"fd_{kind}{size}_over_{kind}{size}"] = fd.msgs_per_s / base.msgs_per_s
        for size in sorted({c.size for c in self.cases if c.name == "fd sink"}):
            # the transport alone: the best fd sink / sink any back-end could reach here
            wire = self.floors.get(f"seqpacket{size}_msgs_per_s")
            base = self.find("sink", "cffi", size) or self.find("sink", "python", size)
            if wire and base and base.msgs_per_s:
                out[f"seqpacket{size}_over_sink{size}"] = wire / base.msgs_per_s
        return out

    def figures(self) -> dict[str, float]:
        """Every figure a target is stated in: the ratios, and two absolute ones."""
        out = self.ratios()
        echo = self.find("echo", "cffi") or self.find("echo", "python")
        if echo and echo.messages:
            out["backend_cpu_per_echo_us"] = echo.backend_cpu * echo.seconds / echo.messages * 1e6
        if self.backend_peak_rss_mb:
            out["backend_peak_rss_mb"] = max(self.backend_peak_rss_mb.values())
        ctl = self.find(CONTROL_CASE, "cffi") or self.find(CONTROL_CASE, "python")
        if ctl and ctl.messages:
            out["control_open_close_us"] = ctl.seconds / ctl.messages * 1e6
        return out

    def targets(self) -> list[dict[str, Any]]:
        """Each target with this run's value and whether it was met (None: not measured,
        e.g. with --sizes lacking 496 or --engines lacking one of a pair)."""
        figures = self.figures()
        out = []
        for t in TARGETS:
            value = figures.get(t.figure)
            out.append(asdict(t) | {"value": value,
                                    "met": None if value is None else t.met(value)})
        return out

    def as_json(self) -> dict[str, Any]:
        return {
            "cases": [asdict(c) | {"msgs_per_s": c.msgs_per_s, "mb_per_s": c.mb_per_s,
                                   "spread": c.spread} for c in self.cases],
            "floors": self.floors,
            "backend_peak_rss_mb": self.backend_peak_rss_mb,
            "ratios": self.ratios(),
            "figures": self.figures(),
            "targets": self.targets(),
            "machine": self.machine,
        }


# -------------------------------------------------------------------- server process


#: messages the bench's source hands over per send_many
SOURCE_BURST = 64


class BenchControl(Endpoint):
    """Commands from the benchmarking guest: ``sync``, ``src:N:SIZE:DST`` and ``zc:1`` /
    ``zc:0`` (the sink registered again with or without zero-copy receive)."""

    def __init__(self, addr: int, sink: Sink) -> None:
        super().__init__(addr)
        self.sink = sink
        self.device: Any = None  # the RpmsgDevice, set once it exists

    def on_message(self, src: int, data: bytes) -> None:
        import asyncio

        assert self.port is not None
        if data == b"sync":
            self.port.send(src, b"sync:%d" % self.sink.messages)
        elif data.startswith(b"zc:"):
            self.device.remove_endpoint(self.sink.addr)
            self.sink.zero_copy = data == b"zc:1"
            self.device.add_endpoint(self.sink)
            self.port.send(src, b"zc:ok")
        elif data.startswith(b"src:"):
            _, n, size, dst = data.split(b":")
            asyncio.get_running_loop().create_task(self._source(int(n), int(size), int(dst)))

    async def _source(self, n: int, size: int, dst: int) -> None:
        assert self.port is not None
        payload = bytes(size)
        port = self.port
        sent = 0
        while sent < n:
            # The batch API: one pass over the rx ring and one notification per burst.
            k = min(SOURCE_BURST, n - sent)
            try:
                port.send_many([(dst, payload)] * k)
            except BlockingIOError:  # the outbox is full: wait for the guest to read
                await port.asend(dst, payload)
                k = 1
            sent += k


def _pin(cpu: int | None) -> None:
    """Keep this process on one CPU, so server and guest do not share (and preempt)
    one core: each wake-up would otherwise run the woken side before the waker resumes."""
    if cpu is not None:
        os.sched_setaffinity(0, {cpu})


def _cpus(pin: bool) -> tuple[int | None, int | None]:
    """(server CPU, guest CPU): two different ones where asked and available."""
    avail = sorted(os.sched_getaffinity(0))
    return (avail[0], avail[1]) if pin and len(avail) >= 2 else (None, None)


def _server_main(path: str | list[str], engine: str, ready: Any,
                 cpu: int | None = None) -> None:
    """One server process on one socket per path (as ``serve --socket-count``), each
    with its own device: sink, echo and bench control; the control socket on the first."""
    import asyncio
    import signal

    from .control.server import ControlServer, default_path
    from .rpmsg.device import RpmsgDevice
    from .vhost_user.server import VhostUserServer, listen_unix
    from .virtio.engines import queue_factory

    _pin(cpu)
    paths = [path] if isinstance(path, str) else path
    servers = []
    for p in paths:
        sink = Sink(SINK)
        control_ep = BenchControl(CTL, sink)
        device = RpmsgDevice([sink, Echo(ECHO), control_ep], outbox_limit=1024)
        control_ep.device = device
        servers.append(VhostUserServer(device, listen_unix(p),
                                       queue_factory=queue_factory(engine)))
    control = ControlServer(default_path(paths[0]), servers)  # as serve runs it: same loop

    async def main() -> None:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        for server in servers:
            server.start(loop)
        control.start()
        ready.set()
        await stop.wait()
        control.close()
        for server in servers:
            server.close()

    asyncio.run(main())


# -------------------------------------------------------------------- guest process


def _cpu_seconds(pid: int | None = None) -> float:
    """CPU time so far of every thread of process ``pid`` (default: this one).

    Read from the kernel's per-process CPU clock, which brings a running thread's
    runtime up to date before answering.  /proc/PID/task/*/schedstat does not: a thread
    that is on a CPU shows the runtime of its last scheduler event, so over a case of
    well under a millisecond it could report more CPU than the machine has.  Neither is
    exact at that scale on this project's VMs: the clock read here can still jump by
    about a scheduler tick, so shares of cases much shorter than 100 ms are rough.
    """
    if pid is None:
        return time.process_time()
    # clock_getcpuclockid(pid): CPUCLOCK_SCHED (2) of the whole process, as the kernel
    # encodes it (include/linux/posix-timers_types.h: ~pid << 3, thread bit clear).
    return time.clock_gettime((~pid << 3) | 2)


def _peak_rss_mb(pid: int, field: str = "VmHWM") -> float:
    """The peak RSS of ``pid`` in MB (``field="VmRSS"``: the current one)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) / 1024
    return 0.0


def _percentiles(lat: list[float]) -> dict[str, float]:
    """p50 / p99 in µs of latencies in seconds."""
    lat = sorted(lat)
    return {"p50_us": lat[len(lat) // 2] * 1e6,
            "p99_us": lat[min(len(lat) - 1, int(len(lat) * 0.99))] * 1e6}


def _hold(peer: str, ep: EndpointSocket, *args: str) -> subprocess.Popen[bytes]:
    """The C holder of ``ep`` (vhost_rpmsg/cdata/bench_fd_peer.c), running ``args``; our copy of the
    fd is closed, so the endpoint lives exactly as long as the holder."""
    fd = ep.fileno()
    proc = subprocess.Popen([peer, "-f", str(fd), *args], pass_fds=(fd,),
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    ep.close()
    return proc


def _finish(proc: subprocess.Popen[bytes], what: str, messages: int) -> None:
    """Wait for a holder (closing its stdin ends a source); it must have moved them all."""
    out, _ = proc.communicate(timeout=60)
    words = out.split()
    if proc.returncode != 0 or not words or int(words[0]) != messages:
        raise RuntimeError(f"bench: the C {what} holder moved {out.decode().strip() or '?'} "
                           f"of {messages} messages (exit status {proc.returncode})")


#: a case's run, and what follows it untimed (a holder's exit)
Run = tuple[Callable[[], None], Callable[[], None]]


def _nothing() -> None:
    pass


def _send_windowed(g: SimGuest, src: int, dst: int, payload: bytes, n: int) -> None:
    """Send ``n`` messages to the fd sink at ``dst``, at most FD_WINDOW of them not yet
    acknowledged (its acknowledgements come to ``src``, a counting address); return
    once it has acknowledged the last."""
    base = g.counted(src)[0]
    acks = -(-n // FD_ACK)
    sent = 0
    while sent < n:
        got = g.counted(src)[0] - base
        room = FD_WINDOW - (sent - got * FD_ACK)
        if room <= 0:
            g.wait_counted(src, base + got + 1, timeout=60)
            continue
        burst = min(room, n - sent)
        g.send_burst(src, dst, payload, burst)
        sent += burst
    g.wait_counted(src, base + acks, timeout=60)


def _wait_ns(g: SimGuest, addr: int, flags: Any, timeout: float = 30.0) -> None:
    """Drive the guest's rx ring until a name-service message ``flags`` for ``addr``
    has arrived (the guest of the bench has no rx thread)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            ns = g.ns_events.get_nowait()
        except queue.Empty:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"bench: no name-service {flags.name} for {addr} in "
                                   f"{timeout} s") from None
            g._rx_poll(left)
            continue
        if ns.addr == addr and ns.flags is flags:
            return


#: a case runs at least REPEATS times and until its runs add up to MIN_SECONDS; the
#: median run is reported with the spread (one short run on this VM can be off 2x)
REPEATS, MIN_SECONDS, MAX_RUNS = 3, 0.5, 50


@dataclass(frozen=True)
class Repeat:
    """How often each case runs: ``runs`` at least, ``seconds`` in all at least."""

    runs: int = REPEATS
    seconds: float = MIN_SECONDS

    def more(self, done: int, seconds: float) -> bool:
        """Whether a case that ran ``done`` times, ``seconds`` in all, runs again."""
        return done < MAX_RUNS and (done < self.runs or seconds < self.seconds)


DEFAULT_REPEAT = Repeat()


def median_index(rates: list[float]) -> int:
    """The run to report: the median by rate, the slower middle one of an even count."""
    return sorted(range(len(rates)), key=rates.__getitem__)[(len(rates) - 1) // 2]


def stop_process(proc: Any, terminate: bool = True) -> None:
    """End a multiprocessing child: SIGTERM (or none, for one ending by itself), up to
    10 s, then SIGKILL; one left running would skew what is measured next."""
    if terminate:
        proc.terminate()
    proc.join(10)
    if proc.is_alive():
        proc.kill()
        proc.join()


def _median_run(name: str, engine: str, size: int, runs: list[dict[str, Any]]
                ) -> dict[str, Any]:
    """A case's result: its median run by rate, with every run's rate."""
    rates = [r["messages"] / r["seconds"] for r in runs]
    return dict(runs[median_index(rates)], name=name, engine=engine, size=size, rates=rates)


def _guest_main(path: str, server_pid: int, engine: str, sizes: list[int], messages: int,
                samples: int, peer: str, out: Any, cpu: int | None = None,
                repeat: Repeat = DEFAULT_REPEAT) -> None:
    from .client import Control
    from .control.server import default_path
    from .guest import SimGuest
    from .rpmsg.codec import NsFlags

    _pin(cpu)
    results: list[dict[str, Any]] = []
    fd_messages = max(1, messages // FD_SHARE)
    with SimGuest(path, rx_thread=False) as g, Control(default_path(path)) as ctl:
        g.open(GUEST_ADDR)
        g.open_counter(GUEST_ADDR + 1)
        acks, fd_dst = GUEST_ADDR + 2, GUEST_ADDR + 3
        g.open_counter(acks)
        g.open_counter(fd_dst)

        def sync() -> int:
            g.send(GUEST_ADDR, CTL, b"sync")
            _, reply = g.recv(GUEST_ADDR, timeout=60)
            return int(reply.split(b":")[1])

        def measure(name: str, size: int, n: int, setup: Callable[[], Run]) -> None:
            """Time ``n`` messages, ``repeat`` times over: ``setup()`` (untimed) gives
            the run and what to do after it (also untimed)."""
            out.send(("case", name, size))  # progress, before the timed windows
            runs: list[dict[str, Any]] = []
            total = 0.0
            while repeat.more(len(runs), total):
                run, after = setup()
                # The wall-clock window encloses both CPU readings, so no share can
                # exceed the cores the processes could run on.
                t0 = time.perf_counter()
                b0, g0 = _cpu_seconds(server_pid), _cpu_seconds()
                run()
                b1, g1 = _cpu_seconds(server_pid), _cpu_seconds()
                wall = time.perf_counter() - t0
                after()
                total += wall
                runs.append(dict(messages=n, seconds=wall, backend_cpu=(b1 - b0) / wall,
                                 guest_cpu=(g1 - g0) / wall))
            results.append(_median_run(name, engine, size, runs))

        sync()  # warm up the path
        for size in sizes:
            payload = bytes(size)

            def sink_run(payload: bytes = payload) -> Run:
                before = sync()

                def to_sink() -> None:
                    g.send_burst(GUEST_ADDR, SINK, payload, messages)
                    assert sync() == before + messages

                return to_sink, _nothing

            measure("sink", size, messages, sink_run)

            def zero_copy(on: bool) -> None:
                g.send(GUEST_ADDR, CTL, b"zc:1" if on else b"zc:0")
                assert g.recv(GUEST_ADDR, timeout=60) == (CTL, b"zc:ok")

            def zc_sink_run(payload: bytes = payload) -> Run:
                zero_copy(True)
                to_sink, _ = sink_run(payload)
                return to_sink, lambda: zero_copy(False)

            measure("zero-copy sink", size, messages, zc_sink_run)

            def fd_sink_run(payload: bytes = payload) -> Run:
                ep = ctl.open_endpoint()  # no name: nothing announced
                holder = _hold(peer, ep, "sink", str(fd_messages), str(FD_ACK))

                def to_fd() -> None:
                    _send_windowed(g, acks, ep.addr, payload, fd_messages)

                return to_fd, lambda: _finish(holder, "sink", fd_messages)

            measure("fd sink", size, fd_messages, fd_sink_run)
        for size in sizes:

            def source_run(size: int = size) -> Run:
                start = g.counted(GUEST_ADDR + 1)[0]

                def from_source() -> None:
                    g.send(GUEST_ADDR + 1, CTL, b"src:%d:%d:%d" % (messages, size,
                                                                   GUEST_ADDR + 1))
                    g.wait_counted(GUEST_ADDR + 1, start + messages, timeout=120)

                return from_source, _nothing

            measure("source", size, messages, source_run)

            def fd_source_run(size: int = size) -> Run:
                holder = _hold(peer, ctl.open_endpoint(dst=fd_dst), "source",
                               str(fd_messages), str(size))
                start = g.counted(fd_dst)[0]

                def from_fd() -> None:
                    assert holder.stdin is not None
                    holder.stdin.write(b"g")  # the start signal
                    holder.stdin.flush()
                    g.wait_counted(fd_dst, start + fd_messages, timeout=120)

                return from_fd, lambda: _finish(holder, "source", fd_messages)

            measure("fd source", size, fd_messages, fd_source_run)
        lat: list[float] = []

        def echo() -> None:
            payload = bytes(16)
            for _ in range(samples):
                t0 = time.perf_counter()
                g.send(GUEST_ADDR, ECHO, payload)
                g.recv(GUEST_ADDR)
                lat.append(time.perf_counter() - t0)

        measure("echo", 16, samples, lambda: (echo, _nothing))
        results[-1].update(_percentiles(lat))
        pairs = max(50, min(samples // 5, 1000))
        lat = []

        def open_close() -> None:
            for _ in range(pairs):
                t0 = time.perf_counter()
                ep = ctl.open_endpoint("bench-ctl")
                _wait_ns(g, ep.addr, NsFlags.CREATE)
                ep.close()
                _wait_ns(g, ep.addr, NsFlags.DESTROY)
                lat.append(time.perf_counter() - t0)

        measure(CONTROL_CASE, 0, pairs, lambda: (open_close, _nothing))
        results[-1].update(_percentiles(lat))
    out.send(results)


# -------------------------------------------------------------------- floors


def memcpy_floor(size: int, messages: int) -> float:
    """Messages per second of a bare bulk copy of ``messages`` x ``size`` bytes."""
    src = np.ones((messages, max(size, 1)), np.uint8)
    dst = np.empty_like(src)
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        np.copyto(dst, src)
        best = min(best, time.perf_counter() - t0)
    return messages / best


#: datagrams of the SOCK_SEQPACKET floor at least (about half a second here)
SEQPACKET_FLOOR_MESSAGES = 200_000


def seqpacket_floor(peer: str, size: int, messages: int) -> float:
    """Datagrams per second through a bare SOCK_SEQPACKET socketpair: the C holder's
    sink reading, sendmmsg as the server's writer does (``bench_fd_peer floor``); the
    best of three.  No fd endpoint can move guest messages to a process faster."""
    best = 0.0
    for _ in range(3):
        try:
            done = subprocess.run([peer, "floor", str(messages), str(size)],
                                  capture_output=True, text=True, timeout=120)
        except subprocess.TimeoutExpired:
            raise BenchError(f"bench_fd_peer floor {messages} {size}: no result in 120 s") \
                from None
        if done.returncode != 0:
            raise BenchError(f"bench_fd_peer floor {messages} {size} failed (exit status "
                             f"{done.returncode}): {done.stderr.strip()}")
        best = max(best, float(done.stdout.split()[-1]))
    return best


def _pong(a: int, b: int, n: int, cpu: int | None) -> None:
    _pin(cpu)
    for _ in range(n):
        select.select([a], [], [])
        os.eventfd_read(a)
        os.eventfd_write(b, 1)


def eventfd_pingpong_floor(samples: int, pin: bool = False) -> tuple[float, float]:
    """p50 / p99 round trip (µs) of an eventfd ping-pong between two processes."""
    a = os.eventfd(0, os.EFD_NONBLOCK)
    b = os.eventfd(0, os.EFD_NONBLOCK)
    server_cpu, guest_cpu = _cpus(pin)
    ctx = mp.get_context("fork")
    p = ctx.Process(target=_pong, args=(a, b, samples, server_cpu))
    p.start()
    mask = os.sched_getaffinity(0)
    _pin(guest_cpu)
    lat = []
    for _ in range(samples):
        t0 = time.perf_counter()
        os.eventfd_write(a, 1)
        select.select([b], [], [])
        os.eventfd_read(b)
        lat.append(time.perf_counter() - t0)
    p.join()
    os.sched_setaffinity(0, mask)
    os.close(a)
    os.close(b)
    lat.sort()
    return lat[len(lat) // 2] * 1e6, lat[int(len(lat) * 0.99)] * 1e6


# -------------------------------------------------------------------- orchestration


def build_peer(outdir: str) -> str:
    """Compile vhost_rpmsg/cdata/bench_fd_peer.c with the system compiler (``$CC``, else
    ``cc``) into ``outdir``; its path."""
    cc = shlex.split(os.environ.get("CC") or "cc")
    if not cc or shutil.which(cc[0]) is None:
        raise BenchError("the fd endpoint cases and the SOCK_SEQPACKET floor need a C "
                         f"compiler: {cc[0] if cc else 'cc'} not found (install gcc or set "
                         "CC)")
    if not PEER_SOURCE.is_file():
        raise BenchError(f"{PEER_SOURCE} not found: the fd endpoint cases compile it from "
                         "the project's source tree")
    binary = os.path.join(outdir, "bench_fd_peer")
    done = subprocess.run([*cc, "-O2", "-o", binary, str(PEER_SOURCE)], capture_output=True,
                          text=True)
    if done.returncode != 0:
        raise BenchError(f"{' '.join(cc)} could not build {PEER_SOURCE}: "
                         f"{done.stderr.strip() or done.returncode}")
    return binary


def run(engines: list[str], sizes: list[int], messages: int, samples: int,
        progress: Callable[[str], None] = lambda s: None, pin: bool = False,
        repeat: Repeat = DEFAULT_REPEAT) -> Report:
    """Run every case for every engine, each ``repeat``-ed; floors measured in the same
    run."""
    import platform

    report = Report(machine={"cpus": os.cpu_count(), "python": platform.python_version()})
    ctx = mp.get_context("spawn")
    server_cpu, guest_cpu = _cpus(pin)
    report.machine["pinned"] = {"server": server_cpu, "guest": guest_cpu}
    report.machine["repeat"] = asdict(repeat)
    # The C holder, built once for the fd cases of every engine and the floor: a
    # fraction of a second, before anything starts.
    with tempfile.TemporaryDirectory(prefix="vhost-rpmsg-bench-peer-") as bindir:
        peer = build_peer(bindir)
        for engine in engines:
            with tempfile.TemporaryDirectory(prefix="vhost-rpmsg-bench-") as tmp:
                path = os.path.join(tmp, "bench.sock")
                ready = ctx.Event()
                server = ctx.Process(target=_server_main, args=(path, engine, ready, server_cpu),
                                     daemon=True)
                server.start()
                if not ready.wait(30):
                    server.kill()
                    raise RuntimeError(f"bench server ({engine}) did not start")
                recv, send = ctx.Pipe(duplex=False)
                assert server.pid is not None
                guest = ctx.Process(target=_guest_main, args=(
                    path, server.pid, engine, sizes, messages, samples, peer, send, guest_cpu,
                    repeat))
                guest.start()
                ncases = 5 * len(sizes) + 2
                for k in itertools.count(1):
                    # a guest that failed (a case's error is on stderr) ends the run at once
                    deadline = time.monotonic() + 600
                    while not recv.poll(1):
                        if not guest.is_alive() or time.monotonic() > deadline:
                            guest.kill()
                            server.kill()
                            raise RuntimeError(f"bench guest ({engine}) produced no result "
                                               f"(exit status {guest.exitcode})")
                    msg = recv.recv()
                    if not isinstance(msg, tuple):  # the results, when all cases are done
                        break
                    _, name, size = msg
                    progress(f"{engine} engine: {name} {size} B (case {k} of {ncases})")
                for r in msg:
                    report.cases.append(Case(**r))
                guest.join(10)
                report.backend_peak_rss_mb[engine] = _peak_rss_mb(server.pid)
                stop_process(server)
        for size in sizes:
            progress(f"floor: memcpy of {size} B messages")
            report.floors[f"memcpy{size}_msgs_per_s"] = memcpy_floor(size, max(messages, 10000))
        for size in sizes:
            progress(f"floor: SOCK_SEQPACKET of {size} B datagrams")
            report.floors[f"seqpacket{size}_msgs_per_s"] = seqpacket_floor(
                peer, size, max(messages, SEQPACKET_FLOOR_MESSAGES))
    progress("floor: eventfd ping-pong")
    p50, p99 = eventfd_pingpong_floor(max(samples, 1000), pin)
    report.floors["eventfd_pingpong_p50_us"] = p50
    report.floors["eventfd_pingpong_p99_us"] = p99
    return report


def render(report: Report) -> list[Any]:
    """Rich tables: the cases, the floors, and each target with its goal, met or missed."""
    from rich.table import Table

    cases = Table(title="vhost-rpmsg bench: cases (median run; spread: ±half the range "
                        "of the runs' rates, over the median)")
    for col in ("case", "engine", "bytes", "msgs/s", "runs", "spread", "MB/s", "p50 µs",
                "p99 µs", "backend CPU", "guest CPU"):
        cases.add_column(col, justify="left" if col in ("case", "engine") else "right")
    for c in report.cases:
        moved = c.name != CONTROL_CASE  # its "messages" are open+close pairs, no payload
        cases.add_row(c.name, c.engine, str(c.size) if moved else "", f"{c.msgs_per_s:,.0f}",
                      str(len(c.rates)), f"±{c.spread / 2:.0%}" if len(c.rates) > 1 else "",
                      f"{c.mb_per_s:,.1f}" if moved else "", f"{c.p50_us:.1f}" if c.p50_us else "",
                      f"{c.p99_us:.1f}" if c.p99_us else "",
                      f"{c.backend_cpu:.0%}", f"{c.guest_cpu:.0%}")
    floors = Table(title="floors and memory (same run)")
    floors.add_column("what")
    floors.add_column("value", justify="right")
    for k, v in report.floors.items():
        floors.add_row(k, human(v, floor_unit(k)))
    for engine, rss in report.backend_peak_rss_mb.items():
        floors.add_row(f"backend peak RSS ({engine})", human(rss, "MB"))
    for k, v in report.ratios().items():
        if k.startswith("seqpacket"):
            size = k.removeprefix("seqpacket").partition("_")[0]
            floors.add_row(f"fd sink {size} B / sink at best (seqpacket floor / sink)",
                           human(v, "x"))
    met = sum(t["met"] is True for t in report.targets())
    targets = Table(title=f"targets: {met} of {len(TARGETS)} met")
    for col in ("target", "goal", "this run", "verdict", "set in"):
        targets.add_column(col, justify="right" if col in ("goal", "this run") else "left")
    for t in report.targets():
        value = "—" if t["value"] is None else human(t["value"], t["unit"])
        mark = {True: "[green]✓ met[/]", False: "[red]✗ missed[/]",
                None: "[yellow]not measured[/]"}[t["met"]]
        op = {">=": "≥", "<=": "≤"}[t["op"]]
        targets.add_row(t["what"], f'{op} {human(t["goal"], t["unit"])}', value, mark,
                        t["source"])
    return [cases, floors, targets]


def write_json(report: Report, path: str) -> None:
    with open(path, "w") as f:
        json.dump(report.as_json(), f, indent=2)
