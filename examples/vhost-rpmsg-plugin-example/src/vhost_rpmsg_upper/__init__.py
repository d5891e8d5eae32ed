"""``upper``: an example vhost-rpmsg endpoint plugin."""

from __future__ import annotations

from typing import Any

from vhost_rpmsg.endpoints import Endpoint

__all__ = ["Upper"]


class Upper(Endpoint):
    """Answers every message with its payload upper-cased (ASCII letters; other bytes
    unchanged), optionally after a prefix.

    Options: ``prefix`` (text put before every answer; default none).  An answer longer
    than a guest buffer's 496-byte payload is refused by the device (PayloadTooLarge):
    the server logs it and counts a handler error, and the guest gets no answer.
    """

    #: announced to the guest under this name unless the endpoint spec gives one
    default_name = "upper"

    def __init__(self, addr: int, name: str | None = None, *, prefix: str = "",
                 **options: Any) -> None:
        super().__init__(addr, name, **options)  # refuses options nobody took
        self.prefix = prefix.encode()
        self.answered = 0

    def on_message(self, src: int, data: bytes) -> None:
        assert self.port is not None  # bound by the device before any message
        # One answer per message never finds the outbox full: the device takes no more
        # guest messages than it has room for answers (docs/plugins.md, flow control).
        self.port.send(src, self.prefix + data.upper())
        self.answered += 1
