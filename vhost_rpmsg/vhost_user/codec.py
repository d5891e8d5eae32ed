"""Sans-I/O codec for vhost-user messages.

Nothing here touches a socket: :class:`Decoder` is fed the bytes and file descriptors
``recvmsg`` produced and hands back whole :class:`Message` objects; the ``encode_*`` and
``parse_*`` functions turn typed payloads into bytes and back.  Framing errors (a bad
version, an impossible size) are fatal for the stream; payload errors are per-message and
leave the stream usable.
"""

from __future__ import annotations

import os
import struct
from collections import deque
from dataclasses import dataclass, field

from .protocol import (
    FLAG_NEED_REPLY,
    FLAG_REPLY,
    HEADER_SIZE,
    MAX_CONFIG_SIZE,
    MAX_FDS,
    MAX_PAYLOAD,
    VERSION,
    VERSION_MASK,
    VRING_IDX_MASK,
    VRING_NOFD_MASK,
    Request,
)

_HEADER = struct.Struct("<III")
_U64 = struct.Struct("<Q")
_VRING_STATE = struct.Struct("<II")
_VRING_ADDR = struct.Struct("<IIQQQQ")
_REGION = struct.Struct("<QQQQ")
_MEM_HEADER = struct.Struct("<II")
_CONFIG_HEADER = struct.Struct("<III")

MAX_REGIONS_PER_TABLE = 8


class FramingError(Exception):
    """The byte stream cannot be parsed any further; the connection must be dropped."""


class PayloadError(ValueError):
    """One message's payload does not fit its request; the stream is still in sync."""


@dataclass(frozen=True)
class Message:
    """One vhost-user message with the file descriptors that travelled with it."""

    request: int
    flags: int
    payload: bytes = b""
    fds: tuple[int, ...] = ()

    @property
    def need_reply(self) -> bool:
        # "Bit 3 is the need_reply flag" (vhost-user.rst, Header)
        return bool(self.flags & FLAG_NEED_REPLY)

    @property
    def is_reply(self) -> bool:
        return bool(self.flags & FLAG_REPLY)

    @property
    def name(self) -> str:
        try:
            return Request(self.request).name
        except ValueError:
            return f"UNKNOWN({self.request})"


@dataclass(frozen=True)
class VringState:
    """SET_VRING_NUM / SET_VRING_BASE / GET_VRING_BASE / SET_VRING_ENABLE payload."""

    index: int
    num: int


@dataclass(frozen=True)
class VringAddr:
    """SET_VRING_ADDR payload; the addresses are front-end virtual addresses."""

    index: int
    flags: int
    desc: int
    used: int
    avail: int
    log: int


@dataclass(frozen=True)
class MemoryRegion:
    """One region of guest RAM as the front-end describes it."""

    guest_phys_addr: int
    memory_size: int
    userspace_addr: int
    mmap_offset: int


@dataclass(frozen=True)
class VringFile:
    """SET_VRING_KICK / CALL / ERR payload: a queue index, and whether an fd came along."""

    index: int
    no_fd: bool


@dataclass(frozen=True)
class ConfigAccess:
    """GET_CONFIG / SET_CONFIG payload."""

    offset: int
    size: int
    flags: int
    data: bytes


# ---------------------------------------------------------------------------- encoding


def encode(
    request: int,
    payload: bytes = b"",
    *,
    reply: bool = False,
    need_reply: bool = False,
) -> bytes:
    """Frame ``payload`` as a vhost-user message."""
    # "Bit 2 is the reply flag - needs to be sent on each reply from the back-end" (Header)
    flags = VERSION | (FLAG_REPLY if reply else 0) | (FLAG_NEED_REPLY if need_reply else 0)
    return _HEADER.pack(request, flags, len(payload)) + payload


def encode_u64(value: int) -> bytes:
    return _U64.pack(value & 0xFFFF_FFFF_FFFF_FFFF)


