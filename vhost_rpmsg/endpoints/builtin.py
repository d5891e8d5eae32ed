"""Built-in endpoints: echo, sink, source, and an echo announced as ``rpmsg-raw``."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from ..rpmsg import codec as rp
from ..rpmsg.batch import MessageBatch
from ..rpmsg.ratelimit import RateLimitedLog
from .base import Endpoint

log = logging.getLogger(__name__)
_rl = RateLimitedLog(log)


class Echo(Endpoint):
    """Sends every message back to its sender, unchanged.

    A message too long to go back (a guest may send more than the 496 bytes it can
    receive) is not echoed: counted (``refused``), logged rate-limited, and the others of
    its batch are echoed all the same.
    """

    def __init__(self, addr: int, name: str | None = None, **options: Any) -> None:
        super().__init__(addr, name, **options)
        self.refused = 0

    def on_message_batch(self, batch: MessageBatch) -> None:
        assert self.port is not None
        if len(batch.srcs) == 1:  # the common case of a guest waiting for each reply
            n = int(batch.lengths[0])
            if n <= rp.MAX_PAYLOAD:
                self.port.send_many([(int(batch.srcs[0]), batch.payload(0))])
                return
        messages = batch.pairs()
        if batch.longest() <= rp.MAX_PAYLOAD:
            self.port.send_many(messages)
            return
        fit = [m for m in messages if len(m[1]) <= rp.MAX_PAYLOAD]
        if len(fit) < len(messages):
            self.refused += len(messages) - len(fit)
            _rl.error(f"echo{self.addr}", "%s: %d message(s) longer than the guest's "
                      "%d-byte limit not echoed", self.describe(),
                      len(messages) - len(fit), rp.MAX_PAYLOAD)
        self.port.send_many(fit)

    def on_message(self, src: int, data: bytes) -> None:
        assert self.port is not None
        self.port.send(src, data)


class RawEcho(Echo):
    """Echo announced as ``rpmsg-raw``: a Linux guest's rpmsg_char binds to it and
    creates ``/dev/rpmsgN``, so guest user space can talk to the host with read/write."""

    default_name = "rpmsg-raw"


class Sink(Endpoint):
    """Counts what it receives and throws it away (the guest→host benchmark target).

    ``zero_copy=1``: take the messages in guest memory, as a handler that reads them in
    place would (it reads none: the cost of the path alone).
    """

    def __init__(self, addr: int, name: str | None = None, *,
                 zero_copy: bool | str = "0", **options: Any) -> None:
        super().__init__(addr, name, **options)
        self.zero_copy = _flag(zero_copy)
        self.messages = 0
        self.bytes = 0
        self.last_src: int | None = None

    def on_message_batch(self, batch: MessageBatch) -> None:
        self.messages += len(batch)
        self.bytes += batch.total_bytes()
        self.last_src = int(batch.srcs[-1])

    def on_message(self, src: int, data: bytes) -> None:
        self.messages += 1
        self.bytes += len(data)
        self.last_src = src


def _flag(value: bool | str) -> bool:
    """An on/off option, from Python or from the command line (``1``/``0``, ``yes``/``no``)."""
    if isinstance(value, bool):
        return value
    v = str(value).strip().lower()
    if v in ("1", "true", "yes", "on"):
        return True
    if v in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"expected 1 or 0, not {value!r}")


#: messages a ``rate=0`` source hands over per send_many
BURST = 64


class Source(Endpoint):
    """Generates messages to a guest address at a given rate and size.

    Options: ``dst`` (guest address, required), ``size`` (payload bytes, default 64),
    ``rate`` (messages per second, default 100; 0 = as fast as the guest takes them),
    ``count`` (stop after this many; 0 = forever).  While the guest has no room the
    source waits: it never generates what it cannot deliver.
    """

    def __init__(self, addr: int, name: str | None = None, *, dst: int | str | None = None,
                 size: int | str = 64, rate: float | str = 100.0, count: int | str = 0) -> None:
        super().__init__(addr, name)
        if dst is None:
            raise ValueError("source needs dst=<guest address>")
        self.dst = int(dst)
        self.size = int(size)
        self.rate = float(rate)
        self.count = int(count)
        if not 0 <= self.size <= 496:
            raise ValueError(f"source size {self.size} outside 0..496")
        self.sent = 0
        self._task: asyncio.Task[None] | None = None

    def payload(self, seq: int) -> bytes:
        """Deterministic content, so a receiver can check every byte."""
        pattern = seq.to_bytes(4, "little") * (self.size // 4 + 1)
        return pattern[: self.size]

    def guest_ready(self) -> None:
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._run())

    def guest_gone(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None

    close = guest_gone

    async def _run(self) -> None:
        assert self.port is not None
        if self.rate <= 0:
            await self._flood()
            return
        period = 1.0 / self.rate
        next_at = time.monotonic()
        while not self.count or self.sent < self.count:
            await self.port.asend(self.dst, self.payload(self.sent))
            self.sent += 1
            next_at += period
            delay = next_at - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            else:
                next_at = time.monotonic()

    async def _flood(self) -> None:
        """``rate=0``: bursts through the batch API (one ring pass and one notification
        each), waiting for room when the guest does not read, and a turn of the loop
        between bursts so everyone else is served."""
        assert self.port is not None
        while not self.count or self.sent < self.count:
            k = BURST if not self.count else min(BURST, self.count - self.sent)
            burst = [(self.dst, self.payload(self.sent + i)) for i in range(k)]
            try:
                self.port.send_many(burst)
            except BlockingIOError:  # the outbox is full
                await self.port.asend(*burst[0])
                k = 1
            self.sent += k
            await asyncio.sleep(0)
