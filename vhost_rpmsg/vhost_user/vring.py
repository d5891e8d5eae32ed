"""A vhost-user ring: one virtqueue plus what vhost-user adds to it.

The queue (:mod:`vhost_rpmsg.virtio.queue`) is pure virtio.  The :class:`Vring` owns the
rest, as rust-vmm's ``VringState`` does: the kick, call and err eventfds the front-end
sent, the ring state (:mod:`.ring_state`), and the eventfd writes that interrupt the guest
or report an error.  Devices get Vrings: ``vring.queue`` to move buffers,
``vring.notify()`` to interrupt, ``vring.ready`` to know whether they may.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from types import TracebackType

from ..virtio.queue import Queue, QueueBroken
from .ring_state import Change, Event, Ring, RingState, transition

log = logging.getLogger(__name__)


def close_quietly(fd: int | None) -> None:
    if fd is None:
        return
    try:
        os.close(fd)
    except OSError:
        pass


class Vring:
    """One ring of a vhost-user device: a queue, its eventfds and its state."""

    def __init__(self, queue: Queue, on_change: Callable[[Vring, Change], None]) -> None:
        self.queue = queue
        self.kick_fd: int | None = None
        self.call_fd: int | None = None
        self.err_fd: int | None = None
        self.ring = Ring()
        #: started and enabled (so mapped) and not broken: the device may use it (kept
        #: with ``ring``: read on every pass of a device's loop)
        self.ready = False
        #: why the ring is BROKEN (None otherwise)
        self.broken: str | None = None
        self._on_change = on_change
        self._guard = _Guard(self)  # one, reused: entered on every pass of the hot path

    @property
    def index(self) -> int:
        return self.queue.state.index

    @property
    def state(self) -> RingState:
        return self.ring.state

    def apply(self, event: Event, *, protocol_features: bool = False) -> Change | None:
        """Move the ring on ``event``; the device hears of a change exactly once."""
        self.ring, change = transition(self.ring, event, protocol_features=protocol_features)
        self.ready = self.ring.ready
        if self.ring.state is not RingState.BROKEN:
            self.broken = None
        if change is not None:
            self._on_change(self, change)
        return change

    def break_(self, why: str) -> None:
        """The ring is inconsistent: stop using it and tell the front-end (err eventfd)."""
        if not self.ring.started or self.ring.state is RingState.BROKEN:
            return
        log.error("queue %d broken: %s; stopped until the ring is set up again",
                  self.index, why)
        self.broken = why
        self.signal_error()
        self.apply(Event.BREAK)

    def guarding(self) -> _Guard:
        """``with vring.guarding() as queue:`` use the queue; a QueueBroken out of it
        breaks this ring (once), then goes on up to the caller.  Whoever drives a queue
        does it in here."""
        return self._guard

    # -- eventfds --------------------------------------------------------------------

    def set_kick(self, fd: int | None) -> None:
        close_quietly(self.kick_fd)
        self.kick_fd = fd

    def set_call(self, fd: int | None) -> None:
        close_quietly(self.call_fd)
        self.call_fd = fd

    def set_err(self, fd: int | None) -> None:
        close_quietly(self.err_fd)
        self.err_fd = fd

    def notify(self) -> bool:
        """Interrupt the guest if it wants it; returns whether we did."""
        return self.notify_as(self.queue.need_notify())

    def notify_as(self, wanted: bool) -> bool:
        """:meth:`notify` with the decision already made (``need_notify``, or an engine
        call that made it along the way): interrupt, or count it suppressed."""
        stats = self.queue.state.stats
        if not wanted:
            stats.notifies_suppressed += 1
            return False
        fd = self.call_fd
        if fd is None:
            return False
        try:
            os.eventfd_write(fd, 1)
        except OSError as e:  # a full counter is EAGAIN: the fd is non-blocking
            stats.notify_failures += 1
            if stats.notify_failures == 1 or stats.notify_failures % 10000 == 0:
                log.error("queue %d: call eventfd write failed (%d times): %s",
                          self.index, stats.notify_failures, e)
            return False
        stats.notifies += 1
        return True

    def signal_error(self) -> None:
        if self.err_fd is not None:
            try:
                os.eventfd_write(self.err_fd, 1)
            except OSError:
                pass

    def close_fds(self) -> None:
        for fd in (self.kick_fd, self.call_fd, self.err_fd):
            close_quietly(fd)
        self.kick_fd = self.call_fd = self.err_fd = None

    def reset(self) -> None:
        """Back to a ring never set up: stopped (the device hears it), no fds, unmapped."""
        self.apply(Event.RESET)
        self.close_fds()
        self.queue.state.reset()


class _Guard:
    """What :meth:`Vring.guarding` returns (a plain class: cheaper to enter than a
    generator-based context manager)."""

    __slots__ = ("_vring",)

    def __init__(self, vring: Vring) -> None:
        self._vring = vring

    def __enter__(self) -> Queue:
        return self._vring.queue

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if isinstance(exc, QueueBroken):
            self._vring.break_(str(exc))
