"""Sans-I/O codec for RPMsg messages and name-service announcements.

Layouts are the ones the Linux guest driver uses (``struct rpmsg_hdr`` and
``struct rpmsg_ns_msg``), little-endian as VIRTIO_F_VERSION_1 requires.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass

_HDR = struct.Struct("<IIIHH")  # src, dst, reserved, len, flags
_NS = struct.Struct("<32sII")  # name, addr, flags

HDR_SIZE = _HDR.size  # 16
#: ``pack_header(src, dst, reserved, len, flags)``: no checks (callers check len)
pack_header = _HDR.pack
#: ``unpack_header(buf, offset)``: (src, dst, reserved, len, flags)
unpack_header = _HDR.unpack_from
BUF_SIZE = 512  # every buffer the Linux driver posts
MAX_PAYLOAD = BUF_SIZE - HDR_SIZE  # 496
NS_MSG_SIZE = _NS.size  # 40
NAME_SIZE = 32
NS_ADDR = 53
ADDR_ANY = 0xFFFF_FFFF
RESERVED_ADDRESSES = 1024


class NsFlags(enum.IntEnum):
    CREATE = 0
    DESTROY = 1


class RpmsgFormatError(ValueError):
    """Bytes that are not a well-formed RPMsg message."""


@dataclass(frozen=True, slots=True)
class Header:
    src: int
    dst: int
    length: int
    flags: int = 0
    reserved: int = 0


def encode_header(src: int, dst: int, length: int, flags: int = 0) -> bytes:
    if not 0 <= length <= 0xFFFF:
        raise RpmsgFormatError(f"length {length} does not fit the 16-bit len field")
    return _HDR.pack(src, dst, 0, length, flags)


def decode_header(buf: bytes | memoryview) -> Header:
    if len(buf) < HDR_SIZE:
        raise RpmsgFormatError(f"{len(buf)} bytes cannot hold a {HDR_SIZE}-byte header")
    src, dst, reserved, length, flags = _HDR.unpack_from(buf)
    return Header(src, dst, length, flags, reserved)


def encode_message(src: int, dst: int, payload: bytes, flags: int = 0) -> bytes:
    return encode_header(src, dst, len(payload), flags) + payload


def decode_message(buf: bytes) -> tuple[Header, bytes]:
    """Split a buffer into header and payload; ``len`` must fit what the buffer holds."""
    hdr = decode_header(buf)
    if hdr.length > len(buf) - HDR_SIZE:
        raise RpmsgFormatError(
            f"header says {hdr.length} payload bytes, buffer holds {len(buf) - HDR_SIZE}"
        )
    return hdr, bytes(buf[HDR_SIZE : HDR_SIZE + hdr.length])


@dataclass(frozen=True, slots=True)
class NsMessage:
    """A name-service announcement: a service ``name`` lives at ``addr``."""

    name: str
    addr: int
    flags: NsFlags = NsFlags.CREATE


def encode_ns(msg: NsMessage) -> bytes:
    raw = msg.name.encode()
    # The guest forces the last byte to NUL, so 31 bytes is the longest name that survives.
    if not raw or len(raw) >= NAME_SIZE or b"\0" in raw:
        raise RpmsgFormatError(f"service name {msg.name!r} must be 1..{NAME_SIZE - 1} bytes")
    return _NS.pack(raw, msg.addr, int(msg.flags))


def decode_ns(payload: bytes) -> NsMessage:
    if len(payload) != NS_MSG_SIZE:
        raise RpmsgFormatError(f"name-service payload of {len(payload)} bytes, "
                               f"expected {NS_MSG_SIZE}")
    raw, addr, flags = _NS.unpack(payload)
    name = raw[: NAME_SIZE - 1].split(b"\0", 1)[0].decode(errors="replace")
    try:
        kind = NsFlags(flags)
    except ValueError:
        raise RpmsgFormatError(
            f"name-service flags {flags} are neither create nor destroy") from None
    return NsMessage(name, addr, kind)
