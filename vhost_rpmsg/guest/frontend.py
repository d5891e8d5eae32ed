"""A vhost-user front-end that behaves like QEMU's, for the simulated guest.

It creates guest RAM as a memfd, hands it over with SET_MEM_TABLE (or ADD_MEM_REG when
the back-end offers CONFIGURE_MEM_SLOTS), and sends the requests in the order QEMU 11
does for a ``vhost-user-test-device-pci`` (see docs/protocol.md).  It talks to the
back-end only through the socket, the shared memory and eventfds.
"""

from __future__ import annotations

import fcntl
import mmap
import os
import socket
from dataclasses import dataclass

import numpy as np

from ..vhost_user import codec
from ..vhost_user.codec import MemoryRegion, VringAddr
from ..vhost_user.protocol import (
    FLAG_REPLY,
    HEADER_SIZE,
    REPLY_BODY,
    VHOST_USER_F_PROTOCOL_FEATURES,
    ProtocolFeature,
    Request,
)
from ..virtio.constants import (
    STATUS_ACKNOWLEDGE,
    STATUS_DRIVER,
    STATUS_DRIVER_OK,
    STATUS_FEATURES_OK,
)

# QEMU maps guest RAM somewhere in its own address space; any plausible base will do.
FAKE_UVA_BASE = 0x7F00_0000_0000


class FrontendError(Exception):
    """The back-end answered in a way a front-end cannot accept."""


@dataclass
class QueueSetup:
    size: int
    desc: int
    avail: int
    used: int
    kick_fd: int
    call_fd: int


class GuestRam:
    """Guest physical memory: a memfd, mapped here, shared with the back-end."""

    def __init__(self, size: int, hidden_tail: int = 0, *, seals: int | None = None) -> None:
        """``seals`` to put on the memfd: by default what QEMU's memory-backend-memfd puts
        (seal=on); 0 leaves it sealable by the back-end; -1 makes it unsealable."""
        self.size = size
        #: bytes at the end left out of the memory table: memory the back-end must not touch
        self.hidden_tail = hidden_tail
        if seals is None:
            seals = fcntl.F_SEAL_GROW | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_SEAL
        flags = os.MFD_CLOEXEC | (os.MFD_ALLOW_SEALING if seals >= 0 else 0)
        self.fd = os.memfd_create("vhost-rpmsg-guest", flags)
        os.ftruncate(self.fd, size)
        if seals > 0:
            fcntl.fcntl(self.fd, fcntl.F_ADD_SEALS, seals)
        self._map = mmap.mmap(self.fd, size)
        self.mem = np.frombuffer(self._map, np.uint8)
        self.mv = self.mem.data
        self._next = 0

    def alloc(self, size: int, align: int = 16) -> int:
        """A guest-physical range of ``size`` bytes (a bump allocator; never freed)."""
        start = (self._next + align - 1) & ~(align - 1)
        if start + size > self.size - self.hidden_tail:
            raise MemoryError(f"guest RAM of {self.size} bytes exhausted")
        self._next = start + size
        return start

    def region(self) -> MemoryRegion:
        return MemoryRegion(0, self.size - self.hidden_tail, FAKE_UVA_BASE, 0)

    def close(self) -> None:
        self.mv.release()
        del self.mem
        try:
            self._map.close()
        except BufferError:
            pass
        os.close(self.fd)


