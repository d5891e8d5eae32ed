"""``serve --workers K``: the guest sockets of one ``serve`` spread over K processes.

One process runs one asyncio loop on one core, so a single process is bounded at one
core (docs/performance.md, "Scaling with guests").  Python threads would not help:
the GIL lets one run at a time.  So the
parent checks and creates everything as a single-process ``serve`` does (the
vhost-user sockets, their devices and bridges, one control socket per guest socket),
then forks K workers.  Guest socket i goes to worker i mod K.  Each worker closes the
sockets of the others, enters the sandbox (``--user``, ``--seccomp``) and serves its
own sockets on its own loop.

The parent only supervises.  It forwards SIGTERM and SIGINT to the workers, waits
for them, and removes the socket files of a worker that did not remove them itself.
It reads nothing from a guest, a front-end or a control client.  A worker that dies
is logged with how it died and makes the exit status 1.  Its socket files are removed,
so that its guests' front-ends get ECONNREFUSED at once instead of a socket nobody
accepts on.  The other workers go on serving.  Restarting is left to the service
manager, which restarts the whole ``serve``.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from types import FrameType
from typing import Any

from .vhost_user.server import UnixListener

log = logging.getLogger(__name__)

#: what the supervisor forwards; blocked from before each fork until a worker's loop
#: has its own handlers (``unblock_stop_signals``), so a worker never loses one
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
_PR_SET_PDEATHSIG = 1


@dataclass
class Share:
    """What one worker serves: guest socket indices, and every socket file it owns."""

    worker: int
    sockets: list[int]
    #: vhost-user listeners, control sockets, unix bridges: closed in the other
    #: processes, removed by the parent if the worker dies without removing them
    listeners: list[UnixListener] = field(default_factory=list)
    #: the supervisor's pid (set by :func:`run`): see :func:`end_with_parent`
    supervisor: int = 0


def assign(sockets: int, workers: int) -> list[list[int]]:
    """Guest socket i to worker i mod ``workers``: the loads differ by at most one."""
    return [list(range(w, sockets, workers)) for w in range(workers)]


def describe_exit(code: int) -> str:
    """``os.waitstatus_to_exitcode``'s value in words."""
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit status {code}"


_requested: list[int] = []


def hold_stop_signals() -> None:
    """From now on a stop signal is recorded (:func:`stop_requested`), not fatal: a
    ``serve`` stopped while it creates its sockets then stops cleanly once it can,
    instead of dying with its socket files left behind."""
    for s in STOP_SIGNALS:
        signal.signal(s, lambda signum, frame: _requested.append(signum))


def stop_requested() -> bool:
    """Whether a stop signal came since :func:`hold_stop_signals`."""
    return bool(_requested)


def unblock_stop_signals() -> None:
    """A worker's loop has its handlers: let the stop signals through (no-op elsewhere)."""
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)


