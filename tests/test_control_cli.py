"""``vhost-rpmsg stats`` and ``vhost-rpmsg endpoint …`` as a user runs them: subprocesses
of the real CLI against a real ``serve`` process, with a simulated guest on its socket.

What is checked is what a user (or a script) sees: the output, the exit status, and the
one ``error: …`` line on stderr when something is refused; and, for ``endpoint open``,
that the program it runs (the C echo of examples/fd-endpoint) is the endpoint.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import serving, wait_until
from vhost_rpmsg.client import Control
from vhost_rpmsg.guest import SimGuest

ROOT = Path(__file__).resolve().parent.parent
ECHO_C = ROOT / "examples" / "fd-endpoint" / "echo.c"
CLI = [sys.executable, "-m", "vhost_rpmsg.cli"]
#: what a CLI process may take on this shared 2-core machine (start-up included)
CLI_TIMEOUT = 120
#: payload sizes the guest sends through an fd endpoint: both ends of 0..496 and between
SIZES = [0, 1, 2, 15, 16, 17, 100, 255, 256, 400, 495, 496]


@dataclass
class Served:
    """A ``vhost-rpmsg serve`` process: its guest socket and its control socket."""

    sock: str
    ctl: str

    def stats(self) -> dict[str, Any]:
        with Control(self.ctl) as c:
            return c.stats()

    def endpoints(self) -> dict[int, dict[str, Any]]:
        with Control(self.ctl) as c:
            return {e["addr"]: e for e in c.endpoints()}


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    """One server for the module (each test leaves its endpoints as it found them)."""
    where = tmp_path_factory.mktemp("ctl-cli")
    sock = str(where / "vu.sock")
    argv = [*CLI, "serve", "-s", sock, "-e", "echo@1024", "-e", "sink@1025",
            "--log-level", "warning"]
    with serving(argv, Path(sock + ".ctl")):
        yield Served(sock, sock + ".ctl")


@pytest.fixture(scope="module")
def echo_bin(tmp_path_factory: pytest.TempPathFactory) -> str:
    """examples/fd-endpoint/echo.c, built as its comment says."""
    cc = shutil.which("cc")
    if cc is None:
        pytest.skip("no C compiler (cc) to build examples/fd-endpoint/echo.c")
    out = str(tmp_path_factory.mktemp("echo") / "rpmsg-echo")
    subprocess.run([cc, "-O2", "-Wall", "-Wextra", "-Werror", "-o", out, str(ECHO_C)],
                   check=True, timeout=CLI_TIMEOUT)
    return out


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=CLI_TIMEOUT)


def refused(p: subprocess.CompletedProcess[str], code: int, message: str) -> None:
    """Exit status ``code`` and exactly one stderr line, ``error: `` + a line matching
    the regular expression ``message``; nothing on stdout."""
    assert p.returncode == code, (p.returncode, p.stdout, p.stderr)
    assert p.stderr.count("\n") == 1 and p.stderr.startswith("error: "), p.stderr
    assert re.fullmatch(message, p.stderr[len("error: "):-1]), p.stderr
    assert p.stdout == ""


def test_stats_show_what_the_guest_sent_as_text_and_json(served: Served) -> None:
    before = {a: e["to_host_messages"] for a, e in served.endpoints().items()}
    with SimGuest(served.sock) as g:
        g.open(3000)
        for i in range(5):
            g.send(3000, 1024, b"%d" % i)
            assert g.recv(3000, timeout=30) == (1024, b"%d" % i)
        g.send_burst(3000, 1025, b"x" * 100, 20)
        wait_until(lambda: served.endpoints()[1025]["to_host_messages"] == before[1025] + 20,
                   timeout=30)
        text = cli("stats", "-s", served.sock)
        as_json = cli("stats", "-c", served.ctl, "--json")
    assert text.returncode == 0 and text.stderr == "", text.stderr
    assert f"socket 0 {served.sock}: connected" in text.stdout
    assert "guest ready" in text.stdout
    rows = {line.split()[0]: line.split() for line in text.stdout.splitlines()
            if re.match(r"\s*10\d\d\s", line)}
    assert rows["1024"][1:3] == ["echo@1024", "(-)"]
    assert int(rows["1025"][4]) == before[1025] + 20  # to host: messages, then bytes
    assert as_json.returncode == 0, as_json.stderr
    snap = json.loads(as_json.stdout)
    (srv,) = snap["servers"]
    assert srv["connected"] is True and srv["device"]["guest_ready"] is True
    eps = {e["addr"]: e for e in srv["endpoints"]}
    assert eps[1024]["to_host_messages"] == before[1024] + 5
    assert eps[1024]["to_guest_messages"] >= 5
    assert eps[1025]["to_host_messages"] == before[1025] + 20
    assert snap["control"]["requests"] >= 1


def test_endpoint_add_list_remove(served: Served) -> None:
    with SimGuest(served.sock) as g:
        added = cli("endpoint", "add", "-s", served.sock, "late:echo@1040")
        assert (added.returncode, added.stdout, added.stderr) == (0, "1040\n", "")
        assert g.wait_channel("late", timeout=30).addr == 1040
        g.open(3001)
        g.send(3001, 1040, b"late")
        assert g.recv(3001, timeout=30) == (1040, b"late")

        listed = cli("endpoint", "list", "-s", served.sock, "--json")
        assert listed.returncode == 0, listed.stderr
        eps = {e["addr"]: e for e in json.loads(listed.stdout)}
        assert set(eps) == {1024, 1025, 1040}
        assert eps[1040]["describe"] == "echo@1040 (late)" and eps[1040]["socket"] == 0
        table = cli("endpoint", "list", "-c", served.ctl)
        assert table.returncode == 0 and "echo@1040 (late)" in table.stdout

        # no address given: the first free one from 1024 is taken and printed
        anywhere = cli("endpoint", "add", "-s", served.sock, "free:echo")
        assert anywhere.returncode == 0, anywhere.stderr
        free = int(anywhere.stdout)
        assert free == 1026 and g.wait_channel("free", timeout=30).addr == free

        for addr in (1040, free):
            removed = cli("endpoint", "remove", "-s", served.sock, str(addr))
            assert (removed.returncode, removed.stdout, removed.stderr) == (0, "", "")
        wait_until(lambda: not {"late", "free"} & set(g.channels), timeout=30)  # withdrawn
    assert set(served.endpoints()) == {1024, 1025}


#: (command, its arguments after -s SOCK, exit status, the error line's regular expression)
REFUSALS: list[tuple[list[str], list[str], int, str]] = [
    (["endpoint", "remove"], ["999"], 1, r"no-such-endpoint: no endpoint at 999 on socket 0"),
    (["endpoint", "remove"], ["abc"], 2, r"Invalid value for 'addr': .*"),
    (["endpoint", "add"], ["nosuch@1050"], 1, r"bad-endpoint: no endpoint plugin 'nosuch'; .*"),
    (["endpoint", "add"], [",,,"], 1, r"bad-endpoint: cannot parse endpoint ',,,'; .*"),
    (["endpoint", "add"], ["echo@1024"], 1,
     r"address-in-use: host address 1024 has echo@1024 \(-\)"),
    (["stats"], ["--socket", "3"], 1, r"no-such-socket: no socket 3 \(0\.\.0\)"),
    (["stats"], ["--watch", "0"], 2, r"Invalid value for --watch: .*must be positive.*"),
    (["endpoint", "list"], ["--socket", "1"], 1, r"no-such-socket: no socket 1 \(0\.\.0\)"),
    (["endpoint", "open"], ["x"], 2, r"Invalid value for COMMAND: give the program to run "
                                     r"after -- .*"),
    (["endpoint", "open"], ["x", "--addr", "53", "--", "true"], 1,
     r"bad-endpoint: address 53 is reserved or out of range"),
    (["endpoint", "open"], ["x", "--addr", "1024", "--", "true"], 1,
     r"address-in-use: host address 1024 has echo@1024 \(-\)"),
    (["endpoint", "open"], ["x", "--dst", "-1", "--", "true"], 1,
     r"bad-endpoint: dst -1 out of range"),
    (["endpoint", "open"], ["x", "--", "/nonexistent/program"], 127,
     r"/nonexistent/program: no such program \(or not executable\)"),
]


@pytest.fixture(scope="module")
def refusal_runs(served: Served) -> list[subprocess.CompletedProcess[str]]:
    """Every REFUSALS command, run at once (each CLI start-up takes seconds here)."""
    procs = [subprocess.Popen([*CLI, *command, "-s", served.sock, *rest], text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for command, rest, _, _ in REFUSALS]
    runs = []
    for p in procs:
        out, err = p.communicate(timeout=CLI_TIMEOUT)
        runs.append(subprocess.CompletedProcess(p.args, p.returncode, out, err))
    return runs


@pytest.mark.parametrize("case", range(len(REFUSALS)),
                         ids=[" ".join(c + r) for c, r, _, _ in REFUSALS])
def test_refusals_are_one_error_line_and_an_exit_status(
        served: Served, refusal_runs: list[subprocess.CompletedProcess[str]],
        case: int) -> None:
    _, _, code, message = REFUSALS[case]
    refused(refusal_runs[case], code, message)
    wait_until(lambda: set(served.endpoints()) == {1024, 1025})  # nothing left behind


def test_no_server_to_talk_to(tmp_path: Path) -> None:
    refused(cli("stats"), 2, r"Invalid value for --control: give --control PATH or the "
                             r"server's --socket-path .*")
    missing = tmp_path / "missing.ctl"
    refused(cli("stats", "-c", str(missing)), 1,
            re.escape(f"{missing}: no control socket there (is serve running, with "
                      "--control?)"))
    stale = tmp_path / "stale.ctl"  # a socket file nobody listens on (a server was killed)
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as s:
        s.bind(str(stale))
        refused(cli("endpoint", "list", "-c", str(stale)), 1,
                re.escape(f"{stale}: nobody listens there (a stale socket: is serve "
                          "running?)"))


def _exe(pid: int) -> str:
    try:
        return os.readlink(f"/proc/{pid}/exe")
    except OSError:
        return ""


def test_endpoint_open_runs_the_c_echo_as_the_endpoint_until_it_is_killed(
        served: Served, echo_bin: str) -> None:
    closed_before = served.stats()["control"].get("fd_endpoints_closed", 0)
    with SimGuest(served.sock) as g:
        holder = subprocess.Popen([*CLI, "endpoint", "open", "-s", served.sock, "rpmsg-raw",
                                   "--addr", "1100", "--", echo_bin], stderr=subprocess.PIPE)
        try:
            assert g.wait_channel("rpmsg-raw", timeout=60).addr == 1100
            wait_until(lambda: _exe(holder.pid) == echo_bin, timeout=30)  # exec'd, same pid
            g.open(3100)
            rng = random.Random(1100)
            for size in SIZES:
                payload = rng.randbytes(size)
                g.send(3100, 1100, payload)
                assert g.recv(3100, timeout=30) == (1100, payload), size

            refused(cli("endpoint", "remove", "-s", served.sock, "1100"), 1,
                    re.escape("not-removable: fd@1100 (rpmsg-raw, reply) is held by a "
                              "process: it goes when its fd is closed"))
            listed = cli("endpoint", "list", "-s", served.sock, "--json")
            ep = {e["addr"]: e for e in json.loads(listed.stdout)}[1100]
            assert ep["plugin"] == "fd" and ep["name"] == "rpmsg-raw"
            assert ep["to_host_messages"] == ep["to_guest_messages"] == len(SIZES)
            assert ep["to_host_bytes"] == ep["to_guest_bytes"] == sum(SIZES)
            assert ep["endpoint"]["to_process"] == ep["endpoint"]["from_process"] == len(SIZES)

            os.kill(holder.pid, signal.SIGKILL)
            assert holder.wait(30) == -signal.SIGKILL
        finally:
            holder.kill()
            holder.wait()
        wait_until(lambda: "rpmsg-raw" not in g.channels, timeout=30)  # withdrawn
        assert g.stats.events["ns_destroy"] == 1
    assert 1100 not in served.endpoints()
    assert served.stats()["control"]["fd_endpoints_closed"] == closed_before + 1


def test_endpoint_open_addressed_serves_several_guest_addresses(
        served: Served, echo_bin: str) -> None:
    """Addressed framing: the echo sends each datagram back with its address header, so
    each guest address gets its own messages back; '' announces nothing."""
    with SimGuest(served.sock) as g:
        holder = subprocess.Popen([*CLI, "endpoint", "open", "-s", served.sock, "",
                                   "--addr", "1101", "--addressed", "--", echo_bin],
                                  stderr=subprocess.PIPE)
        try:
            wait_until(lambda: _exe(holder.pid) == echo_bin, timeout=60)
            assert served.endpoints()[1101]["describe"] == "fd@1101 (-, addressed)"
            for a in (3101, 3102):
                g.open(a)
            for a in (3101, 3102, 3101):
                g.send(a, 1101, b"from %d" % a)
                assert g.recv(a, timeout=30) == (1101, b"from %d" % a)
        finally:
            holder.kill()
            holder.wait()
        wait_until(lambda: 1101 not in served.endpoints(), timeout=30)
        assert g.channels == {} and g.stats.events["ns_create"] == 0
