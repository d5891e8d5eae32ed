"""Host endpoints: the registry, per-endpoint state, and handing guest messages to them.

Each endpoint has a :class:`EndpointSlot`: its handler style (fixed at registration),
its counters, and for ``async def`` handlers the queue and task that run them in order
on the device's loop.  A handler that raises costs only its own messages: it is counted
and logged (rate-limited), and everyone else keeps being served.  A slow ``async``
handler costs only its own messages too: its queue is bounded, and what does not fit is
counted per endpoint and logged, never queued without limit.
"""

from __future__ import annotations

import asyncio
import inspect
import itertools
import logging
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

from ..endpoints.base import Endpoint
from . import codec as rp
from .batch import MessageBatch
from .errors import AddressInUse, HandlerNotSupported
from .ratelimit import RateLimitedLog

log = logging.getLogger(__name__)

#: seconds a synchronous handler may hold the loop before it is counted and logged
SLOW_HANDLER = 0.1
#: messages waiting per ``async def`` endpoint before new ones are dropped (counted)
HANDLER_QUEUE_LIMIT = 1024


def handler_style(ep: Endpoint) -> str:
    """Which handler the device calls: the most batched one the endpoint overrides."""
    kind = type(ep)
    if inspect.iscoroutinefunction(ep.on_message):
        return "async"
    if kind.on_message_batch is not Endpoint.on_message_batch:
        return "arrays"
    if kind.on_batch is not Endpoint.on_batch:
        return "pairs"
    return "single"


@dataclass(eq=False)
class EndpointSlot:
    """One registered endpoint and what the device keeps for it."""

    endpoint: Endpoint
    style: str
    #: messages delivered, and those its handler failed on
    stats: Counter[str] = field(default_factory=Counter)
    queue: asyncio.Queue[tuple[int, bytes]] | None = None
    task: asyncio.Task[None] | None = None
    #: 1 while the async worker is inside the handler
    busy: int = 0
    #: its handler reads messages in guest memory (``Endpoint.zero_copy``)
    zero_copy: bool = False


