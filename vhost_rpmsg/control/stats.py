"""What a running server can say about itself: one JSON-able snapshot of every counter.

Read on the loop thread (the control server's requests run there), so the numbers of
one snapshot belong together.  The same snapshot feeds ``vhost-rpmsg stats`` and the
Prometheus exporter (:mod:`.metrics`).
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any

from ..endpoints.base import Endpoint
from ..rpmsg.device import RpmsgDevice
from ..rpmsg.dispatch import EndpointSlot
from ..vhost_user.server import VhostUserServer
from ..virtio.engines import engine_name


def endpoint_stats(slot: EndpointSlot) -> dict[str, Any]:
    ep = slot.endpoint
    s = slot.stats
    out: dict[str, Any] = {
        "addr": ep.addr,
        "name": ep.name,
        "plugin": ep.plugin or type(ep).__name__,
        "describe": ep.describe(),
        "handler": slot.style,
        "to_host_messages": s["messages"],
        "to_host_bytes": s["bytes"],
        "to_guest_messages": s["to_guest"],
        "to_guest_bytes": s["to_guest_bytes"],
        "handler_failed_messages": s["failed_messages"],
        "handler_slow_calls": s["slow_calls"],
        "dropped": {"handler_queue_full": s["dropped_queue_full"],
                    "session_ended": s["dropped_on_reset"]},
        "queue_depth": slot.queue.qsize() if slot.queue is not None else 0,
    }
    extra = _own_stats(ep)
    if extra:
        out["endpoint"] = extra
    return out


def _own_stats(ep: Endpoint) -> dict[str, int]:
    """An endpoint's own counters, if it keeps a ``stats`` mapping of numbers."""
    own = getattr(ep, "stats", None)
    if not isinstance(own, dict):
        return {}
    out = {str(k): v for k, v in own.items() if isinstance(v, int)}
    peer = getattr(ep, "peer", None)
    queued = getattr(peer, "queued", None)
    if isinstance(queued, int):
        out["queued_to_process"] = queued
    return out


def server_stats(index: int, server: VhostUserServer) -> dict[str, Any]:
    out: dict[str, Any] = {
        "index": index,
        "socket": server.name,
        "engine": engine_name(server.queue_factory),
        "connected": server.conn is not None,
        "counters": dict(server.stats),
    }
    backend = server.backend
    if backend is not None:
        out["session"] = {
            "features": f"0x{backend.acked_features:x}",
            "protocol_features": f"0x{backend.protocol_features:x}",
            "status": backend.status,
            "memory_regions": len(backend.memory),
            "errors": dict(backend.errors),
        }
        out["queues"] = [{
            "index": vr.index,
            "state": vr.state.name.lower(),
            "size": vr.queue.state.size,
            "broken": vr.broken,
            **dataclasses.asdict(vr.queue.state.stats),
        } for vr in backend.vrings]
    dev = server.device
    if isinstance(dev, RpmsgDevice):
        out["device"] = {
            "guest_ready": dev.guest_ready,
            "outbox_queued": dev.queued,
            "outbox_limit": dev.outbox_limit,
            "counters": dict(dev.stats),
        }
        out["guest_services"] = [{"name": g.name, "addr": g.addr}
                                 for g in dev.guest_services.values()]
        out["endpoints"] = [endpoint_stats(slot)
                            for slot in dev.dispatcher.slots.values()]
    return out


def snapshot(servers: list[VhostUserServer], started: float) -> dict[str, Any]:
    """Every server of this process, with the process itself."""
    return {
        "pid": os.getpid(),
        "uptime_s": round(time.monotonic() - started, 3),
        "servers": [server_stats(i, s) for i, s in enumerate(servers)],
    }
