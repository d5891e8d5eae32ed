"""The ``vhost-rpmsg`` command: serve, demo, bench, qemu-cmdline."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shutil
import signal
import socket
import stat
import sys
import sysconfig
import tempfile
import textwrap
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Annotated, Any, NoReturn, cast

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from typer.core import TyperGroup

try:  # typer 0.2x carries its own copy of click
    from typer import _click as click
except ImportError:  # older typer: click itself
    import click  # type: ignore[no-redef]

from . import __version__
from .cli_control import endpoint_app, stats
from .control.metrics import MetricsServer, parse_address
from .control.server import ControlServer
from .control.server import default_path as default_control_path
from .control.stats import snapshot
from .endpoints.base import Endpoint
from .endpoints.registry import PluginError, build, options, registry, summary
from .endpoints.unix import UnixBridge
from .qemu import QemuLine
from .rpmsg import codec as rp
from .rpmsg.device import RpmsgDevice
from .sandbox import SandboxError, enter, plan
from .vhost_user.server import (
    LoopThread,
    SocketPathError,
    UnixListener,
    VhostUserServer,
    check_socket_path,
    listen_unix,
    parse_mode,
)
from .virtio.engines import EngineUnavailable, QueueFactory, engine_name, queue_factory
from .workers import (
    Share,
    assign,
    end_with_parent,
    hold_stop_signals,
    stop_requested,
    unblock_stop_signals,
)
from .workers import run as run_workers


def _fail(message: str, code: int = 1) -> NoReturn:
    """End the command with one ``error: …`` line on stderr and exit status ``code``."""
    typer.echo(f"error: {' '.join(message.split())}", err=True)
    raise typer.Exit(code)


#: click >= 8.2 raises this for a bare command; show() prints the help, as it should
_HELP_FOR_NO_ARGS = getattr(click.exceptions, "NoArgsIsHelpError", ())


def _usage_failure(e: click.ClickException) -> NoReturn:
    hint = ""
    if isinstance(e, click.exceptions.UsageError) and e.ctx is not None:
        hint = f" (see '{e.ctx.command_path} --help')"
    _fail(e.format_message() + hint, e.exit_code)


class _OneLineErrors(TyperGroup):
    """Command-line errors as one ``error: …`` line on stderr (exit status 2) instead of
    a usage box, so what a supervisor (systemd, libvirt) logs is the whole message."""

    def make_context(self, info_name: str | None, args: list[str],
                     parent: click.Context | None = None, **extra: Any) -> click.Context:
        try:
            return super().make_context(info_name, args, parent, **extra)
        except _HELP_FOR_NO_ARGS:
            raise
        except click.ClickException as e:
            _usage_failure(e)

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except _HELP_FOR_NO_ARGS:
            raise
        except click.ClickException as e:
            _usage_failure(e)


app = typer.Typer(add_completion=False, no_args_is_help=True, cls=_OneLineErrors,
                  help="A vhost-user backend serving RPMsg (virtio id 7) to virtual machines.")
console = Console(stderr=False, width=None if sys.stdout.isatty() else 110)
log = logging.getLogger("vhost_rpmsg")

LogLevel = Annotated[str, typer.Option("--log-level", "-l",
                                        help="debug, info, warning or error")]
EngineOpt = Annotated[str, typer.Option("--engine", help="ring engine: auto, cffi or python")]


_LOG_LEVELS = ("debug", "info", "warning", "error")


def _setup_logging(level: str) -> None:
    if level.lower() not in _LOG_LEVELS:
        raise typer.BadParameter(f"{level!r} is not one of {', '.join(_LOG_LEVELS)}",
                                 param_hint="--log-level")
    logging.basicConfig(
        level=getattr(logging, level.upper()),
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def _queue_factory(engine: str) -> QueueFactory:
    try:
        return queue_factory(engine)
    except (ValueError, EngineUnavailable) as e:
        raise typer.BadParameter(str(e), param_hint="--engine") from e


def _socket_paths(path: str, count: int) -> list[str]:
    """One path per guest; with several, the index is appended (``path0``, ``path1``…)."""
    return [path] if count == 1 else [f"{path}{i}" for i in range(count)]


@app.command()
def serve(
    socket_path: Annotated[str | None, typer.Option(
        "--socket-path", "-s", help="unix socket to listen on")] = None,
    fd: Annotated[int | None, typer.Option(
        help="inherited listening unix socket, by file descriptor number")] = None,
    socket_count: Annotated[int, typer.Option(
        help="guests to serve, one socket each: with N > 1 the socket path and every "
             "unix endpoint's path= get the index 0..N-1 appended")] = 1,
    socket_mode: Annotated[str, typer.Option(
        help="permissions of the socket file (octal)")] = "0600",
    endpoint: Annotated[list[str] | None, typer.Option(
        "--endpoint", "-e", help=escape("[NAME:]PLUGIN[@ADDR][,k=v…], repeatable"))] = None,
    outbox: Annotated[int, typer.Option(help="messages queued per guest while it has no "
                                              "rx buffer")] = 256,
    print_capabilities: Annotated[bool, typer.Option(
        "--print-capabilities", help="print the backend's capabilities as JSON and exit")] = False,
    print_descriptor: Annotated[bool, typer.Option(
        "--print-descriptor", help="print the JSON backend descriptor (QEMU's "
                                   "vhost-user.json VhostUserBackend) and exit")] = False,
    allow_unsealed_memory: Annotated[bool, typer.Option(
        "--allow-unsealed-memory", help="map guest memory that could shrink under the "
        "server (memory-backend-file, memfd seal=off): only for a trusted front-end, "
        "since shrinking it kills the process")] = False,
    user: Annotated[str | None, typer.Option(
        help="run as this user once the sockets exist (needs root); the socket files "
             "are given to it (docs/security.md)")] = None,
    group: Annotated[str | None, typer.Option(
        help="with --user: this group instead of the user's own")] = None,
    seccomp: Annotated[str | None, typer.Option(
        help="confine the server to the system calls it needs; a call outside them: "
             "kill (the process), eperm (fails) or log (allowed, logged by the kernel)")
    ] = None,
    seccomp_allow: Annotated[list[str] | None, typer.Option(
        help="with --seccomp: allow these system calls too (a plugin's), repeatable")
    ] = None,
    control: Annotated[str | None, typer.Option(
        help="control socket for stats and run-time endpoints (default: the socket path "
             "+ .ctl; docs/control.md)")] = None,
    no_control: Annotated[bool, typer.Option(
        "--no-control", help="no control socket")] = False,
    control_group: Annotated[str | None, typer.Option(
        help="members of this group may use the control socket too")] = None,
    metrics: Annotated[str | None, typer.Option(
        help="serve Prometheus metrics on [HOST:]PORT (loopback by default)")] = None,
    workers: Annotated[int, typer.Option(
        help="processes to spread the --socket-count sockets over (socket i to worker "
             "i mod K); with K > 1 each socket has its own control socket, PATH.ctl "
             "next to it (docs/performance.md)")] = 1,
    engine: EngineOpt = "auto",
    log_level: LogLevel = "info",
) -> None:
    """Serve RPMsg to QEMU guests over vhost-user (runs in the foreground).

    Everything is checked before anything is created; a startup failure is one
    "error:" line on stderr and a non-zero exit status (2: bad arguments).
    """
    if print_capabilities:
        # @VHostUserBackendCapabilities of QEMU's vhost-user.json: "rpmsg" is one of
        # its backend types, and the spec defines no rpmsg features.
        print(json.dumps({"type": "rpmsg", "features": []}))
        return
    if print_descriptor:
        print(json.dumps(_descriptor(), indent=2))
        return
    _setup_logging(log_level)
    if (socket_path is None) == (fd is None):
        raise click.exceptions.UsageError("give exactly one of --socket-path or --fd")
    if fd is not None and socket_count != 1:
        raise click.exceptions.UsageError("--fd serves one guest; drop --socket-count")
    if socket_count < 1:
        raise typer.BadParameter(f"{socket_count}: serve at least one guest",
                                 param_hint="--socket-count")
    if outbox < 0:
        raise typer.BadParameter(f"{outbox}: cannot be negative", param_hint="--outbox")
    if not 1 <= workers <= socket_count:
        raise typer.BadParameter(f"{workers}: between 1 and --socket-count ({socket_count}); "
                                 "a worker serves at least one socket", param_hint="--workers")
    if workers > 1 and metrics is not None:
        raise click.exceptions.UsageError("--metrics serves one process: not with --workers "
                                          "(read each socket's stats on its control socket)")
    mode = _socket_mode(socket_mode)
    factory = _queue_factory(engine)
    try:
        sandbox = plan(user, group, seccomp, seccomp_allow or ())
    except SandboxError as e:
        _fail(str(e), e.code)
    specs = endpoint if endpoint is not None else ["rpmsg-raw:echo@1024"]
    sets = [_endpoints(specs, i if socket_count > 1 else None) for i in range(socket_count)]
    paths = _socket_paths(socket_path, socket_count) if socket_path is not None else []
    if no_control and (control is not None or control_group is not None):
        raise click.exceptions.UsageError("--no-control with --control or --control-group")
    control_path = None if no_control else (
        control if control is not None else
        default_control_path(socket_path) if socket_path is not None else None)
    # One control socket for the process; with workers, one per guest socket (each
    # worker answers for its own): PATH.ctl next to each, or --control with the index.
    control_paths = [] if control_path is None else [control_path] if workers == 1 else [
        f"{control}{i}" if control is not None else default_control_path(p)
        for i, p in enumerate(paths)]
    if control_group is not None and control_path is None:
        raise click.exceptions.UsageError("--control-group needs a control socket (with "
                                          "--fd, give --control PATH)")
    try:
        metrics_at = parse_address(metrics) if metrics is not None else None
    except ValueError as e:
        raise typer.BadParameter(str(e), param_hint="--metrics") from None
    _check_paths([(p, "--socket-path") for p in paths]
                 + [(c, "--control") for c in control_paths]
                 + [(ep.path, f"--endpoint {ep.plugin}@{ep.addr}")
                    for eps in sets for ep in eps if isinstance(ep, UnixBridge)])
    # Checked: now create.  Anything that still fails (a race) is undone before exiting.
    hold_stop_signals()
    socks: list[socket.socket] = [_inherited_listener(fd)] if fd is not None else []
    devices: list[RpmsgDevice] = []
    ctls: list[ControlServer] = []
    metrics_server: MetricsServer | None = None
    try:
        socks += [listen_unix(p, mode) for p in paths]
        devices += [RpmsgDevice(eps, outbox_limit=outbox) for eps in sets]  # bridges bind
        for cpath in control_paths:
            ctls.append(ControlServer(cpath, [], group=control_group))
            ctls[-1].bind()
        if metrics_at is not None:  # its thread exists before the sandbox is entered
            metrics_server = MetricsServer(metrics_at)
        if workers == 1:  # else each worker enters it after the fork
            enter(sandbox, _listeners(socks, ctls, sets))
    except (OSError, ValueError, SandboxError) as e:
        _release(ep for eps in sets for ep in eps)
        for ctl in ctls:
            ctl.close()
        if metrics_server is not None:
            metrics_server.close()
        for sock in socks:
            if isinstance(sock, UnixListener):
                sock.remove_path()
            sock.close()
        _fail(str(e))

    def serve_sockets(mine: list[int]) -> None:
        servers = [VhostUserServer(devices[i], socks[i], queue_factory=factory,
                                   allow_unsealed_memory=allow_unsealed_memory)
                   for i in mine]
        for s, i in zip(servers, mine, strict=True):
            eps = ", ".join(ep.describe() for ep in devices[i].endpoints.values())
            log.info("%s: engine %s, endpoints: %s", s.name, engine_name(factory), eps)
        mine_ctls = ctls if workers == 1 or not ctls else [ctls[i] for i in mine]
        for j, ctl in enumerate(mine_ctls):
            ctl.servers = servers if workers == 1 else [servers[j]]
        asyncio.run(_serve_until_signal(servers, [devices[i] for i in mine], mine_ctls,
                                        metrics_server))

    if workers == 1:
        serve_sockets(list(range(len(socks))))
        return

    def work(share: Share) -> None:
        enter(sandbox, share.listeners, lambda: end_with_parent(share.supervisor))
        serve_sockets(share.sockets)

    shares = [Share(w, mine, _listeners([socks[i] for i in mine],
                                        [ctls[i] for i in mine] if ctls else [],
                                        [sets[i] for i in mine]))
              for w, mine in enumerate(assign(len(socks), workers))]
    status = run_workers(shares, work)
    if status:
        raise typer.Exit(status)


def _listeners(socks: Iterable[socket.socket], ctls: Iterable[ControlServer],
               sets: Iterable[list[Endpoint]]) -> list[UnixListener]:
    """Every socket file of these guest sockets: theirs, their control sockets', their
    unix bridges' (what --user hands over, and what a worker owns)."""
    return ([s for s in socks if isinstance(s, UnixListener)]
            + [c.listener for c in ctls if c.listener is not None]
            + [ep.listener for eps in sets for ep in eps
               if isinstance(ep, UnixBridge) and ep.listener is not None])


