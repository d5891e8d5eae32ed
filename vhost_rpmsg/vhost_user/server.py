"""The I/O half: a unix-socket listener that feeds the codec and the backend.

One :class:`VhostUserServer` serves one device on one socket, one front-end at a time
(vhost-user is point to point); when the front-end goes away its state is dropped and
the next connection is accepted.  Everything runs on an asyncio loop; the protocol
logic lives in :mod:`.codec` and :mod:`.backend`.
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import logging
import os
import socket
import stat
import threading
from collections import Counter
from collections.abc import Callable
from pathlib import Path

from ..virtqueue import SplitQueue
from .backend import DEFAULT_PROTOCOL_FEATURES, VhostUserBackend
from .codec import Decoder, FramingError
from .device import VirtioDevice
from .protocol import MAX_FDS

log = logging.getLogger(__name__)

_ANC_SIZE = socket.CMSG_SPACE(MAX_FDS * array.array("i").itemsize)
_SEND_TIMEOUT = 5.0


def listen_unix(path: str | os.PathLike[str], mode: int = 0o600,
                kind: int = socket.SOCK_STREAM) -> socket.socket:
    """Bind a listening unix socket (stream by default) at ``path`` with ``mode``.

    A stale socket file is replaced; any other existing file is an error.
    """
    p = Path(path)
    if p.exists() or p.is_symlink():
        if not stat.S_ISSOCK(p.lstat().st_mode):
            raise FileExistsError(f"{p} exists and is not a socket")
        p.unlink()
    sock = socket.socket(socket.AF_UNIX, kind | socket.SOCK_CLOEXEC)
    old = os.umask(0o777 & ~mode)
    try:
        sock.bind(str(p))
    finally:
        os.umask(old)
    os.chmod(p, mode)
    sock.listen(16)
    return sock


class VhostUserServer:
    """Serve ``device`` to front-ends connecting on a listening unix socket."""

    def __init__(
        self,
        device: VirtioDevice,
        sock: socket.socket,
        *,
        protocol_features: int = DEFAULT_PROTOCOL_FEATURES,
        queue_factory: Callable[[int, int], SplitQueue] = SplitQueue,
        name: str | None = None,
    ) -> None:
        self.device = device
        self.sock = sock
        self.name = name or (sock.getsockname() or f"fd{sock.fileno()}")
        self.protocol_features = protocol_features
        self.queue_factory = queue_factory
        self.loop: asyncio.AbstractEventLoop | None = None
        self.backend: VhostUserBackend | None = None
        self.conn: socket.socket | None = None
        self._decoder = Decoder()
        self.stats: Counter[str] = Counter()
        self.connected = asyncio.Event()
        self.disconnected = asyncio.Event()

    @classmethod
    def at_path(cls, device: VirtioDevice, path: str | os.PathLike[str], mode: int = 0o600,
                **kw: object) -> VhostUserServer:
        return cls(device, listen_unix(path, mode), **kw)  # type: ignore[arg-type]

    # -- lifecycle ----------------------------------------------------------------

    def start(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        """Begin accepting on ``loop`` (the running loop by default)."""
        self.loop = loop or asyncio.get_running_loop()
        self.connected = asyncio.Event()
        self.disconnected = asyncio.Event()
        self.sock.setblocking(False)
        self.loop.add_reader(self.sock.fileno(), self._accept)
        log.info("%s: listening", self.name)

    def close(self) -> None:
        """Stop accepting, drop the current front-end, close the listening socket."""
        if self.conn is not None:
            self._drop("server closing", error=False)
        if self.loop is not None and self.sock.fileno() >= 0:
            self.loop.remove_reader(self.sock.fileno())
        path = self.sock.getsockname() if self.sock.fileno() >= 0 else None
        self.sock.close()
        if isinstance(path, str) and path:
            with contextlib.suppress(OSError):
                if stat.S_ISSOCK(os.lstat(path).st_mode):
                    os.unlink(path)

    # -- connection handling -------------------------------------------------------

    def _accept(self) -> None:
        assert self.loop is not None
        try:
            conn, _ = self.sock.accept()
        except (BlockingIOError, InterruptedError):
            return
        except OSError as e:
            self.stats["accept_errors"] += 1
            log.error("%s: accept failed: %s", self.name, e)
            return
        if self.conn is not None:
            self.stats["rejected"] += 1
            log.error("%s: a front-end is already connected; refusing another", self.name)
            conn.close()
            return
        conn.setblocking(False)
        self.conn = conn
        self._decoder = Decoder()
        self.backend = VhostUserBackend(
            self.device, self.loop,
            protocol_features=self.protocol_features, queue_factory=self.queue_factory,
        )
        self.stats["connections"] += 1
        self.disconnected.clear()
        self.connected.set()
        self.loop.add_reader(conn.fileno(), self._readable)
        log.info("%s: front-end connected", self.name)

    def _readable(self) -> None:
        conn = self.conn
        backend = self.backend
        if conn is None or backend is None:
            return
        while True:
            try:
                data, anc, flags, _ = conn.recvmsg(
                    self._decoder.wanted(), _ANC_SIZE, socket.MSG_CMSG_CLOEXEC)
            except (BlockingIOError, InterruptedError):
                break
            except OSError as e:
                self._drop(f"receive failed: {e}")
                return
            fds = _fds_from(anc)
            if flags & socket.MSG_CTRUNC:
                for fd in fds:
                    os.close(fd)
                self._drop(f"more than {MAX_FDS} file descriptors in one message")
                return
            if not data:
                for fd in fds:
                    os.close(fd)
                if self._decoder.pending_bytes:
                    self._drop(f"front-end closed mid-message "
                               f"({self._decoder.pending_bytes} bytes pending)")
                else:
                    self._drop("front-end disconnected", error=False)
                return
            self._decoder.feed(data, fds)
            try:
                while (msg := self._decoder.next_message()) is not None:
                    self.stats["messages"] += 1
                    reply = backend.handle(msg)
                    if reply is not None and not self._send(reply):
                        return
            except FramingError as e:
                self._drop(f"unparseable stream: {e}")
                return

    def _send(self, data: bytes) -> bool:
        conn = self.conn
        assert conn is not None
        try:
            conn.settimeout(_SEND_TIMEOUT)
            conn.sendall(data)
            conn.setblocking(False)
        except OSError as e:
            self._drop(f"send failed: {e}")
            return False
        return True

    def _drop(self, why: str, *, error: bool = True) -> None:
        if error:
            self.stats["dropped"] += 1
            log.error("%s: dropping front-end: %s", self.name, why)
        else:
            log.info("%s: %s", self.name, why)
        conn, self.conn = self.conn, None
        if conn is not None:
            if self.loop is not None:
                with contextlib.suppress(ValueError, OSError):
                    self.loop.remove_reader(conn.fileno())
            conn.close()
        self._decoder.close()
        if self.backend is not None:
            self.backend.disconnect()
            for key, n in self.backend.errors.items():
                self.stats[f"backend.{key}"] += n
        self.backend = None
        self.connected.clear()
        self.disconnected.set()

    def counters(self) -> dict[str, int]:
        out = dict(self.stats)
        if self.backend is not None:
            out.update(self.backend.counters())
        return out


def _fds_from(ancdata: list[tuple[int, int, bytes]]) -> list[int]:
    fds: list[int] = []
    for level, kind, data in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            arr = array.array("i")
            arr.frombytes(data[: len(data) - len(data) % arr.itemsize])
            fds.extend(arr)
    return fds


class LoopThread:
    """An asyncio loop on a thread of its own, for embedding the server in other code."""

    def __init__(self, name: str = "vhost-rpmsg") -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._started = threading.Event()

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.call_soon(self._started.set)
        self.loop.run_forever()

    def start(self) -> LoopThread:
        self._thread.start()
        self._started.wait()
        return self

    def call(self, fn: Callable[[], object], timeout: float = 10.0) -> object:
        """Run ``fn`` on the loop thread and return its result."""
        async def run() -> object:
            return fn()
        return asyncio.run_coroutine_threadsafe(run(), self.loop).result(timeout)

    def stop(self) -> None:
        """Cancel what still runs on the loop (async handlers, sources), then stop it."""
        if self._thread.is_alive():
            async def cancel_all() -> None:
                me = asyncio.current_task()
                tasks = [t for t in asyncio.all_tasks() if t is not me]
                for t in tasks:
                    t.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)

            with contextlib.suppress(Exception):
                asyncio.run_coroutine_threadsafe(cancel_all(), self.loop).result(5)
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(10)
        self.loop.close()
