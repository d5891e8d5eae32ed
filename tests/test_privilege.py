"""Least privilege for ``serve`` (vhost_rpmsg/sandbox.py, docs/security.md): ``--user``
gives up root once the sockets exist, ``--seccomp`` confines the process to the system
calls serving needs.

Each case runs the real command in a process of its own and looks at it from outside
(/proc/PID/status, the socket files, what a simulated guest gets back).  Changing user
needs root: those cases skip, saying so, when the suite does not run as root.  The
workloads here are also the allowlist's regression test: served with ``--seccomp kill``,
a system call missing from the list kills the server, and the test sees it die.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import grp
import os
import pwd
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import textwrap
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import pytest

from tests.helpers import require_guest_image, wait_until
from vhost_rpmsg import sandbox
from vhost_rpmsg.client import Control
from vhost_rpmsg.guest.frontend import Frontend, FrontendError, GuestRam
from vhost_rpmsg.guest.rpmsg_guest import SimGuest
from vhost_rpmsg.vhost_user import codec
from vhost_rpmsg.vhost_user.protocol import ProtocolFeature, Request

CLI = [sys.executable, "-m", "vhost_rpmsg.cli"]
NOBODY = pwd.getpwnam("nobody")
ROOT = os.geteuid() == 0
needs_root = pytest.mark.skipif(not ROOT, reason=f"changing user needs root; the suite "
                                                 f"runs as uid {os.geteuid()}")
HANG_GUARD = 60  # seconds: a server that takes longer to start or stop is stuck

# -- a test-only plugin: does what the guest asks, answers how it went ------------------

PROBE = '''
    import asyncio, errno, importlib, os, socket, threading
    from vhost_rpmsg.endpoints import Endpoint

    def _outcome(fn):
        try:
            fn()
        except OSError as e:
            return errno.errorcode.get(e.errno, str(e.errno))
        except ImportError as e:
            return type(e).__name__
        return "ok"

    def _fork():
        pid = os.fork()
        if pid == 0:
            os._exit(0)
        os.waitpid(pid, 0)

    class Probe(Endpoint):
        """mkdir PATH, inet (an AF_INET socket), fork, import MODULE (not imported yet),
        raise (no answer: the server logs the traceback), thread (answers from a new
        thread)."""

        def on_message(self, src, data):
            op, _, arg = data.decode().partition(" ")
            if op == "raise":
                raise RuntimeError("asked to")
            if op == "thread":
                loop = asyncio.get_running_loop()
                answer = lambda: loop.call_soon_threadsafe(self.port.send, src, b"thread")
                threading.Thread(target=answer).start()
                return
            calls = {"mkdir": lambda: os.mkdir(arg),
                     "inet": lambda: socket.socket(socket.AF_INET, socket.SOCK_DGRAM).close(),
                     "fork": _fork, "import": lambda: importlib.import_module(arg)}
            self.port.send(src, _outcome(calls[op]).encode())

    class Later(Endpoint):
        """An async handler: answers after a timer."""

        async def on_message(self, src, data):
            await asyncio.sleep(0.01)
            await self.port.asend(src, data[::-1])
'''


@pytest.fixture(scope="module")
def plugin_site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A third-party distribution with the probe plugins, as an installer leaves it."""
    root = tmp_path_factory.mktemp("site")
    info = root / "vr_probe-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: vr-probe\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(
        "[vhost_rpmsg.endpoints]\nprobe = vr_probe:Probe\nlater = vr_probe:Later\n")
    (root / "vr_probe.py").write_text(textwrap.dedent(PROBE))
    return root


@pytest.fixture
def run_dir() -> Iterator[Path]:
    """A directory for sockets, owned by the user nobody (so the server, once it is
    nobody, removes its sockets at exit) and searchable by anyone (other users
    connect)."""
    d = Path(tempfile.mkdtemp(prefix="vr-priv-"))
    try:
        if ROOT:
            os.chown(d, NOBODY.pw_uid, NOBODY.pw_gid)
        d.chmod(0o755)
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


