"""Talk to a running ``vhost-rpmsg serve``: its control socket, and endpoint fds.

>>> with Control("/run/vhost-rpmsg/vm0.sock.ctl") as ctl:
...     ep = ctl.open_endpoint("rpmsg-raw")      # announced to the guest at once
...     src, data = ep.recv()                     # a guest message (src: with addressed)
...     ep.send(data)                             # back to whoever wrote last
...     ep.close()                                # the endpoint is gone, announcement too

An :class:`EndpointSocket` is an ordinary SOCK_SEQPACKET socket underneath
(``ep.sock``): pass it to another process, poll it, hand its fd to C.  It lives exactly
as long as that fd.  :class:`AsyncEndpoint` is the asyncio flavour.
"""

from __future__ import annotations

import array
import asyncio
import socket
import struct
import time
from types import TracebackType
from typing import Any

from .control import protocol as cp
from .control.protocol import ControlError, Op
from .endpoints.fd import ADDR_HEADER
from .endpoints.peer import CREDS_SPACE, MAX_DATAGRAM, hung_up, recvmsg_async

__all__ = ["AsyncEndpoint", "Control", "ControlError", "EndpointSocket", "from_listen_fds"]

_ADDR = struct.Struct("<I")


class EndpointSocket:
    """An endpoint fd: one datagram per message."""

    def __init__(self, sock: socket.socket, addr: int, *, addressed: bool = False) -> None:
        # Credentials on every datagram from now on: how an empty guest message differs
        # from the end (endpoints/peer.py; the server leaves this end as it is, so a
        # holder that does not need it pays nothing).  What the server queued before
        # has none: an empty one of those is told from the end by the hang-up flag.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self.sock = sock
        #: the host address of the endpoint (what the guest writes to)
        self.addr = addr
        self.addressed = addressed

    def send(self, data: bytes, dst: int | None = None) -> None:
        """A message to the guest: to ``dst`` (addressed endpoints must give it)."""
        self.sock.send(self._frame(data, dst))

    def recv(self) -> tuple[int | None, bytes]:
        """(guest src, payload) of the next message; src is None on plain endpoints.
        An empty guest message is an empty payload; the endpoint's end raises
        ConnectionError."""
        data, anc, _, _ = self.sock.recvmsg(MAX_DATAGRAM, CREDS_SPACE)
        return self._unframe(data, anc)

    def _frame(self, data: bytes, dst: int | None) -> bytes:
        if self.addressed:
            if dst is None:
                raise ValueError("an addressed endpoint needs dst")
            return _ADDR.pack(dst) + data
        if dst is not None:
            raise ValueError("a plain endpoint sends to the dst it was opened with "
                             "(or to the last writer): open it addressed to choose")
        return data

    def _unframe(self, data: bytes, anc: list[tuple[int, int, bytes]]
                 ) -> tuple[int | None, bytes]:
        if hung_up(data, anc, self.sock):
            raise ConnectionError("the endpoint was closed")
        if self.addressed:
            if len(data) < ADDR_HEADER:
                raise ConnectionError(f"a {len(data)}-byte datagram on an addressed "
                                      "endpoint: no address header")
            return _ADDR.unpack_from(data)[0], data[ADDR_HEADER:]
        return None, data

    def fileno(self) -> int:
        return self.sock.fileno()

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> EndpointSocket:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncEndpoint(EndpointSocket):
    """An endpoint fd for asyncio code."""

    def __init__(self, sock: socket.socket, addr: int, *, addressed: bool = False) -> None:
        sock.setblocking(False)
        super().__init__(sock, addr, addressed=addressed)

    async def asend(self, data: bytes, dst: int | None = None) -> None:
        await asyncio.get_running_loop().sock_sendall(self.sock, self._frame(data, dst))

    async def arecv(self) -> tuple[int | None, bytes]:
        data, anc = await recvmsg_async(self.sock)
        return self._unframe(data, anc)


#: the longest reply a client takes (a ``stats`` of thousands of endpoints)
REPLY_ROOM = cp.MAX_REQUEST * 16


