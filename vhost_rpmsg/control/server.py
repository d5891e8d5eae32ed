"""The control socket of a running ``serve``: stats, endpoints added and removed at run
time, and endpoint fds for other processes.

A SOCK_SEQPACKET unix socket (mode 0600) next to the vhost-user sockets.  Who may use
it is checked per connection with SO_PEERCRED: root, the server's own user, or members
of the group given with ``--control-group``.  Everything runs on the server's loop,
between guest work: requests are small and answered at once; a client that does not
read its replies is dropped, never waited for.
"""

from __future__ import annotations

import asyncio
import contextlib
import grp
import logging
import os
import socket
import struct
import time
from collections import Counter, defaultdict
from typing import Any

from ..endpoints.base import Endpoint
from ..endpoints.fd import FdEndpoint
from ..endpoints.registry import PluginError, build
from ..rpmsg import codec as rp
from ..rpmsg.device import RpmsgDevice
from ..rpmsg.errors import AddressInUse
from ..vhost_user.server import UnixListener, VhostUserServer, listen_unix
from . import protocol as cp
from .protocol import ControlError, ErrorCode, Op, Request
from .stats import endpoint_stats, snapshot

log = logging.getLogger(__name__)

#: clients served at once; more wait to be accepted (each costs an fd and a reader)
MAX_CLIENTS = 64
#: connections waiting to be accepted (clients retry while it is full)
LISTEN_BACKLOG = 128
#: fd endpoints per guest socket
MAX_FD_ENDPOINTS = 4096
_UCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid


def peer_credentials(sock: socket.socket) -> tuple[int, int, int]:
    """(pid, uid, gid) of the process at the other end, as the kernel saw it connect."""
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    pid, uid, gid = _UCRED.unpack(raw)
    return pid, uid, gid


