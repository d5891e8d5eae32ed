"""``unix``: hand an endpoint to any host process through a unix SEQPACKET socket.

Each guest message becomes one datagram to every connected client; each datagram a
client sends becomes one message to the guest (to ``dst=`` if given, otherwise to the
guest address that last wrote to this endpoint).  Clients are plain processes:
``socat - UNIX-CONNECT:PATH`` style tools, or a few lines of Python.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from typing import Any

from ..rpmsg.codec import MAX_PAYLOAD
from ..vhost_user.server import UnixListener, listen_unix, parse_mode
from .base import Endpoint, Port

log = logging.getLogger(__name__)


class UnixBridge(Endpoint):
    """Bridge this endpoint to host processes over a unix SEQPACKET socket.

    Options: ``path`` (socket to create, required), ``dst`` (guest address to send to;
    default: whoever wrote last), ``mode`` (octal permissions, default 0600).

    Constructing one only checks the options; the socket is created when a device
    registers the endpoint (:meth:`bind`), with :func:`listen_unix`'s rules (a socket
    in use, a symlink or another file at ``path`` is refused).
    """

    def __init__(self, addr: int, name: str | None = None, *, path: str | None = None,
                 dst: int | str | None = None, mode: str = "0600", **options: Any) -> None:
        super().__init__(addr, name, **options)
        if not path:
            raise ValueError("unix needs path=<socket path>")
        self.path = path
        try:
            self.dst = int(dst) if dst is not None else None
        except ValueError:
            raise ValueError(f"dst={dst!r} is not an address") from None
        try:
            self.mode = parse_mode(mode)
        except ValueError as e:
            raise ValueError(f"mode={e}") from None
        self.listener: UnixListener | None = None
        self.clients: set[socket.socket] = set()
        self._last_src: int | None = None
        self.stats = {"to_clients": 0, "from_clients": 0, "client_slow": 0, "no_dst": 0,
                      "too_large": 0}
        self._tasks: set[asyncio.Task[None]] = set()

    def bind(self, port: Port) -> None:
        super().bind(port)
        if self.listener is None:
            self.listener = listen_unix(self.path, self.mode, socket.SOCK_SEQPACKET)
            self.listener.setblocking(False)

    def guest_ready(self) -> None:
        if not self._tasks:
            self._spawn(self._accept())

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _accept(self) -> None:
        loop = asyncio.get_running_loop()
        assert self.listener is not None
        while True:
            conn, _ = await loop.sock_accept(self.listener)
            conn.setblocking(False)
            self.clients.add(conn)
            log.info("%s: host client connected (%d now)", self.describe(), len(self.clients))
            self._spawn(self._client(conn))

    async def _client(self, conn: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        assert self.port is not None
        try:
            while True:
                data = await loop.sock_recv(conn, 65536)
                if not data:
                    break
                dst = self.dst if self.dst is not None else self._last_src
                if dst is None:
                    self.stats["no_dst"] += 1
                    log.error("%s: no guest address to send to yet (give dst=); "
                              "datagram of %d bytes refused", self.describe(), len(data))
                    continue
                if len(data) > MAX_PAYLOAD:
                    self.stats["too_large"] += 1
                    log.error("%s: datagram of %d bytes exceeds %d; refused",
                              self.describe(), len(data), MAX_PAYLOAD)
                    continue
                await self.port.asend(dst, data)
                self.stats["from_clients"] += 1
        except OSError as e:
            log.info("%s: client gone: %s", self.describe(), e)
        finally:
            self.clients.discard(conn)
            conn.close()

    def on_message(self, src: int, data: bytes) -> None:
        self._last_src = src
        for conn in list(self.clients):
            try:
                conn.send(data)
                self.stats["to_clients"] += 1
            except BlockingIOError:
                self.stats["client_slow"] += 1
                log.error("%s: client not reading; message of %d bytes not delivered to it",
                          self.describe(), len(data))
            except OSError:
                self.clients.discard(conn)

    def close(self) -> None:
        for t in list(self._tasks):
            t.cancel()
        for c in self.clients:
            c.close()
        if self.listener is not None:
            self.listener.remove_path()
            self.listener.close()
            self.listener = None
