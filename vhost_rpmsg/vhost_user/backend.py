"""Device-agnostic vhost-user back-end state machine.

:class:`VhostUserBackend` takes decoded :class:`~.codec.Message` objects and returns
the bytes to send back (if any).  It owns guest memory and the rings (:class:`~.vring.Vring`),
moves the rings between their states (:mod:`.ring_state`) and calls the device.  It
is the protocol edge: front-end regions become :class:`~vhost_rpmsg.virtio.memory.RegionSpec`
and ring front-end virtual addresses guest-physical ones before anything below sees
them.  It does no socket I/O: the server feeds it, and the event loop it is given only
watches kick eventfds.

Spec rules are quoted where they are enforced ("the spec" is QEMU's
docs/interop/vhost-user.rst).
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from collections.abc import Callable
from typing import Any

from ..virtio.constants import VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC
from ..virtio.engines import QueueFactory
from ..virtio.memory import BadAddress, GuestMemory, RegionSpec
from ..virtio.queue import QueueBroken, QueueState, check_ring_alignment, ring_sizes
from ..virtio.queue_python import PythonQueue
from . import codec
from .addresses import FrontEndAddresses
from .codec import MemoryRegion, Message, PayloadError
from .device import EventLoop, VirtioDevice
from .protocol import (
    IMPLEMENTED_PROTOCOL_FEATURES,
    MAX_MEM_SLOTS,
    REPLY_BODY,
    VHOST_USER_F_PROTOCOL_FEATURES,
    ProtocolFeature,
    Request,
)
from .ring_state import Change, Event
from .vring import Vring, close_quietly

log = logging.getLogger(__name__)

POLL_INTERVAL = 0.005  # seconds between ring polls for a queue without a kick fd


class RequestFailed(Exception):
    """A request was understood but cannot be carried out; the front-end hears a failure."""


class VhostUserBackend:
    """One front-end connection's worth of back-end state, for one device."""

    def __init__(
        self,
        device: VirtioDevice,
        loop: EventLoop,
        *,
        protocol_features: int | None = None,
        queue_factory: QueueFactory = PythonQueue,
        allow_unsealed_memory: bool = False,
    ) -> None:
        self.device = device
        self.loop = loop
        if protocol_features is None:
            protocol_features = device.protocol_features()
        self.offered_protocol_features = protocol_features & IMPLEMENTED_PROTOCOL_FEATURES
        self.memory = GuestMemory(MAX_MEM_SLOTS, allow_unsealed=allow_unsealed_memory)
        self.addresses = FrontEndAddresses()
        self.vrings = [Vring(queue_factory(QueueState(i, device.max_queue_size)),
                             self._ring_changed) for i in range(device.num_queues)]
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
        device.attach(self.vrings, loop)
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
            # vhost-user.rst, SET_BACKEND_REQ_FD: "It is passed in the ancillary data."
            Request.SET_BACKEND_REQ_FD: 1,
            # vhost-user.rst, ADD_MEM_REG: "Exactly one file descriptor from which the memory"
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
                close_quietly(fd)
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
                    close_quietly(fd)
        if body is not None:
            # "unless the message already has an explicit reply body" (vhost-user.rst, REPLY_ACK)
            return codec.encode(msg.request, body, reply=True)
        return self._ack(msg, 0)

    def _check_fds(self, msg: Message) -> None:
        want = self._fd_count.get(msg.request)
        if msg.request == Request.SET_MEM_TABLE:
            return  # checked against the region count by the handler
        if msg.request in (Request.SET_VRING_KICK, Request.SET_VRING_CALL, Request.SET_VRING_ERR):
            # "This flag is set when there is no file descriptor" (vhost-user.rst, SET_VRING_KICK)
            want = 0 if codec.parse_vring_file(msg).no_fd else 1
        elif msg.request == Request.REM_MEM_REG:
            # "the back-end MAY accept messages with one file descriptor" (vhost-user.rst,
            # REM_MEM_REG); "the back-end MUST close it without using it": handle() does.
            if len(msg.fds) > 1:
                raise PayloadError(f"{msg.name}: {len(msg.fds)} fds, expected at most 1")
            return
        if want is None:
            want = 0
        if len(msg.fds) != want:
            raise PayloadError(f"{msg.name}: {len(msg.fds)} fds, expected {want}")

    def _ack(self, msg: Message, status: int) -> bytes | None:
        # "the back-end MUST respond with a Payload VhostUserMsg" (vhost-user.rst, REPLY_ACK)
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
        if msg.request in REPLY_BODY:
            # The front-end waits for a body; answer so it does not hang, in the form
            # the spec gives for failure where it gives one (GET_CONFIG: empty).
            # "back-end uses zero length of payload to indicate an error" (GET_CONFIG)
            body = b"" if msg.request == Request.GET_CONFIG else codec.encode_u64(0)
            if msg.request == Request.GET_VRING_BASE:
                body = codec.encode_vring_state(0, 0)
            return codec.encode(msg.request, body, reply=True)
        # "The payload should be set to zero on success or non-zero on failure" (REPLY_ACK)
        return self._ack(msg, 1)

    # -- features and ownership ----------------------------------------------------------

    def offered_features(self) -> int:
        return self.device.features() | (1 << VHOST_USER_F_PROTOCOL_FEATURES)

    def _get_features(self, msg: Message) -> bytes:
        return codec.encode_u64(self.offered_features())

    def _set_features(self, msg: Message) -> None:
        features = codec.parse_u64(msg)
        extra = features & ~self.offered_features()
        # virtio 1.2 §2.2.1: "The driver MUST NOT accept a feature which the device did not offer"
        if extra:
            raise RequestFailed(f"features 0x{extra:x} were never offered")
        self.acked_features = features
        if features & (1 << VHOST_USER_F_PROTOCOL_FEATURES):
            self.protocol_negotiated = True
        for vr in self.vrings:
            vr.queue.state.event_idx = bool(features & (1 << VIRTIO_RING_F_EVENT_IDX))
            vr.queue.state.indirect = bool(features & (1 << VIRTIO_RING_F_INDIRECT_DESC))
        self.device.features_acked(features & ~(1 << VHOST_USER_F_PROTOCOL_FEATURES))
        if not features & (1 << VHOST_USER_F_PROTOCOL_FEATURES):
            # "the back-end must enable all rings immediately" (vhost-user.rst, Ring states)
            for vr in self.vrings:
                vr.apply(Event.ENABLE, protocol_features=self.protocol_negotiated)

    def _get_protocol_features(self, msg: Message) -> bytes:
        # GET_PROTOCOL_FEATURES: "must support this message even before VHOST_USER_SET_FEATURES"
        return codec.encode_u64(self.offered_protocol_features)

    def _set_protocol_features(self, msg: Message) -> None:
        features = codec.parse_u64(msg)
        extra = features & ~self.offered_protocol_features
        # "Any protocol extensions are gated by protocol feature bits" (Communication)
        if extra:
            raise RequestFailed(f"protocol features 0x{extra:x} were never offered")
        self.protocol_features = features
        self.protocol_negotiated = True

    def _set_owner(self, msg: Message) -> None:
        self.owner = True

    def _reset_owner(self, msg: Message) -> None:
        # Deprecated: "back-ends either ignore this message, or use it to disable all rings";
        # older QEMUs send it instead of RESET_DEVICE, so it resets like RESET_DEVICE.
        self._reset_rings()
        self.device.reset()
        self.owner = False

    def _reset_device(self, msg: Message) -> None:
        # "The back-end retains ownership of the device throughout the reset operation."
        self._reset_rings()
        self.acked_features = 0
        self.status = 0
        self.device.reset()

    def _get_queue_num(self, msg: Message) -> bytes:
        return codec.encode_u64(len(self.vrings))

    def _get_max_mem_slots(self, msg: Message) -> bytes:
        return codec.encode_u64(self.memory.max_regions)

    def _set_status(self, msg: Message) -> None:
        status = codec.parse_u64(msg)
        # "device status as defined in the Virtio specification" (SET_STATUS): virtio 1.2
        # §2.1 defines bits up to FAILED (128)
        if status > 0xFF:
            raise RequestFailed(f"status 0x{status:x} has bits beyond the status byte")
        self.status = status
        self.device.status_changed(status)

    def _get_status(self, msg: Message) -> bytes:
        return codec.encode_u64(self.status)

    def _set_backend_req_fd(self, msg: Message) -> None:
        close_quietly(self.backend_req_fd)
        self.backend_req_fd = self._keep(msg.fds[0])

    def _get_config(self, msg: Message) -> bytes:
        access = codec.parse_config(msg)
        cfg = self.device.config()
        window = cfg[access.offset : access.offset + access.size]
        # "back-end's payload size MUST match the front-end's request" (GET_CONFIG)
        window += bytes(access.size - len(window))
        return codec.encode_config(access.offset, window, access.flags)

    def _set_config(self, msg: Message) -> None:
        access = codec.parse_config(msg)
        # "back-ends MUST NOT accept SET_CONFIG for read-only configuration space fields
        # unless the live migration bit is set" (SET_CONFIG): left to the device, whose
        # default refuses every write; access.flags is not looked at.
        self.device.set_config(access.offset, access.data)

    # -- memory ---------------------------------------------------------------------------

    def _set_mem_table(self, msg: Message) -> None:
        regions = codec.parse_mem_table(msg)
        # "The size and ordering of the fds matches the number and ordering of memory regions."
        if len(msg.fds) != len(regions):
            raise PayloadError(f"{msg.name}: {len(regions)} regions, {len(msg.fds)} fds")
        self.memory.set_table([_spec(r, fd) for r, fd in zip(regions, msg.fds, strict=True)])
        self.addresses.set_table(regions)
        self._remap_rings()

    def _add_mem_reg(self, msg: Message) -> None:
        region = codec.parse_single_region(msg)
        self.memory.add(_spec(region, msg.fds[0]))
        self.addresses.add(region)
        self._remap_rings()

    def _rem_mem_reg(self, msg: Message) -> None:
        # An fd may come along; it carries no meaning here and is closed with the rest.
        region = codec.parse_single_region(msg)
        # "identified by its guest address, user address and size. The mmap offset is ignored."
        self.addresses.check_remove(region)
        self.memory.remove(region.guest_phys_addr, region.memory_size)
        self.addresses.remove(region)
        self._remap_rings()

    def _remap_rings(self) -> None:
        """Ring views point into the old mappings; translate them again."""
        for vr in self.vrings:
            if not vr.ring.started:
                vr.queue.state.unmap()
                continue
            try:
                self._map(vr)
            except (BadAddress, ValueError, RequestFailed) as e:
                self.errors["ring_unmapped"] += 1
                log.error("queue %d: rings no longer in guest memory: %s", vr.index, e)
                self._stop(vr)

    # -- rings ----------------------------------------------------------------------------

    def _vring(self, index: int) -> Vring:
        if not 0 <= index < len(self.vrings):
            raise RequestFailed(f"queue index {index} out of range (0..{len(self.vrings) - 1})")
        return self.vrings[index]

    def _set_vring_num(self, msg: Message) -> None:
        st = codec.parse_vring_state(msg)
        # "Set the size of the queue." (SET_VRING_NUM): checked against virtio 1.2 §2.7
        self._stopped(self._vring(st.index), msg).queue.state.set_size(st.num)

    @staticmethod
    def _stopped(vr: Vring, msg: Message) -> Vring:
        """``vr``, if it is stopped: its size and base only change between uses (the rings
        are mapped, and indices advanced, for the ones it was started with)."""
        if vr.ring.started:
            raise RequestFailed(f"{msg.name} on queue {vr.index} while it is started "
                                "(stop it with GET_VRING_BASE first)")
        return vr

    def _set_vring_addr(self, msg: Message) -> None:
        addr = codec.parse_vring_addr(msg)
        vr = self._vring(addr.index)
        # Front-end virtual addresses, kept as such until the ring is mapped.
        # "Otherwise it is a user address." (A vring address description; IOMMU_PLATFORM is
        # never offered).  Alignment is checked here and again on the guest-physical ones.
        check_ring_alignment(addr.desc, addr.avail, addr.used)
        self.addresses.set_ring(addr.index, (addr.desc, addr.avail, addr.used))
        if vr.ring.started:
            try:
                self._map(vr)
            except BadAddress as e:
                self._stop(vr)
                raise RequestFailed(str(e)) from e

    def _map(self, vr: Vring) -> None:
        """Translate the ring's front-end addresses to guest-physical ones and map it."""
        q = vr.queue.state
        va = self.addresses.ring(vr.index)
        if va is None or not q.size:
            raise RequestFailed(f"queue {vr.index} kicked before its size and addresses were set")
        # "User addresses map to the vhost memory region containing that user address."
        desc, avail, used = (self.addresses.to_gpa(a, length)
                             for a, length in zip(va, ring_sizes(q.size), strict=True))
        q.set_addresses(desc, avail, used)
        q.map(self.memory)

    def _set_vring_base(self, msg: Message) -> None:
        st = codec.parse_vring_state(msg)
        vr = self._vring(st.index)
        # "32-bit value, of which currently only the lower 16 bits are used" (A vring
        # descriptor index for split virtqueues)
        if st.num > 0xFFFF:
            raise RequestFailed(f"vring base {st.num} does not fit a 16-bit index")
        self._stopped(vr, msg).queue.state.set_base(st.num)

    def _get_vring_base(self, msg: Message) -> bytes:
        st = codec.parse_vring_state(msg)
        vr = self._vring(st.index)
        # "stop a ring upon receiving VHOST_USER_GET_VRING_BASE" (Ring states)
        self._stop(vr)
        # The kick fd goes with the stopped ring; the next start brings a new one.
        vr.set_kick(None)
        return codec.encode_vring_state(st.index, vr.queue.state.last_avail_idx)

    def _set_vring_kick(self, msg: Message) -> None:
        vf = codec.parse_vring_file(msg)
        vr = self._vring(vf.index)
        # no fd: "This signals that polling should be used instead of waiting for the kick."
        fd = None if vf.no_fd else self._eventfd(msg)
        self._unwatch(vr)
        vr.set_kick(fd)
        self._start(vr)

    def _set_vring_call(self, msg: Message) -> None:
        vf = codec.parse_vring_file(msg)
        vr = self._vring(vf.index)
        vr.set_call(None if vf.no_fd else self._eventfd(msg))

    def _set_vring_err(self, msg: Message) -> None:
        vf = codec.parse_vring_file(msg)
        vr = self._vring(vf.index)
        vr.set_err(None if vf.no_fd else self._eventfd(msg))

    def _eventfd(self, msg: Message) -> int:
        """The message's fd, kept, if it is an eventfd; made non-blocking, so that no
        read or write of it can ever block the loop (a peer may share it blocking)."""
        fd = msg.fds[0]
        try:
            kind = os.readlink(f"/proc/self/fd/{fd}")
        except OSError as e:
            raise RequestFailed(f"{msg.name}: cannot inspect the fd: {e}") from e
        if kind != "anon_inode:[eventfd]":
            raise RequestFailed(f"{msg.name}: the fd is not an eventfd ({kind})")
        os.set_blocking(fd, False)
        return self._keep(fd)

    def _set_vring_enable(self, msg: Message) -> None:
        st = codec.parse_vring_state(msg)
        vr = self._vring(st.index)
        # "This request should be sent only when VHOST_USER_F_PROTOCOL_FEATURES has
        # been negotiated." (SET_VRING_ENABLE)
        if not self.protocol_negotiated:
            raise RequestFailed("SET_VRING_ENABLE without VHOST_USER_F_PROTOCOL_FEATURES "
                                "negotiated")
        if st.num not in (0, 1):
            raise RequestFailed(f"SET_VRING_ENABLE with {st.num}")
        vr.apply(Event.ENABLE if st.num else Event.DISABLE,
                 protocol_features=self.protocol_negotiated)

    def _start(self, vr: Vring) -> None:
        """SET_VRING_KICK: the ring starts (disabled if protocol features were negotiated).

        "The back-end must start a ring upon receiving a kick (that is, detecting that file
        descriptor is readable) on the descriptor specified by VHOST_USER_SET_VRING_KICK"
        (Ring states): we start it on the message itself, as the front-end has finished
        setting it up by then.
        """
        self._map(vr)
        self._watch(vr)
        vr.apply(Event.START, protocol_features=self.protocol_negotiated)

    def _stop(self, vr: Vring) -> None:
        """Stop a ring; the device hears of it even if it was disabled."""
        self._unwatch(vr)
        vr.apply(Event.STOP, protocol_features=self.protocol_negotiated)

    def _ring_changed(self, vr: Vring, change: Change) -> None:
        """A ring's state changed: the device hears it exactly once."""
        if change is Change.READY:
            self._safe(self.device.queue_started, vr)
        else:
            self._safe(self.device.queue_stopped, vr)

    def _watch(self, vr: Vring) -> None:
        if vr.kick_fd is not None:
            self.loop.add_reader(vr.kick_fd, self._on_kick, vr)
            self._watched[vr.index] = vr.kick_fd
        else:
            log.info("queue %d has no kick fd; polling every %.0f ms", vr.index,
                     POLL_INTERVAL * 1000)
            self._pollers[vr.index] = self.loop.call_later(POLL_INTERVAL, self._poll, vr)

    def _unwatch(self, vr: Vring) -> None:
        fd = self._watched.pop(vr.index, None)
        if fd is not None:
            self.loop.remove_reader(fd)
        poller = self._pollers.pop(vr.index, None)
        if poller is not None:
            poller.cancel()

    def _poll(self, vr: Vring) -> None:
        if vr.index in self._pollers:
            self._pollers[vr.index] = self.loop.call_later(POLL_INTERVAL, self._poll, vr)
            if vr.ready and vr.queue.has_available():
                self._safe(self.device.kicked, vr)

    def _on_kick(self, vr: Vring) -> None:
        fd = vr.kick_fd
        if fd is None:
            return
        try:
            os.eventfd_read(fd)
        except BlockingIOError:
            return
        except OSError as e:
            self.errors["kick_fd"] += 1
            log.error("queue %d: kick eventfd read failed: %s", vr.index, e)
            self._unwatch(vr)
            return
        vr.queue.state.stats.kicks += 1
        # "While a ring is stopped, the back-end must not process the ring at all" (Ring
        # states); a disabled one is not handed to the device either.
        if vr.ready:
            self._safe(self.device.kicked, vr)

    def _safe(self, fn: Callable[[Vring], None], vr: Vring) -> None:
        """Call into the device; a broken ring or a device bug is logged and counted."""
        try:
            fn(vr)
        except QueueBroken as e:
            self.errors["queue_broken"] += 1
            vr.break_(str(e))  # nothing more if the device already did
        except Exception:
            self.errors["device"] += 1
            log.exception("device callback %s on queue %d failed", fn.__name__, vr.index)

    def _reset_rings(self) -> None:
        for vr in self.vrings:
            self._unwatch(vr)
            vr.reset()
        self.addresses.clear_rings()

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
        self.addresses.clear()
        close_quietly(self.backend_req_fd)
        self.backend_req_fd = None

    def counters(self) -> dict[str, int]:
        out = {f"errors.{k}": v for k, v in self.errors.items()}
        for vr in self.vrings:
            s = vr.queue.state.stats
            for key in ("popped", "pushed", "bad_chains", "notifies", "notify_failures",
                        "kicks"):
                out[f"q{vr.index}.{key}"] = getattr(s, key)
        return out


def _spec(region: MemoryRegion, fd: int) -> RegionSpec:
    """A wire region as guest memory sees it: no front-end address."""
    if region.userspace_addr + region.memory_size > 1 << 64:
        raise BadAddress("region wraps the 64-bit address space")
    return RegionSpec(region.guest_phys_addr, region.memory_size, region.mmap_offset, fd)
