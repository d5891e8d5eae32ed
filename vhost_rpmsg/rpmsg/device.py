"""The RPMsg device: what travels on the two virtqueues of a virtio-rpmsg device.

It plugs into the generic vhost-user backend as a :class:`VirtioDevice` and is the glue
of three parts with one job each: :mod:`.sessions` (guest sessions and the name
service), :mod:`.dispatch` (host endpoints and delivery to them) and :mod:`.outbox`
(host messages waiting for rx buffers).  Queue 1 (to_host, the kernel API's REQUEST
queue) carries guest messages to host endpoints; queue 0 (to_guest, RESPONSE) carries
host messages and name-service announcements to the guest.  Flow control: host
messages wait in the bounded outbox while the guest has no rx buffer, and while that
outbox is full the device stops taking guest messages, so the guest's own tx
back-pressure (it blocks for a buffer) does the rest.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable
from typing import Any

from ..endpoints.base import Endpoint
from ..vhost_user.device import VirtioDevice
from ..vhost_user.ring_state import RingState
from ..vhost_user.vring import Vring
from ..virtio.constants import (
    VIRTIO_F_VERSION_1,
    VIRTIO_ID_RPMSG,
    VIRTIO_RING_F_EVENT_IDX,
    VIRTIO_RING_F_INDIRECT_DESC,
    VIRTIO_RPMSG_F_NS,
)
from ..virtio.queue import Chain, ChainError, Located, Queue, QueueBroken, RawBatch, Taken
from . import codec as rp
from .batch import Parsed, long_why, parse, parse_located, short_why
from .dispatch import HANDLER_QUEUE_LIMIT, Dispatcher
from .errors import PayloadTooLarge, WouldBlock
from .outbox import BATCH, Outbox
from .ratelimit import RateLimitedLog
from .sessions import GuestService, NameService, ns_message

log = logging.getLogger(__name__)

#: to_host batches taken in one turn of the loop before other guests get theirs
DRAIN_BUDGET = 8

TO_GUEST = 0  # vq 0, guest rx; the kernel API's VIRTIO_RPMSG_RESPONSE
TO_HOST = 1  # vq 1, guest tx; the kernel API's VIRTIO_RPMSG_REQUEST
MAX_READ = rp.HDR_SIZE + 0xFFFF  # nothing longer can be a message (len is 16 bits)


def _call_soon(loop: Any, callback: Callable[..., Any], *args: Any) -> None:
    """Run ``callback`` in the loop's next turn.  From the loop's own thread that is a
    plain call_soon; call_soon_threadsafe also writes the loop's self-pipe (a syscall,
    and one more wake-up and turn of the loop) which only a sleeping loop needs."""
    try:
        here = asyncio.get_running_loop() is loop
    except RuntimeError:  # a thread of the API's user, which runs no loop
        here = False
    if here:
        loop.call_soon(callback, *args)
    else:
        loop.call_soon_threadsafe(callback, *args)


class _DevicePort:
    """An endpoint's :class:`~vhost_rpmsg.endpoints.base.Port`: sends from its address."""

    def __init__(self, device: RpmsgDevice, src: int, stats: Counter[str]) -> None:
        self._device = device
        self.src = src
        self._stats = stats  # the endpoint's: what it sent is counted there

    def send(self, dst: int, data: bytes) -> None:
        self._device.send_nowait(self.src, dst, data)
        self._count(1, len(data))

    def send_many(self, messages: list[tuple[int, bytes]]) -> None:
        dev = self._device
        with dev.mutex:
            nbytes = dev._queue_many(self.src, messages)
            # Counted once accepted and before the flush writes them and notifies the
            # guest: a count that lags what the guest already has would be wrong.
            stats = self._stats
            stats["to_guest"] += len(messages)
            stats["to_guest_bytes"] += nbytes
            dev.flush()

    async def asend(self, dst: int, data: bytes) -> None:
        await self._device.asend(self.src, dst, data)
        self._count(1, len(data))

    def _count(self, messages: int, nbytes: int) -> None:
        stats = self._stats
        stats["to_guest"] += messages
        stats["to_guest_bytes"] += nbytes

    @property
    def guest_ready(self) -> bool:
        return self._device.guest_ready


