"""The vhost-user ring states, and the one function that moves a ring between them.

Pure: no fds, no device, no I/O, so the rules are tested directly
(tests/test_ring_state.py).  The vhost-user specification, "Ring states":

    "Rings have two independent states: started/stopped, and enabled/disabled."

    "While a ring is stopped, the back-end must not process the ring at all, regardless
    of whether it is enabled or disabled.  The enabled/disabled state should still be
    tracked, though, so it can come into effect once the ring is started."

so a :class:`Ring` is a :class:`RingState` plus the enabled bit kept while stopped.  A
ring we found inconsistent is BROKEN: started, but never used again until the front-end
starts it afresh (or stops or resets it).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class RingState(enum.Enum):
    STOPPED = "stopped"
    STARTED_DISABLED = "started-disabled"
    STARTED_ENABLED = "started-enabled"
    BROKEN = "broken"


class Event(enum.Enum):
    START = "start"  # SET_VRING_KICK
    STOP = "stop"  # GET_VRING_BASE, or the rings left guest memory
    ENABLE = "enable"  # SET_VRING_ENABLE 1
    DISABLE = "disable"  # SET_VRING_ENABLE 0
    BREAK = "break"  # the ring's contents are inconsistent
    RESET = "reset"  # RESET_OWNER, RESET_DEVICE, disconnect


class Change(enum.Enum):
    """What the device hears, once per change."""

    READY = "ready"  # it may use the ring now
    NOT_READY = "not-ready"  # it must stop using it (disabled, broken or stopped)


@dataclass(frozen=True)
class Ring:
    # "Each ring is initialized in a stopped and disabled state." (vhost-user.rst, Ring states)
    state: RingState = RingState.STOPPED
    enabled: bool = False

    @property
    def started(self) -> bool:
        return self.state is not RingState.STOPPED

    @property
    def ready(self) -> bool:
        return self.state is RingState.STARTED_ENABLED


def _started(enabled: bool) -> RingState:
    return RingState.STARTED_ENABLED if enabled else RingState.STARTED_DISABLED


def transition(ring: Ring, event: Event, *, protocol_features: bool) -> tuple[Ring, Change | None]:
    """The ring after ``event``, and what the device must be told (None: nothing).

    ``protocol_features``: whether VHOST_USER_F_PROTOCOL_FEATURES was negotiated.
    """
    state, enabled = ring.state, ring.enabled
    if event is Event.START:
        # Ring states: "upon receiving a VHOST_USER_SET_FEATURES message from the front-end
        # without VHOST_USER_F_PROTOCOL_FEATURES set, the back-end must enable all rings
        # immediately" (the back-end's _set_features does).  Earlier revisions of the
        # section said "If VHOST_USER_F_PROTOCOL_FEATURES has not been negotiated, the ring
        # starts directly in the enabled state.", kept here; otherwise the tracked bit applies.
        if not protocol_features:
            enabled = True
        new = Ring(_started(enabled), enabled)
    elif event is Event.ENABLE or event is Event.DISABLE:
        enabled = event is Event.ENABLE
        if state in (RingState.STARTED_DISABLED, RingState.STARTED_ENABLED):
            state = _started(enabled)
        new = Ring(state, enabled)  # stopped or broken: tracked for later
    elif event is Event.BREAK:
        new = Ring(RingState.BROKEN, enabled) if ring.started else ring
    elif event is Event.STOP:
        new = Ring(RingState.STOPPED, enabled)
    else:  # RESET: back to a ring never set up
        new = Ring()
    if new.ready and not ring.ready:
        return new, Change.READY
    if ring.ready and not new.ready:
        return new, Change.NOT_READY
    if ring.started and not new.started:
        # Stopping a ring that was not in use still ends it: the driver sets it up anew.
        return new, Change.NOT_READY
    return new, None
