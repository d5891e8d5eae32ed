"""A short run of the benchmark: every case runs for every engine and yields sane figures.

No speed is asserted here (targets are read off ``vhost-rpmsg bench``, never timed in
tests); this checks that the benchmark itself works end to end.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from vhost_rpmsg import bench
from vhost_rpmsg.engines import available_engines


def test_bench_smoke(tmp_path: Path) -> None:
    engines = available_engines()
    report = bench.run(engines, [16, 496], messages=2000, samples=200)
    names = {(c.name, c.engine, c.size) for c in report.cases}
    for engine in engines:
        for size in (16, 496):
            assert ("sink", engine, size) in names
            assert ("source", engine, size) in names
        assert ("echo", engine, 16) in names
        assert 0 < report.backend_peak_rss_mb[engine] < 1024
    for c in report.cases:
        assert c.messages > 0 and c.seconds > 0 and c.msgs_per_s > 0
        cores = os.cpu_count() or 1
        assert 0 < c.backend_cpu <= cores + 0.1 and 0 < c.guest_cpu <= cores + 0.1
    echo = report.find("echo", engines[0])
    assert echo is not None and echo.p50_us is not None and echo.p99_us is not None
    assert 0 < echo.p50_us <= echo.p99_us
    assert report.floors["eventfd_pingpong_p50_us"] > 0
    assert report.floors["memcpy496_msgs_per_s"] > 0
    out = tmp_path / "bench.json"
    bench.write_json(report, str(out))
    data = json.loads(out.read_text())
    assert len(data["cases"]) == len(report.cases)
    assert set(data["ratios"]) == set(report.ratios())
