"""``vhost-rpmsg bench --guests N,… [--workers K]``: how a server scales with guests.

For each N: one server process with N vhost-user sockets (each its own device, as
``serve --socket-count N``), or K of them with socket i in process i mod K (as
``serve --workers K``), and N simulated guests, each its own process, each
flooding its own sink with the same number of messages at the same moment.  A round
is timed from the start signal until the last guest's final sync has come back;
every guest also times itself.  Each N runs ``repeat`` rounds (the median round is
reported, with the spread).  Figures per N: aggregate msgs/s (all guests' messages
over the round), per-guest msgs/s (the slowest guest's own rate, and the mean), the
backend's CPU share over the round (all its processes, in cores), and its RSS once the
guests are connected (summed over its processes).

Two targets, both ratios within the run: per-guest rate at the largest N over the rate
at N = 1 must be at least 1/N (no super-linear cost: the aggregate does not fall),
and the RSS each guest beyond the first adds at most 10 MB.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from .bench import (
    CTL,
    DEFAULT_REPEAT,
    GUEST_ADDR,
    SINK,
    Repeat,
    _cpu_seconds,
    _peak_rss_mb,
    _server_main,
    median_index,
    spread,
    stop_process,
)
from .workers import assign

#: RSS a guest beyond the first may add, MB (performance issue)
RSS_PER_GUEST_MB = 10.0


@dataclass
class Scale:
    """One N: the median round, every round's aggregate rate."""

    guests: int
    messages: int  # per guest per round
    size: int
    seconds: float  # the median round's wall time
    slowest_guest_msgs_per_s: float
    mean_guest_msgs_per_s: float
    backend_cpu: float  # share of one core over the median round
    backend_rss_mb: float  # VmRSS with every guest connected, after the rounds
    rates: list[float] = field(default_factory=list)  # aggregate msgs/s per round

    @property
    def msgs_per_s(self) -> float:
        return self.guests * self.messages / self.seconds if self.seconds else 0.0

    @property
    def spread(self) -> float:
        return spread(self.rates, self.msgs_per_s)


@dataclass
class ScaleReport:
    engine: str
    workers: int = 1
    scales: list[Scale] = field(default_factory=list)

    def figures(self) -> dict[str, float]:
        """per_guest_ratio: slowest guest at the largest N over the guest at N = 1
        (goal >= 1 / N); rss_per_extra_guest_mb (goal <= RSS_PER_GUEST_MB)."""
        out: dict[str, float] = {}
        one = next((s for s in self.scales if s.guests == 1), None)
        big = max(self.scales, key=lambda s: s.guests, default=None)
        if one and big and big.guests > 1 and one.slowest_guest_msgs_per_s:
            out["guests"] = big.guests
            out["per_guest_ratio"] = (big.slowest_guest_msgs_per_s
                                      / one.slowest_guest_msgs_per_s)
            out["per_guest_goal"] = 1 / big.guests
            out["rss_per_extra_guest_mb"] = ((big.backend_rss_mb - one.backend_rss_mb)
                                             / (big.guests - 1))
        return out

    def as_json(self) -> dict[str, Any]:
        return {"engine": self.engine, "workers": self.workers,
                "scales": [asdict(s) | {"msgs_per_s": s.msgs_per_s, "spread": s.spread}
                           for s in self.scales],
                "figures": self.figures()}


def _guest_main(path: str, size: int, messages: int, conn: Any) -> None:
    """A flooding guest: ready, then one flood per "go", timed by itself."""
    from .guest import SimGuest

    payload = bytes(size)
    with SimGuest(path, rx_thread=False) as g:
        g.open(GUEST_ADDR)

        def sync() -> int:
            g.send(GUEST_ADDR, CTL, b"sync")
            _, reply = g.recv(GUEST_ADDR, timeout=120)
            return int(reply.split(b":")[1])

        count = sync()
        conn.send("ready")
        while True:
            try:
                if conn.recv() != "go":
                    return
            except EOFError:  # the bench gave up: end quietly
                return
            t0 = time.monotonic()
            g.send_burst(GUEST_ADDR, SINK, payload, messages)
            count += messages
            got = sync()
            t1 = time.monotonic()
            if got != count:
                raise RuntimeError(f"bench: the sink counted {got}, not {count}")
            conn.send((t0, t1))


