"""A host process at the other end of a SOCK_SEQPACKET socket: one datagram, one message.

Both endpoints that hand guest traffic to other processes use it: the fd endpoints the
control socket gives out (:mod:`.fd`) and the ``unix`` bridge's clients (:mod:`.unix`).
What it guarantees, whatever the process does:

* the loop never waits on it: writes are non-blocking; what the socket does not take
  waits in a bounded queue, written when the socket is writable again; a batch of guest
  messages goes out in one system call per 64 (``sendmmsg``, in C, where
  ``_vhost_rpmsg_headers`` is built), straight from the batch's buffer;
* a process that stops reading costs only its own messages: past the bound they are
  dropped, counted (``dropped_slow_reader``) and logged, rate-limited;
* what it writes reaches the device through :func:`send_all`: the datagrams waiting
  go in one ``send_many``, or one by one through ``asend``, which waits for room in
  the outbox: a guest that does not read slows the writer (its socket fills), it does
  not lose its datagrams.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import select
import socket
import struct
from collections import Counter, deque
from collections.abc import Awaitable, Callable
from typing import Any

import numpy as np

from ..rpmsg.batch import MessageBatch
from ..rpmsg.ratelimit import RateLimitedLog
from .base import Port

try:
    from _vhost_rpmsg_headers import ffi as _ffi
    from _vhost_rpmsg_headers import lib as _lib  # cext/build_rpmsg.py, datagrams.c
except ImportError:
    _lib = None

#: messages waiting for a process that does not read, per peer, before drops start
PEER_QUEUE_LIMIT = 1024
#: the largest datagram read from a process (a payload and an address header fit)
MAX_DATAGRAM = 65536
#: datagrams read from a process per wake-up, at most (then other peers get a turn)
READ_BURST = 64
#: batches this long or longer go to the process through the C writer (where built)
NATIVE_BATCH = 2
#: queued datagrams handed to the C writer at a time
WRITE_CHUNK = 256


async def send_all(port: Port, messages: list[tuple[int, bytes]]) -> None:
    """Send ``messages`` in order: one send_many where the outbox has room for all,
    else one by one, waiting for room."""
    if not messages:
        return
    try:
        port.send_many(messages)
    except BlockingIOError:  # all or nothing: none of them went
        for dst, data in messages:
            await port.asend(dst, data)


#: ancillary room for the SCM_CREDENTIALS every datagram carries (SO_PASSCRED)
CREDS_SPACE = socket.CMSG_SPACE(struct.calcsize("3i"))


def hung_up(data: bytes, ancdata: list[tuple[int, int, bytes]], sock: socket.socket) -> bool:
    """Whether a read of ``data`` was the end of the stream, not a datagram.

    SOCK_SEQPACKET reports an empty datagram and the hang-up alike, as a read of 0
    bytes.  With SO_PASSCRED on our end, the kernel attaches the sender's credentials
    to every datagram, an empty one included, and to nothing at the end of the stream.
    A datagram queued before SO_PASSCRED took effect (a ``unix`` bridge client can
    write before the server accepts it) has none: then the hang-up flag decides.
    """
    if data or any(level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS
                   for level, kind, _ in ancdata):
        return False
    p = select.poll()
    p.register(sock.fileno(), select.POLLIN | select.POLLRDHUP)
    events = dict(p.poll(0)).get(sock.fileno(), 0)
    return bool(events & (select.POLLHUP | select.POLLRDHUP | select.POLLERR))


async def recvmsg_async(sock: socket.socket) -> tuple[bytes, list[tuple[int, int, bytes]]]:
    """One datagram and its ancillary data (room for credentials), waiting on the loop
    until there is one."""
    loop = asyncio.get_running_loop()
    while True:
        try:
            data, ancdata, _, _ = sock.recvmsg(MAX_DATAGRAM, CREDS_SPACE)
            return data, ancdata
        except (BlockingIOError, InterruptedError):
            pass
        ready: asyncio.Future[None] = loop.create_future()
        fd = sock.fileno()
        loop.add_reader(fd, _wake, ready)
        try:
            await ready
        finally:
            if sock.fileno() == fd:  # closed meanwhile: its closer removed the reader
                loop.remove_reader(fd)


def _wake(ready: asyncio.Future[None]) -> None:
    if not ready.done():
        ready.set_result(None)


class SeqpacketPeer:
    """One connected SOCK_SEQPACKET socket to a host process."""

    def __init__(self, sock: socket.socket, label: str, rl: RateLimitedLog, *,
                 limit: int = PEER_QUEUE_LIMIT) -> None:
        sock.setblocking(False)
        # Credentials on every datagram: how an empty one differs from the hang-up.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self.sock = sock
        self.label = label
        self.limit = limit
        self.stats: Counter[str] = Counter()
        self._rl = rl
        self._out: deque[bytes] = deque()
        self._writer = False
        self._task: asyncio.Task[None] | None = None

    @property
    def queued(self) -> int:
        return len(self._out)

    # -- to the process -------------------------------------------------------------

    def send(self, data: bytes) -> bool:
        """Write ``data`` or queue it; False (counted, logged) if the queue is full."""
        if not self._out:
            try:
                self.sock.send(data)
                self.stats["to_process"] += 1
                self.stats["to_process_bytes"] += len(data)
                return True
            except BlockingIOError:
                pass
            except OSError:
                return False  # gone: the reader sees the hang-up and ends the peer
        if len(self._out) >= self.limit:
            self.stats["dropped_slow_reader"] += 1
            self._rl.error(f"slow{self.label}", "%s: the process does not read; %d "
                           "messages wait for it, one more dropped", self.label,
                           len(self._out))
            return False
        self._out.append(data)
        if not self._writer:
            asyncio.get_running_loop().add_writer(self.sock.fileno(), self._writable)
            self._writer = True
        return True

    def send_batch(self, batch: MessageBatch, addressed: bool) -> int:
        """Write what the socket takes now of ``batch`` (each payload, after its sender
        as 4 bytes when ``addressed``) in one system call per 64: how many went.

        The rest is for :meth:`send`, in order: it queues what the socket does not take.
        0, and nothing written, without the C writer, while older messages wait in the
        queue (they go first), or when the socket is gone (``send`` sees that too).
        """
        n = len(batch.srcs)
        if _lib is None or self._out or n < NATIVE_BATCH:
            return 0
        lengths = _int64s(batch.lengths)
        sent = self._sendmmsg(batch.data, _int64s(batch.offsets), lengths,
                              _int64s(batch.srcs) if addressed else _ffi.NULL, n)
        if sent <= 0:
            return 0  # full, or gone (the reader sees the hang-up and ends the peer)
        nbytes = int(sum(_ffi.unpack(lengths, sent))) + (4 * sent if addressed else 0)
        self.stats["to_process"] += sent
        self.stats["to_process_bytes"] += nbytes
        return int(sent)

    def _sendmmsg(self, data: bytes | memoryview, offsets: Any, lengths: Any, addrs: Any,
                  n: int) -> int:
        """``rp_send_datagrams`` on our socket: how many of the ``n`` went, or -errno."""
        return int(_lib.rp_send_datagrams(self.sock.fileno(), _ffi.from_buffer("uint8_t[]", data),
                                          len(data), offsets, lengths, addrs, n))

    def _writable(self) -> None:
        out = self._out
        while len(out) >= NATIVE_BATCH and _lib is not None:
            chunk = list(itertools.islice(out, WRITE_CHUNK))
            lengths = [len(d) for d in chunk]
            data = b"".join(chunk)
            sent = self._sendmmsg(
                data, _ffi.new("int64_t[]", list(itertools.accumulate(lengths, initial=0))[:-1]),
                _ffi.new("int64_t[]", lengths), _ffi.NULL, len(chunk))
            if sent < 0:  # gone: the reader sees the hang-up and ends the peer
                out.clear()
                break
            for _ in range(sent):
                out.popleft()
            self.stats["to_process"] += sent
            self.stats["to_process_bytes"] += sum(lengths[:sent])
            if sent < len(chunk):
                return  # full again: the next writable event goes on
        while out:
            data = out[0]
            try:
                self.sock.send(data)
            except BlockingIOError:
                return
            except OSError:
                out.clear()
                break
            out.popleft()
            self.stats["to_process"] += 1
            self.stats["to_process_bytes"] += len(data)
        self._stop_writer()

    def _stop_writer(self) -> None:
        if self._writer:
            with contextlib.suppress(Exception):
                asyncio.get_running_loop().remove_writer(self.sock.fileno())
            self._writer = False

    # -- from the process -----------------------------------------------------------

    def start(self, on_datagrams: Callable[[list[bytes]], Awaitable[None]],
              on_closed: Callable[[str], None]) -> None:
        """Read datagrams in a task of the running loop until the process goes; what is
        waiting is handed over together (up to READ_BURST), for one send_many."""
        self._task = asyncio.get_running_loop().create_task(
            self._read(on_datagrams, on_closed))

    async def _read(self, on_datagrams: Callable[[list[bytes]], Awaitable[None]],
                    on_closed: Callable[[str], None]) -> None:
        why = "closed"
        sock = self.sock
        recvmsg = sock.recvmsg
        try:
            while True:
                data, anc = await recvmsg_async(sock)
                if not data and hung_up(data, anc, sock):
                    break
                batch = [data]
                gone = False
                while len(batch) < READ_BURST:
                    try:
                        data, anc, _, _ = recvmsg(MAX_DATAGRAM, CREDS_SPACE)  # non-blocking
                    except (BlockingIOError, InterruptedError):
                        break
                    if not data and hung_up(data, anc, sock):
                        gone = True
                        break
                    batch.append(data)
                self.stats["from_process"] += len(batch)
                self.stats["from_process_bytes"] += sum(map(len, batch))
                await on_datagrams(batch)
                if gone:
                    break
        except OSError as e:
            why = str(e)
        on_closed(why)

    def close(self) -> None:
        if self._task is not None and self._task is not asyncio.current_task():
            self._task.cancel()
            # Now, not when the cancelled task next runs: by then the fd number may
            # belong to another socket, whose reader that late removal would take away.
            with contextlib.suppress(RuntimeError, ValueError, OSError):
                asyncio.get_running_loop().remove_reader(self.sock.fileno())
        self._task = None
        self._stop_writer()
        self._out.clear()
        self.sock.close()


def _int64s(values: np.ndarray | list[int]) -> Any:
    """``values`` as a C int64_t array (numpy's own buffer where it already is one)."""
    if isinstance(values, np.ndarray):
        return _ffi.from_buffer("int64_t[]", np.ascontiguousarray(values, dtype=np.int64))
    return _ffi.new("int64_t[]", values)