# -- a server process ----------------------------------------------------------------


@dataclass
class Server:
    proc: subprocess.Popen[bytes]
    log: Path

    @property
    def pid(self) -> int:
        return self.proc.pid

    def text(self) -> str:
        return self.log.read_text()

    def status(self, task: int | None = None) -> dict[str, str]:
        """/proc/PID/status (or a thread's) as a dict of its fields."""
        where = f"/proc/{self.pid}" + (f"/task/{task}" if task is not None else "")
        lines = Path(f"{where}/status").read_text().splitlines()
        return {k: v.strip() for k, v in (line.split(":", 1) for line in lines)}

    def threads(self) -> list[dict[str, str]]:
        """The status of every thread: credentials and filters are per thread."""
        return [self.status(int(t)) for t in os.listdir(f"/proc/{self.pid}/task")]

    def stop(self) -> int:
        """SIGTERM, and the exit status."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(HANG_GUARD)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(f"no exit within {HANG_GUARD} s of SIGTERM") from None


@contextlib.contextmanager
def serving(args: list[str], ready: list[Path], logs: Path, site: Path | None = None,
            ) -> Iterator[Server]:
    """``vhost-rpmsg serve ARGS`` (stderr to a file, so no pipe can fill), once every
    path of ``ready`` exists and it serves (sandboxed: the paths appear before that);
    killed if the body fails, else it must end cleanly on SIGTERM."""
    env = dict(os.environ)
    if site is not None:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(site),
                                                          env.get("PYTHONPATH")]))
    log = logs / f"serve-{time.monotonic_ns()}.log"
    with log.open("w") as err:
        proc = subprocess.Popen([*CLI, "serve", *args], stderr=err, env=env)
    server = Server(proc, log)
    try:
        deadline = time.monotonic() + HANG_GUARD
        while not all(p.exists() for p in ready) or ": listening" not in server.text():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"server did not start ({proc.poll()}):\n"
                                     f"{server.text()}")
            time.sleep(0.01)
        yield server
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    code = server.stop()
    assert code == 0, f"exit status {code}\n{server.text()}"


# -- the workloads (also what the allowlist was derived from) -----------------------


def echo_session(path: str, addr: int = 3000) -> None:
    """A guest's driver probes, finds the announced echo, and gets 200 messages of every
    size back byte for byte, some as one burst."""
    with SimGuest(path) as g:
        assert g.wait_channel("rpmsg-raw").addr == 1024
        g.open(addr)
        for i in range(200):
            data = bytes((i + k) & 0xFF for k in range(i * 5 % 497))
            g.send(addr, 1024, data)
            assert g.recv(addr) == (1024, data)
        g.send_burst(addr, 1024, b"burst", 100)
        for _ in range(100):
            assert g.recv(addr) == (1024, b"burst")


def hostile_front_ends(path: str) -> None:
    """The error paths of tests/test_bad_input.py, through the socket: garbage, a second
    front-end, a pipe for a kick eventfd, a blocking one, memory that cannot be
    sealed, a truncation of sealed memory, a front-end that never reads its replies.
    Then a guest is served as usual."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(path)
    s.sendall(os.urandom(64))
    s.shutdown(socket.SHUT_WR)
    with contextlib.suppress(ConnectionResetError):
        s.recv(100)
    s.close()
    with SimGuest(path, memory_seals=0) as g:  # sealable: the server seals it
        second = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        second.settimeout(5)
        second.connect(path)
        assert second.recv(10) == b""  # refused while the first is connected
        second.close()
        assert g.fe is not None and g.ram is not None
        r, w = os.pipe()
        with pytest.raises(FrontendError, match="refused"):
            g.fe.request(Request.SET_VRING_KICK, codec.encode_vring_file(1), [r],
                         need_reply=True)
        os.close(r)
        os.close(w)
        with pytest.raises(PermissionError):
            os.ftruncate(g.ram.fd, 4096)
        g.open(3100)
        g.send(3100, 1024, b"after")
        assert g.recv(3100) == (1024, b"after")
        kick = os.eventfd(0)  # blocking: the server makes it non-blocking, and reads it
        g.fe.request(Request.SET_VRING_KICK, codec.encode_vring_file(1), [kick],
                     need_reply=True)
        assert not os.get_blocking(kick)
        os.eventfd_write(kick, 1)
        wait_until(lambda: g.fe is not None and g.fe.get_u64(Request.GET_QUEUE_NUM) == 2)
        os.close(kick)
    with pytest.raises(FrontendError):
        SimGuest(path, memory_seals=-1).start()  # memory that could shrink: refused
    flood = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    flood.connect(path)
    with contextlib.suppress(OSError):
        flood.sendall(codec.encode(Request.GET_FEATURES, b"") * 20000)
    flood.close()
    time.sleep(0.2)  # the server drops it; the next front-end waits for that
    ram = GuestRam(1 << 20)
    fe = Frontend(path, ram)
    fe.negotiate(1 << ProtocolFeature.REPLY_ACK)
    with pytest.raises(FrontendError):
        fe.request(Request.SET_VRING_NUM, codec.encode_vring_state(7, 256), need_reply=True)
    fe.close()
    ram.close()
    echo_session(path, 3101)


