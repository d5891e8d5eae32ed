"""Shared fixtures: a server on its own loop thread, and simulated guests for it."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, Protocol, TypedDict, TypeVar, Unpack, cast, overload

import hypothesis  # noqa: F401  (imported early: its lazy import at session end can crash)
import pytest

from vhost_rpmsg.endpoints.base import Endpoint
from vhost_rpmsg.guest import SimGuest
from vhost_rpmsg.rpmsg.device import RpmsgDevice
from vhost_rpmsg.vhost_user.device import VirtioDevice
from vhost_rpmsg.vhost_user.server import LoopThread, VhostUserServer, listen_unix
from vhost_rpmsg.virtio.engines import QueueFactory

D = TypeVar("D", bound=VirtioDevice)
T = TypeVar("T")


class ServerOptions(TypedDict, total=False):
    """The keyword options of :class:`VhostUserServer`, which ``serve`` passes on."""

    protocol_features: int | None
    queue_factory: QueueFactory
    name: str | None


class GuestOptions(TypedDict, total=False):
    """The keyword options of :class:`SimGuest`, which :meth:`Running.guest` passes on."""

    queue_size: int
    event_idx: bool
    tx_interrupts: bool
    protocol_features: int
    name_service: bool
    hidden_tail: int
    rx_thread: bool
    fast: bool | None


@dataclass
class Running(Generic[D]):
    """A server serving one device (of type ``D``) on a socket, on a loop thread."""

    path: str
    device: D
    server: VhostUserServer
    loop: LoopThread
    guests: list[SimGuest] = field(default_factory=list)

    def call(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` on the server's loop thread; its result."""
        return cast(T, self.loop.call(fn))

    def guest(self, **kw: Unpack[GuestOptions]) -> SimGuest:
        g = SimGuest(self.path, **kw)
        self.guests.append(g)
        return g

    def counters(self) -> dict[str, int]:
        return self.call(self.server.counters)


class Serve(Protocol):
    """The ``serve`` fixture: endpoints (or nothing) are served by a fresh
    :class:`RpmsgDevice`; a device is served as it is."""

    @overload
    def __call__(self, device: list[Endpoint] | None = None,
                 **kw: Unpack[ServerOptions]) -> Running[RpmsgDevice]: ...

    @overload
    def __call__(self, device: D, **kw: Unpack[ServerOptions]) -> Running[D]: ...


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[Serve]:
    """serve(device_or_endpoints, **server_kw) -> Running; torn down after the test."""
    running: list[Running[Any]] = []

    def start(device: VirtioDevice | list[Endpoint] | None = None,
              **kw: Unpack[ServerOptions]) -> Running[Any]:
        if device is None or isinstance(device, list):
            device = RpmsgDevice(device or [])
        path = os.path.join(tmp_path, f"vr{len(running)}.sock")
        loop = LoopThread().start()
        server = VhostUserServer(device, listen_unix(path), **kw)
        loop.call(lambda: server.start(loop.loop))
        r = Running(path, device, server, loop)
        running.append(r)
        return r

    yield start
    for r in running:
        for g in r.guests:
            if g.fe is not None:
                g.disconnect()
        r.loop.call(r.server.close)
        r.loop.stop()


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """The real-guest suite's per-boot figures, when it ran."""
    from tests.test_qemu_guest import GUEST_REPORT

    if not GUEST_REPORT:
        return
    tr = terminalreporter
    tr.section("real guest: per boot (backend µs/msg: its CPU over the whole boot ÷ "
               "messages the guest programs reported)")
    tr.write_line(f"{'test':52} {'boots':>5} {'rc':>3} {'boot s':>7} {'run s':>6} "
                  f"{'msgs':>8} {'backend µs/msg':>14}")
    for r in GUEST_REPORT:
        boot = f"{r['boot_s']:.2f}" if r["boot_s"] is not None else "-"
        per = (f"{r['backend_cpu_us_per_msg']:.1f}"
               if r["backend_cpu_us_per_msg"] is not None else "-")
        tr.write_line(f"{r['test']!s:52} {r['boots']!s:>5} {r['rc']!s:>3} {boot:>7} "
                      f"{r['run_s']:>6.1f} {r['messages']!s:>8} {per:>14}")
