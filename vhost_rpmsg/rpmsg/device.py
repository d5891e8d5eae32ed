"""The RPMsg device: what travels on the two virtqueues of a virtio-rpmsg device.

It plugs into the generic vhost-user backend as a :class:`VirtioDevice`.  Queue 1
(to_host, the kernel API's REQUEST queue) carries guest messages to host endpoints;
queue 0 (to_guest, RESPONSE) carries host messages and name-service announcements to
the guest.  Flow control: host messages wait in a bounded outbox while the guest has
no rx buffer, and while that outbox is full the device stops taking guest messages,
so the guest's own tx back-pressure (it blocks for a buffer) does the rest.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from ..endpoints.base import Endpoint, Port
from ..vhost_user.device import VirtioDevice
from ..vhost_user.protocol import (
    VIRTIO_F_VERSION_1,
    VIRTIO_RING_F_EVENT_IDX,
    VIRTIO_RING_F_INDIRECT_DESC,
)
from ..virtqueue import Chain, ChainError, RawBatch, SplitQueue
from . import codec as rp
from .batch import MessageBatch, Parsed, parse

log = logging.getLogger(__name__)

VIRTIO_ID_RPMSG = 7
VIRTIO_RPMSG_F_NS = 0
TO_GUEST = 0  # vq 0, guest rx; the kernel API's VIRTIO_RPMSG_RESPONSE
TO_HOST = 1  # vq 1, guest tx; the kernel API's VIRTIO_RPMSG_REQUEST
BATCH = 256  # at most a whole ring: per-batch costs amortise over many messages
MAX_READ = rp.HDR_SIZE + 0xFFFF  # nothing longer can be a message (len is 16 bits)


class RpmsgError(Exception):
    """Base of the errors the RPMsg API raises."""


class WouldBlock(RpmsgError, BlockingIOError):
    """The guest has no free rx buffer and the outbox is full: try again later."""


class PayloadTooLarge(RpmsgError, ValueError):
    """More than the guest's 496-byte payload limit."""


class AddressInUse(RpmsgError, ValueError):
    """Another endpoint already owns this host address."""


@dataclass(frozen=True)
class GuestService:
    """A service the guest announced to the host."""

    name: str
    addr: int


class RateLimitedLog:
    """Log a recurring error at most once a second per key, with a count of the rest."""

    def __init__(self, logger: logging.Logger, interval: float = 1.0) -> None:
        self.logger = logger
        self.interval = interval
        self._last: dict[str, float] = {}
        self._suppressed: Counter[str] = Counter()

    def error(self, key: str, msg: str, *args: object, exc_info: bool = False) -> None:
        now = time.monotonic()
        if now - self._last.get(key, -1e9) < self.interval:
            self._suppressed[key] += 1
            return
        self._last[key] = now
        n = self._suppressed.pop(key, 0)
        suffix = f" ({n} similar suppressed)" if n else ""
        self.logger.error(msg + suffix, *args, exc_info=exc_info)


def _ns_message(name: str, addr: int, flags: rp.NsFlags) -> bytes:
    """A name-service message from ``addr`` to the guest's name service."""
    return rp.encode_message(addr, rp.NS_ADDR, rp.encode_ns(rp.NsMessage(name, addr, flags)))


