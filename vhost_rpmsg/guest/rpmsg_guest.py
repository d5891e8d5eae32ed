"""A simulated guest: QEMU's front-end plus a model of Linux's virtio_rpmsg_bus driver.

It behaves the way the stock driver does where the host can tell the difference:
512-byte buffers, ``min(2 * ring size, 512)`` of them split between rx and tx, rx
buffers posted before DRIVER_OK and kicked after, a name-service endpoint at 53,
tx-complete interrupts suppressed (older kernels) or wanted (``tx_interrupts=True``,
newer kernels), event idx honoured, and the guest's own checks on what it receives
("inbound msg too big" loses the buffer, as Linux does).
"""

from __future__ import annotations

import logging
import os
import queue
import select
import threading
import time
from collections import Counter
from dataclasses import dataclass, field

from ..rpmsg import codec as rp
from ..vhost_user import codec as vuc
from ..vhost_user.protocol import ProtocolFeature, Request
from ..virtio.constants import (
    VIRTIO_F_VERSION_1,
    VIRTIO_RING_F_EVENT_IDX,
    VIRTIO_RPMSG_F_NS,
    VRING_DESC_F_WRITE,
)
from . import fastpath
from .frontend import Frontend, GuestRam, QueueSetup
from .ring import DriverRing, RingLayout

log = logging.getLogger(__name__)

RX, TX = 0, 1
MAX_BUFS = 512
TX_TIMEOUT = 15.0  # what the Linux driver waits for a tx buffer before failing

QEMU_PROTOCOL_FEATURES = (
    (1 << ProtocolFeature.MQ)
    | (1 << ProtocolFeature.REPLY_ACK)
    | (1 << ProtocolFeature.CONFIG)
    | (1 << ProtocolFeature.RESET_DEVICE)
    | (1 << ProtocolFeature.CONFIGURE_MEM_SLOTS)
    | (1 << ProtocolFeature.STATUS)
    | (1 << ProtocolFeature.BACKEND_REQ)
)


class GuestTimeout(TimeoutError):
    pass


@dataclass
class Channel:
    """A service the host announced to the guest."""

    name: str
    addr: int


@dataclass
class GuestStats:
    rx_messages: int = 0
    tx_messages: int = 0
    rx_kicks: int = 0
    tx_kicks: int = 0
    rx_interrupts: int = 0
    tx_interrupts: int = 0
    no_recipient: int = 0
    too_big: int = 0  # the Linux driver would have lost a buffer here
    events: Counter[str] = field(default_factory=Counter)