class Frontend:
    """A blocking vhost-user front-end connection."""

    def __init__(self, path: str, ram: GuestRam, timeout: float = 10.0) -> None:
        self.path = path
        self.ram = ram
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        self.sock.settimeout(timeout)
        self.sock.connect(path)
        self.backend_features = 0
        self.protocol_features = 0
        self.num_queues = 0

    # -- raw messaging -------------------------------------------------------------------

    def send(self, request: int, payload: bytes = b"", fds: list[int] | None = None,
             need_reply: bool = False) -> None:
        data = codec.encode(request, payload, need_reply=need_reply)
        anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, bytes(np.array(fds, np.int32)))] if fds \
            else []
        self.sock.sendmsg([data], anc)

    def recv_reply(self, request: int) -> bytes:
        header = self._recv_exact(HEADER_SIZE)
        req, flags, size = int.from_bytes(header[:4], "little"), \
            int.from_bytes(header[4:8], "little"), int.from_bytes(header[8:12], "little")
        payload = self._recv_exact(size)
        if req != request or not flags & FLAG_REPLY:
            raise FrontendError(f"expected reply to {request}, got request {req} flags {flags:x}")
        return payload

    def _recv_exact(self, n: int) -> bytes:
        buf = bytearray()
        while len(buf) < n:
            chunk = self.sock.recv(n - len(buf))
            if not chunk:
                raise FrontendError("back-end closed the connection")
            buf += chunk
        return bytes(buf)

    def request(self, request: int, payload: bytes = b"", fds: list[int] | None = None,
                need_reply: bool = False) -> bytes | None:
        """Send a request; wait for the body or the REPLY_ACK where one is due."""
        reply_ack = bool(self.protocol_features & (1 << ProtocolFeature.REPLY_ACK))
        want_ack = need_reply and reply_ack and request not in REPLY_BODY
        self.send(request, payload, fds, need_reply=want_ack)
        if request in REPLY_BODY:
            return self.recv_reply(request)
        if want_ack:
            status = int.from_bytes(self.recv_reply(request), "little")
            if status:
                raise FrontendError(f"back-end refused request {request}: status {status}")
        return None

    def get_u64(self, request: int) -> int:
        body = self.request(request)
        assert body is not None
        if len(body) != 8:
            raise FrontendError(f"{Request(request).name}: reply of {len(body)} bytes")
        return int.from_bytes(body, "little")

    # -- the sequences QEMU performs ----------------------------------------------------

    def negotiate(self, want_protocol: int) -> None:
        """Connection set-up, as QEMU does it when the device is realized."""
        self.backend_features = self.get_u64(Request.GET_FEATURES)
        if self.backend_features & (1 << VHOST_USER_F_PROTOCOL_FEATURES):
            offered = self.get_u64(Request.GET_PROTOCOL_FEATURES)
            self.protocol_features = offered & want_protocol
            self.request(Request.SET_PROTOCOL_FEATURES, codec.encode_u64(self.protocol_features))
        if self.protocol_features & (1 << ProtocolFeature.MQ):
            self.num_queues = self.get_u64(Request.GET_QUEUE_NUM)
        self.request(Request.SET_OWNER)
        self.backend_features = self.get_u64(Request.GET_FEATURES)

    def has(self, feature: ProtocolFeature) -> bool:
        return bool(self.protocol_features & (1 << feature))

    def start(self, features: int, queues: list[QueueSetup], send_memory: bool = True) -> None:
        """What QEMU sends when the guest driver sets DRIVER_OK.

        After a driver unbind/rebind QEMU sets the rings up again without re-sending
        the memory table: ``send_memory=False``.
        """
        if self.backend_features & (1 << VHOST_USER_F_PROTOCOL_FEATURES):
            features |= 1 << VHOST_USER_F_PROTOCOL_FEATURES
        self.request(Request.SET_FEATURES, codec.encode_u64(features))
        if self.has(ProtocolFeature.STATUS):
            self.request(Request.SET_STATUS, codec.encode_u64(
                STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK), need_reply=True)
        if send_memory:
            self.set_memory()
        for i, q in enumerate(queues):
            self.request(Request.SET_VRING_NUM, codec.encode_vring_state(i, q.size))
            self.request(Request.SET_VRING_BASE, codec.encode_vring_state(i, 0))
            self.request(Request.SET_VRING_ADDR, codec.encode_vring_addr(VringAddr(
                i, 0, FAKE_UVA_BASE + q.desc, FAKE_UVA_BASE + q.used, FAKE_UVA_BASE + q.avail, 0)))
            self.request(Request.SET_VRING_KICK, codec.encode_vring_file(i), [q.kick_fd],
                         need_reply=True)
            self.request(Request.SET_VRING_CALL, codec.encode_vring_file(i), [q.call_fd],
                         need_reply=True)
        if self.backend_features & (1 << VHOST_USER_F_PROTOCOL_FEATURES):
            for i in range(len(queues)):
                self.request(Request.SET_VRING_ENABLE, codec.encode_vring_state(i, 1),
                             need_reply=True)
        if self.has(ProtocolFeature.STATUS):
            self.request(Request.SET_STATUS, codec.encode_u64(
                STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK),
                need_reply=True)

    def set_memory(self) -> None:
        if self.has(ProtocolFeature.CONFIGURE_MEM_SLOTS):
            self.get_u64(Request.GET_MAX_MEM_SLOTS)
            self.request(Request.ADD_MEM_REG, codec.encode_single_region(self.ram.region()),
                         [self.ram.fd], need_reply=True)
        else:
            self.request(Request.SET_MEM_TABLE, codec.encode_mem_table([self.ram.region()]),
                         [self.ram.fd], need_reply=True)

    def stop(self, nqueues: int) -> list[int]:
        """Guest reset or shutdown: disable and stop every ring; returns their bases."""
        bases = []
        if self.backend_features & (1 << VHOST_USER_F_PROTOCOL_FEATURES):
            for i in range(nqueues):
                self.request(Request.SET_VRING_ENABLE, codec.encode_vring_state(i, 0),
                             need_reply=True)
        for i in range(nqueues):
            body = self.request(Request.GET_VRING_BASE, codec.encode_vring_state(i, 0))
            assert body is not None
            bases.append(int.from_bytes(body[4:8], "little"))
        if self.has(ProtocolFeature.STATUS):
            self.request(Request.SET_STATUS, codec.encode_u64(0), need_reply=True)
        return bases

    def close(self) -> None:
        self.sock.close()
