"""``serve --workers K``: the guest sockets spread over K processes, each with its own
control socket; a worker that dies costs only its own guests.

Driven as a user would: the CLI in a subprocess, simulated guests on the sockets, the
control client on each socket's control socket.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import serving, wait_until
from vhost_rpmsg.client import Control
from vhost_rpmsg.guest.rpmsg_guest import SimGuest
from vhost_rpmsg.workers import assign, describe_exit

CLI = [sys.executable, "-m", "vhost_rpmsg.cli"]


def _echo(path: Path, text: bytes) -> None:
    with SimGuest(str(path)) as g:
        g.open(3000)
        g.send(3000, 1024, text)
        assert g.recv(3000) == (1024, text)


def _server_pid(ctl: Path) -> int:
    """The pid of the process that answers on control socket ``ctl``."""
    with Control(str(ctl)) as c:
        stats = c.stats()
    assert len(stats["servers"]) == 1  # a worker's control socket: its one guest socket
    return int(stats["pid"])


@contextlib.contextmanager
def _serve(args: list[str], stderr: int = subprocess.PIPE) -> Iterator[subprocess.Popen[bytes]]:
    """``serve ARGS`` as a process; killed on the way out if it is still running."""
    proc = subprocess.Popen([*CLI, "serve", *args], stderr=stderr)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _stop(proc: subprocess.Popen[bytes]) -> int:
    """SIGTERM, then its exit status (within 20 s)."""
    proc.send_signal(signal.SIGTERM)
    return proc.wait(20)


def _children(pid: int) -> set[int]:
    return {int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()}


def test_assign_spreads_sockets_round_robin() -> None:
    assert assign(5, 2) == [[0, 2, 4], [1, 3]]
    assert assign(3, 3) == [[0], [1], [2]]
    assert describe_exit(-9) == "killed by SIGKILL" and describe_exit(3) == "exit status 3"


def test_each_socket_is_served_by_its_worker_with_its_own_control_socket(
        tmp_path: Path) -> None:
    base = tmp_path / "g"
    paths = [tmp_path / f"g{i}" for i in range(3)]
    with serving([*CLI, "serve", "-s", str(base), "--socket-count", "3", "--workers", "2"],
                 paths[-1]) as proc:
        wait_until(lambda: all(Path(f"{p}.ctl").exists() for p in paths))
        for i, p in enumerate(paths):
            _echo(p, b"to socket %d" % i)
        pids = [_server_pid(Path(f"{p}.ctl")) for p in paths]
        workers = _children(proc.pid)
        assert len(workers) == 2 and set(pids) == workers  # two processes, not the parent
        assert pids[0] == pids[2] != pids[1]  # socket i to worker i mod 2
        assert proc.pid not in pids
    for p in paths:  # a clean stop removes every socket file
        assert not p.exists() and not Path(f"{p}.ctl").exists()
    log = proc.stderr.read().decode() if proc.stderr else ""
    assert "worker 0 (pid" in log and "worker 1: " in log  # each worker's lines say whose


def test_a_worker_killed_costs_only_its_own_guests(tmp_path: Path) -> None:
    base = tmp_path / "g"
    paths = [tmp_path / f"g{i}" for i in range(3)]
    with _serve(["-s", str(base), "--socket-count", "3", "--workers", "2"]) as proc:
        wait_until(lambda: all(Path(f"{p}.ctl").exists() for p in paths))
        victim = _server_pid(Path(f"{paths[1]}.ctl"))
        os.kill(victim, signal.SIGKILL)
        # Its socket files go, so a front-end hears ECONNREFUSED instead of waiting.
        wait_until(lambda: not paths[1].exists() and not Path(f"{paths[1]}.ctl").exists())
        for i in (0, 2):
            _echo(paths[i], b"still served %d" % i)
        assert proc.poll() is None
        code = _stop(proc)
    log = proc.stderr.read().decode() if proc.stderr else ""
    assert code == 1, log  # a worker died: not a clean run
    assert f"worker 1 (pid {victim}) died (killed by SIGKILL)" in log, log
    assert not any(p.exists() for p in paths)


def test_workers_enter_the_sandbox_themselves(tmp_path: Path) -> None:
    """--seccomp kill: each worker is filtered, after the fork (a filtered parent could
    not fork), and serves through it; the parent, which reads no input, is not."""
    pytest.importorskip("ctypes")
    base = tmp_path / "g"
    paths = [tmp_path / f"g{i}" for i in range(2)]
    user = ["--user", "nobody"] if os.geteuid() == 0 else []
    with serving([*CLI, "serve", "-s", str(base), "--socket-count", "2", "--workers", "2",
                  "--seccomp", "kill", *user], paths[-1]) as proc:
        wait_until(lambda: all(Path(f"{p}.ctl").exists() for p in paths))
        for i, p in enumerate(paths):
            _echo(p, b"filtered %d" % i)
        for pid in (_server_pid(Path(f"{p}.ctl")) for p in paths):
            status = Path(f"/proc/{pid}/status").read_text()
            assert "\nSeccomp:\t2\n" in status
        assert "\nSeccomp:\t0\n" in Path(f"/proc/{proc.pid}/status").read_text()


def test_without_control_sockets_the_workers_serve(tmp_path: Path) -> None:
    paths = [tmp_path / f"g{i}" for i in range(2)]
    with serving([*CLI, "serve", "-s", str(tmp_path / "g"), "--socket-count", "2",
                  "--workers", "2", "--no-control"], paths[-1]):
        for i, p in enumerate(paths):
            _echo(p, b"no control %d" % i)
        assert not any(tmp_path.glob("*.ctl"))


@pytest.mark.parametrize("attempt", range(5))
def test_a_stop_at_once_after_the_start_stops_every_worker(tmp_path: Path,
                                                           attempt: int) -> None:
    """SIGTERM the moment the socket files exist, while the workers are being forked
    and set up: however it falls, every worker stops and ``serve`` exits 0."""
    paths = [tmp_path / f"g{i}" for i in range(3)]
    with _serve(["-s", str(tmp_path / "g"), "--socket-count", "3", "--workers", "3"]) as proc:
        wait_until(lambda: paths[-1].exists() or proc.poll() is not None, timeout=30)
        time.sleep(attempt * 0.002)  # a little later each attempt
        code = _stop(proc)
    assert code == 0, proc.stderr.read().decode() if proc.stderr else code
    assert not any(p.exists() for p in paths)


def test_workers_end_with_their_supervisor(tmp_path: Path) -> None:
    """kill -9 of the supervisor: each worker hears SIGTERM (PR_SET_PDEATHSIG), stops
    and removes its socket files, so a new serve can take the paths."""
    paths = [tmp_path / f"g{i}" for i in range(2)]
    with _serve(["-s", str(tmp_path / "g"), "--socket-count", "2", "--workers", "2"],
                stderr=subprocess.DEVNULL) as proc:
        wait_until(lambda: all(Path(f"{p}.ctl").exists() for p in paths))
        workers = [_server_pid(Path(f"{p}.ctl")) for p in paths]
        proc.kill()
        proc.wait()
        wait_until(lambda: not any(Path(f"/proc/{pid}").exists()
                                   and "State:\tZ" not in _status(pid) for pid in workers))
        wait_until(lambda: not any(p.exists() for p in paths))


def _status(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return ""