class SimGuest:
    """Drive a vhost-rpmsg back-end the way a Linux guest under QEMU would."""

    def __init__(
        self,
        socket_path: str,
        *,
        queue_size: int = 256,
        event_idx: bool = True,
        tx_interrupts: bool = False,
        protocol_features: int = QEMU_PROTOCOL_FEATURES,
        name_service: bool = True,
        hidden_tail: int = 0,
        rx_thread: bool = True,
        fast: bool | None = None,
        memory_seals: int | None = None,
    ) -> None:
        self.socket_path = socket_path
        self.queue_size = queue_size
        self.want_event_idx = event_idx
        self.tx_interrupts = tx_interrupts
        self.want_protocol = protocol_features
        self.want_ns = name_service
        self.hidden_tail = hidden_tail
        #: seals on the guest RAM memfd (GuestRam's ``seals``: None is QEMU's seal=on)
        self.memory_seals = memory_seals
        #: False: no background rx thread; recv()/wait_counted() drive the rx ring
        #: themselves (no thread hand-off: what a latency measurement wants)
        self.rx_thread = rx_thread
        #: the C fast path (guest/fastpath.py) for send_burst and the rx drain: None picks
        #: it when _vhost_rpmsg_guest is built, True requires it, False keeps to Python;
        #: either way the same ring contents, kicks, stats and delivered messages
        self._fast = fastpath.load(fast, queue_size)
        self.fast = self._fast is not None
        #: False: rx buffers are kept after use instead of re-posted (tests make room so)
        self.repost_rx = True
        self.rx_held: list[int] = []
        self.stats = GuestStats()
        self.channels: dict[str, Channel] = {}
        self.ns_events: queue.Queue[rp.NsMessage] = queue.Queue()
        #: per open address: messages received and not yet read
        self.inbox: dict[int, queue.Queue[tuple[int, bytes]]] = {}
        #: per counting address: [messages, bytes] received
        self.counts: dict[int, list[int]] = {}
        self._tx_lock = threading.Lock()
        self._rx_lock = threading.Lock()
        self._stop = threading.Event()
        self._rx_thread: threading.Thread | None = None
        self.fe: Frontend | None = None
        self.ram: GuestRam | None = None
        self.features = 0
        self.nbufs = min(2 * queue_size, MAX_BUFS)
        # eventfds are created by the front-end, as QEMU does
        self.kick = [os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK) for _ in range(2)]
        self.call = [os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK) for _ in range(2)]
        self.err = [os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK) for _ in range(2)]
        self.open(rp.NS_ADDR)

    # -- life cycle -----------------------------------------------------------------------

    def start(self) -> SimGuest:
        """Connect, negotiate, and probe the driver (posts rx, DRIVER_OK, kicks rx)."""
        per_init = 2 * RingLayout.bytes_needed(self.queue_size) + self.nbufs * rp.BUF_SIZE
        self.ram = GuestRam(_round_up(4 * per_init + (1 << 20), 1 << 21) + self.hidden_tail,
                            self.hidden_tail, seals=self.memory_seals)
        self.fe = Frontend(self.socket_path, self.ram)
        self.fe.negotiate(self.want_protocol)
        for i in range(2):
            self.fe.request(Request.SET_VRING_CALL, vuc.encode_vring_file(i), [self.call[i]])
            self.fe.request(Request.SET_VRING_ERR, vuc.encode_vring_file(i), [self.err[i]])
        self._probe(send_memory=True)
        return self

    def _probe(self, send_memory: bool) -> None:
        """What virtio_rpmsg_bus's probe does, with QEMU's vhost start in the middle."""
        fe, ram = self.fe, self.ram
        assert fe is not None and ram is not None
        offered = fe.backend_features
        self.features = offered & (
            (1 << VIRTIO_F_VERSION_1)
            | ((1 << VIRTIO_RPMSG_F_NS) if self.want_ns else 0)
            | ((1 << VIRTIO_RING_F_EVENT_IDX) if self.want_event_idx else 0)
        )
        event_idx = bool(self.features & (1 << VIRTIO_RING_F_EVENT_IDX))
        n = self.queue_size
        layouts = [RingLayout(ram.alloc(RingLayout.bytes_needed(n), 4096), n) for _ in range(2)]
        self.rings = [DriverRing(ram.mem, lay, event_idx) for lay in layouts]
        bufs = ram.alloc(self.nbufs * rp.BUF_SIZE, 4096)
        half = self.nbufs // 2
        self.rx_bufs: dict[int, int | None] = {}
        for k in range(half):
            gpa = bufs + k * rp.BUF_SIZE
            self.rx_bufs[self.rings[RX].add([(gpa, rp.BUF_SIZE, VRING_DESC_F_WRITE)])] = gpa
        self.tx_free = [bufs + (half + k) * rp.BUF_SIZE for k in range(half)]
        self.tx_inflight: dict[int, int] = {}
        rx_needs_kick = self.rings[RX].publish()
        if self.tx_interrupts:
            self.rings[TX].enable_interrupts()
        else:
            self.rings[TX].disable_interrupts()
        # DRIVER_OK: QEMU starts the vhost device now.
        fe.start(self.features, [
            QueueSetup(n, lay.desc, lay.avail, lay.used, self.kick[i], self.call[i])
            for i, lay in enumerate(layouts)
        ], send_memory=send_memory)
        self._stop.clear()
        if self.rx_thread:
            self._rx_thread = threading.Thread(target=self._rx_loop, name="simguest-rx",
                                               daemon=True)
            self._rx_thread.start()
        if rx_needs_kick:
            self.kick_queue(RX)

    def reset(self) -> None:
        """Driver unbind/rebind: rings stopped and set up again; memory table not re-sent."""
        self._stop_rx()
        assert self.fe is not None
        self.fe.stop(2)
        self.channels.clear()
        self._probe(send_memory=False)

    def close(self) -> None:
        """Guest shutdown: stop the rings and close the connection."""
        self._stop_rx()
        if self.fe is not None:
            try:
                self.fe.stop(2)
            except (OSError, Exception) as e:  # the back-end may be gone already
                log.debug("stop on close: %s", e)
            self.fe.close()
        self._release()

    def disconnect(self) -> None:
        """Vanish without the shutdown sequence (a crashed QEMU)."""
        self._stop_rx()
        if self.fe is not None:
            self.fe.close()
        self._release()

    def _release(self) -> None:
        self.fe = None
        self.rings = []
        if self.ram is not None:
            self.ram.close()
            self.ram = None
        for fd in (*self.kick, *self.call, *self.err):
            try:
                os.close(fd)
            except OSError:
                pass
        self.kick = self.call = self.err = []

    def _stop_rx(self) -> None:
        self._stop.set()
        if self._rx_thread is not None:
            self._rx_thread.join(5)
            self._rx_thread = None

    def __enter__(self) -> SimGuest:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- endpoints ---------------------------------------------------------------------

    def open(self, addr: int) -> None:
        """Create a guest endpoint at ``addr`` (messages to it can then be received)."""
        self.inbox.setdefault(addr, queue.Queue())

    def open_counter(self, addr: int) -> None:
        """A guest endpoint that only counts messages and bytes (benchmark receiver)."""
        self.counts.setdefault(addr, [0, 0])

    def counted(self, addr: int) -> tuple[int, int]:
        """(messages, payload bytes) a counting endpoint has received so far."""
        n, b = self.counts[addr]
        return n, b

    def wait_counted(self, addr: int, messages: int, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while self.counts[addr][0] < messages:
            left = deadline - time.monotonic()
            if left <= 0:
                raise GuestTimeout(f"guest address {addr} got {self.counts[addr][0]} of "
                                   f"{messages} messages in {timeout}s")
            if self.rx_thread:
                time.sleep(0.0005)
            else:
                self._rx_poll(left)

    def recv(self, addr: int, timeout: float = 5.0) -> tuple[int, bytes]:
        """(src, payload) of the next message to the guest endpoint ``addr``."""
        box = self.inbox[addr]
        try:
            if self.rx_thread:
                return box.get(timeout=timeout)
            deadline = time.monotonic() + timeout
            while box.empty():
                left = deadline - time.monotonic()
                if left <= 0:
                    raise queue.Empty
                self._rx_poll(left)
            return box.get_nowait()
        except queue.Empty:
            raise GuestTimeout(f"no message for guest address {addr} in {timeout}s") from None

    def wait_channel(self, name: str, timeout: float = 5.0) -> Channel:
        deadline = time.monotonic() + timeout
        while name not in self.channels:
            if time.monotonic() > deadline:
                raise GuestTimeout(f"host never announced {name!r} (have {list(self.channels)})")
            time.sleep(0.002)
        return self.channels[name]

    def announce(self, name: str, addr: int, flags: rp.NsFlags = rp.NsFlags.CREATE) -> None:
        """Announce a guest service to the host, as a guest channel with a fixed src does."""
        self.send(addr, rp.NS_ADDR, rp.encode_ns(rp.NsMessage(name, addr, flags)))

    # -- tx: guest → host -----------------------------------------------------------------

    def send(self, src: int, dst: int, payload: bytes, timeout: float = TX_TIMEOUT) -> None:
        """rpmsg_send: take a tx buffer (waiting like Linux does), fill it, kick."""
        if len(payload) > rp.MAX_PAYLOAD:
            raise ValueError(f"payload of {len(payload)} bytes exceeds {rp.MAX_PAYLOAD}")
        with self._tx_lock:
            gpa = self._get_tx_buf(timeout)
            msg = rp.encode_message(src, dst, payload)
            self._write(gpa, msg)
            ring = self.rings[TX]
            head = ring.add([(gpa, len(msg), 0)])
            self.tx_inflight[head] = gpa
            self.stats.tx_messages += 1
            if ring.publish():
                self.kick_queue(TX)

    def send_burst(self, src: int, dst: int, payload: bytes, count: int,
                   timeout: float = TX_TIMEOUT) -> None:
        """Send ``payload`` ``count`` times, publishing and kicking once per batch of
        buffers, as a guest driver under load does (rpmsg_send in a tight loop)."""
        if len(payload) > rp.MAX_PAYLOAD:
            raise ValueError(f"payload of {len(payload)} bytes exceeds {rp.MAX_PAYLOAD}")
        msg = rp.encode_message(src, dst, payload)
        ring = self.rings[TX]
        with self._tx_lock:
            fast = self._fast
            if fast is not None and fast.send_burst(self, ring, msg, count, timeout):
                return
            left = count
            while left:
                if not self.tx_free:  # _get_tx_buf reclaims first, then waits
                    self.tx_free.append(self._get_tx_buf(timeout))
                batch = min(left, len(self.tx_free))
                self.fill_tx(ring, msg, batch)
                left -= batch

    def fill_tx(self, ring: DriverRing, msg: bytes, batch: int) -> None:
        """``batch`` buffers off tx_free, each holding ``msg``, made visible together."""
        n = len(msg)
        for _ in range(batch):
            gpa = self.tx_free.pop()
            self._write(gpa, msg)
            self.tx_inflight[ring.add([(gpa, n, 0)])] = gpa
        self.stats.tx_messages += batch
        if ring.publish():
            self.kick_queue(TX)

    def send_chain(self, bufs: list[tuple[int, int, int]]) -> int:
        """Post an arbitrary chain on the tx ring (for tests of malformed input)."""
        with self._tx_lock:
            ring = self.rings[TX]
            head = ring.add(bufs)
            self.tx_inflight[head] = -1
            if ring.publish():
                self.kick_queue(TX)
            return head

    def post_rx_chain(self, bufs: list[tuple[int, int, int]]) -> int:
        """Post an arbitrary chain on the rx ring (for tests of malformed input)."""
        with self._rx_lock:
            ring = self.rings[RX]
            head = ring.add(bufs)
            self.rx_bufs[head] = None
            if ring.publish():
                self.kick_queue(RX)
            return head

    def _get_tx_buf(self, timeout: float) -> int:
        if self.tx_free:
            return self.tx_free.pop()
        self._reclaim_tx()
        if self.tx_free:
            return self.tx_free.pop()
        # Out of buffers: Linux enables tx interrupts and sleeps until one comes back.
        ring = self.rings[TX]
        deadline = time.monotonic() + timeout
        while not self.tx_free:
            if ring.enable_interrupts():
                self._reclaim_tx()
                continue
            left = deadline - time.monotonic()
            if left <= 0:
                raise GuestTimeout(f"no tx buffer came back in {timeout}s")
            select.select([self.call[TX]], [], [], left)
            self._reclaim_tx()
        if not self.tx_interrupts:
            ring.disable_interrupts()
        return self.tx_free.pop()

    def _reclaim_tx(self) -> None:
        self._tx_irq()
        self.reclaim_used()

    def _tx_irq(self) -> None:
        """Take a pending tx interrupt, if there is one."""
        try:
            os.eventfd_read(self.call[TX])
            self.stats.tx_interrupts += 1
        except BlockingIOError:
            pass

    def reclaim_used(self) -> None:
        """Take back the buffers of the used tx entries."""
        for head, _length in self.rings[TX].get_used():
            gpa = self.tx_inflight.pop(head)
            if gpa >= 0:
                self.tx_free.append(gpa)

    def reclaim(self) -> int:
        """Take back every tx buffer the host has returned; how many are free now."""
        with self._tx_lock:
            self._reclaim_tx()
            return len(self.tx_free)

    # -- rx: host → guest -----------------------------------------------------------------

    def _rx_loop(self) -> None:
        while not self._stop.is_set():
            self._rx_poll(0.05)

    def _rx_poll(self, timeout: float) -> None:
        """Wait up to ``timeout`` for an rx interrupt, then drain the rx ring."""
        ring = self.rings[RX]
        fd = self.call[RX]
        r, _, _ = select.select([fd], [], [], timeout)
        if r:
            try:
                os.eventfd_read(fd)
                self.stats.rx_interrupts += 1
            except BlockingIOError:
                pass
        while True:
            with self._rx_lock:
                self._rx_drain(ring)
                if not ring.enable_interrupts():
                    break

    def _rx_drain(self, ring: DriverRing) -> None:
        if self._fast is not None and self._fast.rx_drain(self, ring):
            return
        used = ring.get_used()
        if not used:
            return
        # Look every buffer up before re-posting any: a re-post may reuse a descriptor
        # freed by a later entry of this same batch.
        batch = [(self.rx_bufs.pop(head), length) for head, length in used]
        for gpa, length in batch:
            if gpa is None:  # a chain a test posted on purpose
                self.stats.events["rx_test_chain_returned"] += 1
                continue
            if length > rp.BUF_SIZE or length < rp.HDR_SIZE:
                self.stats.too_big += 1
                log.error("simguest: inbound msg too big (%d bytes); buffer lost", length)
                continue
            data = bytes(self.ram.mv[gpa : gpa + length]) if self.ram else b""
            try:
                hdr, payload = rp.decode_message(data)
            except rp.RpmsgFormatError as e:
                self.stats.too_big += 1
                log.error("simguest: inbound msg too big: %s; buffer lost", e)
                continue
            self.deliver(hdr, payload)
            if not self.repost_rx:
                self.rx_held.append(gpa)
                continue
            self.rx_bufs[ring.add([(gpa, rp.BUF_SIZE, VRING_DESC_F_WRITE)])] = gpa
        if ring.publish():
            self.kick_queue(RX)

    def deliver(self, hdr: rp.Header, payload: bytes) -> None:
        self.stats.rx_messages += 1
        if hdr.dst == rp.NS_ADDR and self.features & (1 << VIRTIO_RPMSG_F_NS):
            try:
                ns = rp.decode_ns(payload)
            except rp.RpmsgFormatError as e:
                self.stats.events["bad_ns"] += 1
                log.error("simguest: malformed name-service message: %s", e)
                return
            if ns.flags is rp.NsFlags.CREATE:
                self.channels[ns.name] = Channel(ns.name, ns.addr)
            else:
                self.channels.pop(ns.name, None)
            self.stats.events[f"ns_{ns.flags.name.lower()}"] += 1
            self.ns_events.put(ns)
            return
        box = self.inbox.get(hdr.dst)
        if box is None:
            counter = self.counts.get(hdr.dst)
            if counter is not None:
                counter[0] += 1
                counter[1] += len(payload)
                return
            self.stats.no_recipient += 1
            return
        box.put((hdr.src, payload))

    # -- helpers -------------------------------------------------------------------------

    def take_error(self, q: int) -> bool:
        """Whether the back-end signalled queue ``q``'s err eventfd (a broken ring) since
        the last call; the signal is consumed."""
        try:
            os.eventfd_read(self.err[q])
        except BlockingIOError:
            return False
        return True

    def kick_queue(self, q: int) -> None:
        os.eventfd_write(self.kick[q], 1)
        if q == RX:
            self.stats.rx_kicks += 1
        else:
            self.stats.tx_kicks += 1

    def _write(self, gpa: int, data: bytes) -> None:
        assert self.ram is not None
        self.ram.mv[gpa : gpa + len(data)] = data


def _round_up(n: int, to: int) -> int:
    return (n + to - 1) // to * to