class Dispatcher:
    """The host endpoints, by address, and delivery of message runs to them."""

    def __init__(self, stats: Counter[str], rl: RateLimitedLog, *,
                 queue_limit: int = HANDLER_QUEUE_LIMIT) -> None:
        self.slots: dict[int, EndpointSlot] = {}
        #: endpoints registered with ``zero_copy``: while there is one, the device pops
        #: with Queue.pop_located and gives buffers back after the handlers
        self.zero_copy = 0
        self.queue_limit = queue_limit
        self._stats = stats
        self._rl = rl

    @property
    def endpoints(self) -> dict[int, Endpoint]:
        return {addr: s.endpoint for addr, s in self.slots.items()}

    def add(self, ep: Endpoint) -> None:
        if ep.addr == rp.NS_ADDR or not 0 <= ep.addr < rp.ADDR_ANY:
            raise AddressInUse(f"address {ep.addr} is reserved")
        if ep.addr in self.slots:
            raise AddressInUse(f"host address {ep.addr} already has "
                             f"{self.slots[ep.addr].endpoint.describe()}")
        for name in ("on_message_batch", "on_batch"):
            if inspect.iscoroutinefunction(getattr(ep, name)):
                # called, never awaited: every message would vanish without a trace
                raise HandlerNotSupported(f"{ep.describe()}: {name} cannot be async def; only "
                                "on_message can (one message at a time, in order)")
        style = handler_style(ep)
        zero_copy = bool(getattr(ep, "zero_copy", False))
        if zero_copy and style != "arrays":
            raise HandlerNotSupported(f"{ep.describe()}: zero_copy needs a synchronous "
                                      "on_message_batch (views are valid only while it runs)")
        self.slots[ep.addr] = EndpointSlot(ep, style, zero_copy=zero_copy)
        self.zero_copy += zero_copy

    def remove(self, addr: int) -> Endpoint:
        slot = self.slots.pop(addr)
        self.zero_copy -= slot.zero_copy
        if slot.task is not None:
            slot.task.cancel()
        return slot.endpoint

    def call_hooks(self, name: str) -> None:
        """``guest_ready`` or ``guest_gone`` on every endpoint; one raising stops no other."""
        for slot in list(self.slots.values()):
            ep = slot.endpoint
            hook: Callable[[], None] = getattr(ep, name)
            try:
                hook()
            except Exception:
                self._stats["handler_errors"] += 1
                self._rl.error(f"hook{ep.addr}", "endpoint %s hook %s raised", ep.describe(),
                               name, exc_info=True)

    def deliver(self, run: MessageBatch) -> None:
        """Hand a run of messages for one address to its endpoint."""
        n = len(run.srcs)
        slot = self.slots.get(run.dst)
        if slot is None:
            self._unknown(run.dst, int(run.srcs[0]), n)
            return
        stats = slot.stats
        stats["messages"] += n
        stats["bytes"] += run.total_bytes()
        if type(run.data) is memoryview and not slot.zero_copy:
            run = run.copied()  # a view of guest memory, for a handler that keeps bytes
        self._run(slot, run, n)

    def deliver_one(self, src: int, dst: int, data: bytes, length: int) -> None:
        """:meth:`deliver` of the one message ``data[HDR_SIZE : HDR_SIZE + length]``, as
        a batch of one: no sums over arrays."""
        slot = self.slots.get(dst)
        if slot is None:
            self._unknown(dst, src, 1)
            return
        stats = slot.stats
        stats["messages"] += 1
        stats["bytes"] += length
        self._run(slot, MessageBatch(data, dst, [src], [rp.HDR_SIZE], [length]), 1)

    def _unknown(self, dst: int, src: int, n: int) -> None:
        self._stats["unknown_destination"] += n
        self._rl.error("dst", "no host endpoint at %d (from guest %d); "
                       "%d message(s) discarded", dst, src, n)

    def _run(self, slot: EndpointSlot, run: MessageBatch, n: int) -> None:
        """The endpoint's handler on ``run`` (``n`` messages), in its style."""
        stats = slot.stats
        ep = slot.endpoint
        style = slot.style
        if style == "async":
            q = self._async_queue(slot)
            room = max(self.queue_limit - q.qsize(), 0)
            for item in itertools.islice(run, room):
                q.put_nowait(item)
            if n > room:
                self._overflow(slot, n - room)
            return
        # A synchronous handler runs on the loop: while it runs, no guest of this server
        # is served.  That cannot be prevented, only seen: time it, count it, say so.
        t0 = time.perf_counter()
        if style == "arrays":  # the common one, without a call more
            try:
                ep.on_message_batch(run)
            except Exception:
                self._failed(slot, n)
        else:
            self._call(slot, run, n)
        held = time.perf_counter() - t0
        if held > SLOW_HANDLER:
            stats["slow_calls"] += 1
            self._stats["slow_handler_calls"] += 1
            self._rl.error(f"slow{ep.addr}", "endpoint %s held the loop for %.0f ms: every "
                           "guest of this server waited (a handler that blocks should be "
                           "async def, or hand its work to a thread)", ep.describe(),
                           held * 1000)

    def _call(self, slot: EndpointSlot, run: MessageBatch, n: int) -> None:
        """The handlers that take pairs or single messages."""
        ep = slot.endpoint
        if slot.style == "pairs":
            try:
                ep.on_batch(list(run))
            except Exception:
                self._failed(slot, n)
        else:
            # Per message, so one failing message does not cost the rest of the batch.
            for src, data in run:
                try:
                    ep.on_message(src, data)
                except Exception:
                    self._failed(slot, 1)

    def _failed(self, slot: EndpointSlot, messages: int) -> None:
        slot.stats["failed_messages"] += messages
        self._stats["handler_errors"] += 1
        self._stats["handler_failed_messages"] += messages
        ep = slot.endpoint
        self._rl.error(f"ep{ep.addr}", "endpoint %s raised on %d message(s)",
                       ep.describe(), messages, exc_info=True)

    def _overflow(self, slot: EndpointSlot, messages: int) -> None:
        slot.stats["dropped_queue_full"] += messages
        self._stats["handler_queue_full"] += messages
        ep = slot.endpoint
        self._rl.error(f"full{ep.addr}", "endpoint %s: its handler is behind by %d "
                       "messages; %d message(s) from the guest dropped", ep.describe(),
                       self.queue_limit, messages)

    def discard_queued(self) -> int:
        """The guest that sent what waits for ``async`` handlers is gone: drop it, and
        cancel the handlers still working on its messages (their replies would reach a
        guest that never sent them).  The next message starts a fresh worker."""
        dropped = 0
        for slot in self.slots.values():
            if slot.task is None or slot.queue is None:
                continue
            n = slot.queue.qsize() + slot.busy
            slot.task.cancel()
            slot.task = slot.queue = None
            slot.busy = 0
            if n:
                slot.stats["dropped_on_reset"] += n
                dropped += n
        self._stats["handler_queue_dropped_on_reset"] += dropped
        return dropped

    def _async_queue(self, slot: EndpointSlot) -> asyncio.Queue[tuple[int, bytes]]:
        if slot.queue is None:
            slot.queue = asyncio.Queue()
            slot.task = asyncio.get_running_loop().create_task(self._async_worker(slot))
        return slot.queue

    async def _async_worker(self, slot: EndpointSlot) -> None:
        q = slot.queue
        assert q is not None
        on_message = slot.endpoint.on_message
        me = asyncio.current_task()
        while True:
            src, data = await q.get()
            slot.busy = 1
            try:
                await on_message(src, data)  # type: ignore[misc]
            except asyncio.CancelledError:
                raise
            except Exception:
                self._failed(slot, 1)
            finally:
                if slot.task is me:  # not a worker cancelled and replaced meanwhile
                    slot.busy = 0

    def stop_tasks(self) -> None:
        for slot in self.slots.values():
            if slot.task is not None:
                slot.task.cancel()
                slot.task = None
                slot.queue = None
