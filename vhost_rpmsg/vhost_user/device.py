"""The contract between the generic vhost-user backend and a virtio device.

The backend knows vhost-user and virtqueues; a device knows what travels on them.
A device declares its queues, features, protocol features and config space and is
called back with :class:`~.vring.Vring` objects as rings come and go and as the guest
kicks.  It never sees a vhost-user message.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

from .protocol import IMPLEMENTED_PROTOCOL_FEATURES, ProtocolFeature

if TYPE_CHECKING:
    from .vring import Vring


class EventLoop(Protocol):
    """What the backend needs from whoever owns the loop (asyncio's loop fits)."""

    def add_reader(self, fd: int, callback: Callable[..., Any], *args: Any) -> Any: ...

    def remove_reader(self, fd: int) -> Any: ...

    def call_soon_threadsafe(self, callback: Callable[..., Any], *args: Any) -> Any: ...

    def call_later(self, delay: float, callback: Callable[..., Any], *args: Any) -> Any: ...


class VirtioDevice:
    """Base class for devices served over vhost-user.  Override what you need."""

    #: number of virtqueues the device uses
    num_queues: int = 1
    #: largest ring the device accepts
    max_queue_size: int = 1024
    #: virtio device id (for documentation and capability printing)
    device_id: int = 0
    #: bytes of config space; with none, PROTOCOL_F_CONFIG is not offered
    config_size: int = 0

    def __init__(self) -> None:
        self.vrings: list[Vring] = []
        self.loop: EventLoop | None = None
        self.acked_features = 0

    def features(self) -> int:
        """Device feature bits offered to the driver (virtio bits, incl. VERSION_1)."""
        return 0

    def protocol_features(self) -> int:
        """vhost-user protocol features to offer: all the back-end implements, but
        CONFIG only for a device with a config space."""
        f = IMPLEMENTED_PROTOCOL_FEATURES
        if not self.config_size:
            f &= ~(1 << ProtocolFeature.CONFIG)
        return f

    def config(self) -> bytes:
        """The device's config space."""
        return b""

    def set_config(self, offset: int, data: bytes) -> None:
        """The driver wrote to config space.  Raise ValueError to refuse."""
        raise ValueError("device config space is read-only")

    # -- callbacks from the backend, always on the loop thread ----------------------

    def attach(self, vrings: list[Vring], loop: EventLoop) -> None:
        """Called once: the rings this device will be handed, and the loop to use."""
        self.vrings = vrings
        self.loop = loop

    def features_acked(self, features: int) -> None:
        """The front-end set the negotiated features (SET_FEATURES)."""
        self.acked_features = features

    def queue_started(self, vring: Vring) -> None:
        """A ring became usable (started and enabled, memory mapped)."""

    def queue_stopped(self, vring: Vring) -> None:
        """A ring is no longer usable: disabled or broken (``vring.state`` says which),
        or stopped (``RingState.STOPPED``: the driver will set it up afresh).  Stop using
        it until it is ready again."""

    def kicked(self, vring: Vring) -> None:
        """The guest made buffers available on a ready ring."""

    def status_changed(self, status: int) -> None:
        """The front-end forwarded the driver's status (SET_STATUS)."""

    def reset(self) -> None:
        """Device reset: RESET_DEVICE, RESET_OWNER or front-end disconnect."""
