"""A short run of the benchmark: every case runs for every engine and yields sane figures.

No speed is asserted here (targets are read off ``vhost-rpmsg bench``, never timed in
tests); this checks that the benchmark itself works end to end.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from vhost_rpmsg import bench, bench_guests
from vhost_rpmsg.virtio.engines import available_engines


def test_bench_smoke(tmp_path: Path) -> None:
    engines = available_engines()
    # Cases long enough that the CPU clock's granularity (below) is small beside them.
    report = bench.run(engines, [16, 496], messages=50_000, samples=200,
                       repeat=bench.Repeat(runs=2, seconds=0))
    names = {(c.name, c.engine, c.size) for c in report.cases}
    for engine in engines:
        for size in (16, 496):
            assert ("sink", engine, size) in names
            assert ("source", engine, size) in names
        assert ("echo", engine, 16) in names
        assert 0 < report.backend_peak_rss_mb[engine] < 1024
    for c in report.cases:
        assert c.messages > 0 and c.seconds > 0 and c.msgs_per_s > 0
        # two runs each; the one reported is the lower median: the slower of them
        assert len(c.rates) == 2 and c.msgs_per_s == min(c.rates), c
        assert c.spread == (max(c.rates) - min(c.rates)) / c.msgs_per_s
        # The wall window encloses both CPU readings, so CPU time above what the cores
        # could give is a broken measurement -- up to the clock's granularity: on this VM
        # a process's CPU time can jump by up to a scheduler tick (2.5 ms seen over a
        # 0.1 ms window), so each of the two readings may be off by one tick (<= 10 ms).
        cores = len(os.sched_getaffinity(0))
        slack = 2 * 0.010
        assert 0 < c.backend_cpu * c.seconds <= cores * c.seconds + slack, c
        assert 0 < c.guest_cpu * c.seconds <= cores * c.seconds + slack, c
    echo = report.find("echo", engines[0])
    assert echo is not None and echo.p50_us is not None and echo.p99_us is not None
    assert 0 < echo.p50_us <= echo.p99_us
    assert report.floors["eventfd_pingpong_p50_us"] > 0
    assert report.floors["memcpy496_msgs_per_s"] > 0
    assert report.floors["seqpacket496_msgs_per_s"] > 0
    out = tmp_path / "bench.json"
    bench.write_json(report, str(out))
    data = json.loads(out.read_text())
    assert len(data["cases"]) == len(report.cases)
    assert set(data["ratios"]) == set(report.ratios())


def test_bench_guests_smoke() -> None:
    """``bench --guests``: one server, N sockets and guests; every round accounted for."""
    report = bench_guests.run(available_engines()[0], [1, 2], size=496, messages=5_000,
                              repeat=bench.Repeat(runs=2, seconds=0))
    assert [s.guests for s in report.scales] == [1, 2]
    for s in report.scales:
        assert len(s.rates) == 2 and s.msgs_per_s == min(s.rates)
        assert 0 < s.slowest_guest_msgs_per_s <= s.mean_guest_msgs_per_s
        assert s.backend_rss_mb > 0 and s.backend_cpu > 0
    f = report.figures()
    assert f["guests"] == 2 and f["per_guest_goal"] == 0.5
    assert f["per_guest_ratio"] > 0
    assert set(json.loads(json.dumps(report.as_json()))) == {"engine", "workers", "scales",
                                                             "figures"}


def test_bench_guests_with_workers_counts_every_server_process() -> None:
    """``bench --guests 2 --workers 2``: two server processes, one socket each; the
    backend's RSS is both processes' (each about a full server's)."""
    engine = available_engines()[0]
    one = bench_guests.run(engine, [2], size=496, messages=5_000,
                           repeat=bench.Repeat(runs=1, seconds=0))
    two = bench_guests.run(engine, [2], size=496, messages=5_000,
                           repeat=bench.Repeat(runs=1, seconds=0), workers=2)
    assert two.workers == 2 and two.as_json()["workers"] == 2
    s1, s2 = one.scales[0], two.scales[0]
    assert s2.guests == 2 and s2.slowest_guest_msgs_per_s > 0 and s2.backend_cpu > 0
    assert s2.backend_rss_mb > 1.5 * s1.backend_rss_mb  # two interpreters, not one