def _release(endpoints: Iterable[Endpoint]) -> None:
    """Close endpoints no device took over (a start that failed), ignoring their errors."""
    for ep in endpoints:
        with contextlib.suppress(Exception):
            ep.close()


def _socket_mode(text: str) -> int:
    try:
        return parse_mode(text)
    except ValueError as e:
        raise typer.BadParameter(str(e), param_hint="--socket-mode") from None


def _endpoints(specs: list[str], index: int | None) -> list[Endpoint]:
    """One device's endpoints, checked without creating anything (a unix bridge makes
    its socket only when a device registers it); ``index`` suffixes bridge paths."""
    try:
        eps = build(specs)
    except PluginError as e:
        raise typer.BadParameter(str(e), param_hint="--endpoint") from e
    seen: dict[int, Endpoint] = {}
    for ep in eps:
        if not 0 <= ep.addr < rp.ADDR_ANY:
            raise typer.BadParameter(f"{ep.plugin}@{ep.addr}: address out of range",
                                     param_hint="--endpoint")
        if ep.addr in seen:
            first = seen[ep.addr].plugin
            raise typer.BadParameter(f"host address {ep.addr} given twice ({first} and "
                                     f"{ep.plugin})", param_hint="--endpoint")
        seen[ep.addr] = ep
        if ep.name:
            try:
                rp.encode_ns(rp.NsMessage(ep.name, ep.addr, rp.NsFlags.CREATE))
            except ValueError as e:
                raise typer.BadParameter(f"{ep.plugin}@{ep.addr}: {e}",
                                         param_hint="--endpoint") from e
        if index is not None and isinstance(ep, UnixBridge):
            ep.path = f"{ep.path}{index}"
    return eps


