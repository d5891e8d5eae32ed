"""``unix``: hand an endpoint to any host process through a unix SEQPACKET socket.

Each guest message becomes one datagram to every connected client; each datagram a
client sends becomes one message to the guest (to ``dst=`` if given, otherwise to the
guest address that last wrote to this endpoint).  Clients are plain processes:
``socat - UNIX-CONNECT:PATH`` style tools, or a few lines of Python.  Each client is a
:class:`~.peer.SeqpacketPeer`, as an fd endpoint's holder is: one that stops reading
has its own bounded queue and counted drops; with no client connected a guest message
is counted (``no_client``) and logged, rate-limited.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import socket
from collections import Counter
from typing import Any

from ..rpmsg.codec import MAX_PAYLOAD
from ..rpmsg.ratelimit import RateLimitedLog
from ..vhost_user.server import UnixListener, listen_unix, parse_mode
from .base import Endpoint, Port
from .peer import SeqpacketPeer, send_all

log = logging.getLogger(__name__)
_rl = RateLimitedLog(log)


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
        self.clients: dict[socket.socket, SeqpacketPeer] = {}
        self._last_src: int | None = None
        self.stats: Counter[str] = Counter()
        self._tasks: set[asyncio.Task[None]] = set()

    def bind(self, port: Port) -> None:
        super().bind(port)
        if self.listener is None:
            self.listener = listen_unix(self.path, self.mode, socket.SOCK_SEQPACKET)
            self.listener.setblocking(False)
            # inherited by each accepted connection (endpoints/peer.py: empty datagrams)
            self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)

    def guest_ready(self) -> None:
        if not self._tasks:
            task = asyncio.get_running_loop().create_task(self._accept())
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _accept(self) -> None:
        loop = asyncio.get_running_loop()
        assert self.listener is not None
        while True:
            conn, _ = await loop.sock_accept(self.listener)
            peer = SeqpacketPeer(conn, f"{self.describe()} client", _rl)
            self.clients[conn] = peer
            self.stats["clients"] += 1
            log.info("%s: host client connected (%d now)", self.describe(), len(self.clients))
            peer.start(self._from_client, functools.partial(self._gone, conn))

    def _gone(self, conn: socket.socket, why: str) -> None:
        peer = self.clients.pop(conn, None)
        if peer is not None:
            self._keep(peer)
            peer.close()
        log.info("%s: client gone (%s)", self.describe(), why)

    def _keep(self, peer: SeqpacketPeer) -> None:
        """A client's counters outlive it: add them to the bridge's."""
        for key in ("to_process", "dropped_slow_reader", "from_process"):
            self.stats[key] += peer.stats[key]

    async def _from_client(self, datagrams: list[bytes]) -> None:
        assert self.port is not None
        messages = [m for m in map(self._message, datagrams) if m is not None]
        await send_all(self.port, messages)
        self.stats["from_clients"] += len(messages)

    def _message(self, data: bytes) -> tuple[int, bytes] | None:
        dst = self.dst if self.dst is not None else self._last_src
        if dst is None:
            self.stats["no_dst"] += 1
            _rl.error(f"nodst{self.addr}", "%s: no guest address to send to yet (give "
                      "dst=); datagram of %d bytes refused", self.describe(), len(data))
            return None
        if len(data) > MAX_PAYLOAD:
            self.stats["too_large"] += 1
            _rl.error(f"big{self.addr}", "%s: datagram of %d bytes exceeds %d; refused",
                      self.describe(), len(data), MAX_PAYLOAD)
            return None
        return dst, data

    def on_message(self, src: int, data: bytes) -> None:
        self._last_src = src
        if not self.clients:
            # nobody to give it to: say so, do not lose it without a trace
            self.stats["no_client"] += 1
            _rl.error(f"noclient{self.addr}", "%s: no host client connected; guest "
                      "message of %d bytes from %d dropped", self.describe(), len(data), src)
            return
        for peer in list(self.clients.values()):
            if peer.send(data):
                self.stats["to_clients"] += 1

    def close(self) -> None:
        for t in list(self._tasks):
            t.cancel()
        for peer in self.clients.values():
            peer.close()
        self.clients.clear()
        if self.listener is not None:
            self.listener.remove_path()
            self.listener.close()
            self.listener = None