def bridge_session(guest_path: str, bridge_path: str) -> None:
    """A host process on a unix bridge and a guest exchange datagrams both ways."""
    client = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    client.settimeout(10)
    with SimGuest(guest_path) as g:
        client.connect(bridge_path)
        g.open(3200)
        time.sleep(0.1)  # the bridge accepts the client on the server's loop
        g.send(3200, 1030, b"to the host")
        assert client.recv(600) == b"to the host"
        client.send(b"to the guest")
        assert g.recv(3200) == (1030, b"to the guest")
    client.close()


def plugin_session(path: str) -> None:
    """A third-party plugin's synchronous handler starts a thread, an async one sleeps
    on a timer; the built-in source streams to the guest."""
    with SimGuest(path) as g:
        g.open(2000)  # where the source sends
        g.open(3300)
        g.send(3300, 1040, b"thread")
        assert g.recv(3300) == (1040, b"thread")
        g.send(3300, 1041, b"later")
        assert g.recv(3300) == (1041, b"retal")
        g.send(3300, 1040, b"raise")  # a traceback for the log, no answer
        g.send(3300, 1040, b"import wave")  # a module imported late, whatever comes of it
        assert g.recv(3300)[1] in (b"ok", b"ModuleNotFoundError", b"ImportError")
        for _ in range(5):
            assert g.recv(2000)[0] == 1042


def control_session(control: str, guest_path: str, index: int | None = None) -> None:
    """The control socket: stats, an endpoint added, used and removed at run time, and
    an endpoint fd (SCM_RIGHTS) the guest and this process talk through, then closed."""
    with Control(control) as ctl:
        assert ctl.stats(index)["servers"]
        addr = ctl.add_endpoint("late:echo@1050", index)
        with SimGuest(guest_path) as g:
            assert g.wait_channel("late").addr == addr
            g.open(3600)
            g.send(3600, addr, b"late")
            assert g.recv(3600) == (addr, b"late")
            with ctl.open_endpoint("held", socket_index=index) as ep:
                assert g.wait_channel("held").addr == ep.addr
                g.send(3600, ep.addr, b"to the process")
                assert ep.recv() == (None, b"to the process")
                g.send_burst(3600, ep.addr, b"burst", 20)  # a batch: the C writer, sendmmsg
                assert [ep.recv() for _ in range(20)] == [(None, b"burst")] * 20
                ep.send(b"to the guest")
                assert g.recv(3600) == (ep.addr, b"to the guest")
            wait_until(lambda: all(e["addr"] != ep.addr for e in ctl.endpoints(index)))
        ctl.remove_endpoint(addr, index)
        assert all(e["addr"] != addr for e in ctl.endpoints(index))