def _check_paths(wanted: list[tuple[str, str]]) -> None:
    """Every socket this process will create: distinct, and each one usable."""
    seen: dict[str, str] = {}
    for path, what in wanted:
        key = os.path.join(os.path.realpath(os.path.dirname(path) or "."),
                           os.path.basename(path))
        if key in seen:
            _fail(f"{path}: one socket path for two sockets ({seen[key]} and {what})", 2)
        seen[key] = what
        try:
            check_socket_path(path)
        except SocketPathError as e:
            _fail(f"{what}: {e}")


def _inherited_listener(fd: int) -> socket.socket:
    try:
        st = os.fstat(fd)
    except OSError as e:
        _fail(f"--fd {fd}: {e.strerror}")
    if not stat.S_ISSOCK(st.st_mode):
        _fail(f"--fd {fd}: not a socket")
    sock = socket.socket(fileno=fd)
    if sock.family != socket.AF_UNIX or sock.type != socket.SOCK_STREAM:
        _fail(f"--fd {fd}: not a unix stream socket")
    if not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
        _fail(f"--fd {fd}: socket is not listening")
    return sock


def _descriptor() -> dict[str, object]:
    """The backend descriptor of QEMU's vhost-user.json (@VhostUserBackend)."""
    return {"description": "vhost-rpmsg: RPMsg (virtio id 7) for virtual machines",
            "type": "rpmsg", "binary": _binary(), "tags": [f"version={__version__}"]}


