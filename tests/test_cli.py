"""The command line: serve's backend conventions, demo, qemu-cmdline, plugins."""

from __future__ import annotations

import json
import os
import shlex
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tests.helpers import wait_path
from vhost_rpmsg.cli import app
from vhost_rpmsg.endpoints.registry import EndpointSpec, PluginError, build
from vhost_rpmsg.guest import SimGuest

runner = CliRunner()


def _serve(*args: str, pass_fds: tuple[int, ...] = ()) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-m", "vhost_rpmsg.cli", "serve", *args],
                            stderr=subprocess.PIPE, pass_fds=pass_fds)


def test_print_capabilities() -> None:
    out = runner.invoke(app, ["serve", "--print-capabilities"])
    assert out.exit_code == 0
    assert json.loads(out.stdout)["type"] == "rpmsg"


def test_serve_socket_count_and_sigterm(tmp_path: Path) -> None:
    base = tmp_path / "g.sock"
    proc = _serve("--socket-path", str(base), "--socket-count", "2", "--engine", "python",
                  "--endpoint", "rpmsg-raw:echo@1024")
    try:
        for i in range(2):
            p = Path(f"{base}{i}")
            wait_path(p, proc)
            assert oct(p.stat().st_mode & 0o777) == "0o600"
        with SimGuest(f"{base}0") as g0, SimGuest(f"{base}1") as g1:
            for g in (g0, g1):
                assert g.wait_channel("rpmsg-raw").addr == 1024
                g.open(2000)
                g.send(2000, 1024, b"hi")
                assert g.recv(2000) == (1024, b"hi")
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
    assert not Path(f"{base}0").exists()  # removed on a clean exit


def test_serve_inherited_fd(tmp_path: Path) -> None:
    path = str(tmp_path / "fd.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(1)
    fd = listener.fileno()
    os.set_inheritable(fd, True)
    proc = _serve("--fd", str(fd), "--engine", "python", pass_fds=(fd,))
    listener.close()
    try:
        with SimGuest(path) as g:
            g.open(2000)
            g.send(2000, 1024, b"via fd")
            assert g.recv(2000) == (1024, b"via fd")
    finally:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(10) == 0


@pytest.mark.parametrize("args", [
    [], ["--socket-path", "x", "--fd", "3"], ["--socket-path", "x", "--endpoint", "nope@1"],
    ["--socket-path", "x", "--endpoint", "echo@53"], ["--socket-path", "x", "--engine", "rust"],
])
def test_serve_refuses_bad_arguments_clearly(args: list[str]) -> None:
    out = runner.invoke(app, ["serve", *args])
    assert out.exit_code == 2
    assert out.stderr.startswith("error: ") and out.stderr.count("\n") == 1


def test_qemu_cmdline() -> None:
    out = runner.invoke(app, ["qemu-cmdline", "--socket-path", "/run/r.sock"])
    assert out.exit_code == 0
    argv = shlex.split(out.stdout)
    for part in ("vhost-user-test-device-pci,chardev=rpmsg0,virtio-id=7,num_vqs=2,vq_size=256",
                 "socket,id=rpmsg0,path=/run/r.sock",
                 "memory-backend-memfd,id=mem,size=256M,share=on"):
        assert part in argv
    # one accelerator that works everywhere; no reconnect, which QEMU 11.1 refuses here
    assert argv[argv.index("-accel") + 1] == "tcg"
    assert "reconnect" not in out.stdout
    mmio = shlex.split(runner.invoke(app, ["qemu-cmdline", "-s", "/r", "--mmio"]).stdout)
    assert "vhost-user-test-device,chardev=rpmsg0,virtio-id=7,num_vqs=2,vq_size=256" in mmio
    assert mmio[mmio.index("-machine") + 1].split(",")[0] == "microvm"
    assert "pic=off" in mmio[mmio.index("-machine") + 1]


@pytest.mark.parametrize("args", [["--accel", "kvm:tcg"], ["--vq-size", "100"], ["--smp", "0"]])
def test_qemu_cmdline_refuses_bad_values(args: list[str]) -> None:
    out = runner.invoke(app, ["qemu-cmdline", "-s", "/r", *args])
    assert out.exit_code == 2
    assert out.stderr.startswith("error: ") and len(out.stderr.splitlines()) == 1


def test_demo_runs_and_checks_echo() -> None:
    out = runner.invoke(app, ["demo", "--messages", "300", "--engine", "python"])
    assert out.exit_code == 0, out.output
    assert "host announced rpmsg-raw" in out.stdout
    assert "300" in out.stdout and "mismatch" not in out.stdout


def test_plugins_lists_builtins() -> None:
    out = runner.invoke(app, ["plugins"])
    for name in ("echo", "sink", "source", "rpmsg-raw"):
        assert name in out.stdout


def test_endpoint_specs() -> None:
    s = EndpointSpec.parse("rpmsg-raw:sink@1025,foo=bar")
    assert (s.name, s.plugin, s.addr, s.options) == ("rpmsg-raw", "sink", 1025, {"foo": "bar"})
    assert EndpointSpec.parse(":echo").explicit_name and EndpointSpec.parse(":echo").name is None
    eps = build(["echo", "sink", "echo@1024", "rpmsg-raw", "source,dst=1030,size=8"])
    assert [e.addr for e in eps] == [1025, 1026, 1024, 1027, 1028]
    assert eps[3].name == "rpmsg-raw" and eps[0].name is None
    for bad in ("", "a:b:c", "echo@", "source@1030", "sink,size=3", "echo@0x35"):
        with pytest.raises(PluginError):
            build([bad])


def test_docs_show_the_line_qemu_cmdline_prints() -> None:
    doc = (Path(__file__).resolve().parent.parent / "docs" / "qemu.md").read_text()
    prompt = "$ vhost-rpmsg qemu-cmdline -s /tmp/rpmsg.sock\n"
    shown = doc[doc.index(prompt) + len(prompt):]
    shown = shown[:shown.index("```")]
    printed = runner.invoke(app, ["qemu-cmdline", "-s", "/tmp/rpmsg.sock"]).stdout
    assert shlex.split(shown.replace("\\\n", " ")) == shlex.split(printed)
