"""The vhost-user conversation: QEMU's order, each request's reply, ring states."""

from __future__ import annotations

from typing import Any

import pytest

from vhost_rpmsg.guest.frontend import Frontend, FrontendError, GuestRam
from vhost_rpmsg.guest.rpmsg_guest import QEMU_PROTOCOL_FEATURES, SimGuest
from vhost_rpmsg.vhost_user import codec
from vhost_rpmsg.vhost_user.codec import Message
from vhost_rpmsg.vhost_user.protocol import (
    MAX_MEM_SLOTS,
    VHOST_USER_F_PROTOCOL_FEATURES,
    ProtocolFeature,
    Request,
)
from vhost_rpmsg.virtio.constants import (
    VIRTIO_F_VERSION_1,
    VIRTIO_RING_F_EVENT_IDX,
    VIRTIO_RING_F_INDIRECT_DESC,
    VIRTIO_RPMSG_F_NS,
)

from .conftest import Running, Serve
from .helpers import wait_until

PF = ProtocolFeature


def _fe(r: Running, protocol: int = QEMU_PROTOCOL_FEATURES) -> tuple[Frontend, GuestRam]:
    ram = GuestRam(1 << 20)
    fe = Frontend(r.path, ram)
    fe.negotiate(protocol)
    return fe, ram


def test_negotiation_replies(serve: Serve) -> None:
    r = serve()
    fe, ram = _fe(r)
    f = fe.backend_features
    for bit in (VIRTIO_RPMSG_F_NS, VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX,
                VIRTIO_RING_F_INDIRECT_DESC, VHOST_USER_F_PROTOCOL_FEATURES):
        assert f & (1 << bit), bit
    assert fe.num_queues == 2
    for feat in (PF.MQ, PF.REPLY_ACK, PF.CONFIGURE_MEM_SLOTS, PF.STATUS, PF.RESET_DEVICE):
        assert fe.has(feat), feat
    assert not fe.has(PF.CONFIG)  # no config space to offer
    # as many as its memory table holds (QEMU wants at least 8)
    assert fe.get_u64(Request.GET_MAX_MEM_SLOTS) == MAX_MEM_SLOTS
    # config space: an rpmsg device has none; a read returns the window asked for
    body = fe.request(Request.GET_CONFIG, codec.encode_config(0, bytes(8)))
    assert body == codec.encode_config(0, bytes(8))
    with pytest.raises(FrontendError):
        fe.request(Request.SET_CONFIG, codec.encode_config(0, b"\1"), need_reply=True)
    fe.request(Request.SET_STATUS, codec.encode_u64(0x7), need_reply=True)
    assert fe.get_u64(Request.GET_STATUS) == 0x7
    # a request the backend does not know gets a failure ack, and the stream goes on
    with pytest.raises(FrontendError):
        fe.request(200, b"", need_reply=True)
    fe.request(Request.SET_LOG_BASE, bytes(16))  # no reply owed; must not break anything
    assert fe.get_u64(Request.GET_QUEUE_NUM) == 2
    fe.close()
    ram.close()


@pytest.mark.parametrize("protocol", [
    QEMU_PROTOCOL_FEATURES,  # ADD_MEM_REG, STATUS
    (1 << PF.MQ) | (1 << PF.REPLY_ACK),  # what the reference notes saw QEMU 11 use
    (1 << PF.MQ),  # no REPLY_ACK
    0,  # protocol features offered but none taken
], ids=["mem-slots", "qemu-11-default", "no-reply-ack", "bare"])
def test_guest_starts_with_each_feature_set(serve: Serve, protocol: int) -> None:
    r = serve()
    g = r.guest(protocol_features=protocol).start()
    wait_until(lambda: r.device.guest_ready)
    g.open(1500)
    r.device.send_nowait(7, 1500, b"ping")
    assert g.recv(1500) == (7, b"ping")
    g.close()
    wait_until(lambda: not r.device.guest_ready)


def test_rings_wait_for_enable_when_protocol_features_negotiated(serve: Serve) -> None:
    r = serve()
    backend_seen = []

    def spy() -> None:
        b = r.server.backend
        assert b is not None
        backend_seen.append([(v.ring.started, v.ring.enabled) for v in b.vrings])

    g = r.guest().start()
    r.call(spy)
    assert backend_seen[-1] == [(True, True), (True, True)]
    assert g.fe is not None
    g.fe.request(Request.SET_VRING_ENABLE, codec.encode_vring_state(0, 0), need_reply=True)
    r.call(spy)
    assert backend_seen[-1][0] == (True, False)  # disabled, still started: state kept
    assert r.device.guest_ready  # a disabled ring is a pause, not a new guest
    g.fe.request(Request.SET_VRING_ENABLE, codec.encode_vring_state(0, 1), need_reply=True)
    g.close()


