#!/usr/bin/env python3
"""Fuzzing the vhost-user decoder and the back-end state machine, with the rpmsg device.

One input is a front-end's conversation: messages (any request code, flags, payload,
lying size fields, split across reads, with real file descriptors attached: eventfds,
the guest-RAM memfd, other memfds, a pipe, a socket, /dev/null) fed to the Decoder
and handed to a VhostUserBackend serving a real RpmsgDevice (echo and sink endpoints),
mixed with the guest's side: writes to guest RAM (rings and buffers), kicks, turns of
the event loop (pollers, deferred flushes), host sends, reconnects, attempts to shrink
the RAM file.  Checked after every step:

* the decoder raises nothing but FramingError, and then the connection is dropped (as
  the server does) and a new one starts;
* ``handle`` never raises (its own contract), every reply is one well-formed reply
  message for the request, getters always get one, acks only when REPLY_ACK asks;
* every fd that came with a message is open afterwards exactly when the back-end keeps
  it (a ring's kick/call/err, the backend-req fd), the loop watches only live kick fds;
* nothing is caught by a catch-all (``internal``/``device`` errors, a handler failure,
  a traceback in the log, an exception escaping a loop callback);
* after the input, the disconnect leaves no fd open and nothing watched.

    python fuzz/fuzz_vhost_user.py fuzz/corpus/vhost_user -runs=1000   # see fuzz/README.md
"""

from __future__ import annotations

import contextlib
import fcntl
import mmap
import os
import socket
import struct
from collections.abc import Callable
from typing import Any

import atheris
from _common import Reader, Writer, capture_logs, main, open_fds, use_asan_build_if_asked

use_asan_build_if_asked()

with atheris.instrument_imports(include=["vhost_rpmsg"]):
    from vhost_rpmsg.endpoints.builtin import Echo, Sink
    from vhost_rpmsg.rpmsg.device import RpmsgDevice
    from vhost_rpmsg.rpmsg.errors import PayloadTooLarge, WouldBlock
    from vhost_rpmsg.vhost_user import codec
    from vhost_rpmsg.vhost_user.backend import VhostUserBackend
    from vhost_rpmsg.vhost_user.codec import Decoder, FramingError, MemoryRegion, Message, VringAddr
    from vhost_rpmsg.vhost_user.protocol import (
        FLAG_NEED_REPLY,
        FLAG_REPLY,
        REPLY_BODY,
        VERSION,
        VHOST_USER_F_PROTOCOL_FEATURES,
        ProtocolFeature,
        Request,
    )
    from vhost_rpmsg.vhost_user.ring_state import RingState
    from vhost_rpmsg.virtio.constants import (
        VIRTIO_F_VERSION_1,
        VIRTIO_RING_F_EVENT_IDX,
        VIRTIO_RING_F_INDIRECT_DESC,
        VIRTIO_RPMSG_F_NS,
        VRING_DESC_F_WRITE,
    )
    from vhost_rpmsg.virtio.queue import QueueBroken
    from vhost_rpmsg.virtio.queue_cffi import CffiQueue
    from vhost_rpmsg.virtio.queue_python import PythonQueue

RAM_SIZE = 1 << 17
UVA = 0x7F00_0000_0000  # where the front-end has guest RAM in its address space
REQUESTS = sorted(Request)
MAX_STEPS = 64
# steps: 0-4 a message, then the guest's side
POKE, KICK, TICK, SEND, RECONNECT, SHRINK = range(5, 11)
NSTEPS = 11
# fd kinds a message can carry
(FD_EVENT, FD_RAM, FD_MEMFD, FD_PIPE, FD_NULL, FD_SOCKET, FD_UNSEALABLE,
 FD_EVENT2) = range(8)
NKINDS = 8
ACK_OK, ACK_FAIL = codec.encode_u64(0), codec.encode_u64(1)
LOGS = capture_logs()


class Finding(AssertionError):
    """A property of the back-end failed."""


