"""The benchmark's targets: figures computed from a report, met or missed, shown and saved.

Built from hand-made reports (no benchmark runs here), so every figure is known exactly.
"""

from __future__ import annotations

import json

import pytest
from rich.console import Console

from vhost_rpmsg import bench
from vhost_rpmsg.bench import TARGETS, Case, Report, human


def report(sink16_cffi: float = 4e6, sink16_py: float = 2e5, sink496: float = 3e6,
           source496: float = 1e6, echo_p50: float = 100.0, pingpong: float = 60.0,
           rss: tuple[float, float] = (40.0, 45.0), sizes: tuple[int, ...] = (16, 496)) -> Report:
    """A report whose cases last 1 s, so messages = msgs/s."""
    r = Report()
    rates = {("sink", "cffi", 16): sink16_cffi, ("sink", "python", 16): sink16_py,
             ("sink", "cffi", 496): sink496, ("source", "cffi", 496): source496,
             ("sink", "python", 496): sink496 / 10, ("source", "python", 496): 1.0,
             ("source", "cffi", 16): 1.0, ("source", "python", 16): 1.0,
             # fd endpoints: sink 16 B at exactly 1/4 of in-process, 496 B at 1/10;
             # sources at 1/1 and 1/2
             ("fd sink", "cffi", 16): sink16_cffi / 4, ("fd sink", "cffi", 496): sink496 / 10,
             ("fd source", "cffi", 16): 1.0, ("fd source", "cffi", 496): source496 / 2,
             # zero-copy receive: the sink at 0.8 of the copying one
             ("zero-copy sink", "cffi", 496): sink496 * 0.8}
    for (name, engine, size), rate in rates.items():
        if size in sizes:
            r.cases.append(Case(name, engine, size, int(rate), 1.0, 1.0, 0.2))
    # 5000 echoes in 0.5 s with the backend busy 40% of it: 40 µs of backend CPU each
    r.cases.append(Case("echo", "cffi", 16, 5000, 0.5, 0.4, 0.3, echo_p50, 2 * echo_p50))
    r.cases.append(Case("echo", "python", 16, 5000, 0.5, 0.9, 0.3, 999.0, 999.0))
    # 1000 open+close pairs in 0.2 s: 200 µs each
    r.cases.append(Case(bench.CONTROL_CASE, "cffi", 0, 1000, 0.2, 0.5, 0.5, 150.0, 400.0))
    r.floors = {f"memcpy{s}_msgs_per_s": 2e7 for s in sizes}
    r.floors["eventfd_pingpong_p50_us"] = pingpong
    r.floors |= {f"seqpacket{s}_msgs_per_s": 5e5 for s in sizes}
    r.backend_peak_rss_mb = dict(zip(("cffi", "python"), rss, strict=True))
    return r


def verdicts(r: Report) -> dict[tuple[str, float], bool | None]:
    return {(t["figure"], t["goal"]): t["met"] for t in r.targets()}


def test_figures_are_computed_from_the_cffi_cases() -> None:
    f = report().figures()
    assert f["sink16_cffi_over_python"] == pytest.approx(20.0)
    assert f["sink496_over_memcpy"] == pytest.approx(3e6 / 2e7)
    assert f["source496_over_sink496"] == pytest.approx(1 / 3)
    assert f["echo_p50_over_pingpong"] == pytest.approx(100 / 60)
    assert f["backend_cpu_per_echo_us"] == pytest.approx(40.0)
    assert f["backend_peak_rss_mb"] == 45.0  # the larger engine's
    assert f["fd_sink16_over_sink16"] == pytest.approx(0.25)
    assert f["fd_sink496_over_sink496"] == pytest.approx(0.1)
    assert f["fd_source16_over_source16"] == pytest.approx(1.0)
    assert f["fd_source496_over_source496"] == pytest.approx(0.5)
    assert f["control_open_close_us"] == pytest.approx(200.0)  # the mean, not the p50
    # the best an fd sink could do on that transport: 0.5 M of 3 M msgs/s
    assert f["seqpacket496_over_sink496"] == pytest.approx(5e5 / 3e6)
    assert f["zc_sink496_over_memcpy"] == pytest.approx(0.8 * 3e6 / 2e7)
    assert set(f) >= {t.figure for t in TARGETS}, "every target's figure is computed"


