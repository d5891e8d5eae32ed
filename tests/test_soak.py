"""The soak (vhost_rpmsg/soak.py): a minute of it in every run, and proof that it fails.

A soak that cannot fail proves nothing, so besides the 60-second run against the real
server: its verdict rules on made-up figures, and a short soak of a plugin that leaks
memory and file descriptors, which must end in a failure naming both.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from vhost_rpmsg.soak import BRIDGE, ECHO, SINK, SOURCE, Limits, Sample, Tally, verdict

ROOT = Path(__file__).resolve().parent.parent


def _soak(tmp_path: Path, *args: str, env: dict[str, str] | None = None,
          timeout: float = 600) -> tuple[int, dict[str, object], str]:
    out = tmp_path / "soak.json"
    p = subprocess.run([sys.executable, "-m", "vhost_rpmsg.soak", "--json", str(out),
                        "--progress", "0", *args], cwd=ROOT, capture_output=True, text=True,
                       timeout=timeout, env=env)
    report = json.loads(out.read_text()) if out.exists() else {}
    return p.returncode, report, p.stdout + p.stderr


@pytest.mark.timeout(900)
def test_soak_for_a_minute(tmp_path: Path) -> None:
    """Two sockets, mixed traffic, reconnects and hostile inputs for 60 s: everything
    accounted for, RSS and fds flat after the warm-up, a clean exit."""
    rc, report, out = _soak(tmp_path, "--duration", "60", "--sockets", "2")
    print("\n" + out)
    assert rc == 0, out
    messages = report["messages"]
    assert isinstance(messages, dict)
    assert messages["echo_ok"] > 0 and messages["sink_sent"] > 0
    assert messages["h2g_received"] > 0 and messages["source_received"] > 0
    assert sum(report["reconnects"].values()) >= 3  # type: ignore[attr-defined]
    assert sum(report["hostile"].values()) >= 3  # type: ignore[attr-defined]
    assert report["server_counts"], "the server's counters were not read"
    assert len(report["samples"]) >= 20  # type: ignore[arg-type]


LIMITS = Limits(warmup=10, rss_tolerance_kib=4096, fd_tolerance=0)
#: RSS samples every 2 s: the warm-up ends at the sixth
FLAT = [50_000, 54_000, 55_000, 55_500, 56_000, 56_100, 57_000, 56_800]
GROWING = [*FLAT[:6], 58_000, 61_000]


def _samples(rss: list[int]) -> list[Sample]:
    return [Sample(float(2 * i), kib, 20) for i, kib in enumerate(rss)]


def _clean() -> Tally:
    return Tally(echo_sent=100, echo_ok=98, echo_lost_in_crash=2, sink_sent=1000,
                 crash_in_flight=40, g2h_sent=10, g2h_received=10, h2g_sent=7,
                 h2g_received=7, source_received=30)


def _server(t: Tally) -> dict[str, object]:
    """The counters a server would report for what ``t`` says."""
    return {"device": {"counters": {}}, "endpoints": [
        {"addr": ECHO, "to_host_messages": 99, "to_guest_messages": 99},
        {"addr": SINK, "to_host_messages": t.sink_sent - 30},
        {"addr": BRIDGE, "to_host_messages": t.g2h_sent, "to_guest_messages": t.h2g_sent,
         "endpoint": {"to_clients": t.g2h_received, "from_clients": t.h2g_sent}},
        {"addr": SOURCE, "to_guest_messages": t.source_received + 3}]}


def test_verdict_passes_what_is_flat_and_accounted() -> None:
    t = _clean()
    assert verdict(_samples(FLAT), (12, 12), [t], {}, 0, LIMITS, [_server(t)]) == []
    assert verdict(_samples(FLAT), (12, 12), [t], {}, 0, LIMITS, None) == []


#: each fault, and what the verdict must say about it
FAULTS = {"rss": "RSS grew", "fds": "open fds", "echo": "echo_missing",
          "bridge": "bridge guest->host", "server-count": "sink", "traceback": "traceback",
          "exit": "exit status", "error": "something went wrong",
          "no-samples": "sample(s) after"}


@pytest.mark.parametrize("fault", list(FAULTS))
def test_verdict_fails_each_fault(fault: str) -> None:
    t = _clean()
    server = _server(t)
    rss = GROWING if fault == "rss" else FLAT[:5] if fault == "no-samples" else FLAT
    fds = (12, 13) if fault == "fds" else (12, 12)
    log = {"traceback": 1} if fault == "traceback" else {}
    if fault == "echo":
        t.echo_missing = 1
        t.echo_sent += 1
    elif fault == "bridge":
        t.g2h_received -= 1  # a datagram neither delivered nor counted as dropped
    elif fault == "server-count":
        server["endpoints"][1]["to_host_messages"] = t.sink_sent + 1  # type: ignore[index]
    elif fault == "error":
        t.errors.append("socket 0: something went wrong")
    why = verdict(_samples(rss), fds, [t], log, 1 if fault == "exit" else 0, LIMITS,
                  [server])
    assert len(why) == 1 and FAULTS[fault] in why[0], why


LEAKY = '''
    """An echo that leaks: 1 MiB kept per second it runs, an eventfd per guest session
    never closed (by the clock, so the leak is the same on a slow machine)."""

    import os
    import time

    from vhost_rpmsg.endpoints.builtin import Echo


    class LeakyEcho(Echo):
        kept: list[bytes] = []
        fds: list[int] = []
        start = 0.0

        def on_message_batch(self, batch):
            now = time.monotonic()
            type(self).start = type(self).start or now
            while len(self.kept) < (now - self.start) * 16:
                self.kept.append(b"x" * 65536)
            super().on_message_batch(batch)

        def guest_ready(self):
            self.fds.append(os.eventfd(0))
'''


@pytest.mark.timeout(600)
def test_soak_fails_on_a_plugin_that_leaks(tmp_path: Path) -> None:
    """A plugin installed as a user would (an entry point), behind the echo endpoint:
    its memory and fd leaks must fail the soak, each named."""
    plugins = tmp_path / "plugins"
    info = plugins / "leakyplug-0.1.dist-info"
    info.mkdir(parents=True)
    (plugins / "leakyplug.py").write_text(textwrap.dedent(LEAKY))
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: leakyplug\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(
        "[vhost_rpmsg.endpoints]\nleakyecho = leakyplug:LeakyEcho\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(plugins), *filter(None, [os.environ.get("PYTHONPATH")])])}
    rc, report, out = _soak(tmp_path, "--duration", "25", "--sockets", "2", "--warmup",
                            "5", "--rss-tolerance-mib", "8", "--echo-plugin", "leakyecho",
                            env=env)
    print("\n" + out)
    failures = report.get("failures")
    assert rc == 1 and isinstance(failures, list), out
    assert any("RSS grew" in f for f in failures), failures
    assert any("open fds" in f for f in failures), failures
    # the leak is the only fault: the messages are all accounted for
    assert not [f for f in failures if "RSS grew" not in f and "open fds" not in f], failures
