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
import errno
import logging
import os
import secrets
import socket
import stat
import threading
from collections import Counter
from collections.abc import Callable

from ..virtio.engines import QueueFactory
from ..virtio.queue_python import PythonQueue
from .backend import VhostUserBackend
from .codec import Decoder, FramingError
from .device import VirtioDevice
from .protocol import MAX_FDS

log = logging.getLogger(__name__)

_ANC_SIZE = socket.CMSG_SPACE(MAX_FDS * array.array("i").itemsize)
#: replies queued for a front-end that does not read them, at most; past this it is
#: dropped (QEMU reads each reply before its next request: a few hundred bytes at most)
MAX_PENDING_REPLIES = 64 * 1024
#: socket reads per readable event of a connection (each at most one message part)
READS_PER_TURN = 64


#: Longest unix socket path accepted: sun_path holds 108 bytes, one kept for the NUL that
#: C programs (QEMU among them) expect.
MAX_SOCKET_PATH = 107
_umask_lock = threading.Lock()


class SocketPathError(OSError):
    """A unix socket cannot be published at a path; the message names the path and why."""


class UnixListener(socket.socket):
    """A listening unix socket that remembers the path it was published at.

    :func:`listen_unix` binds it under a temporary name and moves it onto :attr:`path`
    once it listens, so ``getsockname()`` shows the temporary name: use :attr:`path`.
    """

    __slots__ = ("_ident", "path")
    path: str
    _ident: tuple[int, int] | None

    def published(self, path: str, st: os.stat_result) -> None:
        """It now lives at ``path``, as the file ``st`` describes."""
        self.path = path
        self._ident = (st.st_dev, st.st_ino)

    def remove_path(self) -> None:
        """Unlink :attr:`path` if it is still the socket this listener published there
        (never another server's socket that has since replaced it)."""
        path = getattr(self, "path", None)
        ident = getattr(self, "_ident", None)
        if path is None or ident is None:
            return
        with contextlib.suppress(OSError):
            st = os.lstat(path)
            if (st.st_dev, st.st_ino) == ident:
                os.unlink(path)
        self._ident = None


def parse_mode(text: str) -> int:
    """A socket file's permissions from octal text (``0660``); ValueError saying why."""
    try:
        mode = int(text, 8)
    except ValueError:
        raise ValueError(f"{text!r} is not an octal mode such as 0660") from None
    if not 0 <= mode <= 0o777:
        raise ValueError(f"{text!r} is not a permission mode (0000..0777)")
    return mode


def check_socket_path(path: str | os.PathLike[str], kind: int = socket.SOCK_STREAM) -> bool:
    """Check that a listener could be published at ``path``, creating nothing.

    Returns True when a stale socket (one nobody listens on) is there, to be replaced.
    Raises :class:`SocketPathError` when the path is unusable: too long, its directory
    missing or not writable, a symlink (never followed), a file that is not a socket, or
    a socket a server is listening on ("in use").
    """
    p = os.fspath(path)
    if not p:
        raise SocketPathError("empty socket path")
    if "\0" in p:
        raise SocketPathError(f"{p!r}: socket path contains a NUL byte")
    if len(os.fsencode(p)) > MAX_SOCKET_PATH:
        raise SocketPathError(f"{p}: socket path too long ({len(os.fsencode(p))} bytes; "
                              f"at most {MAX_SOCKET_PATH})")
    d = os.path.dirname(p) or "."
    try:
        dst = os.stat(d)
    except FileNotFoundError:
        raise SocketPathError(f"{p}: directory {d} does not exist") from None
    except OSError as e:
        raise SocketPathError(f"{p}: directory {d}: {e.strerror}") from None
    if not stat.S_ISDIR(dst.st_mode):
        raise SocketPathError(f"{p}: {d} is not a directory")
    if not os.access(d, os.W_OK | os.X_OK):
        raise SocketPathError(f"{p}: directory {d} is not writable")
    try:
        st = os.lstat(p)
    except FileNotFoundError:
        return False
    except OSError as e:
        raise SocketPathError(f"{p}: {e.strerror}") from None
    if stat.S_ISLNK(st.st_mode):
        raise SocketPathError(f"{p}: is a symbolic link; not following it (give the "
                              "real path, or remove the link)")
    if stat.S_ISDIR(st.st_mode):
        raise SocketPathError(f"{p}: is a directory")
    if not stat.S_ISSOCK(st.st_mode):
        raise SocketPathError(f"{p}: exists and is not a socket; not replacing it")
    if _someone_listens(p, kind):
        raise SocketPathError(f"{p}: in use: a server is listening on it")
    return True


def _someone_listens(path: str, kind: int) -> bool:
    probe = socket.socket(socket.AF_UNIX, kind | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK)
    try:
        probe.connect(path)
    except (ConnectionRefusedError, FileNotFoundError):
        return False  # a socket file nobody is bound to (or gone meanwhile)
    except BlockingIOError:
        return True  # a listener with a full backlog
    except OSError as e:
        if e.errno == errno.EPROTOTYPE:
            return True  # a listener of another socket type
        raise SocketPathError(f"{path}: cannot tell whether a server listens on it: "
                              f"{e.strerror}") from None
    finally:
        probe.close()
    return True