class Handle:
    def __init__(self, cb: Callable[..., Any], args: tuple[Any, ...]) -> None:
        self.cb, self.args, self.cancelled = cb, args, False

    def cancel(self) -> None:
        self.cancelled = True


class FakeLoop:
    """The EventLoop the back-end is given: records watches and callbacks; the input
    decides when they run.  An exception out of a callback is a finding (asyncio would
    log it as an unhandled "Exception in callback")."""

    def __init__(self) -> None:
        self.readers: dict[int, tuple[Callable[..., Any], tuple[Any, ...]]] = {}
        self.soon: list[Handle] = []
        self.later: list[Handle] = []

    def add_reader(self, fd: int, callback: Callable[..., Any], *args: Any) -> None:
        os.fstat(fd)  # asyncio refuses a closed fd the same way (OSError)
        self.readers[fd] = (callback, args)

    def remove_reader(self, fd: int) -> bool:
        return self.readers.pop(fd, None) is not None

    def call_soon_threadsafe(self, callback: Callable[..., Any], *args: Any) -> Handle:
        h = Handle(callback, args)
        self.soon.append(h)
        return h

    def call_later(self, delay: float, callback: Callable[..., Any], *args: Any) -> Handle:
        h = Handle(callback, args)
        self.later.append(h)
        return h

    def run_once(self) -> None:
        """One turn: what was scheduled so far runs once (pollers schedule again)."""
        todo = [h for h in self.soon + self.later if not h.cancelled]
        self.soon, self.later = [], []
        for h in todo:
            if not h.cancelled:
                callback(h.cb, *h.args)

    def pending(self) -> list[Handle]:
        return [h for h in self.soon + self.later if not h.cancelled]


def callback(fn: Callable[..., Any], *args: Any) -> None:
    try:
        fn(*args)
    except QueueBroken as e:
        if not known("flush-queue-broken", fn.__qualname__ == "RpmsgDevice._deferred_flush"):
            raise Finding(f"exception escaped loop callback {fn.__qualname__}: "
                          f"QueueBroken: {e}") from e
    except Exception as e:
        raise Finding(f"exception escaped loop callback {fn.__qualname__}: "
                      f"{type(e).__name__}: {e}") from e


#: Findings reported and not yet fixed, tolerated so that fuzzing goes on past them
#: (VHOST_RPMSG_FUZZ_STRICT=1 makes them fail again), each with its reproducer:
#: flush-queue-broken (fuzz/crashes/vhost_user-deferred-flush-queuebroken): a corrupt
#: avail idx on the rx ring makes RpmsgDevice.flush() break the ring and then re-raise
#: QueueBroken out of the deferred flush the loop runs (and out of send_nowait, and out of
#: an endpoint's send_many: a handler failure).
KNOWN = {"flush-queue-broken": 0}
#: findings fixed since: no longer tolerated (flush-queue-broken: flush() now stops at
#: the broken ring; tests/test_bad_input.py has its regression test)
FIXED = {"flush-queue-broken"}
STRICT = os.environ.get("VHOST_RPMSG_FUZZ_STRICT") == "1"


def known(name: str, matches: bool) -> bool:
    """Whether this is known finding ``name`` (tolerated unless strict or fixed); counts
    it."""
    if not matches or STRICT or name in FIXED:
        return False
    KNOWN[name] += 1
    return True


def fd_alive(fd: int) -> bool:
    try:
        fcntl.fcntl(fd, fcntl.F_GETFD)
    except OSError:
        return False
    return True


