"""The upper endpoint: alone, through the plugin registry, and against a simulated guest.

Run with the distribution installed (``pip install '.[test]'`` here): the second and
third tests find the plugin through its entry point, as ``vhost-rpmsg`` does.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator

import pytest
from vhost_rpmsg_upper import Upper

from vhost_rpmsg.endpoints.registry import build, registry
from vhost_rpmsg.guest import SimGuest
from vhost_rpmsg.rpmsg.device import RpmsgDevice
from vhost_rpmsg.vhost_user.server import LoopThread, VhostUserServer, listen_unix


class RecordingPort:
    """Stands in for the device's Port: keeps what the endpoint sends."""

    def __init__(self) -> None:
        self.sent: list[tuple[int, bytes]] = []

    def send(self, dst: int, data: bytes) -> None:
        self.sent.append((dst, data))


def test_answers_upper_cased_to_the_sender() -> None:
    ep = Upper(1030, prefix="> ")
    port = RecordingPort()
    ep.bind(port)  # type: ignore[arg-type]
    ep.on_message(2000, b"hello, world 42")
    ep.on_message(2001, b"\xffabc")
    assert port.sent == [(2000, b"> HELLO, WORLD 42"), (2001, b"> \xffABC")]
    assert ep.answered == 2


def test_unknown_options_are_refused() -> None:
    with pytest.raises(TypeError, match="colour"):
        Upper(1030, colour="red")


def test_the_registry_finds_it_through_its_entry_point() -> None:
    plugin = registry().find("upper")
    assert plugin.dist == "vhost-rpmsg-plugin-example" and not plugin.builtin
    assert plugin.load() is Upper
    (ep,) = build(["upper@1030,prefix=x"])
    assert isinstance(ep, Upper) and ep.addr == 1030 and ep.name == "upper"
    assert ep.prefix == b"x"


@pytest.fixture
def served() -> Iterator[tuple[str, RpmsgDevice]]:
    """A device with upper at 1030, served on a socket by a loop thread."""
    device = RpmsgDevice(build(["upper@1030"]))
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "rpmsg.sock")
        loop = LoopThread().start()
        server = VhostUserServer(device, listen_unix(path))
        loop.call(lambda: server.start(loop.loop))
        try:
            yield path, device
        finally:
            loop.call(server.close)
            loop.call(device.destroy)
            loop.stop()


def test_against_the_simulated_guest(served: tuple[str, RpmsgDevice]) -> None:
    path, device = served
    with SimGuest(path) as guest:
        assert guest.wait_channel("upper").addr == 1030  # announced by default_name
        guest.open(2000)
        for i in range(50):
            guest.send(2000, 1030, f"message {i}".encode())
            assert guest.recv(2000) == (1030, f"MESSAGE {i}".encode())
    assert device.stats["handler_errors"] == 0


def test_a_too_long_answer_is_a_handler_error(served: tuple[str, RpmsgDevice]) -> None:
    path, device = served
    (upper,) = device.endpoints.values()
    assert isinstance(upper, Upper)
    upper.prefix = b"!"  # 1 + 496 bytes: more than the guest's buffer holds
    with SimGuest(path) as guest:
        guest.open(2000)
        guest.send(2000, 1030, b"x" * 496)
        guest.send(2000, 1030, b"short")  # the endpoint goes on with the next message
        assert guest.recv(2000) == (1030, b"!SHORT")
    assert device.stats["handler_errors"] == 1