def _binary() -> str:
    """Absolute path of the installed ``vhost-rpmsg`` script."""
    candidates = []
    if sys.argv and os.path.basename(sys.argv[0]) == "vhost-rpmsg":
        candidates.append(sys.argv[0])
    candidates.append(os.path.join(sysconfig.get_path("scripts"), "vhost-rpmsg"))
    candidates.append(shutil.which("vhost-rpmsg") or "")
    for c in filter(None, candidates):
        if os.path.isfile(c) and os.access(c, os.X_OK):
            return os.path.abspath(c)
    _fail("cannot find the vhost-rpmsg script to name in the descriptor "
          "(is the package installed?)")


async def _serve_until_signal(servers: list[VhostUserServer], devices: list[RpmsgDevice],
                              ctls: list[ControlServer] | None = None,
                              metrics: MetricsServer | None = None) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    unblock_stop_signals()  # a worker's: pending since its fork, now the loop's to handle
    if stop_requested():  # during start-up (hold_stop_signals): stop as asked
        stop.set()
    for s in servers:
        s.start(loop)
    for ctl in ctls or ():
        ctl.start()
    if metrics is not None:
        started = time.monotonic()
        metrics.attach(lambda: snapshot(servers, started), loop)
    await stop.wait()
    log.info("stopping")
    for ctl in ctls or ():
        ctl.close()
    for s in servers:
        s.close()
    for d in devices:
        d.destroy()  # endpoints release what they hold (a unix bridge its socket)


