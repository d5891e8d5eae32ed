"""The serve path does not import the simulated guest, nor its C fast path.

The simulator (vhost_rpmsg.guest, _vhost_rpmsg_guest) is an optional part, for the demo,
the benchmarks and the tests: a real ``vhost-rpmsg serve`` never loads it.  Checked on a
real serve in a subprocess, through everything it runs: the CLI, the start-up checks, a
guest's connection and traffic (the simulated guest here lives in the test process), and
the shutdown on SIGTERM; the subprocess writes out its sys.modules as it exits.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from vhost_rpmsg.guest import SimGuest

ROOT = Path(__file__).resolve().parent.parent
SIMULATOR = ("vhost_rpmsg.guest", "_vhost_rpmsg_guest")

# Run from the project root, so that the subprocess imports the same work tree.
SERVE = """
import atexit, json, sys
out, path, engine = sys.argv[1:4]

def dump():
    with open(out, "w") as f:
        json.dump(sorted(sys.modules), f)

atexit.register(dump)
from vhost_rpmsg.cli import main
sys.argv = ["vhost-rpmsg", "serve", "--socket-path", path, "--engine", engine,
            "--log-level", "warning"]
main()
"""

# What importing each module that `serve` may reach loads (without running anything).
IMPORT_ONLY = """
import json, sys
import vhost_rpmsg.bench, vhost_rpmsg.cli, vhost_rpmsg.virtio.engines
print(json.dumps(sorted(sys.modules)))
"""


def _simulator_modules(modules: list[str]) -> list[str]:
    return [m for m in modules if m in SIMULATOR or m.startswith(SIMULATOR[0] + ".")]


def test_importing_the_cli_loads_no_simulator() -> None:
    got = subprocess.run([sys.executable, "-c", IMPORT_ONLY], cwd=ROOT, capture_output=True,
                         text=True, timeout=60, check=True)
    modules = json.loads(got.stdout)
    assert "vhost_rpmsg.cli" in modules
    assert _simulator_modules(modules) == []


@pytest.mark.parametrize("engine", ["auto", "python"])
def test_serve_loads_no_simulator(tmp_path: Path, engine: str) -> None:
    path = str(tmp_path / "vr.sock")
    out = tmp_path / "modules.json"
    proc = subprocess.Popen([sys.executable, "-c", SERVE, str(out), path, engine], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        while not os.path.exists(path):
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                _, err = proc.communicate(timeout=10)
                pytest.fail(f"serve did not start (exit {proc.returncode}): {err}")
            time.sleep(0.02)
        guest = SimGuest(path, fast=False)
        guest.open(2000)
        with guest:
            for payload in (b"ping", b"x" * 400):
                guest.send(2000, 1024, payload)  # the default endpoint: rpmsg-raw echo
                assert guest.recv(2000, timeout=10) == (1024, payload)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate(timeout=10)
    assert proc.returncode == 0, err
    modules = json.loads(out.read_text())
    assert "vhost_rpmsg.cli" in modules and "vhost_rpmsg.rpmsg.device" in modules
    assert _simulator_modules(modules) == []
