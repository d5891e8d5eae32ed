"""The contract between the generic vhost-user backend and a virtio device.

The backend knows vhost-user and virtqueues; a device knows what travels on them.
A device declares its queues, features and config space and is called back as rings
come and go and as the guest kicks.  It never sees a vhost-user message.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from ..virtqueue import SplitQueue


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

    def __init__(self) -> None:
        self.queues: list[SplitQueue] = []
        self.loop: EventLoop | None = None
        self.acked_features = 0

    def features(self) -> int:
        """Device feature bits offered to the driver (virtio bits, incl. VERSION_1)."""
        return 0

    def config(self) -> bytes:
        """The device's config space."""
        return b""

    def set_config(self, offset: int, data: bytes) -> None:
        """The driver wrote to config space.  Raise ValueError to refuse."""
        raise ValueError("device config space is read-only")

    # -- callbacks from the backend, always on the loop thread ----------------------

    def attach(self, queues: list[SplitQueue], loop: EventLoop) -> None:
        """Called once: the queues this device will be handed, and the loop to use."""
        self.queues = queues
        self.loop = loop

    def features_acked(self, features: int) -> None:
        """The front-end set the negotiated features (SET_FEATURES)."""
        self.acked_features = features

    def queue_started(self, queue: SplitQueue) -> None:
        """A ring became usable (started and enabled, memory mapped)."""

    def queue_stopped(self, queue: SplitQueue) -> None:
        """A ring was disabled (``queue.started`` still True) or stopped (False: the
        driver will set it up afresh); stop using it until it is ready again."""

    def kicked(self, queue: SplitQueue) -> None:
        """The guest made buffers available on a ready ring."""

    def status_changed(self, status: int) -> None:
        """The front-end forwarded the driver's status (SET_STATUS)."""

    def reset(self) -> None:
        """Device reset: RESET_DEVICE, RESET_OWNER or front-end disconnect."""