def test_get_vring_base_returns_next_avail_and_keeps_state(serve: Serve) -> None:
    from vhost_rpmsg.endpoints import Sink

    sink = Sink(1024)
    r = serve([sink])
    g = r.guest().start()
    for i in range(10):
        g.send(1100, 1024, b"x" * i)
    wait_until(lambda: sink.messages == 10)
    g.open(1100)
    for _ in range(3):
        r.device.send_nowait(1024, 1100, b"y")
        g.recv(1100)
    assert g.fe is not None
    bases = g.fe.stop(2)
    assert bases == [3, 10]  # 3 rx buffers and 10 tx buffers taken by the host
    b = r.server.backend
    assert b is not None and b.memory.regions  # GET_VRING_BASE does not drop memory
    assert all(v.queue.state.size == 256 for v in b.vrings)  # nor ring configuration
    g.disconnect()


def test_reset_device_stops_rings_and_ends_the_session(serve: Serve) -> None:
    r = serve()
    g = r.guest().start()
    wait_until(lambda: r.device.guest_ready)
    assert g.fe is not None
    g.fe.request(Request.RESET_DEVICE, need_reply=True)
    wait_until(lambda: not r.device.guest_ready)
    b = r.server.backend
    assert b is not None and not any(v.ring.started for v in b.vrings)
    g.disconnect()


def test_rem_mem_reg_unmaps_and_rings_stop(serve: Serve) -> None:
    r = serve()
    g = r.guest().start()
    assert g.fe is not None and g.ram is not None
    g.fe.request(Request.REM_MEM_REG, codec.encode_single_region(g.ram.region()),
                 need_reply=True)
    b = r.server.backend
    assert b is not None
    assert len(b.memory) == 0
    assert not any(v.ready for v in b.vrings)
    assert b.errors["ring_unmapped"] == 2
    g.disconnect()


def test_order_of_requests_matches_qemu(serve: Serve,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    r = serve()
    seen: list[str] = []

    def record() -> None:
        b = r.server.backend
        assert b is not None
        orig = b.handle

        def handle(msg: Message) -> bytes | None:
            seen.append(msg.name)
            return orig(msg)

        monkeypatch.setattr(b, "handle", handle)

    g = SimGuest(r.path, protocol_features=(1 << PF.MQ) | (1 << PF.REPLY_ACK))
    r.guests.append(g)
    # connect, then install the recorder before the first request is processed
    from vhost_rpmsg.guest.frontend import Frontend as F
    orig_init = F.__init__

    def init(self: F, *a: Any, **k: Any) -> None:
        orig_init(self, *a, **k)
        wait_until(lambda: r.server.backend is not None)
        r.call(record)

    with monkeypatch.context() as m:  # only this guest's front-end records
        m.setattr(F, "__init__", init)
        g.start()
    per_queue = ["SET_VRING_NUM", "SET_VRING_BASE", "SET_VRING_ADDR", "SET_VRING_KICK",
                 "SET_VRING_CALL"]
    assert seen == [
        "GET_FEATURES", "GET_PROTOCOL_FEATURES", "SET_PROTOCOL_FEATURES", "GET_QUEUE_NUM",
        "SET_OWNER", "GET_FEATURES",
        "SET_VRING_CALL", "SET_VRING_ERR", "SET_VRING_CALL", "SET_VRING_ERR",
        "SET_FEATURES", "SET_MEM_TABLE", *per_queue, *per_queue,
        "SET_VRING_ENABLE", "SET_VRING_ENABLE",
    ]
    g.close()


def test_set_vring_enable_needs_protocol_features(
        serve: Serve, caplog: pytest.LogCaptureFixture) -> None:
    """"This request should be sent only when VHOST_USER_F_PROTOCOL_FEATURES has been
    negotiated": without it the request is refused (and the ring keeps its state)."""
    r = serve()
    ram = GuestRam(1 << 20)
    fe = Frontend(r.path, ram)
    fe.get_u64(Request.GET_FEATURES)
    fe.request(Request.SET_OWNER)
    fe.request(Request.SET_VRING_ENABLE, codec.encode_vring_state(0, 1))
    assert fe.get_u64(Request.GET_QUEUE_NUM) == 2  # the connection goes on

    def check() -> None:
        b = r.server.backend
        assert b is not None
        assert b.errors["bad_request"] == 1
        assert not b.vrings[0].ring.enabled

    r.call(check)
    assert "without VHOST_USER_F_PROTOCOL_FEATURES" in caplog.text
    fe.close()
    ram.close()


def test_set_features_without_the_protocol_bit_enables_every_ring(serve: Serve) -> None:
    """Ring states: "upon receiving a VHOST_USER_SET_FEATURES message from the front-end
    without VHOST_USER_F_PROTOCOL_FEATURES set, the back-end must enable all rings
    immediately", also after SET_PROTOCOL_FEATURES (which SET_FEATURES need not ack)."""
    r = serve()
    ram = GuestRam(1 << 20)
    fe = Frontend(r.path, ram)
    fe.negotiate((1 << PF.MQ) | (1 << PF.REPLY_ACK))
    features = fe.backend_features & ~(1 << VHOST_USER_F_PROTOCOL_FEATURES)
    fe.request(Request.SET_FEATURES, codec.encode_u64(features), need_reply=True)

    def check() -> None:
        b = r.server.backend
        assert b is not None
        assert [(v.ring.started, v.ring.enabled) for v in b.vrings] == [(False, True)] * 2

    r.call(check)
    fe.close()
    ram.close()