@app.command()
def demo(
    messages: Annotated[int, typer.Option(help="echo round trips to run; with --endpoint, "
                                               "messages to send each endpoint")] = 2000,
    endpoint: Annotated[list[str] | None, typer.Option(
        "--endpoint", "-e", help=escape("try this endpoint instead of the standard set: "
                                        "[NAME:]PLUGIN[@ADDR][,k=v…], repeatable"))] = None,
    payload: Annotated[str, typer.Option(help="with --endpoint: what the guest sends "
                                              "({i}: the message's number)")] = "message {i}",
    wait: Annotated[float, typer.Option(help="with --endpoint: seconds the host must stay "
                                             "idle before the guest stops collecting "
                                             "replies")] = 0.5,
    engine: EngineOpt = "auto",
    log_level: LogLevel = "warning",
) -> None:
    """Run the server and the built-in simulated guest together; show the traffic.

    With --endpoint, the guest sends each endpoint --messages messages
    and shows what came back (exit status 1 if an endpoint raised or
    blocked the server).
    """
    _setup_logging(log_level)
    factory = _queue_factory(engine)
    if messages < 0:
        raise typer.BadParameter(f"{messages}: cannot be negative", param_hint="--messages")
    if wait < 0:
        raise typer.BadParameter(f"{wait}: cannot be negative", param_hint="--wait")
    longest = len(payload.replace("{i}", str(max(messages - 1, 0))).encode())
    if longest > rp.MAX_PAYLOAD:
        raise typer.BadParameter(f"{longest} bytes: the guest sends at most {rp.MAX_PAYLOAD}",
                                 param_hint="--payload")
    if endpoint:
        endpoints = _endpoints(endpoint, None)
    else:
        endpoints = build(["rpmsg-raw:echo@1024", "rpmsg-client-sample:echo@1025", "sink@1026"])
    try:
        device = RpmsgDevice(endpoints)  # a unix bridge makes its socket here
    except (OSError, ValueError) as e:
        _release(endpoints)
        _fail(str(e))
    tmp = tempfile.mkdtemp(prefix="vhost-rpmsg-demo-")
    path = os.path.join(tmp, "demo.sock")
    server = VhostUserServer(device, listen_unix(path), queue_factory=factory)
    lt = LoopThread("vhost-rpmsg-demo").start()
    lt.call(lambda: server.start(lt.loop))
    console.print(f"[bold]vhost-rpmsg {__version__}[/] demo: server on {path} "
                  f"(engine {engine_name(factory)}), simulated Linux guest connecting")
    ok = blocked = False
    try:
        if endpoint:
            ok = _demo_endpoints(path, messages, payload, wait, device, lt)
        else:
            _demo_traffic(path, messages, device, endpoints[2])
            ok = True
    except _LoopBlocked:
        blocked = True
    finally:
        if blocked:  # a handler holds the loop: stop it when it can, do not wait for it
            lt.loop.call_soon_threadsafe(server.close)
            lt.loop.call_soon_threadsafe(lt.loop.stop)
        else:
            with contextlib.suppress(Exception):  # endpoints release what they hold
                lt.call(device.destroy, _DEMO_LOOP_TIMEOUT)
            lt.call(server.close)
            lt.stop()
        Path(path).unlink(missing_ok=True)
        os.rmdir(tmp)
    if not ok:
        raise typer.Exit(1)


#: how long the device's loop may take to answer the demo before it counts as blocked
_DEMO_LOOP_TIMEOUT = 10.0


class _LoopBlocked(Exception):
    """A handler is blocking the device's event loop: the demo gives up on it."""


