"""The ring-state rules, tested on the transition function itself (no socket, no device)."""

from __future__ import annotations

import os

import pytest

from vhost_rpmsg.guest.ring import RingLayout
from vhost_rpmsg.vhost_user.ring_state import Change, Event, Ring, RingState, transition
from vhost_rpmsg.vhost_user.vring import Vring
from vhost_rpmsg.virtio.queue import QueueBroken
from vhost_rpmsg.virtio.queue_python import PythonQueue

from .helpers import Memfd, setup_queue

S = RingState
STOPPED, DISABLED, ENABLED, BROKEN = S.STOPPED, S.STARTED_DISABLED, S.STARTED_ENABLED, S.BROKEN


def step(ring: Ring, event: Event, pf: bool = True) -> tuple[Ring, Change | None]:
    return transition(ring, event, protocol_features=pf)


def test_a_new_ring_is_stopped_and_disabled() -> None:
    assert Ring() == Ring(STOPPED, False)
    assert not Ring().started and not Ring().ready


def test_start_without_protocol_features_is_enabled_at_once() -> None:
    assert step(Ring(), Event.START, pf=False) == (Ring(ENABLED, True), Change.READY)


def test_start_with_protocol_features_waits_for_enable() -> None:
    ring, change = step(Ring(), Event.START)
    assert (ring, change) == (Ring(DISABLED, False), None)
    assert step(ring, Event.ENABLE) == (Ring(ENABLED, True), Change.READY)


def test_enable_while_stopped_is_tracked_and_applies_at_start() -> None:
    ring, change = step(Ring(), Event.ENABLE)
    assert (ring, change) == (Ring(STOPPED, True), None)
    assert step(ring, Event.START) == (Ring(ENABLED, True), Change.READY)


def test_disable_pauses_a_ready_ring_and_enable_resumes_it() -> None:
    ready = Ring(ENABLED, True)
    paused, change = step(ready, Event.DISABLE)
    assert (paused, change) == (Ring(DISABLED, False), Change.NOT_READY)
    assert paused.started
    assert step(paused, Event.ENABLE) == (ready, Change.READY)


def test_repeated_requests_change_nothing_and_say_nothing() -> None:
    for ring, event in [(Ring(ENABLED, True), Event.ENABLE), (Ring(ENABLED, True), Event.START),
                        (Ring(DISABLED, False), Event.DISABLE), (Ring(DISABLED, False),
                                                                 Event.START),
                        (Ring(STOPPED, False), Event.STOP), (Ring(STOPPED, True), Event.STOP)]:
        assert step(ring, event) == (ring, None), (ring, event)


def test_stop_ends_a_started_ring_even_when_it_was_not_ready() -> None:
    for ring in (Ring(ENABLED, True), Ring(DISABLED, False), Ring(BROKEN, True)):
        new, change = step(ring, Event.STOP)
        assert (new.state, change) == (STOPPED, Change.NOT_READY), ring
        assert new.enabled == ring.enabled  # the enabled bit survives the stop


def test_break_stops_use_until_started_again() -> None:
    broken, change = step(Ring(ENABLED, True), Event.BREAK)
    assert (broken, change) == (Ring(BROKEN, True), Change.NOT_READY)
    assert broken.started and not broken.ready
    # enable/disable while broken are tracked, never a way back in
    assert step(broken, Event.DISABLE) == (Ring(BROKEN, False), None)
    assert step(broken, Event.ENABLE) == (broken, None)
    assert step(broken, Event.START) == (Ring(ENABLED, True), Change.READY)
    # a disabled ring that breaks was not in use: nothing to tell
    assert step(Ring(DISABLED, False), Event.BREAK) == (Ring(BROKEN, False), None)
    # a stopped ring cannot break
    assert step(Ring(STOPPED, True), Event.BREAK) == (Ring(STOPPED, True), None)


def test_reset_forgets_everything() -> None:
    for ring in (Ring(ENABLED, True), Ring(BROKEN, True), Ring(STOPPED, True)):
        new, change = step(ring, Event.RESET)
        assert new == Ring()
        assert change == (Change.NOT_READY if ring.started else None)


@pytest.mark.parametrize("pf", [False, True])
def test_every_change_is_told_exactly_once(pf: bool) -> None:
    """Walk every state with every event: a change is reported iff readiness or
    started-ness went away, or readiness came."""
    states = [Ring(s, e) for s in S for e in (False, True)]
    for ring in states:
        for event in Event:
            new, change = step(ring, event, pf)
            if new.ready and not ring.ready:
                assert change is Change.READY
            elif (ring.ready and not new.ready) or (ring.started and not new.started):
                assert change is Change.NOT_READY
            else:
                assert change is None, (ring, event, new)


def test_vring_breaks_once_signals_err_fd_and_tells_the_device() -> None:
    memfd = Memfd(1 << 16)
    q = setup_queue(PythonQueue, memfd.guest_memory(), RingLayout(0, 8))
    heard: list[tuple[int, Change]] = []
    vr = Vring(q, lambda v, c: heard.append((v.index, c)))
    err = os.eventfd(0, os.EFD_NONBLOCK)
    vr.set_err(err)
    vr.apply(Event.START)
    assert vr.ready and heard == [(0, Change.READY)]
    memfd.mem[q.state.avail_addr + 2 : q.state.avail_addr + 4] = [9, 0]  # avail idx 9 > 8
    with pytest.raises(QueueBroken) as exc:
        q.pending()
    vr.break_(str(exc.value))
    vr.break_(str(exc.value))  # a second report of the same breakage changes nothing
    assert vr.state is BROKEN and not vr.ready
    assert vr.broken == "avail idx 9 is 9 ahead of 0"
    assert heard == [(0, Change.READY), (0, Change.NOT_READY)]
    assert os.eventfd_read(err) == 1
    vr.apply(Event.START)  # set up again: usable, no longer broken
    assert vr.ready and vr.broken is None
    vr.reset()
    assert vr.err_fd is None and not q.state.mapped
    memfd.close()
