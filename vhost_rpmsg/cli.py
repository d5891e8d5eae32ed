"""The ``vhost-rpmsg`` command: serve, demo, bench, qemu-cmdline."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shlex
import signal
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from . import __version__
from .endpoints.registry import PluginError, build, plugins
from .engines import EngineUnavailable, QueueFactory, queue_factory
from .rpmsg.device import RpmsgDevice
from .vhost_user.server import VhostUserServer, listen_unix

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="A vhost-user backend serving RPMsg (virtio id 7) to virtual machines.")
console = Console(stderr=False, width=None if sys.stdout.isatty() else 110)
log = logging.getLogger("vhost_rpmsg")

LogLevel = Annotated[str, typer.Option("--log-level", "-l",
                                        help="debug, info, warning or error")]
EngineOpt = Annotated[str, typer.Option("--engine", help="ring engine: auto, cffi or python")]


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
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
    socket_path: Annotated[str | None, typer.Option(help="unix socket to listen on")] = None,
    fd: Annotated[int | None, typer.Option(help="inherited listening socket fd")] = None,
    socket_count: Annotated[int, typer.Option(help="guests to serve (paths get 0..N-1)")] = 1,
    socket_mode: Annotated[str, typer.Option(help="permissions of the socket file")] = "0600",
    endpoint: Annotated[list[str] | None, typer.Option(
        "--endpoint", "-e", help="[NAME:]PLUGIN[@ADDR][,k=v…], repeatable")] = None,
    outbox: Annotated[int, typer.Option(help="messages queued per guest while it has no "
                                              "rx buffer")] = 256,
    print_capabilities: Annotated[bool, typer.Option(
        "--print-capabilities", help="print the backend's capabilities as JSON and exit")] = False,
    engine: EngineOpt = "auto",
    log_level: LogLevel = "info",
) -> None:
    """Serve RPMsg to QEMU guests over vhost-user (runs in the foreground)."""
    if print_capabilities:
        # The vhost-user spec's backend convention; "rpmsg" is not one of its listed types.
        print(json.dumps({"type": "rpmsg", "features": []}))
        return
    _setup_logging(log_level)
    if (socket_path is None) == (fd is None):
        raise typer.BadParameter("give exactly one of --socket-path or --fd")
    if fd is not None and socket_count != 1:
        raise typer.BadParameter("--fd serves one guest; drop --socket-count")
    specs = endpoint if endpoint is not None else ["rpmsg-raw:echo@1024"]
    try:
        build(specs)  # fail early and clearly on a bad spec
    except PluginError as e:
        raise typer.BadParameter(str(e), param_hint="--endpoint") from e
    factory = _queue_factory(engine)
    mode = int(socket_mode, 8)
    servers: list[VhostUserServer] = []
    if fd is not None:
        socks = [socket.socket(fileno=fd)]
    else:
        assert socket_path is not None
        socks = [listen_unix(p, mode) for p in _socket_paths(socket_path, socket_count)]
    for sock in socks:
        device = RpmsgDevice(build(specs), outbox_limit=outbox)
        device.guest_ns_listeners.append(
            lambda ns: log.info("guest announced %r at %d (%s)", ns.name, ns.addr,
                                ns.flags.name.lower()))
        servers.append(VhostUserServer(device, sock, queue_factory=factory))
    for s in servers:
        eps = ", ".join(ep.describe() for ep in s.device.endpoints.values())  # type: ignore[attr-defined]
        log.info("%s: engine %s, endpoints: %s", s.name, factory(0, 1).engine, eps)
    asyncio.run(_serve_until_signal(servers))


async def _serve_until_signal(servers: list[VhostUserServer]) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    for s in servers:
        s.start(loop)
    await stop.wait()
    log.info("stopping")
    for s in servers:
        s.close()


@app.command()
def demo(
    messages: Annotated[int, typer.Option(help="echo round trips to run")] = 2000,
    engine: EngineOpt = "auto",
    log_level: LogLevel = "warning",
) -> None:
    """Run the server and the built-in simulated guest together; show the traffic."""
    _setup_logging(log_level)
    factory = _queue_factory(engine)
    endpoints = build(["rpmsg-raw:echo@1024", "rpmsg-client-sample:echo@1025", "sink@1026"])
    device = RpmsgDevice(endpoints)
    sink = endpoints[2]
    tmp = tempfile.mkdtemp(prefix="vhost-rpmsg-demo-")
    path = os.path.join(tmp, "demo.sock")
    server = VhostUserServer(device, listen_unix(path), queue_factory=factory)
    loop = asyncio.new_event_loop()
    ready = threading.Event()

    def run_loop() -> None:
        asyncio.set_event_loop(loop)
        server.start(loop)
        loop.call_soon(ready.set)
        loop.run_forever()

    t = threading.Thread(target=run_loop, daemon=True)
    t.start()
    ready.wait()
    console.print(f"[bold]vhost-rpmsg {__version__}[/] demo: server on {path} "
                  f"(engine {factory(0, 1).engine}), simulated Linux guest connecting")
    try:
        _demo_traffic(path, messages, device, sink)
    finally:
        loop.call_soon_threadsafe(server.close)
        loop.call_soon_threadsafe(loop.stop)
        t.join(5)
        Path(path).unlink(missing_ok=True)
        os.rmdir(tmp)


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
    log_level: LogLevel = "warning",
) -> None:
    """Measure throughput and latency: server and simulated guest as separate processes."""
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    from . import bench as b
    from .engines import available_engines

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
    with Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(),
                  console=console, transient=True) as progress:
        task = progress.add_task("starting", total=None)
        report = b.run(wanted, size_list, messages, samples,
                       progress=lambda s: progress.update(task, description=s), pin=pin)
    for table in b.render(report):
        console.print(table)
    if json_out:
        b.write_json(report, json_out)
        console.print(f"results written to {json_out}")


@app.command("qemu-cmdline")
def qemu_cmdline(
    socket_path: Annotated[str, typer.Option(help="the socket vhost-rpmsg serves")],
    vq_size: Annotated[int, typer.Option(help="ring size (256 gives the guest 256+256 "
                                               "buffers)")] = 256,
    memory: Annotated[str, typer.Option(help="guest RAM (shared with the backend)")] = "256M",
    kernel: Annotated[str | None, typer.Option(help="guest kernel to boot")] = None,
    initrd: Annotated[str | None, typer.Option(help="guest initramfs")] = None,
    qemu: Annotated[str, typer.Option(help="QEMU binary (10.2 or newer)")] =
        "qemu-system-x86_64",
    mmio: Annotated[bool, typer.Option(help="virtio-mmio instead of PCI (microvm)")] = False,
) -> None:
    """Print a QEMU command line that attaches a guest to the server."""
    args = [qemu]
    if mmio:
        # virtio-mmio is legacy (v1) by default; modern gives VERSION_1 as on PCI.
        args += ["-machine", "microvm,memory-backend=mem,rtc=on",
                 "-global", "virtio-mmio.force-legacy=off"]
    else:
        args += ["-machine", "q35,memory-backend=mem"]
    args += ["-accel", "kvm:tcg", "-cpu", "max", "-m", memory,
             "-object", f"memory-backend-memfd,id=mem,size={memory},share=on",
             "-chardev", f"socket,id=rpmsg0,path={socket_path},reconnect-ms=1000",
             "-device", ("vhost-user-test-device" if mmio else "vhost-user-test-device-pci")
             + f",chardev=rpmsg0,virtio-id=7,num_vqs=2,vq_size={vq_size}",
             "-nographic"]
    if kernel:
        args += ["-kernel", kernel, "-append", "console=ttyS0"]
    if initrd:
        args += ["-initrd", initrd]
    print(shlex.join(args))


@app.command("plugins")
def list_plugins() -> None:
    """List the endpoint plugins installed."""
    for name, cls in sorted(plugins().items()):
        doc = (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else ""
        console.print(f"[cyan]{name}[/]  {doc}")


@app.callback()
def _main() -> None:
    """vhost-rpmsg."""


def main() -> None:
    app()


if __name__ == "__main__":
    main()
