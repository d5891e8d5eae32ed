"""Guest sessions and the name service.

A guest session lasts from the rx ring becoming usable to its stop or a device reset;
the guest forgets every channel in between, so every host service is announced again to
each new session.  The guest's own announcements (to the name-service address, 53) are
recorded here and passed to listeners.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

from . import codec as rp
from .ratelimit import RateLimitedLog

log = logging.getLogger(__name__)

#: announcement lines logged at once before the log is throttled to one a second
NS_LOG_BURST = 32

#: guest services remembered per session: a guest announcing more is refused the rest
#: (a Linux guest announces one per channel driver endpoint: a handful)
MAX_GUEST_SERVICES = 1024


@dataclass(frozen=True)
class GuestService:
    """A service the guest announced to the host."""

    name: str
    addr: int


def ns_message(name: str, addr: int, flags: rp.NsFlags) -> bytes:
    """A name-service message from ``addr`` to the guest's name service."""
    return rp.encode_message(addr, rp.NS_ADDR, rp.encode_ns(rp.NsMessage(name, addr, flags)))


class NameService:
    """Host services to announce, the guest's services, and whether a session is on."""

    def __init__(self, stats: Counter[str], rl: RateLimitedLog) -> None:
        #: host addr -> announced name, in registration order
        self.services: dict[int, str] = {}
        self.guest_services: dict[str, GuestService] = {}
        self.listeners: list[Callable[[rp.NsMessage], None]] = []
        #: a guest session is on: its rx ring is usable
        self.ready = False
        self._stats = stats
        self._rl = rl
        self._ns_log = RateLimitedLog(log, burst=NS_LOG_BURST)

    def record(self, name: str, addr: int, flags: rp.NsFlags) -> bytes:
        """Register (CREATE) or withdraw a host service; its name-service message.

        A bad name is refused before anything changes.
        """
        msg = ns_message(name, addr, flags)
        if flags is rp.NsFlags.CREATE:
            self.services[addr] = name
        else:
            self.services.pop(addr, None)
        return msg

    def session_announcements(self) -> list[bytes]:
        """Every registered service's CREATE, for a new session."""
        return [ns_message(name, addr, rp.NsFlags.CREATE) for addr, name in self.services.items()]

    def end_session(self) -> bool:
        """The guest is gone; whether a session was on."""
        was = self.ready
        self.ready = False
        self.guest_services.clear()
        return was

    def from_guest(self, src: int, payload: bytes) -> None:
        """A message the guest sent to the name-service address."""
        try:
            ns = rp.decode_ns(payload)
        except rp.RpmsgFormatError as e:
            self._stats["bad_guest_ns"] += 1
            self._rl.error("bad_ns", "malformed name-service message from guest %d: %s",
                           src, e)
            return
        if ns.flags is rp.NsFlags.CREATE:
            if (ns.name not in self.guest_services
                    and len(self.guest_services) >= MAX_GUEST_SERVICES):
                self._stats["guest_ns_refused"] += 1
                self._rl.error("ns_full", "guest announced more than %d services; %r at %d "
                               "ignored", MAX_GUEST_SERVICES, ns.name, ns.addr)
                return
            self.guest_services[ns.name] = GuestService(ns.name, ns.addr)
        else:
            self.guest_services.pop(ns.name, None)
        self._stats[f"guest_ns_{ns.flags.name.lower()}"] += 1
        self._ns_log.info("guest_ns", "guest announced %r at %d (%s)", ns.name, ns.addr,
                          ns.flags.name.lower())
        for listener in list(self.listeners):
            try:
                listener(ns)
            except Exception:
                self._stats["listener_errors"] += 1
                log.exception("guest name-service listener failed")
