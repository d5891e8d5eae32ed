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


@dataclass
class Share:
    """What one worker serves: guest socket indices, and every socket file it owns."""

    worker: int
    sockets: list[int]
    #: vhost-user listeners, control sockets, unix bridges: closed in the other
    #: processes, removed by the parent if the worker dies without removing them
    listeners: list[UnixListener] = field(default_factory=list)


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


def run(shares: list[Share], work: Callable[[Share], None]) -> int:
    """Fork a worker per share that runs ``work`` (it returns when its loop stops),
    supervise them until all have ended; the exit status for ``serve``."""
    pids: dict[int, Share] = {}
    stopping = False

    def stop(signum: int, frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)

    # Before the first fork: a signal that comes between two forks is not lost.
    old = {s: signal.signal(s, stop) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        for share in shares:
            sys.stdout.flush()
            sys.stderr.flush()
            pid = os.fork()
            if pid == 0:
                _worker(share, shares, work, old)  # never returns
            pids[pid] = share
            log.info("worker %d (pid %d): guest socket%s %s", share.worker, pid,
                     "s" if len(share.sockets) > 1 else "",
                     ", ".join(map(str, share.sockets)))
        for share in shares:  # the parent serves nothing
            for listener in share.listeners:
                listener.close()
        return _supervise(pids, lambda: stopping)
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)
        for share in shares:
            for listener in share.listeners:
                listener.remove_path()  # what a worker did not remove (inode-checked)


def _worker(share: Share, shares: list[Share], work: Callable[[Share], None],
            handlers: dict[signal.Signals, Any]) -> None:
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
        code = e.code if isinstance(e.code, int) else 1
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