class Conversation:
    """One input's front-end, guest and loop around a back-end and its device."""

    def __init__(self, r: Reader) -> None:
        c = r.u8()
        self.engine: Any = CffiQueue if c & 1 else PythonQueue
        self.protocol_features = r.u32() if c & 2 else None
        self.loop = FakeLoop()
        self.device = RpmsgDevice([Echo(1024, name="rpmsg-raw"), Sink(1025)],
                                  outbox_limit=(256, 8, 1, 256)[(c >> 2) & 3])
        self.tolerated_handler_errors = 0
        self.ram_fd: int | None = None
        self.ram: mmap.mmap | None = None
        self.connect()

    def connect(self) -> None:
        self.decoder = Decoder()
        self.backend = VhostUserBackend(self.device, self.loop,
                                        protocol_features=self.protocol_features,
                                        queue_factory=self.engine)

    def disconnect(self) -> None:
        """What the server does when a connection ends (_drop)."""
        self.decoder.close()
        self.backend.disconnect()
        self.check_watches()

    # -- file descriptors ---------------------------------------------------------------

    def guest_ram(self) -> int:
        if self.ram_fd is None:
            self.ram_fd = os.memfd_create("fuzz-ram", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
            os.ftruncate(self.ram_fd, RAM_SIZE)
            self.ram = mmap.mmap(self.ram_fd, RAM_SIZE)
        return self.ram_fd

    def make_fd(self, kind: int) -> int:
        """A fresh fd of ``kind``, as recvmsg would hand the server one (its own copy)."""
        if kind in (FD_EVENT, FD_EVENT2):
            return os.eventfd(0, os.EFD_CLOEXEC | (os.EFD_SEMAPHORE if kind == FD_EVENT2 else 0))
        if kind == FD_RAM:
            return os.dup(self.guest_ram())
        if kind in (FD_MEMFD, FD_UNSEALABLE):
            flags = os.MFD_CLOEXEC | (os.MFD_ALLOW_SEALING if kind == FD_MEMFD else 0)
            fd = os.memfd_create("fuzz-other", flags)
            os.ftruncate(fd, 8192 if kind == FD_MEMFD else RAM_SIZE)
            return fd
        if kind == FD_PIPE:
            rd, wr = os.pipe()
            os.close(wr)
            return rd
        if kind == FD_NULL:
            return os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
        a, b = socket.socketpair()
        b.close()
        return a.detach()

    def kept(self) -> set[int]:
        b = self.backend
        out = {fd for vr in b.vrings for fd in (vr.kick_fd, vr.call_fd, vr.err_fd)
               if fd is not None}
        if b.backend_req_fd is not None:
            out.add(b.backend_req_fd)
        return out

    def check_watches(self) -> None:
        kicks = {vr.kick_fd for vr in self.backend.vrings if vr.kick_fd is not None}
        for fd in self.loop.readers:
            if fd not in kicks or not fd_alive(fd):
                raise Finding(f"the loop watches fd {fd}, not a live kick fd ({kicks})")

    # -- steps ----------------------------------------------------------------------------

    def message(self, r: Reader) -> None:
        b = r.u8()
        if b == 255:
            req = r.u32()
        elif b >= 200:
            req = 41 + b - 200  # unknown to the back-end
        else:
            req = int(REQUESTS[b % len(REQUESTS)])
        f = r.u8()
        flags = r.u32() if f & 0x80 else VERSION | (f & (FLAG_REPLY | FLAG_NEED_REPLY))
        kinds = [r.u8() % NKINDS for _ in range(r.u8() & 3)]
        payload = r.blob()
        size = r.u16() if f & 0x40 else len(payload)
        cut = r.u16() if f & 0x20 else None
        frame = struct.pack("<III", req, flags, size) + payload
        fds = [self.make_fd(k) for k in kinds]
        if cut is None:
            self.feed(frame, fds)
        else:
            cut %= len(frame) + 1
            self.feed(frame[:cut], fds)
            self.feed(frame[cut:], [])

    def feed(self, data: bytes, fds: list[int]) -> None:
        self.decoder.feed(data, fds)
        while True:
            try:
                msg = self.decoder.next_message()
            except FramingError:
                self.disconnect()  # the server drops the stream and takes the next one
                self.connect()
                return
            if msg is None:
                return
            self.handle(msg)

    def handle(self, msg: Message) -> None:
        b = self.backend
        try:
            reply = b.handle(msg)
        except Exception as e:
            raise Finding(f"handle({msg.name}) raised {type(e).__name__}: {e}") from e
        self.check_reply(msg, reply)
        kept = self.kept()
        for fd in msg.fds:
            if fd_alive(fd) != (fd in kept):
                raise Finding(f"{msg.name}: fd {fd} is {'open' if fd_alive(fd) else 'closed'}"
                              f" but the back-end {'keeps' if fd in kept else 'dropped'} it")
        self.check_watches()
        self.check_errors(msg.name)

    def check_reply(self, msg: Message, reply: bytes | None) -> None:
        b = self.backend
        if reply is None:
            if msg.request in REPLY_BODY:
                raise Finding(f"{msg.name}: no reply to a getter")
            if msg.need_reply and b.protocol_features & (1 << ProtocolFeature.REPLY_ACK):
                raise Finding(f"{msg.name}: need_reply with REPLY_ACK, but no ack")
            return
        d = Decoder()
        d.feed(reply)
        try:
            out = d.next_message()
        except FramingError as e:
            raise Finding(f"{msg.name}: unparseable reply {reply!r}: {e}") from e
        if out is None or d.pending_bytes:
            raise Finding(f"{msg.name}: reply {reply!r} is not exactly one message")
        if out.request != msg.request or out.flags != VERSION | FLAG_REPLY or out.fds:
            raise Finding(f"{msg.name}: reply header {out.request} 0x{out.flags:x}")
        if msg.request in REPLY_BODY:
            if msg.request == Request.GET_CONFIG:
                if out.payload and len(out.payload) != len(msg.payload):
                    raise Finding(f"GET_CONFIG: {len(out.payload)}-byte reply to "
                                  f"{len(msg.payload)}")
            elif len(out.payload) != 8:
                raise Finding(f"{msg.name}: reply body of {len(out.payload)} bytes")
        elif (out.payload not in (ACK_OK, ACK_FAIL) or not msg.need_reply
              or not b.protocol_features & (1 << ProtocolFeature.REPLY_ACK)):
            raise Finding(f"{msg.name}: unexpected reply {out.payload!r}")

    def check_errors(self, where: str) -> None:
        e = self.backend.errors
        bad = {k: e[k] for k in ("internal", "device") if e[k]}
        failed = self.device.stats["handler_errors"] - self.tolerated_handler_errors
        tracebacks = LOGS.take()
        # An endpoint's send_many flushes, and the flush lets QueueBroken out after
        # breaking the rx ring: the known finding, seen as a handler failure.
        rx_broken = self.backend.vrings[0].state is RingState.BROKEN
        if failed and known("flush-queue-broken", rx_broken and all(
                "QueueBroken" in t and "flush" in t for t in tracebacks)):
            self.tolerated_handler_errors += failed
            failed, tracebacks = 0, []
        if failed:
            bad["handler_errors"] = failed
        if bad or tracebacks:
            raise Finding(f"after {where}: caught by a catch-all: {bad}\n" + "\n".join(tracebacks))

    def poke(self, r: Reader) -> None:
        """The guest writes its RAM (rings, buffers), within the file as it is now."""
        off, data = r.u32() % RAM_SIZE, r.blob()
        fd = self.guest_ram()
        end = min(off + len(data), os.fstat(fd).st_size)
        if self.ram is not None and end > off:
            self.ram[off:end] = data[: end - off]

    def kick(self, r: Reader) -> None:
        vr = self.backend.vrings[r.u8() % len(self.backend.vrings)]
        fd = vr.kick_fd
        if fd is None:
            return
        with contextlib.suppress(OSError):  # a full counter: the kick is there already
            os.eventfd_write(fd, 1)
        watch = self.loop.readers.get(fd)
        if watch is not None:
            callback(watch[0], *watch[1])
        self.check_watches()
        self.check_errors("kick")

    def send(self, r: Reader) -> None:
        s = r.u8()
        dst = r.u32() if s & 1 else (1030, 1024, 53, 1031)[(s >> 1) & 3]
        data = r.blob()
        try:
            self.device.send_nowait(1024, dst, data)
        except (WouldBlock, PayloadTooLarge):
            pass  # the API's documented refusals
        except QueueBroken as e:  # flushing a full outbox found the rx ring broken
            if not known("flush-queue-broken", True):
                raise Finding(f"send_nowait raised QueueBroken: {e}") from e
        self.check_errors("send_nowait")

    def shrink(self) -> None:
        """A front-end shrinking guest RAM under the mapping (sealed memfds refuse)."""
        with contextlib.suppress(OSError):
            os.ftruncate(self.guest_ram(), RAM_SIZE // 4)

    def step(self, r: Reader) -> None:
        op = r.u8() % NSTEPS
        if op < POKE:
            self.message(r)
        elif op == POKE:
            self.poke(r)
        elif op == KICK:
            self.kick(r)
        elif op == TICK:
            self.loop.run_once()
            self.check_watches()
            self.check_errors("a loop turn")
        elif op == SEND:
            self.send(r)
        elif op == RECONNECT:
            self.disconnect()
            self.connect()
        elif op == SHRINK:
            self.shrink()

    def close(self) -> None:
        self.disconnect()
        if self.loop.readers:
            raise Finding(f"after disconnect the loop still watches {list(self.loop.readers)}")
        live = [h.cb.__qualname__ for h in self.loop.later if not h.cancelled]
        if live:
            raise Finding(f"after disconnect pollers are still scheduled: {live}")
        self.device.destroy()
        if self.ram is not None:
            self.ram.close()
        if self.ram_fd is not None:
            os.close(self.ram_fd)


def test_one_input(data: bytes) -> None:
    before = open_fds()
    r = Reader(data)
    conv = Conversation(r)
    try:
        for _ in range(MAX_STEPS):
            if not r.left():
                break
            conv.step(r)
    finally:
        conv.close()
    leaked = open_fds() - before
    if leaked:
        raise Finding(f"fds left open after the disconnect: "
                      f"{[(fd, _describe(fd)) for fd in sorted(leaked)]}")


def _describe(fd: int) -> str:
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError as e:
        return str(e)


# -- seeds (fuzz/gen_seeds.py) ---------------------------------------------------------------

QSIZE = 64
RINGS = (0x0000, 0x1000)  # guest-physical desc tables of queue 0 and 1
BUFS = (0x8000, 0x10000)  # their buffers, 512 bytes each


def _ring(q: int) -> tuple[int, int, int]:
    desc = RINGS[q]
    avail = desc + 16 * QSIZE
    return desc, avail, (avail + 6 + 2 * QSIZE + 3) & ~3


class Seed:
    """Writes a conversation in the format Conversation reads."""

    def __init__(self, config: int = 0) -> None:
        self.w = Writer().u8(config)

    def msg(self, req: int, payload: bytes = b"", fds: tuple[int, ...] = (),
            need_reply: bool = False, flags: int | None = None) -> Seed:
        w = self.w.u8(0).u8(req - 1)
        if flags is not None:
            w.u8(0x80).u32(flags)
        else:
            w.u8(FLAG_NEED_REPLY if need_reply else 0)
        w.u8(len(fds)).raw(bytes(fds)).blob(payload)
        return self

    def frame(self, req: int, payload: bytes, *, size: int | None = None,
              cut: int | None = None) -> Seed:
        f = (0x40 if size is not None else 0) | (0x20 if cut is not None else 0)
        self.w.u8(0).u8(req - 1).u8(f).u8(0).blob(payload)
        if size is not None:
            self.w.u16(size)
        if cut is not None:
            self.w.u16(cut)
        return self

    def poke(self, gpa: int, data: bytes) -> Seed:
        self.w.u8(POKE).u32(gpa).blob(data)
        return self

    def op(self, op: int, *args: int) -> Seed:
        self.w.u8(op)
        for a in args:
            self.w.u8(a)
        return self

    def bytes(self) -> bytes:
        return self.w.bytes()


def _qemu_setup(s: Seed, *, protocol: int, features: int, mem_slots: bool = False,
                kick_fd: bool = True) -> Seed:
    """QEMU 11.1's order with vhost-user-test-device-pci (shared/REFERENCE.md)."""
    R = Request
    s.msg(R.GET_FEATURES).msg(R.GET_PROTOCOL_FEATURES)
    s.msg(R.SET_PROTOCOL_FEATURES, codec.encode_u64(protocol))
    s.msg(R.GET_QUEUE_NUM).msg(R.SET_OWNER).msg(R.GET_FEATURES)
    for q in (0, 1):
        s.msg(R.SET_VRING_CALL, codec.encode_vring_file(q), (FD_EVENT,), need_reply=True)
        s.msg(R.SET_VRING_ERR, codec.encode_vring_file(q), (FD_EVENT,), need_reply=True)
    s.msg(R.SET_FEATURES, codec.encode_u64(features))
    region = MemoryRegion(0, RAM_SIZE, UVA, 0)
    if mem_slots:
        s.msg(R.GET_MAX_MEM_SLOTS)
        s.msg(R.ADD_MEM_REG, codec.encode_single_region(region), (FD_RAM,), need_reply=True)
    else:
        s.msg(R.SET_MEM_TABLE, codec.encode_mem_table([region]), (FD_RAM,), need_reply=True)
    for q in (0, 1):
        desc, avail, used = _ring(q)
        s.msg(R.SET_VRING_NUM, codec.encode_vring_state(q, QSIZE))
        s.msg(R.SET_VRING_BASE, codec.encode_vring_state(q, 0))
        s.msg(R.SET_VRING_ADDR, codec.encode_vring_addr(
            VringAddr(q, 0, UVA + desc, UVA + used, UVA + avail, 0)))
        if kick_fd:
            s.msg(R.SET_VRING_KICK, codec.encode_vring_file(q), (FD_EVENT,), need_reply=True)
        else:
            s.msg(R.SET_VRING_KICK, codec.encode_vring_file(q, no_fd=True), need_reply=True)
        s.msg(R.SET_VRING_CALL, codec.encode_vring_file(q), (FD_EVENT,), need_reply=True)
    if features & (1 << VHOST_USER_F_PROTOCOL_FEATURES):
        for q in (0, 1):
            s.msg(R.SET_VRING_ENABLE, codec.encode_vring_state(q, 1), need_reply=True)
    return s


def _guest_traffic(s: Seed) -> Seed:
    """rx buffers on queue 0, one message to the echo endpoint on queue 1, kicks."""
    desc, avail, _ = _ring(0)
    s.poke(desc, b"".join(struct.pack("<QIHH", BUFS[0] + 512 * i, 512, VRING_DESC_F_WRITE, 0)
                          for i in range(4)))
    s.poke(avail, struct.pack("<HH4H", 0, 4, 0, 1, 2, 3))
    s.op(KICK, 0)
    msg = struct.pack("<IIIHH", 1030, 1024, 0, 4, 0) + b"ping"
    desc, avail, _ = _ring(1)
    s.poke(BUFS[1], msg)
    s.poke(desc, struct.pack("<QIHH", BUFS[1], len(msg), 0, 0))
    s.poke(avail, struct.pack("<HHH", 0, 1, 0))
    s.op(KICK, 1).op(TICK)
    s.op(SEND, 0).w.blob(b"host says hi")
    return s


def seeds() -> dict[str, bytes]:
    """Whole conversations: QEMU's setup in each variant, traffic, teardown, oddities."""
    R, PF = Request, ProtocolFeature
    virtio = ((1 << VIRTIO_F_VERSION_1) | (1 << VIRTIO_RING_F_EVENT_IDX)
              | (1 << VIRTIO_RING_F_INDIRECT_DESC) | (1 << VIRTIO_RPMSG_F_NS))
    qemu = (1 << PF.MQ) | (1 << PF.REPLY_ACK)
    slots = qemu | (1 << PF.CONFIGURE_MEM_SLOTS) | (1 << PF.STATUS)
    out = {}
    for engine, name in ((0, "python"), (1, "cffi")):
        s = _qemu_setup(Seed(engine), protocol=qemu,
                        features=virtio | (1 << VHOST_USER_F_PROTOCOL_FEATURES))
        _guest_traffic(s)
        for q in (0, 1):
            s.msg(R.SET_VRING_ENABLE, codec.encode_vring_state(q, 0), need_reply=True)
        for q in (0, 1):
            s.msg(R.GET_VRING_BASE, codec.encode_vring_state(q, 0))
        out[f"qemu-{name}"] = s.bytes()
    s = _qemu_setup(Seed(1), protocol=slots, mem_slots=True,
                    features=virtio | (1 << VHOST_USER_F_PROTOCOL_FEATURES))
    _guest_traffic(s)
    s.msg(R.SET_STATUS, codec.encode_u64(0xF), need_reply=True).msg(R.GET_STATUS)
    s.msg(R.REM_MEM_REG, codec.encode_single_region(MemoryRegion(0, RAM_SIZE, UVA, 0)),
          need_reply=True)
    s.op(SHRINK).op(RECONNECT)
    out["mem-slots"] = s.bytes()
    s = _qemu_setup(Seed(0), protocol=0, features=virtio, kick_fd=False)
    _guest_traffic(s).op(TICK).op(TICK)
    s.msg(R.RESET_DEVICE).op(TICK)
    out["polling-no-protocol"] = s.bytes()
    s = Seed(0b100)
    _qemu_setup(s, protocol=qemu, features=virtio | (1 << VHOST_USER_F_PROTOCOL_FEATURES))
    _guest_traffic(s).op(KICK, 1)
    s.msg(R.SET_MEM_TABLE, codec.encode_mem_table([MemoryRegion(0, RAM_SIZE // 2, UVA, 0)]),
          (FD_RAM,), need_reply=True)
    s.msg(R.RESET_OWNER)
    out["outbox-8-remap"] = s.bytes()
    s = Seed(0)
    s.msg(R.GET_PROTOCOL_FEATURES).msg(R.SET_PROTOCOL_FEATURES, codec.encode_u64(qemu))
    s.msg(R.GET_CONFIG, codec.encode_config(0, bytes(8)))
    s.msg(R.SET_CONFIG, codec.encode_config(0, b"\1"), need_reply=True)
    s.msg(R.SET_BACKEND_REQ_FD, b"", (FD_SOCKET,), need_reply=True)
    s.msg(R.SET_VRING_KICK, codec.encode_vring_file(0), (FD_PIPE,), need_reply=True)
    s.msg(R.SET_VRING_CALL, codec.encode_vring_file(1), (FD_NULL, FD_EVENT), need_reply=True)
    s.msg(R.SET_LOG_BASE, bytes(16), need_reply=True)
    s.msg(R.SET_MEM_TABLE, codec.encode_mem_table([MemoryRegion(0, RAM_SIZE, UVA, 0)]),
          (FD_UNSEALABLE,), need_reply=True)
    s.msg(R.GET_FEATURES, flags=VERSION | FLAG_REPLY)
    s.w.u8(0).u8(230).u8(FLAG_NEED_REPLY).u8(0).blob(b"")  # an unknown request
    s.frame(R.SET_OWNER, b"", cut=5).frame(R.GET_QUEUE_NUM, b"", size=6000)
    s.msg(R.GET_FEATURES)
    out["oddities"] = s.bytes()
    return out


if __name__ == "__main__":
    main(test_one_input)
