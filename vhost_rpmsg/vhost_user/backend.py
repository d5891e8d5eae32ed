"""Device-agnostic vhost-user back-end state machine.

:class:`VhostUserBackend` takes decoded :class:`~.codec.Message` objects and returns
the bytes to send back (if any).  It owns guest memory and the virtqueues, drives the
ring states (stopped / started-disabled / started-enabled) and calls the device.  It
does no socket I/O: the server feeds it, and the event loop it is given only watches
kick eventfds.
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from collections.abc import Callable
from typing import Any

from ..memory import BadAddress, GuestMemory
from ..virtqueue import QueueBroken, SplitQueue
from . import codec
from .codec import Message, PayloadError
from .device import EventLoop, VirtioDevice
from .protocol import (
    MAX_MEM_SLOTS,
    STATUS_DRIVER_OK,
    VHOST_USER_F_PROTOCOL_FEATURES,
    VIRTIO_RING_F_EVENT_IDX,
    VIRTIO_RING_F_INDIRECT_DESC,
    ProtocolFeature,
    Request,
)

log = logging.getLogger(__name__)

# CONFIG is not offered: an rpmsg device has no config space, and QEMU's generic device
# warns when a back-end offers it.  GET_CONFIG/SET_CONFIG are still answered.
DEFAULT_PROTOCOL_FEATURES = (
    (1 << ProtocolFeature.MQ)
    | (1 << ProtocolFeature.REPLY_ACK)
    | (1 << ProtocolFeature.RESET_DEVICE)
    | (1 << ProtocolFeature.CONFIGURE_MEM_SLOTS)
    | (1 << ProtocolFeature.STATUS)
)

POLL_INTERVAL = 0.005  # seconds between ring polls for a queue without a kick fd


class RequestFailed(Exception):
    """A request was understood but cannot be carried out; the front-end hears a failure."""


# Requests whose reply carries a body; every other reply is a REPLY_ACK u64.
_REPLY_BODY = {
    Request.GET_FEATURES,
    Request.GET_PROTOCOL_FEATURES,
    Request.GET_VRING_BASE,
    Request.GET_QUEUE_NUM,
    Request.GET_CONFIG,
    Request.GET_MAX_MEM_SLOTS,
    Request.GET_STATUS,
}


class VhostUserBackend:
    """One front-end connection's worth of back-end state, for one device."""

    def __init__(
        self,
        device: VirtioDevice,
        loop: EventLoop,
        *,
        protocol_features: int = DEFAULT_PROTOCOL_FEATURES,
        queue_factory: Callable[[int, int], SplitQueue] = SplitQueue,
    ) -> None:
        self.device = device
        self.loop = loop
        self.offered_protocol_features = protocol_features
        self.memory = GuestMemory(MAX_MEM_SLOTS)
        self.queues = [queue_factory(i, device.max_queue_size) for i in range(device.num_queues)]
        self.errors: Counter[str] = Counter()
        self.handled: Counter[str] = Counter()
        self.acked_features = 0
        self.protocol_features = 0
        self.protocol_negotiated = False
        self.owner = False
        self.status = 0
        self.backend_req_fd: int | None = None
        self._watched: dict[int, int] = {}  # queue index -> kick fd watched
        self._pollers: dict[int, Any] = {}
        self._kept: set[int] = set()
        device.attach(self.queues, loop)
        self._handlers: dict[int, Callable[[Message], bytes | None]] = {
            Request.GET_FEATURES: self._get_features,
            Request.SET_FEATURES: self._set_features,
            Request.SET_OWNER: self._set_owner,
            Request.RESET_OWNER: self._reset_owner,
            Request.SET_MEM_TABLE: self._set_mem_table,
            Request.SET_VRING_NUM: self._set_vring_num,
            Request.SET_VRING_ADDR: self._set_vring_addr,
            Request.SET_VRING_BASE: self._set_vring_base,
            Request.GET_VRING_BASE: self._get_vring_base,
            Request.SET_VRING_KICK: self._set_vring_kick,
            Request.SET_VRING_CALL: self._set_vring_call,
            Request.SET_VRING_ERR: self._set_vring_err,
            Request.GET_PROTOCOL_FEATURES: self._get_protocol_features,
            Request.SET_PROTOCOL_FEATURES: self._set_protocol_features,
            Request.GET_QUEUE_NUM: self._get_queue_num,
            Request.SET_VRING_ENABLE: self._set_vring_enable,
            Request.SET_BACKEND_REQ_FD: self._set_backend_req_fd,
            Request.GET_CONFIG: self._get_config,
            Request.SET_CONFIG: self._set_config,
            Request.RESET_DEVICE: self._reset_device,
            Request.GET_MAX_MEM_SLOTS: self._get_max_mem_slots,
            Request.ADD_MEM_REG: self._add_mem_reg,
            Request.REM_MEM_REG: self._rem_mem_reg,
            Request.SET_STATUS: self._set_status,
            Request.GET_STATUS: self._get_status,
        }
        # How many fds each request must carry (others carry none); kick/call/err vary.
        self._fd_count: dict[int, int] = {
            Request.SET_BACKEND_REQ_FD: 1,
            Request.ADD_MEM_REG: 1,
        }

    # -- entry point ------------------------------------------------------------------

    def handle(self, msg: Message) -> bytes | None:
        """Carry out one request; return the reply to send, if any.  Never raises."""
        name = msg.name
        self.handled[name] += 1
        handler = self._handlers.get(msg.request)
        if msg.is_reply or handler is None:
            for fd in msg.fds:
                _close_quietly(fd)
            if msg.is_reply:
                return self._fail(msg, "a reply sent as a request", "bad_flags")
            return self._fail(msg, "request not supported", "unsupported")
        self._kept = set()
        try:
            self._check_fds(msg)
            body = handler(msg)
        except (PayloadError, RequestFailed, BadAddress, ValueError) as e:
            return self._fail(msg, str(e), "bad_request")
        except Exception as e:  # a bug in a device callback must not kill the connection
            log.exception("%s: internal error", name)
            return self._fail(msg, f"internal error: {e}", "internal")
        finally:
            # Every fd that came with the message is ours to close unless a handler kept it.
            for fd in msg.fds:
                if fd not in self._kept:
                    _close_quietly(fd)
        if body is not None:
            return codec.encode(msg.request, body, reply=True)
        return self._ack(msg, 0)

    def _check_fds(self, msg: Message) -> None:
        want = self._fd_count.get(msg.request)
        if msg.request == Request.SET_MEM_TABLE:
            return  # checked against the region count by the handler
        if msg.request in (Request.SET_VRING_KICK, Request.SET_VRING_CALL, Request.SET_VRING_ERR):
            want = 0 if codec.parse_vring_file(msg).no_fd else 1
        elif msg.request == Request.REM_MEM_REG:
            if len(msg.fds) > 1:
                raise PayloadError(f"{msg.name}: {len(msg.fds)} fds, expected at most 1")
            return
        if want is None:
            want = 0
        if len(msg.fds) != want:
            raise PayloadError(f"{msg.name}: {len(msg.fds)} fds, expected {want}")

    def _ack(self, msg: Message, status: int) -> bytes | None:
        if msg.need_reply and self.protocol_features & (1 << ProtocolFeature.REPLY_ACK):
            return codec.encode(msg.request, codec.encode_u64(status), reply=True)
        return None

    def _keep(self, fd: int) -> int:
        """Take ownership of a received fd (it will not be closed after the request)."""
        self._kept.add(fd)
        return fd

    def _fail(self, msg: Message, why: str, kind: str) -> bytes | None:
        self.errors[kind] += 1
        log.error("vhost-user %s (flags 0x%x, %d bytes, %d fds): %s",
                  msg.name, msg.flags, len(msg.payload), len(msg.fds), why)
        if msg.request in _REPLY_BODY:
            # The front-end waits for a body; answer so it does not hang, in the form
            # the spec gives for failure where it gives one (GET_CONFIG: empty).
            body = b"" if msg.request == Request.GET_CONFIG else codec.encode_u64(0)
            if msg.request == Request.GET_VRING_BASE:
                body = codec.encode_vring_state(0, 0)
            return codec.encode(msg.request, body, reply=True)
        return self._ack(msg, 1)

    # -- features and ownership ----------------------------------------------------------

    def offered_features(self) -> int:
        return self.device.features() | (1 << VHOST_USER_F_PROTOCOL_FEATURES)

    def _get_features(self, msg: Message) -> bytes:
        return codec.encode_u64(self.offered_features())

    def _set_features(self, msg: Message) -> None:
        features = codec.parse_u64(msg)
        extra = features & ~self.offered_features()
        if extra:
            raise RequestFailed(f"features 0x{extra:x} were never offered")
        self.acked_features = features
        if features & (1 << VHOST_USER_F_PROTOCOL_FEATURES):
            self.protocol_negotiated = True
        for q in self.queues:
            q.event_idx = bool(features & (1 << VIRTIO_RING_F_EVENT_IDX))
            q.indirect = bool(features & (1 << VIRTIO_RING_F_INDIRECT_DESC))
        self.device.features_acked(features & ~(1 << VHOST_USER_F_PROTOCOL_FEATURES))

    def _get_protocol_features(self, msg: Message) -> bytes:
        return codec.encode_u64(self.offered_protocol_features)

    def _set_protocol_features(self, msg: Message) -> None:
        features = codec.parse_u64(msg)
        extra = features & ~self.offered_protocol_features
        if extra:
            raise RequestFailed(f"protocol features 0x{extra:x} were never offered")
        self.protocol_features = features
        self.protocol_negotiated = True

    def _set_owner(self, msg: Message) -> None:
        self.owner = True

    def _reset_owner(self, msg: Message) -> None:
        self._reset_rings()
        self.device.reset()
        self.owner = False

    def _reset_device(self, msg: Message) -> None:
        self._reset_rings()
        self.acked_features = 0
        self.status = 0
        self.device.reset()

    def _get_queue_num(self, msg: Message) -> bytes:
        return codec.encode_u64(len(self.queues))

    def _get_max_mem_slots(self, msg: Message) -> bytes:
        return codec.encode_u64(self.memory.max_regions)

    def _set_status(self, msg: Message) -> None:
        status = codec.parse_u64(msg)
        if status > 0xFF:
            raise RequestFailed(f"status 0x{status:x} has bits beyond the status byte")
        was = self.status
        self.status = status
        self.device.status_changed(status)
        if status & STATUS_DRIVER_OK and not was & STATUS_DRIVER_OK:
            for q in self.queues:
                if q.ready:
                    self._safe(self.device.queue_started, q)

    def _get_status(self, msg: Message) -> bytes:
        return codec.encode_u64(self.status)

    def _set_backend_req_fd(self, msg: Message) -> None:
        _close_quietly(self.backend_req_fd)
        self.backend_req_fd = self._keep(msg.fds[0])

    def _get_config(self, msg: Message) -> bytes:
        access = codec.parse_config(msg)
        cfg = self.device.config()
        window = cfg[access.offset : access.offset + access.size]
        window += bytes(access.size - len(window))
        return codec.encode_config(access.offset, window, access.flags)

    def _set_config(self, msg: Message) -> None:
        access = codec.parse_config(msg)
        self.device.set_config(access.offset, access.data)

    # -- memory ---------------------------------------------------------------------------

    def _set_mem_table(self, msg: Message) -> None:
        regions = codec.parse_mem_table(msg)
        if len(msg.fds) != len(regions):
            raise PayloadError(f"{msg.name}: {len(regions)} regions, {len(msg.fds)} fds")
        self.memory.set_table(regions, list(msg.fds))
        self._remap_queues()

    def _add_mem_reg(self, msg: Message) -> None:
        self.memory.add(codec.parse_single_region(msg), msg.fds[0])
        self._remap_queues()

    def _rem_mem_reg(self, msg: Message) -> None:
        # An fd may come along; it carries no meaning here and is closed with the rest.
        self.memory.remove(codec.parse_single_region(msg))
        self._remap_queues()

    def _remap_queues(self) -> None:
        """Ring views point into the old mappings; translate them again."""
        for q in self.queues:
            if not q.started:
                q.unmap()
                continue
            try:
                q.map(self.memory)
            except (BadAddress, ValueError) as e:
                self.errors["ring_unmapped"] += 1
                log.error("queue %d: rings no longer in guest memory: %s", q.index, e)
                self._stop(q)

    # -- rings ----------------------------------------------------------------------------

    def _queue(self, index: int) -> SplitQueue:
        if not 0 <= index < len(self.queues):
            raise RequestFailed(f"queue index {index} out of range (0..{len(self.queues) - 1})")
        return self.queues[index]

    def _set_vring_num(self, msg: Message) -> None:
        st = codec.parse_vring_state(msg)
        self._queue(st.index).set_size(st.num)

    def _set_vring_addr(self, msg: Message) -> None:
        addr = codec.parse_vring_addr(msg)
        q = self._queue(addr.index)
        q.set_addresses(addr.desc, addr.avail, addr.used)
        if q.started:
            try:
                q.map(self.memory)
            except BadAddress as e:
                self._stop(q)
                raise RequestFailed(str(e)) from e

    def _set_vring_base(self, msg: Message) -> None:
        st = codec.parse_vring_state(msg)
        q = self._queue(st.index)
        if st.num > 0xFFFF:
            raise RequestFailed(f"vring base {st.num} does not fit a 16-bit index")
        q.set_base(st.num)

    def _get_vring_base(self, msg: Message) -> bytes:
        st = codec.parse_vring_state(msg)
        q = self._queue(st.index)
        self._stop(q)
        # The kick fd goes with the stopped ring; the next start brings a new one.
        _close_quietly(q.kick_fd)
        q.kick_fd = None
        return codec.encode_vring_state(st.index, q.last_avail_idx)

    def _set_vring_kick(self, msg: Message) -> None:
        vf = codec.parse_vring_file(msg)
        q = self._queue(vf.index)
        self._unwatch(q)
        _close_quietly(q.kick_fd)
        q.kick_fd = None if vf.no_fd else self._keep(msg.fds[0])
        self._start(q)

    def _set_vring_call(self, msg: Message) -> None:
        vf = codec.parse_vring_file(msg)
        q = self._queue(vf.index)
        _close_quietly(q.call_fd)
        q.call_fd = None if vf.no_fd else self._keep(msg.fds[0])

    def _set_vring_err(self, msg: Message) -> None:
        vf = codec.parse_vring_file(msg)
        q = self._queue(vf.index)
        _close_quietly(q.err_fd)
        q.err_fd = None if vf.no_fd else self._keep(msg.fds[0])

    def _set_vring_enable(self, msg: Message) -> None:
        st = codec.parse_vring_state(msg)
        q = self._queue(st.index)
        if st.num not in (0, 1):
            raise RequestFailed(f"SET_VRING_ENABLE with {st.num}")
        was_ready = q.ready
        q.enabled = bool(st.num)
        if was_ready and not q.ready:
            self.device.queue_stopped(q)
        elif q.ready and not was_ready:
            self._safe(self.device.queue_started, q)

    def _start(self, q: SplitQueue) -> None:
        """SET_VRING_KICK: the ring starts (disabled if protocol features were negotiated)."""
        if not q.size or not q.addr_set:
            raise RequestFailed(f"queue {q.index} kicked before its size and addresses were set")
        q.map(self.memory)
        was_ready = q.ready
        q.started = True
        q.broken = None
        if not self.protocol_negotiated:
            q.enabled = True
        self._watch(q)
        if q.ready and not was_ready:
            self._safe(self.device.queue_started, q)

    def _stop(self, q: SplitQueue) -> None:
        """Stop a ring (GET_VRING_BASE); the device hears of it even if it was disabled."""
        was_started = q.started
        q.started = False
        self._unwatch(q)
        if was_started:
            self._safe(self.device.queue_stopped, q)

    def _watch(self, q: SplitQueue) -> None:
        if q.kick_fd is not None:
            self.loop.add_reader(q.kick_fd, self._on_kick, q)
            self._watched[q.index] = q.kick_fd
        else:
            log.info("queue %d has no kick fd; polling every %.0f ms", q.index,
                     POLL_INTERVAL * 1000)
            self._pollers[q.index] = self.loop.call_later(POLL_INTERVAL, self._poll, q)

    def _unwatch(self, q: SplitQueue) -> None:
        fd = self._watched.pop(q.index, None)
        if fd is not None:
            self.loop.remove_reader(fd)
        poller = self._pollers.pop(q.index, None)
        if poller is not None:
            poller.cancel()

    def _poll(self, q: SplitQueue) -> None:
        if q.index in self._pollers:
            self._pollers[q.index] = self.loop.call_later(POLL_INTERVAL, self._poll, q)
            if q.has_available():
                self._deliver_kick(q)

    def _on_kick(self, q: SplitQueue) -> None:
        fd = q.kick_fd
        if fd is None:
            return
        try:
            os.eventfd_read(fd)
        except BlockingIOError:
            return
        except OSError as e:
            self.errors["kick_fd"] += 1
            log.error("queue %d: kick eventfd read failed: %s", q.index, e)
            self._unwatch(q)
            return
        q.stats.kicks += 1
        if q.ready:
            self._deliver_kick(q)

    def _deliver_kick(self, q: SplitQueue) -> None:
        self._safe(self.device.kicked, q)

    def _safe(self, fn: Callable[[SplitQueue], None], q: SplitQueue) -> None:
        """Call into the device; a broken ring or a device bug is logged and counted."""
        try:
            fn(q)
        except QueueBroken:
            self.errors["queue_broken"] += 1
            self._signal_error(q)
        except Exception:
            self.errors["device"] += 1
            log.exception("device callback %s on queue %d failed", fn.__name__, q.index)

    def _signal_error(self, q: SplitQueue) -> None:
        if q.err_fd is not None:
            try:
                os.eventfd_write(q.err_fd, 1)
            except OSError:
                pass

    def _reset_rings(self) -> None:
        for q in self.queues:
            if q.started:
                q.started = False
                self._safe(self.device.queue_stopped, q)
            self._unwatch(q)
            q.reset()

    # -- teardown -------------------------------------------------------------------------

    def disconnect(self) -> None:
        """The front-end went away: drop rings, memory and fds, reset the device."""
        self._reset_rings()
        try:
            self.device.reset()
        except Exception:
            self.errors["device"] += 1
            log.exception("device reset failed")
        self.memory.clear()
        _close_quietly(self.backend_req_fd)
        self.backend_req_fd = None

    def counters(self) -> dict[str, int]:
        out = {f"errors.{k}": v for k, v in self.errors.items()}
        for q in self.queues:
            s = q.stats
            for key in ("popped", "pushed", "bad_chains", "notifies", "kicks"):
                out[f"q{q.index}.{key}"] = getattr(s, key)
        return out


def _close_quietly(fd: int | None) -> None:
    if fd is None:
        return
    try:
        os.close(fd)
    except OSError:
        pass