class RpmsgDevice(VirtioDevice):
    """A virtio-rpmsg device with host endpoints and a name service."""

    num_queues = 2
    max_queue_size = 1024
    device_id = VIRTIO_ID_RPMSG

    def __init__(self, endpoints: Iterable[Endpoint] = (), *, outbox_limit: int = 256,
                 name_service: bool = True, auto_dispatch: bool = True) -> None:
        super().__init__()
        self.outbox_limit = outbox_limit
        #: False: guest messages stay in the ring until read through the iterator API
        self.auto_dispatch = auto_dispatch
        self.name_service = name_service
        self.stats: Counter[str] = Counter()
        self.endpoints: dict[int, Endpoint] = {}
        self._styles: dict[int, str] = {}  # host addr -> handler style, fixed at registration
        self.services: dict[int, str] = {}  # host addr -> announced name (in order)
        self.guest_services: dict[str, GuestService] = {}
        self.guest_ns_listeners: list[Callable[[rp.NsMessage], None]] = []
        self.guest_ready = False
        self._outbox: deque[bytes] = deque()
        self._cond = threading.Condition(threading.RLock())
        self._room: asyncio.Event | None = None
        self._to_host_paused = False
        self._flush_pending = False
        self._native_parse = False
        self._async_queues: dict[int, asyncio.Queue[tuple[int, bytes]]] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._rl = RateLimitedLog(log)
        for ep in endpoints:
            self.add_endpoint(ep)

    # -- virtio device contract ----------------------------------------------------------

    def features(self) -> int:
        f = (1 << VIRTIO_F_VERSION_1) | (1 << VIRTIO_RING_F_EVENT_IDX) \
            | (1 << VIRTIO_RING_F_INDIRECT_DESC)
        if self.name_service:
            f |= 1 << VIRTIO_RPMSG_F_NS
        return f

    def attach(self, queues: list[SplitQueue], loop: Any) -> None:
        super().attach(queues, loop)
        # The cffi engine's queues come with the C header check; the python engine keeps
        # the whole path in Python.
        self._native_parse = bool(queues) and queues[0].engine == "cffi"
        with self._cond:
            self.guest_ready = False

    @property
    def to_guest(self) -> SplitQueue | None:
        return self.queues[TO_GUEST] if self.queues else None

    @property
    def to_host(self) -> SplitQueue | None:
        return self.queues[TO_HOST] if self.queues else None

    def queue_started(self, queue: SplitQueue) -> None:
        if queue.index == TO_GUEST:
            self._guest_session_start()
        else:
            self._guest_sent(queue)

    def queue_stopped(self, queue: SplitQueue) -> None:
        if queue.index == TO_GUEST and not queue.started:
            self._guest_session_end("rx ring stopped")

    def kicked(self, queue: SplitQueue) -> None:
        if queue.index == TO_GUEST:
            self.flush()
            with self._cond:
                self._cond.notify_all()  # wake iterator-API writers waiting for a buffer
        else:
            self._guest_sent(queue)

    def _guest_sent(self, queue: SplitQueue) -> None:
        if self.auto_dispatch:
            self._service_to_host(queue)
        else:
            with self._cond:
                self._cond.notify_all()  # wake readers blocked in the iterator API

    def reset(self) -> None:
        self._guest_session_end("device reset")

    # -- guest sessions and the name service ---------------------------------------------

    def _guest_session_start(self) -> None:
        """The rx ring is usable: (re)announce every service, then flush what waits."""
        with self._cond:
            if self.guest_ready:
                self.flush()
                return
            self.guest_ready = True
            self.stats["guest_sessions"] += 1
            if self.acked_features & (1 << VIRTIO_RPMSG_F_NS):
                announcements = [_ns_message(name, addr, rp.NsFlags.CREATE)
                                 for addr, name in self.services.items()]
                # Ahead of anything queued for this session, in registration order.
                self._outbox.extendleft(reversed(announcements))
                self.stats["ns_announced"] += len(announcements)
            elif self.services:
                log.warning("guest did not negotiate VIRTIO_RPMSG_F_NS; %d service(s) "
                            "not announced", len(self.services))
        log.info("guest ready: %d service(s) to announce", len(self.services))
        self.flush()
        for ep in list(self.endpoints.values()):
            self._call_hook(ep, ep.guest_ready)

    def _guest_session_end(self, why: str) -> None:
        with self._cond:
            was = self.guest_ready
            self.guest_ready = False
            if self._outbox:
                # The guest instance these were for no longer exists; say so loudly.
                self.stats["dropped_on_reset"] += len(self._outbox)
                log.warning("%s: %d queued message(s) for the old guest discarded",
                            why, len(self._outbox))
                self._outbox.clear()
            self.guest_services.clear()
            self._to_host_paused = False
            self._cond.notify_all()
        if was:
            log.info("guest session ended: %s", why)
            for ep in list(self.endpoints.values()):
                self._call_hook(ep, ep.guest_gone)

    def announce(self, name: str, addr: int, flags: rp.NsFlags = rp.NsFlags.CREATE) -> None:
        """Announce (or withdraw) a host service; queued until the guest is ready.

        Registered services are announced again to every new guest session.
        """
        msg = _ns_message(name, addr, flags)  # refuses a bad name before anything changes
        with self._cond:
            if flags is rp.NsFlags.CREATE:
                self.services[addr] = name
            else:
                self.services.pop(addr, None)
            if not self.guest_ready:
                return  # delivered (CREATE) with the next session start
            if not self.acked_features & (1 << VIRTIO_RPMSG_F_NS):
                return
            self._outbox.append(msg)
            self.stats["ns_announced"] += 1
        self._flush_soon()

    def _guest_ns(self, src: int, payload: bytes) -> None:
        try:
            ns = rp.decode_ns(payload)
        except rp.RpmsgFormatError as e:
            self.stats["bad_guest_ns"] += 1
            self._rl.error("bad_ns", "malformed name-service message from guest %d: %s",
                           src, e)
            return
        if ns.flags is rp.NsFlags.CREATE:
            self.guest_services[ns.name] = GuestService(ns.name, ns.addr)
        else:
            self.guest_services.pop(ns.name, None)
        self.stats[f"guest_ns_{ns.flags.name.lower()}"] += 1
        log.info("guest service %s: %r at %d", ns.flags.name.lower(), ns.name, ns.addr)
        for listener in list(self.guest_ns_listeners):
            try:
                listener(ns)
            except Exception:
                self.stats["listener_errors"] += 1
                log.exception("guest name-service listener failed")

    # -- endpoints -----------------------------------------------------------------------

    def add_endpoint(self, ep: Endpoint) -> Endpoint:
        if ep.addr == rp.NS_ADDR or not 0 <= ep.addr < rp.ADDR_ANY:
            raise AddressInUse(f"address {ep.addr} is reserved")
        if ep.addr in self.endpoints:
            raise AddressInUse(f"host address {ep.addr} already has "
                               f"{self.endpoints[ep.addr].describe()}")
        self.endpoints[ep.addr] = ep
        self._styles[ep.addr] = self._handler_style(ep)
        ep.bind(Port(self, ep.addr))
        if ep.name:
            self.announce(ep.name, ep.addr)
        return ep

    def remove_endpoint(self, addr: int) -> None:
        ep = self.endpoints.pop(addr)
        self._styles.pop(addr, None)
        if addr in self.services:
            self.announce(self.services[addr], addr, rp.NsFlags.DESTROY)
        ep.close()

    def _call_hook(self, ep: Endpoint, hook: Callable[[], None]) -> None:
        try:
            hook()
        except Exception:
            self.stats["handler_errors"] += 1
            self._rl.error(f"hook{ep.addr}", "endpoint %s hook %s raised", ep.describe(),
                           hook.__name__, exc_info=True)

    # -- guest → host ----------------------------------------------------------------------

    def _service_to_host(self, q: SplitQueue) -> None:
        """Drain the to_host ring in batches: copy out, return buffers, dispatch."""
        while q.ready:
            with q.lock:
                # Take no more guest messages than the outbox has room for: a handler
                # answering each message once can then never overflow it.
                room = min(BATCH, self.outbox_limit - len(self._outbox))
                if room <= 0:
                    self._to_host_paused = True
                    self.stats["to_host_paused"] += 1
                    return
                q.disable_kicks()
                rb = q.pop_raw_batch(room, MAX_READ)
                if not rb.count:
                    if not q.enable_kicks():
                        return
                    continue
                q.push_used(rb.returnable_heads(), 0)
                q.notify()
                # A partial batch drained the ring: re-arm kicks now, not after one more
                # (empty) pop; True means buffers raced in and we go round again.
                drained = rb.count < room and not q.enable_kicks()
            self._dispatch(self._parse(rb))
            if drained:
                return

    def _parse(self, rb: RawBatch) -> Parsed:
        """Parse a raw batch; count and log (rate-limited) whatever was not a message."""
        parsed = parse(rb, native=self._native_parse)
        for i in parsed.bad_chains:
            self.stats["bad_chains"] += 1
            err = ChainError(int(rb.errors[i]))
            what = err.name if err is not ChainError.OK else "device-writable buffers"
            self._rl.error("chain", "to_host: bad descriptor chain at head %d: %s",
                           int(rb.heads[i]), what)
        for i, why in parsed.bad_messages:
            self.stats["bad_messages"] += 1
            self._rl.error("msg", "to_host: malformed message in chain %d: %s",
                           int(rb.heads[i]), why)
        return parsed

    def _dispatch(self, parsed: Parsed) -> None:
        """Hand each run of messages for one address to its endpoint."""
        for run in parsed.runs:
            n = len(run)
            self.stats["to_host_messages"] += n
            if run.dst == rp.NS_ADDR:
                for src, payload in run:
                    self._guest_ns(src, payload)
                continue
            ep = self.endpoints.get(run.dst)
            if ep is None:
                self.stats["unknown_destination"] += n
                self._rl.error("dst", "no host endpoint at %d (from guest %d); "
                               "%d message(s) discarded", run.dst, int(run.srcs[0]), n)
            else:
                self._deliver(ep, run)

    @staticmethod
    def _handler_style(ep: Endpoint) -> str:
        """Which handler the device calls: the most batched one the endpoint overrides."""
        kind = type(ep)
        if inspect.iscoroutinefunction(ep.on_message):
            return "async"
        if kind.on_message_batch is not Endpoint.on_message_batch:
            return "arrays"
        if kind.on_batch is not Endpoint.on_batch:
            return "pairs"
        return "single"

    def _deliver(self, ep: Endpoint, run: MessageBatch) -> None:
        style = self._styles[ep.addr]
        if style == "async":
            q = self._async_queue(ep)
            for item in run:
                q.put_nowait(item)
        elif style == "arrays":
            try:
                ep.on_message_batch(run)
            except Exception:
                self._handler_failed(ep, len(run))
        elif style == "pairs":
            try:
                ep.on_batch(list(run))
            except Exception:
                self._handler_failed(ep, len(run))
        else:
            # Per message, so one failing message does not cost the rest of the batch.
            for src, data in run:
                try:
                    ep.on_message(src, data)
                except Exception:
                    self._handler_failed(ep, 1)

    def _handler_failed(self, ep: Endpoint, messages: int) -> None:
        self.stats["handler_errors"] += 1
        self.stats["handler_failed_messages"] += messages
        self._rl.error(f"ep{ep.addr}", "endpoint %s raised on %d message(s)",
                       ep.describe(), messages, exc_info=True)

    def _async_queue(self, ep: Endpoint) -> asyncio.Queue[tuple[int, bytes]]:
        q = self._async_queues.get(ep.addr)
        if q is None:
            q = asyncio.Queue()
            self._async_queues[ep.addr] = q
            self._tasks.append(asyncio.get_running_loop().create_task(self._async_worker(ep, q)))
        return q

    async def _async_worker(self, ep: Endpoint, q: asyncio.Queue[tuple[int, bytes]]) -> None:
        while True:
            src, data = await q.get()
            try:
                await ep.on_message(src, data)  # type: ignore[misc]
            except asyncio.CancelledError:
                raise
            except Exception:
                self._handler_failed(ep, 1)

    # -- host → guest ----------------------------------------------------------------------

    def _outbox_full(self) -> bool:
        return len(self._outbox) >= max(self.outbox_limit, 1)

    def _encode(self, src: int, dst: int, data: bytes) -> bytes:
        """The wire form of one message; refused before any ring sees it if too large."""
        if len(data) > rp.MAX_PAYLOAD:
            self.stats["refused_too_large"] += 1
            raise PayloadTooLarge(f"payload of {len(data)} bytes exceeds the guest's "
                                  f"{rp.MAX_PAYLOAD}-byte limit")
        return rp.encode_message(src, dst, bytes(data))

    def send_nowait(self, src: int, dst: int, data: bytes) -> None:
        """Queue a message for the guest; WouldBlock if the outbox is full.

        Messages queued during one turn of the event loop reach the ring together at its
        end (one pass, one notification); a full outbox is flushed at once to make room,
        so WouldBlock means the guest really has no free rx buffer.
        """
        msg = self._encode(src, dst, data)
        with self._cond:
            if len(self._outbox) >= self.outbox_limit:
                self.flush()
                if len(self._outbox) >= self.outbox_limit:
                    self.stats["would_block"] += 1
                    raise WouldBlock(f"guest has no free rx buffer and {len(self._outbox)} "
                                     "messages are queued")
            self._outbox.append(msg)
            self._flush_soon()

    def send_many(self, src: int, messages: list[tuple[int, bytes]]) -> None:
        """Send several (dst, payload) messages from ``src``: one pass over the ring, one
        notification.  All or nothing: WouldBlock if they do not all fit the outbox."""
        encoded = [self._encode(src, dst, data) for dst, data in messages]
        with self._cond:
            if len(self._outbox) + len(encoded) > self.outbox_limit and (
                    self._outbox or not self.guest_ready):
                self.stats["would_block"] += 1
                raise WouldBlock(f"{len(encoded)} messages do not fit the outbox "
                                 f"({len(self._outbox)} of {self.outbox_limit} used)")
            self._outbox.extend(encoded)
            self.flush()

    def send(self, src: int, dst: int, data: bytes, timeout: float | None = None) -> None:
        """Blocking send for threads other than the device's loop."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while True:
                try:
                    self.send_nowait(src, dst, data)
                    return
                except WouldBlock:
                    left = None if deadline is None else deadline - time.monotonic()
                    if left is not None and left <= 0:
                        raise
                    self._cond.wait(left)

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
        loop.call_soon_threadsafe(self._deferred_flush)

    def _deferred_flush(self) -> None:
        self._flush_pending = False
        self.flush()

    def flush(self) -> None:
        """Move queued messages into free rx buffers, in order."""
        q = self.to_guest
        if q is None:
            return
        wrote = 0
        with self._cond:
            if not self.guest_ready or not q.ready:
                return
            with q.lock:
                while self._outbox:
                    chains = q.pop_batch(min(len(self._outbox), BATCH))
                    if not chains:
                        if q.enable_kicks():
                            continue
                        break
                    used = []
                    for k, c in enumerate(chains):
                        if not self._outbox:
                            # A bad chain in the batch left good ones over: they stay in
                            # the ring for the next message (never returned empty).
                            q.unpop(len(chains) - k)
                            break
                        n = self._fill(q, c, self._outbox[0])
                        if n is None:
                            if c.returnable:
                                used.append((c.head, 0))
                            continue
                        self._outbox.popleft()
                        used.append((c.head, n))
                        wrote += 1
                    q.push_batch(used)
                q.notify()
            if wrote:
                self.stats["to_guest_messages"] += wrote
                self._cond.notify_all()
        if wrote and self._room is not None:
            self._room.set()
        if self._to_host_paused and not self._outbox_full():
            self._to_host_paused = False
            th = self.to_host
            if th is not None and th.ready:
                self._service_to_host(th)

    def _fill(self, q: SplitQueue, c: Chain, msg: bytes) -> int | None:
        """Copy ``msg`` into rx chain ``c``; None if the chain cannot take it."""
        if not c.ok:
            self.stats["bad_chains"] += 1
            self._rl.error("rxchain", "to_guest: bad descriptor chain at head %d: %s",
                           c.head, c.error.name)
            return None
        if c.readable:
            self.stats["bad_chains"] += 1
            self._rl.error("rxdir", "to_guest: chain %d has device-readable buffers", c.head)
            return None
        if c.write_len < len(msg):
            self.stats["rx_buffer_too_small"] += 1
            self._rl.error("rxsmall", "to_guest: rx buffer of %d bytes cannot hold a %d-byte "
                           "message; returned empty", c.write_len, len(msg))
            return None
        return q.write_chain(c, msg)

    @property
    def queued(self) -> int:
        return len(self._outbox)

    def destroy(self) -> None:
        """Withdraw every endpoint and stop async handlers."""
        for addr in list(self.endpoints):
            self.remove_endpoint(addr)
        for t in self._tasks:
            t.cancel()
        self._tasks.clear()
