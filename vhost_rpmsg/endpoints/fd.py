"""Endpoints held by other processes, as file descriptors.

The host-side twin of an anonymous rpmsg endpoint fd: the control socket creates a
connected SOCK_SEQPACKET pair, keeps one end here and passes the other to whoever
asked (``vhost-rpmsg endpoint open``).  One datagram is one rpmsg message.  The
endpoint exists exactly as long as that fd: when the last holder closes it, exits or
is killed, the hang-up ends the endpoint, the device withdraws its announcement and
the address is free again.

Two framings:

* plain (the default): a datagram is the payload.  Guest messages arrive whoever sent
  them; what the process writes goes to ``dst`` or, without one, to the guest address
  that last wrote to the endpoint.
* addressed: every datagram starts with the guest address as 4 bytes, little-endian:
  who sent it (to the process) or whom it is for (from the process).
"""

from __future__ import annotations

import logging
import socket
import struct
from collections.abc import Callable
from typing import Any

from ..rpmsg import codec as rp
from ..rpmsg.batch import MessageBatch
from ..rpmsg.ratelimit import RateLimitedLog
from .base import Endpoint
from .peer import PEER_QUEUE_LIMIT, SeqpacketPeer, send_all

log = logging.getLogger(__name__)
_rl = RateLimitedLog(log)
_ADDR = struct.Struct("<I")
#: the size of the address header of the addressed framing
ADDR_HEADER = _ADDR.size


class FdEndpoint(Endpoint):
    """An endpoint whose handler is another process, at the end of ``sock``."""

    plugin = "fd"

    def __init__(self, addr: int, name: str | None = None, *, sock: socket.socket,
                 dst: int | None = None, addressed: bool = False,
                 limit: int = PEER_QUEUE_LIMIT,
                 on_closed: Callable[[FdEndpoint, str], None] | None = None,
                 **options: Any) -> None:
        super().__init__(addr, name, **options)
        self.dst = dst
        self.addressed = addressed
        self.peer = SeqpacketPeer(sock, f"fd endpoint {addr}", _rl, limit=limit)
        self.stats = self.peer.stats
        self._last_src: int | None = None
        self._on_closed = on_closed
        self._open = True

    def bind(self, port: Any) -> None:
        super().bind(port)
        self.peer.start(self._from_process, self._closed)

    # -- guest → process --------------------------------------------------------------

    def on_message_batch(self, batch: MessageBatch) -> None:
        peer = self.peer
        done = peer.send_batch(batch, self.addressed)
        if done < len(batch.srcs):  # the socket is full, or there is no C writer
            send = peer.send
            rest = batch.pairs()[done:]
            if self.addressed:
                for src, data in rest:
                    send(_ADDR.pack(src) + data)
            else:
                for _, data in rest:
                    send(data)
        if not self.addressed:
            self._last_src = int(batch.srcs[-1])

    def on_message(self, src: int, data: bytes) -> None:
        self._last_src = src
        self.peer.send(_ADDR.pack(src) + data if self.addressed else data)

    # -- process → guest --------------------------------------------------------------

    async def _from_process(self, datagrams: list[bytes]) -> None:
        assert self.port is not None
        await send_all(self.port, [m for m in map(self._message, datagrams) if m is not None])

    def _message(self, data: bytes) -> tuple[int, bytes] | None:
        """The (guest address, payload) a datagram asks for; None (counted, logged) if
        it cannot be sent."""
        if self.addressed:
            if len(data) < ADDR_HEADER:
                self.stats["bad_datagrams"] += 1
                _rl.error(f"short{self.addr}", "%s: datagram of %d bytes has no address "
                          "header; refused", self.describe(), len(data))
                return None
            (dst,) = _ADDR.unpack_from(data)
            data = data[ADDR_HEADER:]
        else:
            dst = self.dst if self.dst is not None else self._last_src
            if dst is None:
                self.stats["no_dst"] += 1
                _rl.error(f"nodst{self.addr}", "%s: no guest address to send to yet (open "
                          "with --dst, or let the guest write first); datagram refused",
                          self.describe())
                return None
        if len(data) > rp.MAX_PAYLOAD or not 0 <= dst < rp.ADDR_ANY:
            self.stats["bad_datagrams"] += 1
            _rl.error(f"big{self.addr}", "%s: datagram of %d bytes to %d refused (at most "
                      "%d bytes, to an address below 0x%x)", self.describe(), len(data),
                      dst, rp.MAX_PAYLOAD, rp.ADDR_ANY)
            return None
        return dst, data

    # -- lifetime ---------------------------------------------------------------------

    def _closed(self, why: str) -> None:
        log.info("%s: its fd was closed (%s)", self.describe(), why)
        if self._on_closed is not None:
            self._on_closed(self, why)
        else:
            self.close()

    def close(self) -> None:
        if self._open:
            self._open = False
            self.peer.close()

    def describe(self) -> str:
        name = self.name if self.name else "-"
        mode = "addressed" if self.addressed else (
            f"dst {self.dst}" if self.dst is not None else "reply")
        return f"fd@{self.addr} ({name}, {mode})"