def _demo_endpoints(path: str, messages: int, payload: str, wait: float, device: RpmsgDevice,
                    lt: LoopThread) -> bool:
    """Send each endpoint ``messages`` messages from a guest address of its own and show
    what comes back; False if an endpoint raised, or blocked the device's loop."""
    from .guest import GuestTimeout, SimGuest

    ok = True
    table = Table(title="demo summary")
    for col in ("endpoint", "guest addr", "sent", "replies", "handler errors"):
        table.add_column(col, justify="left" if col == "endpoint" else "right")
    eps = list(device.endpoints.values())
    guest = SimGuest(path)
    for k in range(len(eps)):
        guest.open(2000 + k)  # before the driver probes: a source may send at once
    with contextlib.closing(guest.start()):
        for ep in eps:
            if ep.name:
                try:
                    ch = guest.wait_channel(ep.name)
                except GuestTimeout as e:
                    console.print(f"[red]{escape(str(e))}[/]")
                    return False
                console.print(f"  host announced [cyan]{escape(ch.name)}[/] at address "
                              f"{ch.addr}")
        for k, ep in enumerate(eps):
            me = 2000 + k
            what = ep.describe()
            console.print(f"  {escape(what)}: {messages} message(s) from guest address {me}")
            errors0 = device.stats["handler_errors"]
            sent: list[bytes] = []
            try:
                for i in range(messages):
                    data = payload.replace("{i}", str(i)).encode()
                    guest.send(me, ep.addr, data)
                    sent.append(data)
                replies = _demo_collect(guest, me, device, lt, wait, 10 * max(messages, 1))
            except (GuestTimeout, TimeoutError):
                console.print(f"  [red]{escape(what)}: the server stopped answering: a "
                              "handler is blocking its event loop[/]")
                guest.disconnect()  # a clean shutdown would wait for the server
                raise _LoopBlocked from None
            for i in range(min(3, len(replies))):
                out = f"sent {_short(sent[i])}  " if i < len(sent) else ""
                console.print(f"    {out}got {_short(replies[i][1])} from {replies[i][0]}",
                              markup=False, highlight=False)
            if not replies:
                console.print("    no reply", highlight=False)
            errors = device.stats["handler_errors"] - errors0
            if errors:
                ok = False
                console.print(f"  [red]{escape(what)} raised {errors} time(s) "
                              "(the log has the traceback)[/]")
            table.add_row(what, str(me), str(len(sent)), str(len(replies)), str(errors))
    console.print(table)
    return ok


def _short(data: bytes, keep: int = 40) -> str:
    return repr(data) if len(data) <= keep else f"{data[:keep]!r}… ({len(data)} bytes)"


def _demo_collect(guest: Any, addr: int, device: RpmsgDevice, lt: LoopThread, wait: float,
                  cap: int) -> list[tuple[int, bytes]]:
    """What reaches guest address ``addr`` until the host has been idle for ``wait``
    seconds (or ``cap`` messages came).  Idle: the device has taken every message the
    guest sent (and so ran their handlers), its outbox is empty, and the guest has read
    all the host wrote; asked on the device's own loop, between two of its callbacks."""
    from .guest import GuestTimeout

    replies: list[tuple[int, bytes]] = []
    quiet_since: float | None = None
    while len(replies) < cap:
        try:
            replies.append(guest.recv(addr, timeout=0.01))
            quiet_since = None
            continue
        except GuestTimeout:
            pass
        sent = guest.stats.tx_messages
        took, queued, wrote = cast(tuple[int, int, int], lt.call(lambda: (
            device.stats["to_host_messages"], device.queued, device.stats["to_guest_messages"]),
            _DEMO_LOOP_TIMEOUT))
        idle = took >= sent and not queued and guest.stats.rx_messages >= wrote
        if not idle:
            quiet_since = None
        elif quiet_since is None:
            quiet_since = time.monotonic()
        elif time.monotonic() - quiet_since >= wait:
            break
    with contextlib.suppress(GuestTimeout):
        while len(replies) < cap:  # what came in the last moment
            replies.append(guest.recv(addr, timeout=0))
    return replies