def metrics_scrape(log: str) -> None:
    """Two scrapes of the Prometheus exporter (its own thread, a TCP socket)."""
    found = re.search(r"metrics on (http://\S+/metrics)", log)
    assert found, log
    for _ in range(2):
        with urllib.request.urlopen(found[1], timeout=HANG_GUARD) as r:
            assert b"vhost_rpmsg_connected" in r.read()


def probe(path: str, op: str) -> bytes:
    """What the probe plugin answers to ``op``."""
    with SimGuest(path) as g:
        g.open(3400)
        g.send(3400, 1040, op.encode())
        return g.recv(3400)[1]


FULL = ["-e", "rpmsg-raw:echo@1024", "-e", "sink@1025", "-e", "probe@1040",
        "-e", "later@1041", "-e", "source@1042,dst=2000,size=64,rate=200",
        "-e", "unix@1030,path={run}/bridge.sock"]


def full_args(run: Path, *extra: str) -> list[str]:
    return ["-s", str(run / "g.sock"), *(a.replace("{run}", str(run)) for a in FULL),
            *extra]


# -- --user ----------------------------------------------------------------------------


def _one_line_failure(out: subprocess.CompletedProcess[str], status: int,
                      *needles: str) -> None:
    assert out.returncode == status, out
    assert "Traceback" not in out.stderr, out.stderr
    assert out.stderr.startswith("error: ") and out.stderr.count("\n") == 1, out.stderr
    for needle in needles:
        assert needle in out.stderr, (needle, out.stderr)


def _run(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, "serve", "-s", "r.sock", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=HANG_GUARD)


#: ``vhost-rpmsg ARGV`` as nobody, for real, from a root start: nobody may be unable to
#: read this host's Python (/root/.pyenv here), so the interpreter starts as root and
#: parses a command line once (typer imports what parsing needs), then becomes nobody
AS_NOBODY = """
import contextlib, io, os, sys
from vhost_rpmsg.cli import app, main
from vhost_rpmsg.virtio.engines import queue_factory
queue_factory("auto")  # the engine's modules, imported while they are still readable
with contextlib.redirect_stdout(io.StringIO()):
    app(["serve", "--print-capabilities"], standalone_mode=False)
os.setgroups([])
os.setgid({gid})
os.setuid({uid})
sys.argv[0] = "vhost-rpmsg"
main()
"""


def test_user_as_a_non_root_user_is_one_error_line(run_dir: Path) -> None:
    """Not root: status 2, one line, nothing created."""
    cmd = [sys.executable, "-c", AS_NOBODY.format(uid=NOBODY.pw_uid, gid=NOBODY.pw_gid)] \
        if ROOT else CLI
    out = subprocess.run([*cmd, "serve", "-s", "r.sock", "--user", "nobody"], cwd=run_dir,
                         capture_output=True, text=True, timeout=HANG_GUARD)
    _one_line_failure(out, 2, "--user nobody", "needs root",
                      f"uid {NOBODY.pw_uid if ROOT else os.geteuid()}")
    assert list(run_dir.iterdir()) == []


@needs_root
@pytest.mark.parametrize(("args", "needles"), [
    (["--user", "no-such-user-here"], ["--user", "no-such-user-here", "no such user"]),
    (["--user", "root"], ["--user", "root"]),
    (["--user", "nobody", "--group", "no-such-group-here"], ["--group", "no such group"]),
    (["--group", "nogroup"], ["--group needs --user"]),
    (["--user", "424242"], ["424242", "--group"]),
], ids=["unknown-user", "root", "unknown-group", "group-alone", "uid-without-entry"])
def test_bad_user_options_are_one_error_line(run_dir: Path, args: list[str],
                                             needles: list[str]) -> None:
    out = _run(args, run_dir)
    _one_line_failure(out, 2, *needles)
    assert list(run_dir.iterdir()) == []