def encode_vring_state(index: int, num: int) -> bytes:
    return _VRING_STATE.pack(index, num)


def encode_vring_addr(addr: VringAddr) -> bytes:
    return _VRING_ADDR.pack(addr.index, addr.flags, addr.desc, addr.used, addr.avail, addr.log)


def encode_vring_file(index: int, no_fd: bool = False) -> bytes:
    return encode_u64((index & VRING_IDX_MASK) | (VRING_NOFD_MASK if no_fd else 0))


def _encode_region(r: MemoryRegion) -> bytes:
    return _REGION.pack(r.guest_phys_addr, r.memory_size, r.userspace_addr, r.mmap_offset)


def encode_mem_table(regions: list[MemoryRegion]) -> bytes:
    return _MEM_HEADER.pack(len(regions), 0) + b"".join(_encode_region(r) for r in regions)


def encode_single_region(region: MemoryRegion) -> bytes:
    return encode_u64(0) + _encode_region(region)


def encode_config(offset: int, data: bytes, flags: int = 0) -> bytes:
    return _CONFIG_HEADER.pack(offset, len(data), flags) + data


# ---------------------------------------------------------------------------- parsing


def _exact(msg: Message, size: int) -> bytes:
    # Each request's payload is one of the fixed layouts of vhost-user.rst, "Payload".
    if len(msg.payload) != size:
        raise PayloadError(f"{msg.name}: payload is {len(msg.payload)} bytes, expected {size}")
    return msg.payload


def parse_u64(msg: Message) -> int:
    value: int = _U64.unpack(_exact(msg, _U64.size))[0]
    return value


def parse_vring_state(msg: Message) -> VringState:
    return VringState(*_VRING_STATE.unpack(_exact(msg, _VRING_STATE.size)))


def parse_vring_addr(msg: Message) -> VringAddr:
    return VringAddr(*_VRING_ADDR.unpack(_exact(msg, _VRING_ADDR.size)))


def parse_vring_file(msg: Message) -> VringFile:
    value = parse_u64(msg)
    # "Bits (0-7) of the payload contain the vring index. Bit 8 is the invalid FD flag."
    if value & ~(VRING_IDX_MASK | VRING_NOFD_MASK):
        raise PayloadError(f"{msg.name}: reserved bits set in 0x{value:x}")
    return VringFile(value & VRING_IDX_MASK, bool(value & VRING_NOFD_MASK))


def parse_mem_table(msg: Message) -> list[MemoryRegion]:
    p = msg.payload
    if len(p) < _MEM_HEADER.size:
        raise PayloadError(f"{msg.name}: payload of {len(p)} bytes has no region count")
    nregions, _padding = _MEM_HEADER.unpack_from(p)
    # "| num regions | padding | region0 | ... | region7 |" (Multiple Memory regions description)
    if not 0 < nregions <= MAX_REGIONS_PER_TABLE:
        raise PayloadError(f"{msg.name}: {nregions} regions (1..{MAX_REGIONS_PER_TABLE} allowed)")
    # QEMU sends the full 8-slot array; a shorter payload must still hold every region.
    need = _MEM_HEADER.size + nregions * _REGION.size
    full = _MEM_HEADER.size + MAX_REGIONS_PER_TABLE * _REGION.size
    if len(p) not in (need, full):
        raise PayloadError(f"{msg.name}: payload is {len(p)} bytes for {nregions} regions")
    return [
        MemoryRegion(*_REGION.unpack_from(p, _MEM_HEADER.size + i * _REGION.size))
        for i in range(nregions)
    ]


def parse_single_region(msg: Message) -> MemoryRegion:
    # "| padding | region |", ":padding: 64-bit" (Single memory region description)
    p = _exact(msg, _U64.size + _REGION.size)
    return MemoryRegion(*_REGION.unpack_from(p, _U64.size))


