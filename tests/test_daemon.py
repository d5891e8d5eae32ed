"""vhost-user device daemon conventions: -s, -V/--version, intact --help, the backend
descriptor, and the systemd unit template in qemu-configs/."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import serving
from vhost_rpmsg import __version__
from vhost_rpmsg.guest import SimGuest

ROOT = Path(__file__).resolve().parent.parent
UNIT = ROOT / "qemu-configs" / "vhost-rpmsg@.service"
CLI = [sys.executable, "-m", "vhost_rpmsg.cli"]


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "COLUMNS": "200"})


@pytest.mark.parametrize("flag", ["-V", "--version"])
def test_version(flag: str) -> None:
    out = _cli(flag)
    assert out.returncode == 0 and out.stderr == ""
    assert out.stdout == f"vhost-rpmsg {__version__}\n"


def test_serve_help_shows_the_endpoint_spec_and_short_options() -> None:
    out = _cli("serve", "--help")
    assert out.returncode == 0
    assert "[NAME:]PLUGIN[@ADDR][,k=v…]" in out.stdout
    assert re.search(r"--socket-path\s+-s\b", out.stdout)
    assert "--print-descriptor" in out.stdout and "--print-capabilities" in out.stdout


def test_print_capabilities_ignores_other_options() -> None:
    out = _cli("serve", "--print-capabilities", "--socket-mode", "bogus", "-e", "nope")
    assert out.returncode == 0
    assert json.loads(out.stdout) == {"type": "rpmsg", "features": []}


def test_descriptor_names_a_runnable_binary() -> None:
    out = _cli("serve", "--print-descriptor")
    assert out.returncode == 0, out.stderr
    d = json.loads(out.stdout)
    assert set(d) <= {"description", "type", "binary", "tags"}
    assert d["type"] == "rpmsg" and d["description"]
    assert all(isinstance(t, str) for t in d.get("tags", []))
    binary = Path(d["binary"])
    assert binary.is_absolute() and os.access(binary, os.X_OK)
    ran = subprocess.run([str(binary), "--version"], capture_output=True, text=True,
                         timeout=60)
    assert ran.stdout == f"vhost-rpmsg {__version__}\n"


def test_short_socket_path_option_serves(tmp_path: Path) -> None:
    path = tmp_path / "r.sock"
    with serving([*CLI, "serve", "-s", str(path), "--engine", "python"], path), \
            SimGuest(str(path)) as g:
        g.open(2000)
        g.send(2000, 1024, b"-s")
        assert g.recv(2000) == (1024, b"-s")


def _unit_value(key: str) -> str:
    (value,) = [line.split("=", 1)[1] for line in UNIT.read_text().splitlines()
                if line.startswith(f"{key}=")]
    return value


def _installed_script() -> str:
    return str(json.loads(_cli("serve", "--print-descriptor").stdout)["binary"])


def test_unit_exec_start_serves_the_instance_socket(tmp_path: Path) -> None:
    """ExecStart as systemd would run it for instance "guest1" with an empty
    VHOST_RPMSG_ARGS (RuntimeDirectory moved into tmp_path, the script to where it is
    installed here)."""
    assert _unit_value("RuntimeDirectory") == "vhost-rpmsg"
    line = _unit_value("ExecStart")
    words = shlex.split(line.replace("%i", "guest1"))
    assert words[0] == "/usr/local/bin/vhost-rpmsg" and words[-1] == "$VHOST_RPMSG_ARGS"
    run_dir = tmp_path / "vhost-rpmsg"
    run_dir.mkdir()
    argv = [_installed_script()] + [w.replace("/run/vhost-rpmsg", str(run_dir))
                                    for w in words[1:-1]]
    path = run_dir / "guest1.sock"
    # serving() stops it with SIGTERM, the unit's stop signal (systemd's default)
    with serving(argv, path), SimGuest(str(path)) as g:
        assert g.wait_channel("rpmsg-raw").addr == 1024
    assert not path.exists()


def test_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed")
    # The unit names the script where a system-wide pip install puts it; verify checks
    # that it exists, so point it at this environment's script.
    unit = tmp_path / UNIT.name
    unit.write_text(UNIT.read_text().replace("/usr/local/bin/vhost-rpmsg",
                                             _installed_script()))
    out = subprocess.run([analyze, "verify", str(unit)], capture_output=True, text=True,
                         timeout=120, cwd=tmp_path)
    assert out.returncode == 0 and out.stdout == "" and out.stderr == "", out