@needs_root
def test_serves_as_nobody_after_binding(run_dir: Path, plugin_site: Path) -> None:
    """Every uid and gid (real, effective, saved, filesystem) is nobody's, no capability
    and no supplementary group is left; the sockets were bound by root and given to
    nobody, guests are served, and at exit nobody removes them."""
    with serving(full_args(run_dir, "--user", "nobody"),
                 [run_dir / "g.sock", run_dir / "bridge.sock"], run_dir,
                 plugin_site) as s:
        for st in s.threads():  # numpy's pool thread among them
            assert st["Uid"].split() == [str(NOBODY.pw_uid)] * 4
            assert st["Gid"].split() == [str(NOBODY.pw_gid)] * 4
            assert st["Groups"].split() == [str(g) for g in sorted(
                set(os.getgrouplist("nobody", NOBODY.pw_gid)))]
            assert int(st["CapPrm"], 16) == int(st["CapEff"], 16) == 0
            assert int(st["CapAmb"], 16) == 0 and st["Seccomp"] == "0"
        # per thread, set by the serving one (all of them only with --seccomp's TSYNC)
        assert s.status()["NoNewPrivs"] == "1"
        for sock in ("g.sock", "g.sock.ctl", "bridge.sock"):  # guest, control, bridge
            info = (run_dir / sock).lstat()
            assert stat.S_ISSOCK(info.st_mode) and stat.S_IMODE(info.st_mode) == 0o600
            assert (info.st_uid, info.st_gid) == (NOBODY.pw_uid, NOBODY.pw_gid)
        echo_session(str(run_dir / "g.sock"))
        bridge_session(str(run_dir / "g.sock"), str(run_dir / "bridge.sock"))
        assert probe(str(run_dir / "g.sock"), f"mkdir {run_dir}/made") == b"ok"
    assert (run_dir / "made").stat().st_uid == NOBODY.pw_uid  # made by nobody
    assert not any((run_dir / p).exists() for p in ("g.sock", "g.sock.ctl", "bridge.sock"))
    assert "running as nobody (uid 65534" in s.text()