def parse_config(msg: Message) -> ConfigAccess:
    p = msg.payload
    if len(p) < _CONFIG_HEADER.size:
        raise PayloadError(f"{msg.name}: payload of {len(p)} bytes has no config header")
    offset, size, flags = _CONFIG_HEADER.unpack_from(p)
    if size > MAX_CONFIG_SIZE or offset + size > MAX_CONFIG_SIZE:
        raise PayloadError(f"{msg.name}: config window {offset}+{size} exceeds {MAX_CONFIG_SIZE}")
    data = p[_CONFIG_HEADER.size :]
    # ":payload: Size bytes array holding the contents" (Virtio device config space)
    if len(data) != size:
        raise PayloadError(f"{msg.name}: {len(data)} config bytes, header says {size}")
    return ConfigAccess(offset, size, flags, data)


# ---------------------------------------------------------------------------- decoder


@dataclass
class Decoder:
    """Turns a byte stream plus ancillary fds into :class:`Message` objects.

    File descriptors are attached to the message whose bytes arrived in the same
    ``recvmsg`` call, which is how the sender's ``sendmsg`` bundled them.  The decoder
    owns fds until it hands them out; :meth:`close` releases any left over.
    """

    max_payload: int = MAX_PAYLOAD
    _buf: bytearray = field(default_factory=bytearray)
    _consumed: int = 0  # stream offset of _buf[0]
    _fds: deque[tuple[int, int]] = field(default_factory=deque)  # (stream offset, fd)
    _broken: str | None = None

    def feed(self, data: bytes, fds: list[int] | tuple[int, ...] = ()) -> None:
        """Add bytes read from the stream, and the fds received with them."""
        offset = self._consumed + len(self._buf)
        for fd in fds:
            if len(self._fds) >= MAX_FDS:
                os.close(fd)
                self._broken = f"more than {MAX_FDS} file descriptors pending"
                continue
            self._fds.append((offset, fd))
        self._buf += data

    def next_message(self) -> Message | None:
        """Return the next complete message, or None until more bytes arrive.

        Raises FramingError when the stream is corrupt; the caller should drop it.
        """
        if self._broken:
            raise FramingError(self._broken)
        if len(self._buf) < HEADER_SIZE:
            return None
        request, flags, size = _HEADER.unpack_from(self._buf)
        # "Lower 2 bits are the version (currently 0x01)" (vhost-user.rst, Header)
        if flags & VERSION_MASK != VERSION:
            self._broken = f"bad protocol version in flags 0x{flags:x} (request {request})"
            raise FramingError(self._broken)
        if size > self.max_payload:
            self._broken = f"payload size {size} exceeds {self.max_payload} (request {request})"
            raise FramingError(self._broken)
        total = HEADER_SIZE + size
        if len(self._buf) < total:
            return None
        payload = bytes(self._buf[HEADER_SIZE:total])
        end = self._consumed + total
        fds = []
        while self._fds and self._fds[0][0] < end:
            fds.append(self._fds.popleft()[1])
        del self._buf[:total]
        self._consumed = end
        return Message(request, flags, payload, tuple(fds))

    def wanted(self) -> int:
        """Bytes still missing from the current message.

        Reading no more than this keeps each ``recvmsg`` within one message, so its fds
        arrive with it: a unix stream socket may otherwise merge earlier bytes into the
        read that carries a later message's fds.
        """
        if len(self._buf) < HEADER_SIZE:
            return HEADER_SIZE - len(self._buf)
        size = int.from_bytes(self._buf[8:12], "little")
        return max(HEADER_SIZE + min(size, self.max_payload) - len(self._buf), 1)

    @property
    def pending_bytes(self) -> int:
        return len(self._buf)

    def close(self) -> None:
        """Close every fd not yet handed out in a message."""
        while self._fds:
            _, fd = self._fds.popleft()
            try:
                os.close(fd)
            except OSError:
                pass
        self._buf.clear()