class Control:
    """A connection to a server's control socket (blocking; one request at a time)."""

    def __init__(self, path: str, timeout: float = 10.0) -> None:
        self.path = path
        # Replies are read into one buffer for the connection's life: a fresh 1 MiB
        # bytes per recvmsg is an mmap and an munmap, about 20 µs a request here.
        self._reply = memoryview(bytearray(REPLY_ROOM))
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        self.sock.settimeout(timeout)
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.sock.connect(path)
                return
            except BlockingIOError:
                # the server's backlog is full (many clients at once): it will drain
                if time.monotonic() < deadline:
                    time.sleep(0.005)
                    continue
                self.sock.close()
                raise
            except OSError:
                self.sock.close()
                raise

    def request(self, op: Op, **args: Any) -> dict[str, Any]:
        """Send one request; its reply's body (ControlError if it failed)."""
        body, fds = self._exchange(op, args)
        for fd in fds:  # none expected: do not leak what a server sent anyway
            socket.close(fd)
        return body

    def _exchange(self, op: Op, args: dict[str, Any]) -> tuple[dict[str, Any], list[int]]:
        self.sock.send(cp.request(op, **args))
        fds = array.array("i")
        n, anc, _flags, _ = self.sock.recvmsg_into(
            [self._reply], socket.CMSG_SPACE(4 * fds.itemsize), socket.MSG_CMSG_CLOEXEC)
        if not n:
            raise ConnectionError(f"{self.path}: the server closed the connection")
        data = bytes(self._reply[:n])
        for level, kind, payload in anc:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds.frombytes(payload[: len(payload) - len(payload) % fds.itemsize])
        try:
            return cp.decode_reply(data), list(fds)
        except ControlError:
            for fd in fds:
                socket.close(fd)
            raise

    def stats(self, socket_index: int | None = None) -> dict[str, Any]:
        stats: dict[str, Any] = self.request(Op.STATS, socket=socket_index)["stats"]
        return stats

    def endpoints(self, socket_index: int | None = None) -> list[dict[str, Any]]:
        eps: list[dict[str, Any]] = self.request(Op.ENDPOINT_LIST,
                                                 socket=socket_index)["endpoints"]
        return eps

    def add_endpoint(self, spec: str, socket_index: int | None = None) -> int:
        """A plugin endpoint from a spec (``rpmsg-raw:echo@1030``); its address."""
        return int(self.request(Op.ENDPOINT_ADD, spec=spec, socket=socket_index)["addr"])

    def remove_endpoint(self, addr: int, socket_index: int | None = None) -> None:
        self.request(Op.ENDPOINT_REMOVE, addr=addr, socket=socket_index)

    def open_endpoint(self, name: str | None = None, *, addr: int | None = None,
                      dst: int | None = None, addressed: bool = False,
                      socket_index: int | None = None) -> EndpointSocket:
        """An endpoint held by this process: announced as ``name`` (if given)."""
        sock, body = self._open(name, addr, dst, addressed, socket_index)
        return EndpointSocket(sock, int(body["addr"]), addressed=addressed)

    def open_async_endpoint(self, name: str | None = None, *, addr: int | None = None,
                            dst: int | None = None, addressed: bool = False,
                            socket_index: int | None = None) -> AsyncEndpoint:
        sock, body = self._open(name, addr, dst, addressed, socket_index)
        return AsyncEndpoint(sock, int(body["addr"]), addressed=addressed)

    def _open(self, name: str | None, addr: int | None, dst: int | None, addressed: bool,
              socket_index: int | None) -> tuple[socket.socket, dict[str, Any]]:
        body, fds = self._exchange(Op.ENDPOINT_OPEN, {
            "name": name, "addr": addr, "dst": dst, "addressed": addressed,
            "socket": socket_index})
        if len(fds) != 1:
            for fd in fds:
                socket.close(fd)
            raise ControlError(cp.ErrorCode.FAILED, f"endpoint.open passed {len(fds)} fds")
        return socket.socket(fileno=fds[0]), body

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> Control:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


def from_listen_fds(*, addressed: bool = False) -> EndpointSocket:
    """The endpoint ``vhost-rpmsg endpoint open … -- CMD`` passed to this process as
    fd 3 (systemd's LISTEN_FDS convention)."""
    import os

    if os.environ.get("LISTEN_PID") != str(os.getpid()) or os.environ.get("LISTEN_FDS") != "1":
        raise RuntimeError("no endpoint fd was passed (LISTEN_PID/LISTEN_FDS not set for "
                           "this process)")
    addr = int(os.environ.get("VHOST_RPMSG_ADDR", "0"))
    if os.environ.get("VHOST_RPMSG_ADDRESSED") == "1":
        addressed = True
    return EndpointSocket(socket.socket(fileno=3), addr, addressed=addressed)