def run(shares: list[Share], work: Callable[[Share], None]) -> int:
    """Fork a worker per share that runs ``work`` (it returns when its loop stops),
    supervise them until all have ended; the exit status for ``serve``.

    ``work`` must call :func:`unblock_stop_signals` once its loop handles SIGTERM and
    SIGINT: until then they stay pending in the worker, never lost, never fatal.
    """
    pids: dict[int, Share] = {}
    stopping = False
    parent = os.getpid()
    for share in shares:
        share.supervisor = parent

    def stop(signum: int, frame: FrameType | None) -> None:
        nonlocal stopping
        if os.getpid() != parent:  # a copy of this handler in a worker: not for it
            return
        stopping = True
        _signal_all(pids)

    old = {s: signal.signal(s, stop) for s in STOP_SIGNALS}
    # Blocked in this thread across the forks: a child starts with them blocked (its
    # only thread is a copy of this one).  One that reaches another thread of ours
    # still runs ``stop`` here, between two bytecodes: hence the check after the loop.
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    # Held since start-up (hold_stop_signals), up to our handler: then start no worker.
    stopping = stopping or stop_requested()
    try:
        try:
            for share in shares:
                if stopping:
                    break
                sys.stdout.flush()
                sys.stderr.flush()
                pid = os.fork()
                if pid == 0:
                    _worker(share, shares, work, old, parent)  # never returns
                pids[pid] = share
                log.info("worker %d (pid %d): guest socket%s %s", share.worker, pid,
                         "s" if len(share.sockets) > 1 else "",
                         ", ".join(map(str, share.sockets)))
        except BaseException:
            _signal_all(pids)  # a fork failed: no worker is left behind
            for pid in pids:
                with contextlib.suppress(ChildProcessError):
                    os.waitpid(pid, 0)
            raise
        if stopping:  # a stop came while we forked: the workers it missed hear it now
            _signal_all(pids)
        for share in shares:  # the parent serves nothing
            for listener in share.listeners:
                listener.close()
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        return _supervise(pids, lambda: stopping)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        for s, handler in old.items():
            signal.signal(s, handler)
        for share in shares:
            for listener in share.listeners:
                listener.remove_path()  # what a worker did not remove (inode-checked)


def _signal_all(pids: dict[int, Share]) -> None:
    for pid in list(pids):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)


def end_with_parent(parent: int) -> None:
    """SIGTERM this worker when the supervisor dies (even of SIGKILL), and end now if
    it already has.  Called as the worker's final user (a change of user clears it)."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, ctypes.c_ulong(signal.SIGTERM), ctypes.c_ulong(0),
                  ctypes.c_ulong(0), ctypes.c_ulong(0)) != 0:
        log.warning("prctl(PR_SET_PDEATHSIG): %s; this worker would outlive its "
                    "supervisor", os.strerror(ctypes.get_errno()))
    if os.getppid() != parent:
        raise SystemExit(0)


def _worker(share: Share, shares: list[Share], work: Callable[[Share], None],
            handlers: dict[signal.Signals, Any], parent: int) -> None:
    """The child: back to the parent's signal handlers (the loop installs its own), the
    others' sockets closed, a log prefix, then ``work``; exits, never returns."""
    code = 1
    try:
        for s, handler in handlers.items():
            signal.signal(s, handler)
        for other in shares:
            if other is not share:
                for listener in other.listeners:
                    listener.close()
        _prefix_log_records(f"worker {share.worker}: ")
        work(share)
        code = 0
    except SystemExit as e:
        code = 0 if e.code is None else e.code if isinstance(e.code, int) else 1
    except BaseException:
        log.exception("worker %d failed", share.worker)
    finally:
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def _prefix_log_records(prefix: str) -> None:
    """Every log line of this process says which worker wrote it."""
    make = logging.getLogRecordFactory()

    def factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = make(*args, **kwargs)
        record.msg = f"{prefix}{record.msg}"
        return record

    logging.setLogRecordFactory(factory)


def _supervise(pids: dict[int, Share], stopping: Callable[[], bool]) -> int:
    status = 0
    while pids:
        try:
            pid, raw = os.waitpid(-1, 0)
        except ChildProcessError:
            break
        share = pids.pop(pid, None)
        if share is None:
            continue
        code = os.waitstatus_to_exitcode(raw)
        if code == 0 and stopping():
            continue
        status = 1
        what = describe_exit(code)
        if code == 0:
            log.error("worker %d (pid %d) stopped by itself (%s): guest socket(s) %s are "
                      "no longer served", share.worker, pid, what,
                      ", ".join(map(str, share.sockets)))
        elif stopping():
            log.error("worker %d (pid %d) ended with %s while stopping", share.worker,
                      pid, what)
        else:
            log.error("worker %d (pid %d) died (%s): guest socket(s) %s are no longer "
                      "served; the other workers go on", share.worker, pid, what,
                      ", ".join(map(str, share.sockets)))
        for listener in share.listeners:
            listener.remove_path()
    return status