def _one(engine: str, n: int, size: int, messages: int, repeat: Repeat,
         workers: int = 1) -> Scale:
    ctx = mp.get_context("spawn")
    with tempfile.TemporaryDirectory(prefix="vhost-rpmsg-bench-guests-") as tmp:
        paths = [os.path.join(tmp, f"g{i}.sock") for i in range(n)]
        readies = [ctx.Event() for _ in range(workers)]
        servers = [ctx.Process(target=_server_main, args=([paths[i] for i in mine], engine,
                                                           ready), daemon=True)
                   for mine, ready in zip(assign(n, workers), readies, strict=True)]
        for server in servers:
            server.start()
        guests: list[Any] = []

        def cpu_now() -> float:
            return sum(_cpu_seconds(s.pid) for s in servers)

        try:
            if not all(ready.wait(30) for ready in readies):
                raise RuntimeError(f"bench server ({engine}, {n} sockets) did not start")
            for p in paths:
                ours, theirs = ctx.Pipe()
                proc = ctx.Process(target=_guest_main, args=(p, size, messages, theirs),
                                   daemon=True)
                proc.start()
                theirs.close()  # the child's copy only: its exit is then EOF to us
                guests.append((proc, ours))
            for proc, conn in guests:
                if not conn.poll(60) or conn.recv() != "ready":
                    raise RuntimeError(f"bench guest did not connect (exit {proc.exitcode})")
            rounds: list[tuple[float, list[float], float]] = []
            total = 0.0
            while repeat.more(len(rounds), total):
                # The CPU readings lie within the wall window they are divided by: the
                # window runs from before the first "go" to after the last reply.
                w0 = time.monotonic()
                c0 = cpu_now()
                for _, conn in guests:
                    conn.send("go")
                spans = []
                for proc, conn in guests:
                    if not conn.poll(300):
                        raise RuntimeError(f"bench guest stalled (exit {proc.exitcode})")
                    spans.append(conn.recv())  # EOFError if it died
                c1 = cpu_now()
                cpu_wall = time.monotonic() - w0
                wall = max(t1 for _, t1 in spans) - min(t0 for t0, _ in spans)
                rounds.append((wall, [messages / (t1 - t0) for t0, t1 in spans],
                               (c1 - c0) / cpu_wall))
                total += wall
            rss = 0.0
            for server in servers:
                assert server.pid is not None
                rss += _peak_rss_mb(server.pid, "VmRSS")
            for _, conn in guests:
                conn.send("stop")
        finally:
            for _, conn in guests:
                conn.close()  # a guest waiting for its next order reads EOF and ends
            for proc, _ in guests:
                stop_process(proc, terminate=False)
            for server in servers:
                stop_process(server)
    rates = [n * messages / r[0] for r in rounds]
    wall, per_guest, cpu = rounds[median_index(rates)]
    return Scale(n, messages, size, wall, min(per_guest), sum(per_guest) / n, cpu, rss,
                 rates)


def run(engine: str, counts: list[int], size: int, messages: int,
        progress: Callable[[str], None] = lambda s: None,
        repeat: Repeat = DEFAULT_REPEAT, workers: int = 1) -> ScaleReport:
    """Every N of ``counts``, one after another, each with a fresh server."""
    report = ScaleReport(engine, workers)
    for n in counts:
        progress(f"{engine} engine: {n} guest{'s' if n > 1 else ''}, {messages:,} x {size} B "
                 f"each, {workers} server process{'es' if workers > 1 else ''}")
        report.scales.append(_one(engine, n, size, messages, repeat, workers))
    return report


def render(report: ScaleReport) -> list[Any]:
    from rich.table import Table

    procs = ("one server process" if report.workers == 1
             else f"{report.workers} server processes (--workers)")
    t = Table(title=f"vhost-rpmsg bench --guests: {procs}, {report.engine} "
                    "engine (median round)")
    for col in ("guests", "bytes", "aggregate msgs/s", "rounds", "spread",
                "slowest guest msgs/s", "mean guest msgs/s", "backend CPU", "backend RSS"):
        t.add_column(col, justify="right")
    for s in report.scales:
        t.add_row(str(s.guests), str(s.size), f"{s.msgs_per_s:,.0f}", str(len(s.rates)),
                  f"±{s.spread / 2:.0%}" if len(s.rates) > 1 else "",
                  f"{s.slowest_guest_msgs_per_s:,.0f}", f"{s.mean_guest_msgs_per_s:,.0f}",
                  f"{s.backend_cpu:.0%}", f"{s.backend_rss_mb:.1f} MB")
    f = report.figures()
    out: list[Any] = [t]
    if f:
        goals = Table(title="targets (performance issue)")
        for col in ("target", "goal", "this run", "verdict"):
            goals.add_column(col)
        n = int(f["guests"])
        rows = [(f"slowest guest at N={n} / guest at N=1", f"≥ {f['per_guest_goal']:.3f}",
                 f"{f['per_guest_ratio']:.3f}", f["per_guest_ratio"] >= f["per_guest_goal"]),
                ("backend RSS per guest beyond the first", f"≤ {RSS_PER_GUEST_MB:.0f} MB",
                 f"{f['rss_per_extra_guest_mb']:.1f} MB",
                 f["rss_per_extra_guest_mb"] <= RSS_PER_GUEST_MB)]
        for what, goal, value, met in rows:
            goals.add_row(what, goal, value, "[green]✓ met[/]" if met else "[red]✗ missed[/]")
        out.append(goals)
    return out