def listen_unix(path: str | os.PathLike[str], mode: int = 0o600,
                kind: int = socket.SOCK_STREAM, backlog: int = 16) -> UnixListener:
    """A listening unix socket (stream by default) published at ``path`` with ``mode``.

    The path appears only once the socket listens, so a client that waits for the file
    can connect at once: the socket is bound under a temporary name in the same
    directory, listens, then is moved onto ``path``.  A stale socket there (nobody
    listening) is replaced; a socket a server listens on ("in use"), a symlink or any
    other file is refused with :class:`SocketPathError`.  The mode is set by the umask
    around ``bind`` (no chmod by path).
    """
    p = os.fspath(path)
    check_socket_path(p, kind)
    sock = UnixListener(socket.AF_UNIX, kind | socket.SOCK_CLOEXEC)
    tmp: str | None = None
    try:
        tmp = _bind_temporary(sock, p, mode)
        sock.listen(backlog)
        st = os.lstat(tmp)
        if _publish(tmp, p, kind):
            tmp = None  # renamed onto p
    except BaseException:
        sock.close()
        raise
    finally:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
    sock.published(p, st)
    return sock


def _bind_temporary(sock: socket.socket, path: str, mode: int) -> str:
    """Bind ``sock`` to a fresh hidden name next to ``path``; returns that name."""
    d = os.path.dirname(path)
    room = MAX_SOCKET_PATH - len(os.fsencode(os.path.join(d, ".")))
    if room < 6:
        raise SocketPathError(f"{path}: directory name too long to bind a temporary "
                              f"socket next to it (at most {MAX_SOCKET_PATH} bytes)")
    with _umask_lock:
        old = os.umask(0o777 & ~mode)
        try:
            for _ in range(32):
                tmp = os.path.join(d, "." + secrets.token_hex(8)[: min(room, 16)])
                try:
                    sock.bind(tmp)
                    return tmp
                except OSError as e:
                    if e.errno != errno.EADDRINUSE:
                        raise SocketPathError(f"{path}: cannot create a socket in "
                                              f"{d or '.'}: {e.strerror}") from None
        finally:
            os.umask(old)
    raise SocketPathError(f"{path}: no free temporary name in {d or '.'}")


def _publish(tmp: str, path: str, kind: int) -> bool:
    """Move the listening socket at ``tmp`` onto ``path``.  Returns True when ``tmp`` is
    gone (renamed), False when ``path`` is a second link to it (``tmp`` to unlink)."""
    try:
        os.link(tmp, path, follow_symlinks=False)  # fails if anything is there already
        return False
    except FileExistsError:
        pass
    except OSError as e:
        if e.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.EMLINK):
            raise SocketPathError(f"{path}: {e.strerror}") from None
    # Something is there: replace it only if it is (still) a stale socket.  rename()
    # replaces the name itself, never what a symlink swapped in would point to.
    check_socket_path(path, kind)
    try:
        os.rename(tmp, path)
    except OSError as e:
        raise SocketPathError(f"{path}: {e.strerror}") from None
    return True


class VhostUserServer:
    """Serve ``device`` to front-ends connecting on a listening unix socket."""

    def __init__(
        self,
        device: VirtioDevice,
        sock: socket.socket,
        *,
        protocol_features: int | None = None,
        queue_factory: QueueFactory = PythonQueue,
        name: str | None = None,
        allow_unsealed_memory: bool = False,
    ) -> None:
        self.device = device
        self.sock = sock
        self.name = name or (sock.path if isinstance(sock, UnixListener)
                             else sock.getsockname() or f"fd{sock.fileno()}")
        self.protocol_features = protocol_features
        self.queue_factory = queue_factory
        self.allow_unsealed_memory = allow_unsealed_memory
        self.loop: asyncio.AbstractEventLoop | None = None
        self.backend: VhostUserBackend | None = None
        self.conn: socket.socket | None = None
        self._decoder = Decoder()
        self._out = bytearray()  # replies the socket did not take yet
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
        """Stop accepting, drop the current front-end, close the listening socket.

        The socket file is removed if :func:`listen_unix` published it and it is still
        ours; an inherited socket's file belongs to whoever created it.
        """
        if self.conn is not None:
            self._drop("server closing", error=False)
        if self.loop is not None and self.sock.fileno() >= 0:
            self.loop.remove_reader(self.sock.fileno())
        if isinstance(self.sock, UnixListener):
            self.sock.remove_path()
        self.sock.close()

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
            allow_unsealed_memory=self.allow_unsealed_memory,
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
        # A front-end that writes without pause would keep us here for ever: read a
        # bounded amount per turn of the loop; the socket stays readable for the next.
        for _ in range(READS_PER_TURN):
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
        else:
            self.stats["read_yields"] += 1

    def _send(self, data: bytes) -> bool:
        """Queue a reply and write what the socket takes; never blocks the loop.

        A front-end that lets more than MAX_PENDING_REPLIES bytes of replies pile up is
        dropped: it is not waited for.
        """
        waiting = bool(self._out)  # for the socket to take earlier replies: keep the order
        self._out += data
        if not waiting and not self._flush_out():
            return False
        if len(self._out) > MAX_PENDING_REPLIES:
            self._drop(f"front-end does not read its replies ({len(self._out)} bytes "
                       "pending)")
            return False
        if self._out and self.loop is not None and self.conn is not None:
            self.loop.add_writer(self.conn.fileno(), self._writable)
        return True

    def _flush_out(self) -> bool:
        """Write queued replies until the socket is full; False if the connection died."""
        conn = self.conn
        assert conn is not None
        while self._out:
            try:
                n = conn.send(self._out)
            except (BlockingIOError, InterruptedError):
                return True
            except OSError as e:
                self._drop(f"send failed: {e}")
                return False
            del self._out[:n]
        return True

    def _writable(self) -> None:
        if self.conn is None:
            return
        if self._flush_out() and not self._out and self.loop is not None:
            self.loop.remove_writer(self.conn.fileno())

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
                with contextlib.suppress(ValueError, OSError):
                    self.loop.remove_writer(conn.fileno())
            conn.close()
        self._out.clear()
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
