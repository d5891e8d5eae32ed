"""The commands that operate a running server through its control socket:
``vhost-rpmsg stats`` and ``vhost-rpmsg endpoint add|remove|list|open``."""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from typing import Annotated, Any, NoReturn

import typer
from rich.console import Console
from rich.table import Table

from .client import Control, ControlError

console = Console(width=None if sys.stdout.isatty() else 140)

ControlOpt = Annotated[str | None, typer.Option(
    "--control", "-c", help="the server's control socket (default: --socket-path + .ctl)")]
SocketPathOpt = Annotated[str | None, typer.Option(
    "--socket-path", "-s", help="the server's vhost-user socket: its control socket is "
                                "this path + .ctl")]
SocketOpt = Annotated[int | None, typer.Option(
    "--socket", help="which guest socket of the server (0..N-1 with --socket-count N)")]

endpoint_app = typer.Typer(no_args_is_help=True,
                           help="Add, remove, list or hold endpoints of a running server.")


def _fail(message: str, code: int = 1) -> NoReturn:
    typer.echo(f"error: {' '.join(message.split())}", err=True)
    raise typer.Exit(code)


def _connect(control: str | None, socket_path: str | None) -> Control:
    if control is None:
        if socket_path is None:
            raise typer.BadParameter("give --control PATH or the server's --socket-path",
                                     param_hint="--control")
        control = socket_path + ".ctl"
    try:
        return Control(control)
    except FileNotFoundError:
        _fail(f"{control}: no control socket there (is serve running, with --control?)")
    except ConnectionRefusedError:
        _fail(f"{control}: nobody listens there (a stale socket: is serve running?)")
    except PermissionError:
        _fail(f"{control}: permission denied (the control socket is the server user's; "
              "see serve --control-group)")
    except OSError as e:
        _fail(f"{control}: {e}")


def _call(ctl: Control, fn: Any, *args: Any, **kw: Any) -> Any:
    try:
        return fn(*args, **kw)
    except ControlError as e:
        _fail(f"{e.code.value}: {e.message}")
    except (OSError, ConnectionError) as e:
        _fail(f"{ctl.path}: {e}")


def stats(
    control: ControlOpt = None,
    socket_path: SocketPathOpt = None,
    socket: SocketOpt = None,
    json_out: Annotated[bool, typer.Option("--json", help="the snapshot as JSON")] = False,
    watch: Annotated[float | None, typer.Option(
        help="print again every SECONDS until interrupted")] = None,
) -> None:
    """Counters of a running server: per guest socket, session, queue and endpoint."""
    if watch is not None and watch <= 0:
        raise typer.BadParameter(f"{watch}: must be positive", param_hint="--watch")
    with _connect(control, socket_path) as ctl:
        while True:
            snap = _call(ctl, ctl.stats, socket)
            if json_out:
                print(json.dumps(snap, indent=None if watch else 2), flush=True)
            else:
                if watch:
                    console.clear()
                _print_stats(snap)
            if watch is None:
                return
            try:
                time.sleep(watch)
            except KeyboardInterrupt:
                return


def _print_stats(snap: dict[str, Any]) -> None:
    console.print(f"[bold]server[/] pid {snap['pid']}, up {snap['uptime_s']:.0f} s")
    control = snap.get("control", {})
    if control:
        console.print("  control: " + ", ".join(f"{k} {v}" for k, v in sorted(control.items())))
    for srv in snap["servers"]:
        state = "connected" if srv["connected"] else "no front-end"
        head = f"[bold]socket {srv['index']}[/] {srv['socket']}: {state}, {srv['engine']}"
        sess = srv.get("session")
        if sess:
            head += (f", features {sess['features']}, {sess['memory_regions']} memory "
                     f"region(s)")
        console.print(head)
        dev = srv.get("device", {})
        if dev:
            services = ", ".join(f"{g['name']}@{g['addr']}" for g in srv["guest_services"])
            console.print(f"  guest {'ready' if dev['guest_ready'] else 'not ready'}; "
                          f"outbox {dev['outbox_queued']}/{dev['outbox_limit']}; guest "
                          f"services: {services or '-'}")
        if srv.get("queues"):
            t = Table("queue", "state", "size", "popped", "pushed", "kicks", "notifies",
                      "suppressed", "notify fails", "bad chains", box=None)
            for q in srv["queues"]:
                t.add_row(str(q["index"]), q["state"], str(q["size"]), str(q["popped"]),
                          str(q["pushed"]), str(q["kicks"]), str(q["notifies"]),
                          str(q["notifies_suppressed"]), str(q["notify_failures"]),
                          str(q["bad_chains"]))
            console.print(t)
        if srv.get("endpoints"):
            console.print(_endpoint_table(srv["endpoints"]))
        counters = {**srv["counters"], **dev.get("counters", {})}
        if counters:
            console.print("  " + ", ".join(f"{k} {v}" for k, v in sorted(counters.items())))