def _demo_traffic(path: str, messages: int, device: RpmsgDevice, sink: object) -> None:
    from .guest import SimGuest

    with SimGuest(path) as guest:
        for name in ("rpmsg-raw", "rpmsg-client-sample"):
            ch = guest.wait_channel(name)
            console.print(f"  host announced [cyan]{ch.name}[/] at address {ch.addr}")
        guest.announce("guest-telemetry", 1100)
        deadline = time.monotonic() + 5
        while "guest-telemetry" not in device.guest_services and time.monotonic() < deadline:
            time.sleep(0.005)
        if "guest-telemetry" in device.guest_services:
            console.print("  guest announced [cyan]guest-telemetry[/] at 1100; host sees "
                          f"{sorted(device.guest_services)}")
        addr = 2000
        guest.open(addr)
        lat = []
        start = time.perf_counter()
        for i in range(messages):
            payload = bytes((i + k) & 0xFF for k in range(i % 497))
            t0 = time.perf_counter()
            guest.send(addr, 1024, payload)
            src, back = guest.recv(addr)
            lat.append(time.perf_counter() - t0)
            if back != payload or src != 1024:
                console.print(f"[red]echo mismatch at message {i}[/]")
                raise typer.Exit(1)
            if i < 3 or (i + 1) % max(messages // 5, 1) == 0:
                console.print(f"  echo #{i + 1}: {len(payload)} bytes -> 1024 -> back, "
                              f"{lat[-1] * 1e6:.0f} µs")
        took = time.perf_counter() - start
        for _ in range(500):
            guest.send(addr, 1026, b"x" * 128)
        deadline = time.monotonic() + 5
        while getattr(sink, "messages", 0) < 500 and time.monotonic() < deadline:
            time.sleep(0.005)
        lat.sort()
        table = Table(title="demo summary")
        table.add_column("what")
        table.add_column("value", justify="right")
        table.add_row("echo round trips (0..496 B, checked)", str(messages))
        table.add_row("echo rate", f"{messages / took:,.0f} /s")
        if lat:
            table.add_row("echo p50 / p99", f"{lat[len(lat) // 2] * 1e6:.0f} / "
                          f"{lat[int(len(lat) * 0.99)] * 1e6:.0f} µs")
        table.add_row("sink received", str(getattr(sink, "messages", 0)))
        for key in sorted(device.stats):
            table.add_row(f"device.{key}", str(device.stats[key]))
        console.print(table)


@app.command()
def bench(
    engines: Annotated[str, typer.Option(help="comma-separated engines to compare")] =
        "cffi,python",
    sizes: Annotated[str, typer.Option(help="payload sizes for the throughput cases")] =
        "16,128,496",
    messages: Annotated[int, typer.Option(help="messages per throughput case")] = 50_000,
    samples: Annotated[int, typer.Option(help="echo round trips for latency")] = 5_000,
    json_out: Annotated[str | None, typer.Option("--json", help="also write results here")]
        = None,
    pin: Annotated[bool, typer.Option(help="run server and guest on different CPUs")] = False,
    repeats: Annotated[int, typer.Option(
        min=1, help="runs of each case at least; the median run is reported")] = 3,
    min_seconds: Annotated[float, typer.Option(
        min=0, help="seconds each case's runs add up to at least (50 runs at most)")] = 0.5,
    guests: Annotated[str | None, typer.Option(
        help="instead of the cases: scaling with guests, e.g. 1,2,4,8 — one server, "
             "N sockets, N guests each flooding a sink with --messages of the largest "
             "--sizes")] = None,
    workers: Annotated[int, typer.Option(
        help="with --guests: the N sockets spread over this many server processes, as "
             "serve --workers does")] = 1,
    log_level: LogLevel = "warning",
) -> None:
    """Measure throughput and latency: server and simulated guest as separate processes."""
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    from . import bench as b
    from .virtio.engines import available_engines

    _setup_logging(log_level)
    wanted = [e.strip() for e in engines.split(",") if e.strip()]
    missing = [e for e in wanted if e not in available_engines()]
    if missing:
        raise typer.BadParameter(f"engine(s) {', '.join(missing)} not available here "
                                 f"(have {', '.join(available_engines())})",
                                 param_hint="--engines")
    size_list = [int(x) for x in sizes.split(",")]
    if any(not 0 <= s <= 496 for s in size_list):
        raise typer.BadParameter("sizes must be within 0..496", param_hint="--sizes")
    counts: list[int] = []
    if guests is not None:
        try:
            counts = [int(x) for x in guests.split(",") if x.strip()]
        except ValueError:
            counts = []
        if not counts or any(not 1 <= n <= 64 for n in counts):
            raise typer.BadParameter(f"{guests!r}: guest counts are 1..64, comma-separated",
                                     param_hint="--guests")
    if workers != 1 and not counts:
        raise click.exceptions.UsageError("--workers measures scaling: give --guests too")
    if workers < 1 or any(n < workers for n in counts):
        raise typer.BadParameter(f"{workers}: between 1 and the smallest --guests count "
                                 "(a worker serves at least one socket)",
                                 param_hint="--workers")
    # Progress goes to stderr: a line per step (also where no terminal shows the live
    # spinner, e.g. in CI logs), the tables to stdout at the end.
    err = Console(stderr=True)
    with Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(),
                  console=err, transient=True, disable=not err.is_terminal) as progress:
        task = progress.add_task("starting", total=None)
        t0 = time.monotonic()

        def step(what: str) -> None:
            err.print(f"bench [{time.monotonic() - t0:6.1f} s] {what}", markup=False,
                      highlight=False)
            progress.update(task, description=what)

        repeat = b.Repeat(repeats, min_seconds)
        if counts:
            from . import bench_guests as bg

            scaled = [bg.run(e, counts, max(size_list), messages, progress=step,
                             repeat=repeat, workers=workers) for e in wanted]
        else:
            report = b.run(wanted, size_list, messages, samples, progress=step, pin=pin,
                           repeat=repeat)
    if counts:
        for r in scaled:
            for table in bg.render(r):
                console.print(table)
        if json_out:
            Path(json_out).write_text(json.dumps([r.as_json() for r in scaled], indent=2))
            console.print(f"results written to {json_out}")
        return
    for table in b.render(report):
        console.print(table)
    if json_out:
        b.write_json(report, json_out)
        console.print(f"results written to {json_out}")


