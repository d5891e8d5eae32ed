"""vhost-user wire constants: request codes, flags and feature bits.

Values are the ones the vhost-user specification (QEMU docs/interop/vhost-user.rst)
assigns; they are facts of the protocol, kept in one place so the codec, the backend
and the simulated front-end agree.
"""

from __future__ import annotations

import enum


class Request(enum.IntEnum):
    """Front-end → back-end request codes."""

    GET_FEATURES = 1
    SET_FEATURES = 2
    SET_OWNER = 3
    RESET_OWNER = 4
    SET_MEM_TABLE = 5
    SET_LOG_BASE = 6
    SET_LOG_FD = 7
    SET_VRING_NUM = 8
    SET_VRING_ADDR = 9
    SET_VRING_BASE = 10
    GET_VRING_BASE = 11
    SET_VRING_KICK = 12
    SET_VRING_CALL = 13
    SET_VRING_ERR = 14
    GET_PROTOCOL_FEATURES = 15
    SET_PROTOCOL_FEATURES = 16
    GET_QUEUE_NUM = 17
    SET_VRING_ENABLE = 18
    SEND_RARP = 19
    NET_SET_MTU = 20
    SET_BACKEND_REQ_FD = 21
    IOTLB_MSG = 22
    SET_VRING_ENDIAN = 23
    GET_CONFIG = 24
    SET_CONFIG = 25
    CREATE_CRYPTO_SESSION = 26
    CLOSE_CRYPTO_SESSION = 27
    POSTCOPY_ADVISE = 28
    POSTCOPY_LISTEN = 29
    POSTCOPY_END = 30
    GET_INFLIGHT_FD = 31
    SET_INFLIGHT_FD = 32
    GPU_SET_SOCKET = 33
    RESET_DEVICE = 34
    VRING_KICK = 35
    GET_MAX_MEM_SLOTS = 36
    ADD_MEM_REG = 37
    REM_MEM_REG = 38
    SET_STATUS = 39
    GET_STATUS = 40


class ProtocolFeature(enum.IntEnum):
    """Bit numbers of vhost-user protocol features."""

    MQ = 0
    LOG_SHMFD = 1
    RARP = 2
    REPLY_ACK = 3
    MTU = 4
    BACKEND_REQ = 5
    CROSS_ENDIAN = 6
    CRYPTO_SESSION = 7
    PAGEFAULT = 8
    CONFIG = 9
    BACKEND_SEND_FD = 10
    HOST_NOTIFIER = 11
    INFLIGHT_SHMFD = 12
    RESET_DEVICE = 13
    INBAND_NOTIFICATIONS = 14
    CONFIGURE_MEM_SLOTS = 15
    STATUS = 16


# Header flags.
VERSION = 0x1
VERSION_MASK = 0x3
FLAG_REPLY = 1 << 2
FLAG_NEED_REPLY = 1 << 3

HEADER_SIZE = 12
# Largest payload any request we understand carries (SET_MEM_TABLE with 8 regions is
# 8 + 8*32 = 264, a config access 12 + 256 = 268).  Anything claiming more than this
# cannot be a valid message, and a stream cannot be resynchronised after it.
MAX_PAYLOAD = 4096
MAX_FDS = 32

#: The one virtio feature bit vhost-user itself defines: protocol features exist.
VHOST_USER_F_PROTOCOL_FEATURES = 30

# Payload of SET_VRING_KICK/CALL/ERR: low byte = queue index, bit 8 = no fd (poll).
VRING_IDX_MASK = 0xFF
VRING_NOFD_MASK = 1 << 8

# Memory slots the backend can hold with CONFIGURE_MEM_SLOTS (the spec's baseline is 8).
MAX_MEM_SLOTS = 32
MAX_CONFIG_SIZE = 256

#: The protocol features this back-end implements; a device offers a subset of them
#: (``VirtioDevice.protocol_features``).
IMPLEMENTED_PROTOCOL_FEATURES = (
    (1 << ProtocolFeature.MQ)
    | (1 << ProtocolFeature.REPLY_ACK)
    | (1 << ProtocolFeature.CONFIG)
    | (1 << ProtocolFeature.RESET_DEVICE)
    | (1 << ProtocolFeature.CONFIGURE_MEM_SLOTS)
    | (1 << ProtocolFeature.STATUS)
)

#: Requests whose reply carries a body; every other reply is a REPLY_ACK u64.  Used by
#: the back-end and by the simulated front-end alike.
REPLY_BODY = frozenset({
    Request.GET_FEATURES,
    Request.GET_PROTOCOL_FEATURES,
    Request.GET_VRING_BASE,
    Request.GET_QUEUE_NUM,
    Request.GET_CONFIG,
    Request.GET_MAX_MEM_SLOTS,
    Request.GET_STATUS,
})