class RpmsgDevice(VirtioDevice):
    """A virtio-rpmsg device with host endpoints and a name service.

    It has no config space, so PROTOCOL_F_CONFIG is not offered (QEMU's generic device
    warns when a back-end offers it); GET_CONFIG is still answered.
    """

    num_queues = 2
    max_queue_size = 1024
    device_id = VIRTIO_ID_RPMSG

    def __init__(self, endpoints: Iterable[Endpoint] = (), *, outbox_limit: int = 256,
                 handler_queue_limit: int = HANDLER_QUEUE_LIMIT,
                 name_service: bool = True, auto_dispatch: bool = True) -> None:
        super().__init__()
        #: False: guest messages stay in the ring until read through the iterator API
        self.auto_dispatch = auto_dispatch
        self.name_service = name_service
        self.stats: Counter[str] = Counter()
        #: held while the outbox or a session changes; waited on for rx buffers and room
        #: (``wait``).  ``with device.mutex`` takes the same lock for less (a C-level
        #: context manager) on the paths that run per message.
        self.mutex = threading.RLock()
        self.lock = threading.Condition(self.mutex)
        self._waiters = 0
        self._rl = RateLimitedLog(log)
        self.ns = NameService(self.stats, self._rl)
        self.dispatcher = Dispatcher(self.stats, self._rl, queue_limit=handler_queue_limit)
        self.outbox = Outbox(outbox_limit, self.stats, self._rl)
        self._room: asyncio.Event | None = None
        self._flush_pending = False
        self._drain_pending = False
        #: a handler of a single message is running: its sends are flushed when it returns
        self._dispatching = False
        for ep in endpoints:
            self.add_endpoint(ep)

    # -- what the rest of the program reads -------------------------------------------

    @property
    def outbox_limit(self) -> int:
        return self.outbox.limit

    @property
    def queued(self) -> int:
        return len(self.outbox)

    @property
    def guest_ready(self) -> bool:
        return self.ns.ready

    @property
    def endpoints(self) -> dict[int, Endpoint]:
        """A new dict of every endpoint by address: for listing, not for lookups."""
        return self.dispatcher.endpoints

    def endpoint_at(self, addr: int) -> Endpoint | None:
        """The endpoint at ``addr``, if any, without building :attr:`endpoints`."""
        slot = self.dispatcher.slots.get(addr)
        return None if slot is None else slot.endpoint

    @property
    def services(self) -> dict[int, str]:
        return self.ns.services

    @property
    def guest_services(self) -> dict[str, GuestService]:
        return self.ns.guest_services

    @property
    def guest_ns_listeners(self) -> list[Callable[[rp.NsMessage], None]]:
        return self.ns.listeners

    @property
    def to_guest(self) -> Vring | None:
        return self.vrings[TO_GUEST] if self.vrings else None

    @property
    def to_host(self) -> Vring | None:
        return self.vrings[TO_HOST] if self.vrings else None

    # -- virtio device contract ----------------------------------------------------------

    def features(self) -> int:
        f = (1 << VIRTIO_F_VERSION_1) | (1 << VIRTIO_RING_F_EVENT_IDX) \
            | (1 << VIRTIO_RING_F_INDIRECT_DESC)
        if self.name_service:
            f |= 1 << VIRTIO_RPMSG_F_NS
        return f

    def attach(self, vrings: list[Vring], loop: Any) -> None:
        super().attach(vrings, loop)
        with self.lock:
            self.ns.ready = False

    def queue_started(self, vring: Vring) -> None:
        if vring.index == TO_GUEST:
            self._guest_session_start()
        else:
            self._guest_sent(vring)

    def queue_stopped(self, vring: Vring) -> None:
        if vring.index == TO_GUEST and vring.state is RingState.STOPPED:
            self._guest_session_end("rx ring stopped")

    def kicked(self, vring: Vring) -> None:
        if vring.index == TO_GUEST:
            self.flush()
            self.wake()  # iterator-API writers waiting for a buffer
        else:
            self._guest_sent(vring)

    def _guest_sent(self, vring: Vring) -> None:
        if self.auto_dispatch:
            self._service_to_host(vring)
        else:
            self.wake()  # readers blocked in the iterator API

    def wait(self, timeout: float | None) -> None:
        """Wait (holding ``lock``) until a ring or the outbox changes, or ``timeout``."""
        self._waiters += 1
        try:
            self.lock.wait(timeout)
        finally:
            self._waiters -= 1

    def wake(self) -> None:
        """Wake whoever is in :meth:`wait`; no Condition.notify_all (five Python calls)
        when nobody is.

        The count is read under the lock, after the change: a waiter holds the lock from
        its last look at the state until it sleeps (counted), so either it looks after
        the change or we see it counted.
        """
        with self.mutex:
            if self._waiters:
                self.lock.notify_all()

    def reset(self) -> None:
        self._guest_session_end("device reset")

    # -- guest sessions and the name service ---------------------------------------------

    def _guest_session_start(self) -> None:
        """The rx ring is usable: (re)announce every service, then flush what waits.

        A broken rx ring set up again resumes the session it had: nothing to announce.
        """
        with self.lock:
            if self.ns.ready:
                self.flush()
                return
            self.ns.ready = True
            self.stats["guest_sessions"] += 1
            if self.acked_features & (1 << VIRTIO_RPMSG_F_NS):
                announcements = self.ns.session_announcements()
                # Ahead of anything queued for this session, in registration order.
                self.outbox.put_first(announcements)
                self.stats["ns_announced"] += len(announcements)
            elif self.ns.services:
                log.warning("guest did not negotiate VIRTIO_RPMSG_F_NS; %d service(s) "
                            "not announced", len(self.ns.services))
        log.info("guest ready: %d service(s) to announce", len(self.ns.services))
        self.flush()
        self.dispatcher.call_hooks("guest_ready")

    def _guest_session_end(self, why: str) -> None:
        with self.lock:
            dropped = self.outbox.clear()
            if dropped:
                # The guest instance these were for no longer exists; say so loudly.
                self.stats["dropped_on_reset"] += dropped
                log.warning("%s: %d queued message(s) for the old guest discarded",
                            why, dropped)
            was = self.ns.end_session()
        self.wake()
        stale = self.dispatcher.discard_queued()
        if stale:
            # Their replies would reach a guest that never sent them.
            log.warning("%s: %d guest message(s) still waiting for async handlers "
                        "discarded", why, stale)
        if was:
            log.info("guest session ended: %s", why)
            self.dispatcher.call_hooks("guest_gone")

    def announce(self, name: str, addr: int, flags: rp.NsFlags = rp.NsFlags.CREATE) -> None:
        """Announce (or withdraw) a host service; queued until the guest is ready.

        Registered services are announced again to every new guest session.
        """
        with self.lock:
            msg = self.ns.record(name, addr, flags)
            if not self.ns.ready:
                return  # delivered (CREATE) with the next session start
            if not self.acked_features & (1 << VIRTIO_RPMSG_F_NS):
                return
            if flags is rp.NsFlags.DESTROY and self.outbox.discard(
                    ns_message(name, addr, rp.NsFlags.CREATE)):
                # The guest never saw it: withdraw nothing.  Endpoints opened and closed
                # while the guest does not read cannot grow the outbox this way.
                self.stats["ns_cancelled"] += 1
                return
            self.outbox.append(msg)
            self.stats["ns_announced"] += 1
        self._flush_soon()

    # -- endpoints -----------------------------------------------------------------------

    def add_endpoint(self, ep: Endpoint) -> Endpoint:
        self.dispatcher.add(ep)
        try:
            ep.bind(_DevicePort(self, ep.addr, self.dispatcher.slots[ep.addr].stats))
        except BaseException:
            self.dispatcher.remove(ep.addr)
            raise
        if ep.name:
            self.announce(ep.name, ep.addr)
        return ep

    def remove_endpoint(self, addr: int) -> None:
        ep = self.dispatcher.remove(addr)
        if addr in self.ns.services:
            self.announce(self.ns.services[addr], addr, rp.NsFlags.DESTROY)
        ep.close()

    # -- guest → host ----------------------------------------------------------------------

    def _service_to_host(self, vr: Vring) -> None:
        """Drain the to_host ring in batches: copy out, return buffers, dispatch."""
        try:
            self._drain_to_host(vr, vr.queue)
        except QueueBroken as e:  # what vr.guarding() does, without its two calls
            vr.break_(str(e))
            raise

    def _drain_to_host(self, vr: Vring, q: Queue) -> None:
        if not vr.ready:
            return
        # A guest that waits for each reply kicks for one message at a time: take it with
        # one engine call and no arrays, and go on to batches only if more are there.
        if self.outbox.room() > 0:
            one = q.take_one(MAX_READ)
            if one is not None:
                vr.notify_as(one[4])
                self._dispatch_one(one)
                if not one[5]:
                    return
        for _ in range(DRAIN_BUDGET):
            if not vr.ready:
                return
            with q.state.lock:
                # Take no more guest messages than the outbox has room for: a handler
                # answering each message once can then never overflow it.
                room = self.outbox.room()
                if room > BATCH:
                    room = BATCH
                if room <= 0:
                    self.outbox.to_host_paused = True
                    self.stats["to_host_paused"] += 1
                    return
                q.disable_kicks()
                located = None
                if self.dispatcher.zero_copy:
                    # Held until the handlers return: take half the ring at most, so the
                    # guest can fill the other half meanwhile.
                    located = q.pop_located(min(room, max(q.state.size // 2, 1)),
                                            rp.HDR_SIZE, MAX_READ)
                    rb = located.raw
                else:
                    rb = q.pop_raw_batch(room, MAX_READ)
                if not rb.count:
                    if not q.enable_kicks():
                        return
                    continue
                if located is None:  # copied out: the buffers can go back at once
                    q.push_used(rb.returnable_heads(), 0)
                    vr.notify()
                # A partial batch drained the ring: re-arm kicks now, not after one more
                # (empty) pop; True means buffers raced in and we go round again.
                drained = rb.count < room and not q.enable_kicks()
            if located is None:
                self._dispatch(self.parse(rb, q))
            else:
                self._dispatch_in_place(vr, q, located)
            if drained:
                return
        # A guest that refills its ring as fast as we drain it would keep us here for
        # ever, and every other guest of this loop would wait: take a turn of the loop
        # and come back (kicks stay off: the guest need not kick a ring we will read).
        self.stats["to_host_yields"] += 1
        if self.loop is not None and not self._drain_pending:
            self._drain_pending = True
            _call_soon(self.loop, self._resume_to_host, vr)

    def _resume_to_host(self, vr: Vring) -> None:
        self._drain_pending = False
        if vr.ready and self.auto_dispatch:
            self._drain_off_kick(vr)

    def _drain_off_kick(self, vr: Vring) -> None:
        """The drain when no kick asked for it (a yield resumed, room made by a flush):
        a ring found broken is broken and logged as on a kick, and goes no further up,
        where a loop callback, a control request or a sender is no guest's caller."""
        try:
            self._service_to_host(vr)
        except QueueBroken:
            self.stats["to_host_broken_off_kick"] += 1

    def parse(self, rb: RawBatch, q: Queue) -> Parsed:
        """Parse a raw batch from ``q``; count and log (rate-limited) what was not a message."""
        return self._counted(parse(rb, q.split_headers), rb)

    def _counted(self, parsed: Parsed, rb: RawBatch) -> Parsed:
        for i in parsed.bad_chains:
            self._bad_chain(int(rb.heads[i]), int(rb.errors[i]))
        for i, why in parsed.bad_messages:
            self._bad_message(int(rb.heads[i]), why)
        return parsed

    def _dispatch_in_place(self, vr: Vring, q: Queue, lb: Located) -> None:
        """Zero-copy receive: the handlers read the messages where the guest wrote them
        (read-only views, released when they return), and only then do the buffers go
        back to the guest.  Endpoints without ``zero_copy`` get their runs copied."""
        views: list[memoryview] = []
        try:
            # The regions as they were at the pop: nothing changes the memory table
            # between the two, all of it runs on this loop.
            mem = q.state.mem
            if mem is not None:
                views = [r.mv.toreadonly() for r in mem.regions]
            self._dispatch(self._counted(parse_located(lb, q.split_headers, views), lb.raw))
        finally:
            for v in views:
                try:
                    v.release()  # slices a handler kept stay readable: they hold the mapping
                except BufferError:  # it kept an export of the view itself: the same
                    self.stats["zero_copy_views_kept"] += 1
            if vr.ready:
                with q.state.lock:
                    q.push_used(lb.raw.returnable_heads(), 0)
                    vr.notify()

    def _bad_chain(self, head: int, error: int) -> None:
        self.stats["bad_chains"] += 1
        err = ChainError(error)
        what = err.name if err is not ChainError.OK else "device-writable buffers"
        self._rl.error("chain", "to_host: bad descriptor chain at head %d: %s", head, what)

    def _bad_message(self, head: int, why: str) -> None:
        self.stats["bad_messages"] += 1
        self._rl.error("msg", "to_host: malformed message in chain %d: %s", head, why)

    def _dispatch_one(self, taken: Taken) -> None:
        """What :meth:`parse` and :meth:`_dispatch` do, for the one message ``take_one``
        took.  Handlers meet it as a batch of one, as they would on the batch path; what
        they send goes to the guest when they return, in one pass (``_dispatching``)."""
        head, error, writable, data = taken[0], taken[1], taken[2], taken[3]
        if error or writable:
            self._bad_chain(head, error)
            return
        n = len(data)
        if n < rp.HDR_SIZE:
            self._bad_message(head, short_why(n))
            return
        src, dst, _, length, _ = rp.unpack_header(data, 0)
        if length > n - rp.HDR_SIZE:
            self._bad_message(head, long_why(length, n))
            return
        self.stats["to_host_messages"] += 1
        if dst == rp.NS_ADDR:
            self.ns.from_guest(src, data[rp.HDR_SIZE : rp.HDR_SIZE + length])
            return
        was = self._dispatching  # (a drain a flush resumed may run inside another)
        self._dispatching = True
        try:
            self.dispatcher.deliver_one(src, dst, data, length)
        finally:
            with self.mutex:
                self._dispatching = was
                queued = not was and len(self.outbox)
            if queued:  # (outside the mutex: other threads' sends need not wait for it)
                self.flush()

    def _dispatch(self, parsed: Parsed) -> None:
        """Hand each run of messages for one address to its endpoint."""
        for run in parsed.runs:
            # Counted before delivery: the handler's reply may reach the guest first.
            self.stats["to_host_messages"] += len(run.srcs)
            if run.dst == rp.NS_ADDR:
                if type(run.data) is memoryview:
                    run = run.copied()
                for src, payload in run:
                    self.ns.from_guest(src, payload)
            else:
                self.dispatcher.deliver(run)

    # -- host → guest ----------------------------------------------------------------------

    def _encode(self, src: int, dst: int, data: bytes) -> bytes:
        """The wire form of one message; refused before any ring sees it if too large."""
        if len(data) > rp.MAX_PAYLOAD:
            self._too_large(len(data))
        return rp.encode_message(src, dst, bytes(data))

    def _too_large(self, size: int) -> None:
        self.stats["refused_too_large"] += 1
        raise PayloadTooLarge(f"payload of {size} bytes exceeds the guest's "
                              f"{rp.MAX_PAYLOAD}-byte limit")

    def send_nowait(self, src: int, dst: int, data: bytes) -> None:
        """Queue a message for the guest; WouldBlock if the outbox is full.

        Messages queued during one turn of the event loop reach the ring together at its
        end (one pass, one notification); a full outbox is flushed at once to make room,
        so WouldBlock means the guest really has no free rx buffer.
        """
        msg = self._encode(src, dst, data)
        with self.mutex:
            if not self.outbox.offer(msg):
                self.flush()
                if not self.outbox.offer(msg):
                    self.stats["would_block"] += 1
                    raise WouldBlock(f"guest has no free rx buffer and {len(self.outbox)} "
                                     "messages are queued")
            if not self._flush_pending and not self._dispatching:
                self._flush_soon()  # (a handler's sends go when it returns)

    def send_many(self, src: int, messages: list[tuple[int, bytes]]) -> None:
        """Send several (dst, payload) messages from ``src``: one pass over the ring, one
        notification.  All or nothing: WouldBlock if they do not all fit the outbox."""
        with self.mutex:
            self._queue_many(src, messages)
            self.flush()

    def _queue_many(self, src: int, messages: list[tuple[int, bytes]]) -> int:
        """send_many up to its flush: all queued, or none (WouldBlock, PayloadTooLarge);
        the payload bytes queued."""
        encoded = []
        nbytes = 0
        pack = rp.pack_header
        for dst, data in messages:
            data = bytes(data)  # the same object for bytes; len() then counts bytes
            n = len(data)
            if n > rp.MAX_PAYLOAD:
                self._too_large(n)
            nbytes += n
            encoded.append(pack(src, dst, 0, n, 0) + data)
        with self.mutex:
            if len(encoded) > self.outbox.room() and (len(self.outbox) or not self.ns.ready):
                self.stats["would_block"] += 1
                raise WouldBlock(f"{len(encoded)} messages do not fit the outbox "
                                 f"({len(self.outbox)} of {self.outbox.limit} used)")
            self.outbox.extend(encoded)
        return nbytes

    def send(self, src: int, dst: int, data: bytes, timeout: float | None = None) -> None:
        """Blocking send for threads other than the device's loop."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self.lock:
            while True:
                try:
                    self.send_nowait(src, dst, data)
                    return
                except WouldBlock:
                    left = None if deadline is None else deadline - time.monotonic()
                    if left is not None and left <= 0:
                        raise
                    self.wait(left)

    async def asend(self, src: int, dst: int, data: bytes) -> None:
        """Send, waiting on the device's loop while the outbox is full."""
        while True:
            try:
                self.send_nowait(src, dst, data)
                return
            except WouldBlock:
                if self._room is None:
                    self._room = asyncio.Event()
                self._room.clear()
                await self._room.wait()

    def _flush_soon(self) -> None:
        """Flush at the end of this turn of the device's loop (once, however many sends)."""
        loop = self.loop
        if loop is None or self._flush_pending:
            return  # no loop yet: the next guest session start flushes
        self._flush_pending = True
        _call_soon(loop, self._deferred_flush)

    def _deferred_flush(self) -> None:
        self._flush_pending = False
        self.flush()

    def flush(self) -> None:
        """Move queued messages into free rx buffers, in order."""
        vr = self.to_guest
        if vr is None:
            return
        q = vr.queue
        with self.mutex:
            if not self.ns.ready or not vr.ready:
                return
            try:
                with q.state.lock:
                    wrote = 0
                    if len(self.outbox) == 1:  # a reply: no batch to build
                        wrote, notify = self.outbox.fill_one(q)
                        vr.notify_as(notify)
                    more = False
                    if not wrote:
                        wrote, more = self.outbox.fill(q)
                        vr.notify()
            except QueueBroken as e:
                # The guest's fault, not the sender's: the ring breaks (logged, err
                # eventfd signalled); what is queued waits for the ring's next setup.
                vr.break_(str(e))
                return
        if wrote:
            self.wake()
        if more:
            # As the to_host drain does: let every other peer of the loop have a turn.
            self.stats["to_guest_yields"] += 1
            self._flush_soon()
        if wrote and self._room is not None:
            self._room.set()
        if self.outbox.to_host_paused and not self.outbox.full:
            self.outbox.to_host_paused = False
            th = self.to_host
            if th is not None and th.ready:
                self._drain_off_kick(th)

    def write_rx(self, q: Queue, c: Chain, msg: bytes) -> int | None:
        """Copy ``msg`` into rx chain ``c`` of ``q``; None if the chain cannot take it."""
        return self.outbox.write(q, c, msg)

    def destroy(self) -> None:
        """Withdraw every endpoint and stop async handlers."""
        for addr in list(self.dispatcher.slots):
            self.remove_endpoint(addr)
        self.dispatcher.stop_tasks()