@app.command("qemu-cmdline")
def qemu_cmdline(
    socket_path: Annotated[str, typer.Option("--socket-path", "-s",
                                             help="the socket vhost-rpmsg serves")],
    vq_size: Annotated[int, typer.Option(help="ring size (256 gives the guest 256+256 "
                                               "buffers)")] = 256,
    memory: Annotated[str, typer.Option(help="guest RAM (shared with the backend)")] = "256M",
    smp: Annotated[int, typer.Option(help="guest vCPUs")] = 1,
    kernel: Annotated[str | None, typer.Option(help="guest kernel to boot")] = None,
    initrd: Annotated[str | None, typer.Option(help="guest initramfs")] = None,
    append: Annotated[str, typer.Option(help="kernel command line (with --kernel)")] =
        "console=ttyS0",
    qemu: Annotated[str, typer.Option(help="QEMU binary (10.2 or newer)")] =
        "qemu-system-x86_64",
    mmio: Annotated[bool, typer.Option(help="virtio-mmio instead of PCI (microvm)")] = False,
    accel: Annotated[str, typer.Option(help="tcg (works everywhere) or kvm (where the "
                                            "host's KVM runs your guest)")] = "tcg",
    no_reboot: Annotated[bool, typer.Option(help="QEMU exits when the guest reboots or "
                                                 "panics")] = False,
) -> None:
    """Print a QEMU command line that attaches a guest to the server."""
    try:
        line = QemuLine(socket_path=socket_path, qemu=qemu, memory=memory, vq_size=vq_size,
                        smp=smp, mmio=mmio, accel=accel, kernel=kernel, initrd=initrd,
                        append=append, no_reboot=no_reboot)
    except ValueError as e:
        _fail(str(e), 2)
    print(line.shell())


@app.command("plugins")
def list_plugins(log_level: LogLevel = "warning") -> None:
    """List the endpoint plugins installed: what each does, its options,
    where it comes from, and whether it is broken or shadowed (listed by
    the DIST/NAME that reaches it). docs/plugins.md: writing one."""
    _setup_logging(log_level)
    reg = registry()
    reg.load_all()  # imports each plugin: a broken one is logged, and marked below
    width = max(console.width, 60)
    for p in sorted(reg.plugins, key=lambda p: (p.spec_name, p.dist)):
        origin = f"built-in, {p.dist} {p.version}" if p.builtin else \
            f"{p.dist} {p.version}, {p.value}"
        status = "  [bold red]BROKEN[/]" if p.error else ""
        if p.clash:
            status += "  [bold yellow]SHADOWED[/]" if p.shadowed else \
                "  [bold yellow]AMBIGUOUS[/]"
        console.print(f"[cyan]{escape(p.spec_name)}[/]  ({escape(origin)}){status}",
                      soft_wrap=True, highlight=False)
        lines = []
        if p.error:
            lines.append(f"broken: {p.error}")
        if p.clash:
            lines.append(p.clash)
        if p.loaded:
            cls = p.load()
            lines.append(summary(cls) or "(no description)")
            if cls.default_name:
                lines.append(f"announced as {cls.default_name} unless the spec names it")
            opts = options(cls)
            lines.append(f"options: {', '.join(opts)}" if opts else "options: none")
        for line in lines:
            console.print(textwrap.fill(line, width, initial_indent="    ",
                                        subsequent_indent="    ", break_long_words=False,
                                        break_on_hyphens=False),
                          markup=False, highlight=False, soft_wrap=True)


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"vhost-rpmsg {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    version: Annotated[bool, typer.Option(
        "--version", "-V", is_eager=True, callback=_print_version,
        help="print the version and exit")] = False,
) -> None:
    """vhost-rpmsg."""


app.command("stats")(stats)
app.add_typer(endpoint_app, name="endpoint")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
