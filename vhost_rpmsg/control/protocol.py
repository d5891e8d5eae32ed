"""The control protocol: one JSON object per SOCK_SEQPACKET datagram, each way.

Sans-I/O: this module turns datagrams into :class:`Request` objects and replies into
datagrams; :mod:`.server` does the socket work.  A request is
``{"v": 1, "op": OP, ...arguments}``; its reply is ``{"v": 1, "ok": true, ...}`` or
``{"v": 1, "ok": false, "error": CODE, "message": TEXT}``.  A reply to ``endpoint.open``
carries the endpoint's fd as SCM_RIGHTS ancillary data.  Each datagram ends with a
newline, so the stream is readable by eye (``socat``).  docs/control.md is the
reference.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

#: the protocol version this side speaks; a request naming another is refused
VERSION = 1
#: the largest request accepted (a request is a few hundred bytes)
MAX_REQUEST = 64 * 1024


class Op(StrEnum):
    """What a request asks for."""

    HELLO = "hello"  #: version and the sockets this server serves
    STATS = "stats"  #: every counter, per server, session, queue and endpoint
    ENDPOINT_LIST = "endpoint.list"
    ENDPOINT_ADD = "endpoint.add"  #: a plugin endpoint from a spec string
    ENDPOINT_REMOVE = "endpoint.remove"
    ENDPOINT_OPEN = "endpoint.open"  #: an endpoint held by the caller, as an fd


class ErrorCode(StrEnum):
    """Why a request failed (``error`` in a failure reply)."""

    BAD_REQUEST = "bad-request"  #: not JSON, not an object, missing or mistyped fields
    BAD_VERSION = "bad-version"
    UNKNOWN_OP = "unknown-op"
    NO_SUCH_SOCKET = "no-such-socket"
    NO_SUCH_ENDPOINT = "no-such-endpoint"
    ADDRESS_IN_USE = "address-in-use"
    BAD_ENDPOINT = "bad-endpoint"  #: the spec or its options are refused
    NOT_REMOVABLE = "not-removable"  #: an fd endpoint goes when its fd is closed
    FAILED = "failed"  #: understood, could not be carried out


class ControlError(Exception):
    """A request that gets a failure reply."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(frozen=True)
class Request:
    op: Op
    args: dict[str, Any] = field(default_factory=dict)

    def get(self, name: str, kind: type, default: Any = None, *,
            required: bool = False) -> Any:
        """Argument ``name`` of type ``kind``; a clear error otherwise."""
        if name not in self.args or self.args[name] is None:
            if required:
                raise ControlError(ErrorCode.BAD_REQUEST, f"{self.op}: {name!r} is required")
            return default
        value = self.args[name]
        # bool is an int in Python; an address of true is still a mistake
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise ControlError(ErrorCode.BAD_REQUEST,
                               f"{self.op}: {name!r} must be {kind.__name__}, not "
                               f"{type(value).__name__}")
        return value


def encode(obj: dict[str, Any]) -> bytes:
    return (json.dumps(obj, separators=(",", ":"), sort_keys=True) + "\n").encode()


def decode_request(data: bytes) -> Request:
    """A datagram from a client; ControlError if it is not a request we know."""
    if len(data) > MAX_REQUEST:
        raise ControlError(ErrorCode.BAD_REQUEST, f"request of {len(data)} bytes exceeds "
                           f"{MAX_REQUEST}")
    try:
        obj = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ControlError(ErrorCode.BAD_REQUEST, f"not JSON: {e}") from None
    except RecursionError:  # "[[[[…" nested deeper than the parser goes
        raise ControlError(ErrorCode.BAD_REQUEST, "not JSON we read: nested too deep") from None
    if not isinstance(obj, dict):
        raise ControlError(ErrorCode.BAD_REQUEST, "a request is a JSON object")
    version = obj.pop("v", None)
    if version != VERSION:
        raise ControlError(ErrorCode.BAD_VERSION,
                           f"protocol version {version!r} is not spoken here (this "
                           f"server speaks {VERSION})")
    op = obj.pop("op", None)
    try:
        return Request(Op(op), obj)
    except ValueError:
        known = ", ".join(o.value for o in Op)
        raise ControlError(ErrorCode.UNKNOWN_OP, f"unknown op {op!r} (known: {known})") from None


def request(op: Op, **args: Any) -> bytes:
    """A request datagram (the client side)."""
    return encode({"v": VERSION, "op": op.value, **{k: v for k, v in args.items()
                                                    if v is not None}})


def ok(**body: Any) -> bytes:
    return encode({"v": VERSION, "ok": True, **body})


def failure(err: ControlError) -> bytes:
    return encode({"v": VERSION, "ok": False, "error": err.code.value,
                   "message": err.message})


def decode_reply(data: bytes) -> dict[str, Any]:
    """A reply datagram (the client side): its body, or ControlError from a failure."""
    try:
        obj = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ControlError(ErrorCode.FAILED, f"unreadable reply: {e}") from None
    if not isinstance(obj, dict) or obj.get("v") != VERSION:
        raise ControlError(ErrorCode.BAD_VERSION, f"reply of another protocol: {obj!r}")
    if not obj.get("ok"):
        try:
            code = ErrorCode(str(obj.get("error")))
        except ValueError:
            code = ErrorCode.FAILED
        raise ControlError(code, str(obj.get("message", "")))
    return obj