def _errno_as(uid: int, gid: int, groups: list[int], fn: Callable[[], object]) -> int:
    """The errno of ``fn()`` in a process of that user and those groups (0: it worked).
    A forked child, not a new interpreter: the user may be unable to read this host's
    Python."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover (the child)
        code = 0
        try:
            os.setgroups(groups)
            os.setgid(gid)
            os.setuid(uid)
            fn()
        except OSError as e:
            code = e.errno or 255
        os._exit(code)
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])


def _connect(path: Path) -> Callable[[], None]:
    return lambda: socket.socket(socket.AF_UNIX, socket.SOCK_STREAM).connect(str(path))


def _ptrace_attach(pid: int) -> Callable[[], None]:
    def attach() -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.ptrace(16, pid, None, None) != 0:  # PTRACE_ATTACH; detached at exit
            raise OSError(ctypes.get_errno(), "ptrace")
    return attach


@needs_root
def test_group_and_socket_mode_decide_who_may_connect(run_dir: Path) -> None:
    """--group G with --socket-mode 0660: the socket is nobody:G, a process of another
    user in G (QEMU's, say) connects, the same user outside G is refused."""
    group = grp.getgrnam("daemon")
    other = pwd.getpwnam("bin")
    assert group.gr_gid not in os.getgrouplist(other.pw_name, other.pw_gid)
    path = run_dir / "g.sock"
    with serving(["-s", str(path), "--user", "nobody", "--group", "daemon",
                  "--socket-mode", "0660"], [path], run_dir) as s:
        assert s.status()["Gid"].split() == [str(group.gr_gid)] * 4
        info = path.lstat()
        assert (info.st_uid, info.st_gid) == (NOBODY.pw_uid, group.gr_gid)
        assert stat.S_IMODE(info.st_mode) == 0o660
        assert _errno_as(other.pw_uid, other.pw_gid, [group.gr_gid], _connect(path)) == 0
        assert _errno_as(other.pw_uid, other.pw_gid, [], _connect(path)) == errno.EACCES
        echo_session(str(path))  # the server took both connections and goes on


@needs_root
def test_other_processes_of_the_user_cannot_trace_it(run_dir: Path) -> None:
    """The kernel marks a process that changed user non-dumpable: another process of
    nobody may not ptrace the server or read its memory, though it may trace one of its
    own (a sleep started as nobody: the control)."""
    path = run_dir / "g.sock"
    me = (NOBODY.pw_uid, NOBODY.pw_gid, [NOBODY.pw_gid])
    with serving(["-s", str(path), "--user", "nobody"], [path], run_dir) as s:
        assert _errno_as(*me, _ptrace_attach(s.pid)) == errno.EPERM
        mem = f"/proc/{s.pid}/mem"
        assert _errno_as(*me, lambda: open(mem, "rb").close()) == errno.EACCES
        echo_session(str(path))
    control = subprocess.Popen(["sleep", "60"], user=NOBODY.pw_uid, group=NOBODY.pw_gid,
                               extra_groups=[NOBODY.pw_gid])
    try:
        assert _errno_as(*me, _ptrace_attach(control.pid)) == 0
    finally:
        control.kill()
        control.wait()


@needs_root
def test_a_socket_nobody_cannot_remove_stays_and_is_replaced(tmp_path: Path) -> None:
    """In a directory only root may write, nobody cannot unlink its socket at exit: the
    server warns at start; the stale socket left is replaced by the next start."""
    path = tmp_path / "r.sock"
    for _ in range(2):
        with serving(["-s", str(path), "--user", "nobody"], [path], tmp_path) as s:
            echo_session(str(path))
        assert "cannot remove it at exit" in s.text()
        assert path.lstat().st_uid == NOBODY.pw_uid


@needs_root
def test_root_is_out_of_reach_after_the_drop() -> None:
    """drop_privileges in a process of its own: after it, setuid(0) and setgid(0) fail
    with EPERM and the saved set-user-ID is nobody's too."""
    code = textwrap.dedent("""
        import os
        from vhost_rpmsg.sandbox import drop_privileges, resolve_user
        drop_privileges(resolve_user("nobody"))
        print(os.getresuid())
        for call in (os.setuid, os.setreuid, os.setgid):
            try:
                call(0) if call is not os.setreuid else call(0, 0)
            except PermissionError as e:
                print(call.__name__, e.errno)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=HANG_GUARD, check=True).stdout.splitlines()
    uid = NOBODY.pw_uid
    assert out == [f"({uid}, {uid}, {uid})", *(f"{c} {errno.EPERM}" for c in
                                                ("setuid", "setreuid", "setgid"))]


# -- --seccomp -------------------------------------------------------------------------


@pytest.mark.parametrize(("args", "needles"), [
    (["--seccomp", "strict"], ["--seccomp", "strict", "kill, eperm, log"]),
    (["--seccomp", "kill", "--seccomp-allow", "no_such_call"], ["no_such_call"]),
    (["--seccomp-allow", "mkdir"], ["--seccomp-allow needs --seccomp"]),
], ids=["bad-mode", "unknown-call", "allow-alone"])
def test_bad_seccomp_options_are_one_error_line(tmp_path: Path, args: list[str],
                                                needles: list[str]) -> None:
    out = _run(args, tmp_path)
    _one_line_failure(out, 2, *needles)
    assert list(tmp_path.iterdir()) == []


def test_seccomp_refuses_other_architectures(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sandbox.platform, "machine", lambda: "riscv64")
    with pytest.raises(sandbox.SandboxError, match="x86_64 and aarch64, not riscv64"):
        sandbox.check_seccomp("kill")


def test_seccomp_without_libseccomp_says_so(monkeypatch: pytest.MonkeyPatch) -> None:
    def missing(name: str, **kw: object) -> None:
        raise OSError(f"{name}: cannot open shared object file")

    monkeypatch.setattr(sandbox.ctypes, "CDLL", missing)
    with pytest.raises(sandbox.SandboxError, match=r"libseccomp\.so\.2 not found"):
        sandbox.check_seccomp("kill")


def test_every_allowlisted_name_is_a_system_call() -> None:
    """A name libseccomp does not know would be left out silently: none is, here; the
    ones this architecture lacks are x86-64's own (aarch64 has only the *at forms)."""
    lib = sandbox._libseccomp()
    names = [*sandbox.SYSCALLS, *(c[0] for c in sandbox.CONDITIONAL)]
    assert len(set(sandbox.SYSCALLS)) == len(sandbox.SYSCALLS)
    missing = {n for n in names if sandbox._number(lib, n) is None}
    assert missing <= {"epoll_wait", "poll", "readlink", "unlink", "stat", "lstat"}, missing
    assert not {"execve", "fork", "ptrace", "mkdir", "mkdirat", "socket", "connect",
                "bind", "chown", "setuid", "kill", "open"} & set(names)


# The allowlist must carry all of serving, whatever runs: both engines, several guests,
# plugins (threads, timers), unix bridges, the control socket and its endpoint fds, the
# metrics exporter and the hostile inputs.  kill: a miss is death.
@pytest.mark.parametrize("engine", ["python", "cffi"])
def test_every_workload_runs_under_seccomp_kill(run_dir: Path, plugin_site: Path,
                                                engine: str) -> None:
    user = ["--user", "nobody"] if ROOT else []
    ready = [run_dir / f"{n}{i}" for n in ("g.sock", "bridge.sock") for i in (0, 1)]
    with serving(full_args(run_dir, "--engine", engine, "--socket-count", "2",
                           "--metrics", "0", "--seccomp", "kill", *user), ready, run_dir,
                 plugin_site) as s:
        for st in s.threads():  # loaded into every thread
            assert (st["Seccomp"], st["Seccomp_filters"], st["NoNewPrivs"]) == ("2", "1", "1")
        for i in (0, 1):
            guest = str(run_dir / f"g.sock{i}")
            echo_session(guest)
            bridge_session(guest, str(run_dir / f"bridge.sock{i}"))
            plugin_session(guest)
        control_session(str(run_dir / "g.sock.ctl"), str(run_dir / "g.sock1"), 1)
        metrics_scrape(s.text())
        hostile_front_ends(str(run_dir / "g.sock0"))
        with SimGuest(str(run_dir / "g.sock0")) as g0, \
                SimGuest(str(run_dir / "g.sock1")) as g1:  # both guests at once
            for g in (g0, g1):
                g.open(3500)
                g.send_burst(3500, 1024, b"both", 50)
            for g in (g0, g1):
                for _ in range(50):
                    assert g.recv(3500) == (1024, b"both")
        assert s.proc.poll() is None, s.text()
    assert not any(p.exists() for p in ready)  # and the exit path is covered too
    assert "seccomp: " in s.text()


@contextlib.contextmanager
def _controlled(run_dir: Path, plugin_site: Path, *extra: str) -> Iterator[Server]:
    user = ["--user", "nobody"] if ROOT else []
    path = run_dir / "g.sock"
    with serving(["-s", str(path), "-e", "rpmsg-raw:echo@1024", "-e", "probe@1040",
                  *user, *extra], [path], run_dir, plugin_site) as s:
        yield s


def test_forbidden_calls_fail_with_eperm(run_dir: Path, plugin_site: Path) -> None:
    """The same calls by the same user, without and with the filter: unfiltered, they
    work (the server's user may create in run_dir; a permission would refuse with
    EACCES anyway), so the EPERM with the filter is the filter's, and it leaves no
    trace; the server goes on serving, and may still start a thread (clone for
    threads)."""
    path = str(run_dir / "g.sock")
    calls = [f"mkdir {run_dir}/open", "inet", "fork", "thread"]
    with _controlled(run_dir, plugin_site):
        assert [probe(path, c) for c in calls] == [b"ok", b"ok", b"ok", b"thread"]
    calls[0] = f"mkdir {run_dir}/filtered"
    with _controlled(run_dir, plugin_site, "--seccomp", "eperm"):
        assert [probe(path, c) for c in calls] == [b"EPERM", b"EPERM", b"EPERM", b"thread"]
        echo_session(path)
    assert (run_dir / "open").is_dir() and not (run_dir / "filtered").exists()


def test_a_forbidden_call_kills_the_server(run_dir: Path, plugin_site: Path) -> None:
    """--seccomp kill: the first call outside the list ends the process with SIGSYS
    before the call happens."""
    path = str(run_dir / "g.sock")
    user = ["--user", "nobody"] if ROOT else []
    env = {**os.environ, "PYTHONPATH": str(plugin_site)}
    log = run_dir / "kill.log"
    with log.open("w") as err:
        proc = subprocess.Popen([*CLI, "serve", "-s", path, "-e", "rpmsg-raw:echo@1024",
                                 "-e", "probe@1040", "--seccomp", "kill", *user],
                                stderr=err, env=env)
    try:
        wait_until(lambda: os.path.exists(path) or proc.poll() is not None, HANG_GUARD)
        echo_session(path)
        g = SimGuest(path).start()
        g.open(3400)
        g.send(3400, 1040, f"mkdir {run_dir}/killed".encode())
        assert proc.wait(HANG_GUARD) == -signal.SIGSYS, log.read_text()
        g.disconnect()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert not (run_dir / "killed").exists()


def test_log_mode_allows_the_call(run_dir: Path, plugin_site: Path) -> None:
    """--seccomp log: the filter is on (Seccomp: 2) and a call outside the list works
    (the kernel logs it)."""
    path = str(run_dir / "g.sock")
    with _controlled(run_dir, plugin_site, "--seccomp", "log") as s:
        assert s.status()["Seccomp"] == "2"
        assert probe(path, f"mkdir {run_dir}/logged") == b"ok"
    assert (run_dir / "logged").is_dir()
    assert "allowed and logged by the kernel" in s.text()


def test_seccomp_allow_adds_a_call(run_dir: Path, plugin_site: Path) -> None:
    """--seccomp-allow: the calls named are allowed, the others still refused."""
    path = str(run_dir / "g.sock")
    with _controlled(run_dir, plugin_site, "--seccomp", "eperm",
                     "--seccomp-allow", "mkdir,mkdirat"):
        assert probe(path, f"mkdir {run_dir}/allowed") == b"ok"
        assert probe(path, "inet") == b"EPERM"


# -- a real guest ----------------------------------------------------------------------


@pytest.mark.qemu
@pytest.mark.parametrize("engine", ["cffi", "python"])
def test_real_guest_under_user_and_seccomp_kill(run_dir: Path, engine: str) -> None:
    """A stock Linux guest under QEMU (as root) against a server that is nobody under
    --seccomp kill: the driver probes and takes the announcement, guest user space
    echoes through rpmsg_char, streams to a sink, and creates and releases a channel
    (rpmsg_client_sample is left out: its callback crashes the stock guest now and
    then, tests/test_qemu_guest.py)."""
    require_guest_image()
    from tests.test_qemu_guest import Server as QemuServer
    from tests.test_qemu_guest import boot

    user = ["--user", "nobody"] if ROOT else []
    path = run_dir / "rpmsg.sock"
    with serving(["-s", str(path), "-e", "rpmsg-raw:echo@1024", "-e", "sink@1026",
                  "--engine", engine, "--seccomp", "kill", *user], [path], run_dir) as s:
        proc = cast("subprocess.Popen[str]", s.proc)  # boot() reads only its pid
        run = boot(QemuServer(proc, str(path), s.log),
                   "rpmsg-chan echo 2000 && rpmsg-chan sizes 496 497 0 && "
                   "rpmsg-ept my-ept any 1026 tput 20000 496 && "
                   "rpmsg-dev create rpmsg-raw 1100 1026 && sleep 1 && "
                   "rpmsg-dev release rpmsg-raw 1100 1026 && sleep 1")
        assert run.rc == 0, f"{run.out}\n--- server ---\n{s.text()}"
        assert "ECHO-OK 2000" in run.out and "TPUT n=20000" in run.out, run.out
        assert "SIZE 496 ECHO 496" in run.out and "SIZE 0 ECHO 0" in run.out, run.out
        assert "guest announced 'rpmsg-raw' at 1100 (destroy)" in s.text()
        assert s.proc.poll() is None, s.text()