def _endpoint_table(endpoints: list[dict[str, Any]], with_socket: bool = False) -> Table:
    cols = ["socket"] if with_socket else []
    t = Table(*cols, "addr", "endpoint", "handler", "to host", "bytes", "to guest", "bytes",
              "failed", "dropped", "queued", box=None)
    for e in endpoints:
        own = e.get("endpoint", {})
        dropped = sum(e["dropped"].values()) + sum(
            own.get(k, 0) for k in ("dropped_slow_reader", "no_dst", "bad_datagrams",
                                    "no_client"))
        queued = e["queue_depth"] + own.get("queued_to_process", 0)
        row = [str(e["socket"])] if with_socket else []
        t.add_row(*row, str(e["addr"]), e["describe"], e["handler"],
                  str(e["to_host_messages"]), str(e["to_host_bytes"]),
                  str(e["to_guest_messages"]), str(e["to_guest_bytes"]),
                  str(e["handler_failed_messages"]), str(dropped), str(queued))
    return t


@endpoint_app.command("list")
def endpoint_list(
    control: ControlOpt = None,
    socket_path: SocketPathOpt = None,
    socket: SocketOpt = None,
    json_out: Annotated[bool, typer.Option("--json", help="as JSON")] = False,
) -> None:
    """The endpoints of a running server (of every guest socket, unless --socket)."""
    with _connect(control, socket_path) as ctl:
        eps = _call(ctl, ctl.endpoints, socket)
    if json_out:
        print(json.dumps(eps, indent=2))
    else:
        console.print(_endpoint_table(eps, with_socket=True))


@endpoint_app.command("add")
def endpoint_add(
    spec: Annotated[str, typer.Argument(help="[NAME:]PLUGIN[@ADDR][,k=v…], as serve -e")],
    control: ControlOpt = None,
    socket_path: SocketPathOpt = None,
    socket: SocketOpt = None,
) -> None:
    """Add a plugin endpoint; it is announced to the guest at once (or at its next
    session).  Prints its address."""
    with _connect(control, socket_path) as ctl:
        print(_call(ctl, ctl.add_endpoint, spec, socket))


@endpoint_app.command("remove")
def endpoint_remove(
    addr: Annotated[int, typer.Argument(help="host address of the endpoint")],
    control: ControlOpt = None,
    socket_path: SocketPathOpt = None,
    socket: SocketOpt = None,
) -> None:
    """Remove an endpoint; its announcement is withdrawn (name-service DESTROY)."""
    with _connect(control, socket_path) as ctl:
        _call(ctl, ctl.remove_endpoint, addr, socket)


@endpoint_app.command("open")
def endpoint_open(
    name: Annotated[str, typer.Argument(help="service name announced to the guest ('' for "
                                             "none)")],
    command: Annotated[list[str] | None, typer.Argument(
        help="the program to run with the endpoint as fd 3 (after --)")] = None,
    control: ControlOpt = None,
    socket_path: SocketPathOpt = None,
    socket: SocketOpt = None,
    addr: Annotated[int | None, typer.Option(help="host address (default: the first free "
                                                  "from 1024)")] = None,
    dst: Annotated[int | None, typer.Option(help="guest address to send to (default: "
                                                 "whoever wrote last)")] = None,
    addressed: Annotated[bool, typer.Option(help="each datagram starts with the guest "
                                                 "address, 4 bytes little-endian")] = False,
) -> None:
    """Hold an endpoint: run COMMAND with it as fd 3 (LISTEN_FDS=1, as systemd socket
    activation does).  The endpoint lives as long as that fd: when COMMAND exits, or is
    killed, it is removed and its announcement withdrawn."""
    if not command:
        raise typer.BadParameter("give the program to run after --", param_hint="COMMAND")
    if shutil.which(command[0]) is None:  # before the guest sees an announcement
        _fail(f"{command[0]}: no such program (or not executable)", 127)
    with _connect(control, socket_path) as ctl:
        ep = _call(ctl, ctl.open_endpoint, name or None, addr=addr, dst=dst,
                   addressed=addressed, socket_index=socket)
    fd = ep.sock.detach()
    if fd != 3:
        os.dup2(fd, 3)  # the copy is inheritable
        os.close(fd)
    else:
        os.set_inheritable(3, True)
    env = dict(os.environ, LISTEN_FDS="1", LISTEN_PID=str(os.getpid()),
               LISTEN_FDNAMES=name or "rpmsg", VHOST_RPMSG_ADDR=str(ep.addr),
               VHOST_RPMSG_ADDRESSED="1" if addressed else "0")
    try:
        os.execvpe(command[0], command, env)
    except OSError as e:
        _fail(f"{command[0]}: {e.strerror}", 127)
