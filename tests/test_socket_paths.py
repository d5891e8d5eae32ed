"""Socket paths: a path in use is refused, a stale socket replaced, other files and
symlinks left alone, the path appears only once it accepts connections, the mode is
exact, and one process never binds one path twice (unix endpoint bridges included)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from vhost_rpmsg.guest import SimGuest
from vhost_rpmsg.guest.frontend import FrontendError
from vhost_rpmsg.vhost_user.server import (
    SocketPathError,
    UnixListener,
    check_socket_path,
    listen_unix,
)

CLI = [sys.executable, "-m", "vhost_rpmsg.cli", "serve", "--engine", "python",
       "--log-level", "warning"]


class Served:
    def __init__(self, args: list[str], cwd: Path) -> None:
        self.proc = subprocess.Popen([*CLI, *args], cwd=cwd, stderr=subprocess.PIPE,
                                     text=True)

    def wait_path(self, p: Path) -> None:
        deadline = time.monotonic() + 30
        while not p.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise AssertionError(f"no {p}: {self.stderr}")
            time.sleep(0.01)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(20)
        self.stderr = self.proc.stderr.read() if self.proc.stderr else ""
        return code

    stderr = ""


@pytest.fixture
def served(tmp_path: Path) -> Iterator[list[Served]]:
    started: list[Served] = []
    yield started
    for s in started:
        s.stop()


def _start(served: list[Served], cwd: Path, *args: str) -> Served:
    s = Served(list(args), cwd)
    served.append(s)
    return s


def _echo_works(path: Path) -> None:
    # The server takes one front-end at a time: until it has seen an "in use" probe
    # (a connection closed at once) go, it turns the next one away.
    deadline = time.monotonic() + 30
    while True:
        try:
            with SimGuest(str(path)) as g:
                assert g.wait_channel("rpmsg-raw").addr == 1024
                g.open(2000)
                g.send(2000, 1024, b"still here")
                assert g.recv(2000) == (1024, b"still here")
            return
        except (ConnectionResetError, BrokenPipeError, FrontendError):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def _connectable(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as c:
        try:
            c.connect(str(path))
        except ConnectionRefusedError:
            return False
    return True


# -- through the command ----------------------------------------------------------------


def test_in_use_is_refused_and_first_server_stays_reachable(tmp_path: Path,
                                                            served: list[Served]) -> None:
    path = tmp_path / "r.sock"
    first = _start(served, tmp_path, "-s", str(path))
    first.wait_path(path)
    ident = os.lstat(path).st_ino
    second = subprocess.run([*CLI, "-s", str(path)], capture_output=True, text=True,
                            timeout=60)
    assert second.returncode == 1
    assert second.stderr.startswith("error: ") and second.stderr.count("\n") == 1
    assert str(path) in second.stderr and "in use" in second.stderr
    assert "Traceback" not in second.stderr
    assert os.lstat(path).st_ino == ident  # not replaced
    assert sorted(os.listdir(tmp_path)) == ["r.sock", "r.sock.ctl"]  # no temporary name left
    _echo_works(path)  # after the second one has exited
    assert first.stop() == 0
    assert not path.exists()


def test_stale_socket_is_replaced(tmp_path: Path, served: list[Served]) -> None:
    path = tmp_path / "r.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as dead:
        dead.bind(str(path))
    assert not _connectable(path)
    stale = os.lstat(path).st_ino
    s = _start(served, tmp_path, "-s", str(path))
    deadline = time.monotonic() + 30
    # The stale file stays until the new socket (another inode, made while the stale one
    # still exists) is moved onto the path.
    while os.lstat(path).st_ino == stale:
        assert s.proc.poll() is None and time.monotonic() < deadline, s.stop() or s.stderr
        time.sleep(0.01)
    _echo_works(path)
    assert sorted(os.listdir(tmp_path)) == ["r.sock", "r.sock.ctl"]


def test_path_appears_only_when_it_accepts(tmp_path: Path, served: list[Served]) -> None:
    # A client that waits for the file must be able to connect the moment it shows up.
    path = tmp_path / "r.sock"
    s = _start(served, tmp_path, "-s", str(path))
    s.wait_path(path)
    assert _connectable(path)


def test_symlink_at_the_path_is_not_followed(tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    link = tmp_path / "r.sock"
    link.symlink_to(elsewhere / "target.sock")
    out = subprocess.run([*CLI, "-s", str(link)], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 1 and out.stderr.startswith("error: ")
    assert str(link) in out.stderr and "symbolic link" in out.stderr
    assert link.is_symlink() and os.listdir(elsewhere) == []


def test_socket_count_gives_each_bridge_its_own_path(tmp_path: Path,
                                                     served: list[Served]) -> None:
    base, bridge = tmp_path / "g.sock", tmp_path / "b.sock"
    s = _start(served, tmp_path, "-s", str(base), "--socket-count", "2",
               "-e", f"rpmsg-raw:unix@1024,path={bridge},dst=2000")
    for p in (f"{base}0", f"{base}1", f"{bridge}0", f"{bridge}1"):
        s.wait_path(Path(p))
    assert not bridge.exists()
    with SimGuest(f"{base}0") as g0, SimGuest(f"{base}1") as g1, \
            socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as c0, \
            socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as c1:
        c0.settimeout(20)
        c1.settimeout(20)
        c0.connect(f"{bridge}0")
        c1.connect(f"{bridge}1")
        for g in (g0, g1):
            g.wait_channel("rpmsg-raw")
            g.open(2000)
        c0.send(b"to guest 0")  # each client reaches its own guest ...
        c1.send(b"to guest 1")
        assert g0.recv(2000) == (1024, b"to guest 0")
        assert g1.recv(2000) == (1024, b"to guest 1")
        g0.send(2000, 1024, b"from guest 0")  # ... and hears only its own guest
        g1.send(2000, 1024, b"from guest 1")
        assert c1.recv(1000) == b"from guest 1"
        assert c0.recv(1000) == b"from guest 0"
    assert s.stop() == 0
    assert sorted(os.listdir(tmp_path)) == []  # every socket removed on a clean exit


# -- listen_unix itself -------------------------------------------------------------------


def test_listen_unix_refuses_a_listening_path(tmp_path: Path) -> None:
    path = str(tmp_path / "r.sock")
    with listen_unix(path) as first:
        with pytest.raises(SocketPathError, match="in use"):
            listen_unix(path)
        with pytest.raises(SocketPathError, match="in use"):  # another socket type too
            listen_unix(path, kind=socket.SOCK_SEQPACKET)
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as c:
            c.connect(path)
            conn, _ = first.accept()
            conn.close()
    assert os.listdir(tmp_path) == ["r.sock"]


def test_listen_unix_replaces_a_stale_socket(tmp_path: Path) -> None:
    path = str(tmp_path / "r.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as dead:
        dead.bind(path)
    assert check_socket_path(path) is True
    with listen_unix(path) as s:
        assert _connectable(Path(path))
        s.remove_path()
    assert os.listdir(tmp_path) == []


def test_listen_unix_leaves_other_files_alone(tmp_path: Path) -> None:
    f = tmp_path / "file"
    f.write_text("data")
    (tmp_path / "dir").mkdir()
    target = tmp_path / "target"
    (tmp_path / "dangling").symlink_to(target)
    with listen_unix(str(tmp_path / "live")):
        (tmp_path / "to-live").symlink_to(tmp_path / "live")
        for name, why in [("file", "not a socket"), ("dir", "directory"),
                          ("dangling", "symbolic link"), ("to-live", "symbolic link")]:
            with pytest.raises(SocketPathError, match=why):
                listen_unix(str(tmp_path / name))
    assert f.read_text() == "data" and not target.exists()
    assert (tmp_path / "to-live").is_symlink()
    assert sorted(os.listdir(tmp_path)) == ["dangling", "dir", "file", "live", "to-live"]


def test_listen_unix_listens_before_the_path_exists(tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "r.sock"
    seen: list[bool] = []
    listen = UnixListener.listen

    def spy(self: UnixListener, *args: int) -> None:
        seen.append(os.path.lexists(path))
        listen(self, *args)

    monkeypatch.setattr(UnixListener, "listen", spy)
    with listen_unix(str(path)) as s:
        assert seen == [False]
        assert _connectable(path)
        s.remove_path()


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o000])
@pytest.mark.parametrize("mode", [0o600, 0o660, 0o640, 0o666])
def test_listen_unix_mode_is_exact(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                   mode: int, umask: int) -> None:
    def no_chmod(*a: object, **k: object) -> None:
        raise AssertionError("chmod by path")

    monkeypatch.setattr(os, "chmod", no_chmod)
    path = tmp_path / "r.sock"
    old = os.umask(umask)
    try:
        with listen_unix(str(path), mode) as s:
            assert os.lstat(path).st_mode & 0o7777 == mode
            s.remove_path()
    finally:
        assert os.umask(old) == umask  # restored after bind
