"""The stats snapshot in Prometheus' text format (``serve --metrics HOST:PORT``).

The exporter's HTTP thread asks the loop for a snapshot on every scrape, so the numbers
are the ones ``vhost-rpmsg stats`` shows, read between two turns of the loop.  Names
are listed in docs/control.md.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, ProcessCollector, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

log = logging.getLogger(__name__)

_QUEUE_COUNTERS = ("popped", "pushed", "bad_chains", "notifies", "notifies_suppressed",
                   "notify_failures", "kicks")
#: how long a scrape waits for the loop
SCRAPE_TIMEOUT = 5.0


class SnapshotCollector(Collector):
    """Turns :func:`~.stats.snapshot` into metric families."""

    def __init__(self, take: Callable[[], dict[str, Any]]) -> None:
        self._take = take

    def collect(self) -> Iterator[Metric]:
        snap = self._take()
        connected = GaugeMetricFamily("vhost_rpmsg_connected",
                                      "1 while a front-end is connected", labels=["socket"])
        server_events = CounterMetricFamily("vhost_rpmsg_server_events",
                                            "server counters (connections, drops...)",
                                            labels=["socket", "event"])
        device_events = CounterMetricFamily("vhost_rpmsg_device_events",
                                            "rpmsg device counters", labels=["socket", "event"])
        ring_state = GaugeMetricFamily("vhost_rpmsg_queue_state", "1 for the ring's state",
                                       labels=["socket", "queue", "state"])
        queue = {k: CounterMetricFamily(f"vhost_rpmsg_queue_{k}", f"virtqueue {k}",
                                        labels=["socket", "queue"]) for k in _QUEUE_COUNTERS}
        outbox = GaugeMetricFamily("vhost_rpmsg_outbox_queued",
                                   "messages waiting for guest rx buffers", labels=["socket"])
        services = GaugeMetricFamily("vhost_rpmsg_guest_services",
                                     "services the guest announced", labels=["socket"])
        labels = ["socket", "addr", "name", "direction"]
        ep_msgs = CounterMetricFamily("vhost_rpmsg_endpoint_messages",
                                      "messages per endpoint", labels=labels)
        ep_bytes = CounterMetricFamily("vhost_rpmsg_endpoint_bytes",
                                       "payload bytes per endpoint", labels=labels)
        ep_drops = CounterMetricFamily("vhost_rpmsg_endpoint_dropped",
                                       "guest messages an endpoint did not take, by reason",
                                       labels=["socket", "addr", "name", "reason"])
        ep_failed = CounterMetricFamily("vhost_rpmsg_endpoint_handler_failed",
                                        "messages the handler raised on",
                                        labels=["socket", "addr", "name"])
        ep_depth = GaugeMetricFamily("vhost_rpmsg_endpoint_queue_depth",
                                     "messages waiting for the endpoint",
                                     labels=["socket", "addr", "name"])
        for srv in snap["servers"]:
            sock = str(srv["index"])
            connected.add_metric([sock], 1.0 if srv["connected"] else 0.0)
            for k, v in srv["counters"].items():
                server_events.add_metric([sock, k], v)
            for q in srv.get("queues", []):
                qi = str(q["index"])
                ring_state.add_metric([sock, qi, q["state"]], 1.0)
                for k in _QUEUE_COUNTERS:
                    queue[k].add_metric([sock, qi], q[k])
            dev = srv.get("device")
            if dev is None:
                continue
            for k, v in dev["counters"].items():
                device_events.add_metric([sock, k], v)
            outbox.add_metric([sock], dev["outbox_queued"])
            services.add_metric([sock], len(srv["guest_services"]))
            for ep in srv["endpoints"]:
                base = [sock, str(ep["addr"]), ep["name"] or ""]
                ep_msgs.add_metric([*base, "to_host"], ep["to_host_messages"])
                ep_msgs.add_metric([*base, "to_guest"], ep["to_guest_messages"])
                ep_bytes.add_metric([*base, "to_host"], ep["to_host_bytes"])
                ep_bytes.add_metric([*base, "to_guest"], ep["to_guest_bytes"])
                drops = dict(ep["dropped"])
                own = ep.get("endpoint", {})
                for reason in ("dropped_slow_reader", "no_dst", "bad_datagrams"):
                    if reason in own:
                        drops[reason.removeprefix("dropped_")] = own[reason]
                for reason, v in drops.items():
                    ep_drops.add_metric([*base, reason], v)
                ep_failed.add_metric(base, ep["handler_failed_messages"])
                ep_depth.add_metric(base, ep["queue_depth"] + own.get("queued_to_process", 0))
        yield from (connected, server_events, device_events, ring_state, *queue.values(),
                    outbox, services, ep_msgs, ep_bytes, ep_drops, ep_failed, ep_depth)


def parse_address(text: str) -> tuple[str, int]:
    """``PORT`` or ``HOST:PORT`` (loopback when no host is given)."""
    host, _, port = text.rpartition(":")
    try:
        number = int(port)
    except ValueError:
        raise ValueError(f"{text!r}: expected PORT or HOST:PORT") from None
    if not 0 <= number <= 65535:
        raise ValueError(f"{text!r}: port out of range")
    return (host.strip("[]") or "127.0.0.1"), number


class MetricsServer:
    """The exporter: its socket and HTTP thread are made at once (before any sandbox is
    entered); scrapes answer with process metrics only until :meth:`attach` gives it the
    snapshot to read, which then runs on ``loop``."""

    def __init__(self, address: tuple[str, int]) -> None:
        self._take: Callable[[], dict[str, Any]] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        registry = CollectorRegistry()
        registry.register(SnapshotCollector(self._snapshot))
        registry.register(ProcessCollector(registry=None))
        self.httpd, self.thread = start_http_server(address[1], address[0], registry=registry)
        host, port = self.httpd.server_address[:2]
        self.address = (str(host), int(port))
        log.info("metrics on http://%s:%d/metrics", *self.address)

    def attach(self, take: Callable[[], dict[str, Any]],
               loop: asyncio.AbstractEventLoop) -> None:
        self._take, self._loop = take, loop

    def _snapshot(self) -> dict[str, Any]:
        take, loop = self._take, self._loop
        if take is None or loop is None:
            return {"servers": []}

        async def run() -> dict[str, Any]:
            return take()
        return asyncio.run_coroutine_threadsafe(run(), loop).result(SCRAPE_TIMEOUT)

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
