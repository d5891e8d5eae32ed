"""Host-side endpoints: the handler interface plugins implement.

An :class:`Endpoint` owns one host RPMsg address.  The device calls the most
batched handler the endpoint overrides: :meth:`Endpoint.on_message_batch` (arrays over
one buffer), :meth:`on_batch` ((src, payload) pairs) or :meth:`on_message` (one at a
time) with what the guest sent it, and gives the endpoint a :class:`Port` through
which it sends back.  A handler may be synchronous or ``async def``: async handlers
run in order on the device's event loop.
"""

from __future__ import annotations

from collections.abc import Awaitable
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

if TYPE_CHECKING:
    from ..rpmsg.batch import MessageBatch


class Port(Protocol):
    """What an endpoint may do with the device: send from its own address ``src``.

    The device hands each endpoint one when it registers it (:meth:`Endpoint.bind`).
    """

    src: int

    def send(self, dst: int, data: bytes) -> None:
        """Queue-or-send without waiting; raises WouldBlock when the outbox is full."""
        ...

    def send_many(self, messages: list[tuple[int, bytes]]) -> None:
        """Several (dst, payload) messages in one pass over the ring; WouldBlock (all or
        nothing) when they do not fit the outbox."""
        ...

    async def asend(self, dst: int, data: bytes) -> None:
        """Send, waiting (asynchronously) for room when the guest is not reading."""
        ...

    @property
    def guest_ready(self) -> bool:
        """Whether a guest session is on (its rx ring is usable)."""
        ...


class Endpoint:
    """Base class of host endpoints.  Subclass and override :meth:`on_message`."""

    #: entry-point name of the plugin (set by the registry)
    plugin: ClassVar[str] = ""
    #: service name announced when none is given on the command line (None: no announcement)
    default_name: ClassVar[str | None] = None
    #: zero-copy receive: ``on_message_batch`` gets ``batch.data`` as a read-only view of
    #: guest memory, valid only until it returns (docs/plugins.md); an instance may set it
    zero_copy: bool = False

    def __init__(self, addr: int, name: str | None = None, **options: Any) -> None:
        if options:
            raise TypeError(f"{type(self).__name__} takes no options {sorted(options)}")
        self.addr = addr
        self.name = name
        self.port: Port | None = None

    def bind(self, port: Port) -> None:
        """The device registered this endpoint; ``port`` sends from ``self.addr``."""
        self.port = port

    def on_message(self, src: int, data: bytes) -> Awaitable[None] | None:
        """One message from guest address ``src``."""

    def on_batch(self, messages: list[tuple[int, bytes]]) -> None:
        """Several messages at once, as (src, payload) pairs; override to amortise
        per-call costs."""
        for src, data in messages:
            self.on_message(src, data)

    def on_message_batch(self, batch: MessageBatch) -> None:
        """Several messages as arrays over one buffer (the hot path): override to handle
        them without creating an object per message.  ``batch.srcs``, ``.offsets`` and
        ``.lengths`` index ``batch.data``; iterating yields (src, payload) pairs."""
        self.on_batch(list(batch))

    def guest_ready(self) -> None:
        """The guest driver is up (announcements delivered, rx buffers posted)."""

    def guest_gone(self) -> None:
        """The guest reset or disconnected; it has forgotten every channel."""

    def close(self) -> None:
        """The device is being destroyed."""

    def describe(self) -> str:
        name = self.name if self.name else "-"
        return f"{self.plugin or type(self).__name__}@{self.addr} ({name})"