def test_each_target_is_met_or_missed_against_its_goal() -> None:
    v = verdicts(report())
    assert v == {
        ("sink16_cffi_over_python", 20): True,  # exactly at the goal counts as met
        ("sink496_over_memcpy", 0.10): True,
        ("sink496_over_memcpy", 0.8): False,
        ("zc_sink496_over_memcpy", 0.8): False,
        ("source496_over_sink496", 0.25): True,
        ("echo_p50_over_pingpong", 2.0): True,
        ("backend_cpu_per_echo_us", 10): False,
        ("backend_peak_rss_mb", 80): True,
        ("fd_sink16_over_sink16", 0.25): True,
        ("fd_sink496_over_sink496", 0.25): False,
        ("fd_source16_over_source16", 0.25): True,
        ("fd_source496_over_source496", 0.25): True,
        ("control_open_close_us", 100): False,
    }
    worse = verdicts(report(sink16_py=2.1e5, source496=0.7e6, echo_p50=130.0, rss=(40, 81)))
    assert worse[("sink16_cffi_over_python", 20)] is False
    assert worse[("source496_over_sink496", 0.25)] is False
    assert worse[("echo_p50_over_pingpong", 2.0)] is False
    assert worse[("backend_peak_rss_mb", 80)] is False
    better = verdicts(report(sink496=2.1e7))
    assert better[("sink496_over_memcpy", 0.8)] is True
    assert better[("zc_sink496_over_memcpy", 0.8)] is True  # 0.8 * 2.1e7 / 2e7 = 0.84


def test_a_target_whose_cases_did_not_run_is_not_measured() -> None:
    v = verdicts(report(sizes=(16,)))
    assert v[("sink496_over_memcpy", 0.10)] is None
    assert v[("source496_over_sink496", 0.25)] is None
    assert v[("fd_sink496_over_sink496", 0.25)] is None
    assert v[("zc_sink496_over_memcpy", 0.8)] is None
    assert v[("sink16_cffi_over_python", 20)] is True


def test_targets_name_their_goal_and_source() -> None:
    assert len({(t.figure, t.goal) for t in TARGETS}) == len(TARGETS)
    for t in TARGETS:
        assert t.op in (">=", "<=") and t.goal > 0 and t.what and t.unit
        assert t.source in (bench.PERF_DOC, bench.PERF_ISSUE, bench.CONTROL_ISSUE)


def test_json_has_every_target_with_its_verdict() -> None:
    data = json.loads(json.dumps(report().as_json()))
    assert [(t["figure"], t["goal"], t["met"]) for t in data["targets"]] == [
        (t["figure"], t["goal"], t["met"]) for t in report().targets()]
    assert all({"what", "op", "unit", "source", "value"} <= set(t) for t in data["targets"])
    assert data["figures"] == pytest.approx(report().figures())


def test_tables_show_goals_marks_and_readable_floors() -> None:
    console = Console(record=True, width=200)
    for table in bench.render(report()):
        console.print(table)
    text = console.export_text()
    assert "targets: 8 of 13 met" in text
    rows = [line for line in text.splitlines() if "met" in line or "missed" in line]
    assert sum("✓ met" in line for line in rows) == 8
    assert sum("✗ missed" in line for line in rows) == 5
    assert any("≤ 100.0 µs" in line and "200.0 µs" in line for line in rows)
    assert any("≤ 10.0 µs" in line and "40.0 µs" in line and "missed" in line for line in rows)
    assert "20.0 M msgs/s" in text and "60.0 µs" in text and "45.0 MB" in text
    assert any("seqpacket496_msgs_per_s" in line and "500 k msgs/s" in line
               for line in text.splitlines())
    assert any("fd sink 496 B / sink at best" in line and "0.167x" in line
               for line in text.splitlines())


@pytest.mark.parametrize(("value", "unit", "text"), [
    (1.409e9, "msgs/s", "1.41 G msgs/s"), (77.64e6, "msgs/s", "77.6 M msgs/s"),
    (19.0e6, "msgs/s", "19.0 M msgs/s"), (225_520, "msgs/s", "226 k msgs/s"),
    (12, "msgs/s", "12.0 msgs/s"), (69.04, "µs", "69.0 µs"), (42.87, "MB", "42.9 MB"),
    (0.1425, "x", "0.142x"), (20.27, "x", "20.3x"), (2, "x", "2.00x"), (0.0344, "x", "0.0344x"),
])
def test_human_units(value: float, unit: str, text: str) -> None:
    assert human(value, unit) == text
