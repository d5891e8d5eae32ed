"""Startup failures of ``vhost-rpmsg serve``: one ``error:`` line, non-zero exit, nothing
created.  Each case runs the real command in a process of its own, in an empty working
directory, so what a supervisor would log (stderr) and what is left behind are checked."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

CLI = [sys.executable, "-m", "vhost_rpmsg.cli"]


def _run(args: list[str], cwd: Path, *, pass_fds: tuple[int, ...] = (),
         stdin: int | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *args], cwd=cwd, capture_output=True, text=True,
                          timeout=60, pass_fds=pass_fds, stdin=stdin)


def _listing(d: Path) -> set[str]:
    return {str(p.relative_to(d)) for p in d.rglob("*")}


def _assert_one_line_failure(out: subprocess.CompletedProcess[str], *needles: str) -> None:
    assert out.returncode not in (0, None), out
    assert "Traceback" not in out.stderr, out.stderr
    assert out.stderr.startswith("error: "), out.stderr
    assert out.stderr.count("\n") == 1 and out.stderr.endswith("\n"), out.stderr
    assert out.stdout == ""
    for needle in needles:
        assert needle in out.stderr, (needle, out.stderr)


# (arguments, what the message must name, exit status)
CASES = [
    (["-e", "echo@1024", "-e", "sink@1024"], ["--endpoint", "1024"], 2),
    # the bridge's socket must not be created (and left) before the address check fails
    (["-e", "unix@1024,path=b.sock", "-e", "sink@1024"], ["--endpoint", "1024"], 2),
    (["-e", "a:b:c"], ["--endpoint", "a:b:c"], 2),
    (["-e", "nope"], ["--endpoint", "nope"], 2),
    (["-e", "sink,size=3"], ["--endpoint", "size"], 2),
    (["-e", "source@1030"], ["--endpoint", "dst"], 2),
    (["-e", "unix@1024"], ["--endpoint", "path="], 2),
    (["-e", "unix@1024,path=b.sock,mode=xyz"], ["--endpoint", "xyz"], 2),
    (["-e", "unix@1024,path=b.sock,dst=x"], ["--endpoint", "dst"], 2),
    (["-e", "echo@53"], ["--endpoint", "53"], 2),
    (["-e", "echo@01024"], ["--endpoint", "01024"], 2),
    (["-e", "echo@4294967295"], ["--endpoint", "4294967295"], 2),
    (["-e", "a-service-name-longer-than-31-bytes:echo"], ["--endpoint", "name"], 2),
    (["--socket-mode", "abc"], ["--socket-mode", "abc"], 2),
    (["--socket-mode", "1777"], ["--socket-mode", "1777"], 2),
    (["--socket-count", "0"], ["--socket-count"], 2),
    (["--socket-count", "-1"], ["--socket-count"], 2),
    (["--socket-count", "two"], ["--socket-count"], 2),
    (["--outbox", "-1"], ["--outbox"], 2),
    (["--workers", "0"], ["--workers"], 2),
    (["--workers", "2"], ["--workers", "--socket-count (1)"], 2),
    (["--socket-count", "2", "--workers", "3"], ["--workers", "--socket-count (2)"], 2),
    (["--socket-count", "2", "--workers", "2", "--metrics", "0"], ["--metrics", "--workers"],
     2),
    (["--log-level", "bogus"], ["--log-level", "bogus"], 2),
    (["--engine", "rust"], ["--engine", "rust"], 2),
    (["--bogus"], ["--bogus"], 2),
    (["--fd", "3"], ["--socket-path", "--fd"], 2),
    (["-e", "unix@1024,path=b.sock", "-e", "unix@1025,path=b.sock"], ["b.sock", "unix@1025"],
     2),
    (["-e", "unix@1024,path=a.sock"], ["a.sock", "--socket-path"], 2),
    (["-e", "unix@1024,path=missing/b.sock"], ["--endpoint", "missing/b.sock", "missing"], 1),
]


@pytest.mark.parametrize(("args", "needles", "status"), CASES,
                         ids=[" ".join(c[0]) for c in CASES])
def test_bad_arguments(tmp_path: Path, args: list[str], needles: list[str],
                       status: int) -> None:
    out = _run(["serve", "-s", "a.sock", "--engine", "python", *args], tmp_path)
    _assert_one_line_failure(out, *needles)
    assert out.returncode == status
    assert _listing(tmp_path) == set()


@pytest.mark.parametrize("args", [["serve"], ["bogus"], ["serve", "--fd", "0", "-s", "x"]])
def test_bad_usage(tmp_path: Path, args: list[str]) -> None:
    out = _run(args, tmp_path)
    _assert_one_line_failure(out)
    assert out.returncode == 2
    assert _listing(tmp_path) == set()


def test_directory_missing(tmp_path: Path) -> None:
    out = _run(["serve", "-s", str(tmp_path / "nodir" / "r.sock")], tmp_path)
    _assert_one_line_failure(out, str(tmp_path / "nodir"), "does not exist")
    assert _listing(tmp_path) == set()


def test_parent_is_a_file(tmp_path: Path) -> None:
    (tmp_path / "f").write_text("x")
    out = _run(["serve", "-s", "f/r.sock"], tmp_path)
    _assert_one_line_failure(out, "f/r.sock", "not a directory")
    assert _listing(tmp_path) == {"f"}


def test_regular_file_at_the_path(tmp_path: Path) -> None:
    (tmp_path / "r.sock").write_text("keep me")
    out = _run(["serve", "-s", "r.sock"], tmp_path)
    _assert_one_line_failure(out, "r.sock", "not a socket")
    assert (tmp_path / "r.sock").read_text() == "keep me"
    assert _listing(tmp_path) == {"r.sock"}


def test_path_too_long(tmp_path: Path) -> None:
    name = "x" * 120
    out = _run(["serve", "-s", name], tmp_path)
    _assert_one_line_failure(out, name, "too long")
    assert _listing(tmp_path) == set()


def test_fd_not_open(tmp_path: Path) -> None:
    out = _run(["serve", "--fd", "99"], tmp_path)
    _assert_one_line_failure(out, "--fd 99")
    assert out.returncode == 1


def test_fd_not_a_socket(tmp_path: Path) -> None:
    out = _run(["serve", "--fd", "0"], tmp_path, stdin=subprocess.DEVNULL)
    _assert_one_line_failure(out, "--fd 0", "not a socket")


def test_fd_not_listening(tmp_path: Path) -> None:
    a, b = socket.socketpair()
    with a, b:
        fd = a.fileno()
        out = _run(["serve", "--fd", str(fd)], tmp_path, pass_fds=(fd,))
    _assert_one_line_failure(out, f"--fd {fd}", "not listening")


def test_fd_not_unix(tmp_path: Path) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        fd = s.fileno()
        out = _run(["serve", "--fd", str(fd)], tmp_path, pass_fds=(fd,))
    _assert_one_line_failure(out, f"--fd {fd}", "unix")


def test_directory_not_writable(tmp_path: Path) -> None:
    ro = tmp_path / "ro"
    ro.mkdir()
    if os.geteuid() == 0:
        # Root passes permission checks, but not an immutable directory's.
        chattr = shutil.which("chattr")
        if chattr is None or subprocess.run([chattr, "+i", str(ro)],
                                            capture_output=True).returncode != 0:
            pytest.skip("running as root and cannot make a directory immutable")
    else:
        ro.chmod(0o555)
    try:
        out = _run(["serve", "-s", str(ro / "r.sock")], tmp_path)
    finally:
        if os.geteuid() == 0:
            subprocess.run(["chattr", "-i", str(ro)], check=True)
        ro.chmod(0o755)
    _assert_one_line_failure(out, str(ro), "not writable")
    assert _listing(tmp_path) == {"ro"}


@pytest.mark.parametrize("args", [["--guests", "0"], ["--guests", "two"], ["--guests", ","],
                                  ["--repeats", "0"], ["--min-seconds", "-1"],
                                  ["--workers", "2"], ["--workers", "0", "--guests", "1"],
                                  ["--workers", "3", "--guests", "2,4"]],
                         ids=lambda a: " ".join(a))
def test_bad_bench_arguments_are_one_error_line(tmp_path: Path, args: list[str]) -> None:
    out = _run(["bench", *args], tmp_path)
    _assert_one_line_failure(out, args[0])
    assert out.returncode == 2