def _groups_of(pid: int) -> set[int]:
    """Supplementary groups of a process (SO_PEERCRED gives only the primary one)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("Groups:"):
                    return {int(g) for g in line.split()[1:]}
    except OSError:
        pass
    return set()


class ControlServer:
    """Answers control requests for the guest sockets of one ``serve`` process."""

    def __init__(self, path: str, servers: list[VhostUserServer], *,
                 group: str | None = None, mode: int = 0o600) -> None:
        self.path = path
        self.servers = servers
        self.gid: int | None = None
        if group is not None:
            try:
                self.gid = grp.getgrnam(group).gr_gid
            except KeyError:
                raise ValueError(f"--control-group {group}: no such group") from None
            mode |= 0o060
        self.mode = mode
        self.stats: Counter[str] = Counter()
        self.started = time.monotonic()
        self.listener: UnixListener | None = None
        self._clients: set[socket.socket] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._room = asyncio.Event()  # set when a client leaves
        self._loop: asyncio.AbstractEventLoop | None = None  # set by start()
        # the fd endpoints opened per guest socket and not yet closed by their holders
        self._held: defaultdict[int, set[FdEndpoint]] = defaultdict(set)

    # -- life cycle ---------------------------------------------------------------------

    def bind(self) -> None:
        """Create the socket (before privileges are dropped: the caller may chown it)."""
        self.listener = listen_unix(self.path, self.mode, socket.SOCK_SEQPACKET,
                                    backlog=LISTEN_BACKLOG)
        self.listener.setblocking(False)
        if self.gid is not None:
            os.chown(self.path, -1, self.gid)

    def start(self) -> None:
        """Serve on the running loop."""
        if self.listener is None:
            self.bind()
        self._loop = asyncio.get_running_loop()
        self._spawn(self._accept())
        log.info("control socket %s", self.path)

    def close(self) -> None:
        for t in list(self._tasks):
            t.cancel()
        for c in list(self._clients):
            self._drop(c)
        if self.listener is not None:
            self.listener.remove_path()
            self.listener.close()
            self.listener = None

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- connections --------------------------------------------------------------------

    def allowed(self, pid: int, uid: int, gid: int) -> bool:
        if uid == 0 or uid == os.geteuid():
            return True
        return self.gid is not None and (gid == self.gid or self.gid in _groups_of(pid))

    async def _accept(self) -> None:
        loop = asyncio.get_running_loop()
        assert self.listener is not None
        while True:
            while len(self._clients) >= MAX_CLIENTS:
                # the rest wait in the backlog (clients retry while it is full)
                self._room.clear()
                await self._room.wait()
            try:
                conn, _ = await loop.sock_accept(self.listener)
            except OSError as e:
                self.stats["accept_errors"] += 1
                log.error("control: accept failed: %s", e)
                await asyncio.sleep(0.1)
                continue
            pid, uid, gid = peer_credentials(conn)
            if not self.allowed(pid, uid, gid):
                self.stats["refused_peer"] += 1
                log.warning("control: refused pid %d (uid %d, gid %d): not root, not uid "
                            "%d%s", pid, uid, gid, os.geteuid(),
                            f", not in group {self.gid}" if self.gid is not None else "")
                conn.close()
                continue
            conn.setblocking(False)
            self._clients.add(conn)
            self.stats["connections"] += 1
            # A reader for the connection's life, not one per request as sock_recv
            # adds and removes: two epoll_ctl calls and a future less per request.
            loop.add_reader(conn.fileno(), self._readable, conn)

    def _readable(self, conn: socket.socket) -> None:
        """Answer what a client sent (one request per datagram), on the loop."""
        try:
            data = conn.recv(cp.MAX_REQUEST + 1)
        except BlockingIOError:
            return
        except OSError as e:
            log.debug("control: client gone: %s", e)
            self._drop(conn)
            return
        if not data:
            self._drop(conn)
            return
        reply, fds = self.handle(data)
        try:
            conn.sendmsg([reply], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                    struct.pack(f"{len(fds)}i", *fds))] if fds else [])
        except BlockingIOError:
            self.stats["dropped_not_reading"] += 1
            log.error("control: a client does not read its replies; dropped")
            self._drop(conn)
        except OSError as e:
            log.debug("control: client gone: %s", e)
            self._drop(conn)
        finally:
            for fd in fds:
                os.close(fd)

    def _drop(self, conn: socket.socket) -> None:
        if conn not in self._clients:
            return
        self._clients.discard(conn)
        if self._loop is not None and not self._loop.is_closed():
            self._loop.remove_reader(conn.fileno())
        conn.close()
        self._room.set()

    # -- requests (no I/O beyond the fds of endpoint.open) -----------------------------

    def handle(self, data: bytes) -> tuple[bytes, list[int]]:
        """A reply datagram for a request datagram, and the fds to pass with it (ours to
        close once sent)."""
        self.stats["requests"] += 1
        fds: list[int] = []
        try:
            req = cp.decode_request(data)
            return cp.ok(**self._dispatch(req, fds)), fds
        except ControlError as e:
            failure = e
        except Exception as e:  # a bug of ours: the client still gets an answer
            self.stats["internal_errors"] += 1
            log.exception("control: request failed inside the server")
            failure = ControlError(ErrorCode.FAILED, f"internal error: {e!r}")
        self.stats["failed_requests"] += 1
        for fd in fds:
            os.close(fd)
        return cp.failure(failure), []

    def _dispatch(self, req: Request, fds: list[int]) -> dict[str, Any]:
        if req.op is Op.HELLO:
            return {"version": cp.VERSION, "pid": os.getpid(),
                    "sockets": [s.name for s in self.servers]}
        if req.op is Op.STATS:
            snap = snapshot(self.servers, self.started)
            snap["control"] = dict(self.stats)
            index = req.get("socket", int)
            if index is not None:
                self._server(req)
                snap["servers"] = [snap["servers"][index]]
            return {"stats": snap}
        if req.op is Op.ENDPOINT_LIST:
            return {"endpoints": self._list(req)}
        if req.op is Op.ENDPOINT_ADD:
            return self._add(req)
        if req.op is Op.ENDPOINT_REMOVE:
            return self._remove(req)
        assert req.op is Op.ENDPOINT_OPEN
        return self._open(req, fds)

    def _server(self, req: Request) -> tuple[int, VhostUserServer, RpmsgDevice]:
        """The guest socket a request names (``socket``: its index; 0 when only one)."""
        index = req.get("socket", int)
        if index is None:
            if len(self.servers) > 1:
                raise ControlError(ErrorCode.BAD_REQUEST,
                                   f"this server serves {len(self.servers)} guests: give "
                                   "socket (0.." f"{len(self.servers) - 1})")
            index = 0
        if not 0 <= index < len(self.servers):
            raise ControlError(ErrorCode.NO_SUCH_SOCKET,
                               f"no socket {index} (0..{len(self.servers) - 1})")
        server = self.servers[index]
        dev = server.device
        if not isinstance(dev, RpmsgDevice):
            raise ControlError(ErrorCode.NO_SUCH_SOCKET, f"socket {index} serves no rpmsg")
        return index, server, dev

    def _list(self, req: Request) -> list[dict[str, Any]]:
        """The endpoints of the socket named, or of every socket when none is."""
        if req.get("socket", int) is not None or len(self.servers) == 1:
            wanted = [self._server(req)]
        else:
            wanted = [(i, s, s.device) for i, s in enumerate(self.servers)
                      if isinstance(s.device, RpmsgDevice)]
        return [{"socket": i, **endpoint_stats(slot)}
                for i, _, dev in wanted for slot in dev.dispatcher.slots.values()]

    @staticmethod
    def _free_addr(dev: RpmsgDevice, wanted: int | None) -> int:
        if wanted is not None:
            if wanted == rp.NS_ADDR or not 0 <= wanted < rp.ADDR_ANY:
                raise ControlError(ErrorCode.BAD_ENDPOINT, f"address {wanted} is reserved "
                                   "or out of range")
            taken = dev.endpoint_at(wanted)
            if taken is not None:
                raise ControlError(ErrorCode.ADDRESS_IN_USE, f"host address {wanted} has "
                                   f"{taken.describe()}")
            return wanted
        # One lookup per address tried, never a copy of the whole table: with thousands
        # of endpoints held, an open must not cost the loop (every guest) more.
        addr = rp.RESERVED_ADDRESSES
        while dev.endpoint_at(addr) is not None:
            addr += 1
        return addr

    @staticmethod
    def _check_name(name: str | None, addr: int) -> None:
        if name:
            try:
                rp.encode_ns(rp.NsMessage(name, addr, rp.NsFlags.CREATE))
            except ValueError as e:
                raise ControlError(ErrorCode.BAD_ENDPOINT, f"name {name!r}: {e}") from None

    def _register(self, dev: RpmsgDevice, ep: Endpoint) -> None:
        try:
            dev.add_endpoint(ep)
        except AddressInUse as e:
            raise ControlError(ErrorCode.ADDRESS_IN_USE, str(e)) from None
        except (OSError, ValueError) as e:
            raise ControlError(ErrorCode.FAILED, f"{ep.describe()}: {e}") from None
        # The announcement goes into the guest's ring now, before the reply: a client
        # that has its answer knows the guest has been told (if its rx ring has room).
        dev.flush()

    def _add(self, req: Request) -> dict[str, Any]:
        index, _, dev = self._server(req)
        spec = req.get("spec", str, required=True)
        try:
            (ep,) = build([spec], first_addr=self._free_addr(dev, None))
        except PluginError as e:
            raise ControlError(ErrorCode.BAD_ENDPOINT, str(e)) from None
        taken = dev.endpoint_at(ep.addr)
        if taken is not None:
            raise ControlError(ErrorCode.ADDRESS_IN_USE, f"host address {ep.addr} has "
                               f"{taken.describe()}")
        self._check_name(ep.name, ep.addr)
        self._register(dev, ep)
        self.stats["endpoints_added"] += 1
        log.info("control: endpoint %s added to socket %d", ep.describe(), index)
        return {"socket": index, "addr": ep.addr, "describe": ep.describe()}

    def _remove(self, req: Request) -> dict[str, Any]:
        index, _, dev = self._server(req)
        addr = req.get("addr", int, required=True)
        ep = dev.endpoint_at(addr)
        if ep is None:
            raise ControlError(ErrorCode.NO_SUCH_ENDPOINT, f"no endpoint at {addr} on "
                               f"socket {index}")
        if isinstance(ep, FdEndpoint):
            raise ControlError(ErrorCode.NOT_REMOVABLE, f"{ep.describe()} is held by a "
                               "process: it goes when its fd is closed")
        dev.remove_endpoint(addr)
        self.stats["endpoints_removed"] += 1
        log.info("control: endpoint %s removed from socket %d", ep.describe(), index)
        return {"socket": index, "addr": addr}

    def _open(self, req: Request, fds: list[int]) -> dict[str, Any]:
        index, _, dev = self._server(req)
        name = req.get("name", str)
        dst = req.get("dst", int)
        addressed = req.get("addressed", bool, False)
        if dst is not None and not 0 <= dst < rp.ADDR_ANY:
            raise ControlError(ErrorCode.BAD_ENDPOINT, f"dst {dst} out of range")
        held = len(self._held[index])
        if held >= MAX_FD_ENDPOINTS:
            raise ControlError(ErrorCode.FAILED, f"socket {index} has {held} fd endpoints "
                               "already")
        addr = self._free_addr(dev, req.get("addr", int))
        self._check_name(name, addr)
        ours, theirs = socket.socketpair(socket.AF_UNIX,
                                         socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        ep = FdEndpoint(addr, name, sock=ours, dst=dst, addressed=addressed,
                        on_closed=lambda e, why: self._fd_closed(dev, e, index))
        try:
            self._register(dev, ep)
        except ControlError:
            ours.close()
            theirs.close()
            raise
        fds.append(theirs.detach())
        self._held[index].add(ep)
        self.stats["fd_endpoints_opened"] += 1
        log.info("control: fd endpoint %s opened on socket %d", ep.describe(), index)
        return {"socket": index, "addr": addr, "name": name, "addressed": addressed}

    def _fd_closed(self, dev: RpmsgDevice, ep: FdEndpoint, index: int) -> None:
        """Its holder closed the fd (or exited, or was killed): the endpoint goes."""
        self._held[index].discard(ep)
        self.stats["fd_endpoints_closed"] += 1
        if dev.endpoint_at(ep.addr) is ep:
            with contextlib.suppress(Exception):
                dev.remove_endpoint(ep.addr)  # withdraws its announcement, closes it
        else:
            ep.close()
        log.info("control: fd endpoint %d on socket %d closed by its holder", ep.addr, index)


def default_path(socket_path: str) -> str:
    """Where the control socket goes when --control is not given."""
    return socket_path + ".ctl"
