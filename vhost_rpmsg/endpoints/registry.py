"""Endpoint plugins: found through the ``vhost_rpmsg.endpoints`` entry-point group and
chosen by a spec string such as ``echo@1024`` or ``rpmsg-raw:sink@1025``."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from importlib.metadata import entry_points

from ..rpmsg.codec import NS_ADDR, RESERVED_ADDRESSES
from .base import Endpoint
from .builtin import Echo, RawEcho, Sink, Source
from .unix import UnixBridge

GROUP = "vhost_rpmsg.endpoints"
_BUILTIN: dict[str, type[Endpoint]] = {
    "echo": Echo, "sink": Sink, "source": Source, "rpmsg-raw": RawEcho, "unix": UnixBridge,
}
_SPEC = re.compile(
    r"^(?:(?P<name>[^:@,]*):)?(?P<plugin>[A-Za-z0-9_.-]+)(?:@(?P<addr>\d+|0x[0-9a-fA-F]+))?"
    r"(?P<opts>(?:,[A-Za-z_][A-Za-z0-9_]*=[^,]*)*)$"
)


class PluginError(ValueError):
    """An endpoint spec names an unknown plugin or cannot be parsed."""


def plugins() -> dict[str, type[Endpoint]]:
    """Every endpoint plugin installed (built-ins even when running from a source tree)."""
    found = dict(_BUILTIN)
    for ep in entry_points(group=GROUP):
        try:
            found[ep.name] = ep.load()
        except Exception as e:  # a broken third-party plugin must not hide the others
            raise PluginError(f"plugin {ep.name!r} ({ep.value}) failed to load: {e}") from e
    return found


@dataclass
class EndpointSpec:
    """``[NAME:]PLUGIN[@ADDR][,key=value...]`` — NAME empty means "do not announce"."""

    plugin: str
    name: str | None = None
    addr: int | None = None
    options: dict[str, str] = field(default_factory=dict)
    explicit_name: bool = False

    @classmethod
    def parse(cls, text: str) -> EndpointSpec:
        m = _SPEC.match(text.strip())
        if not m:
            raise PluginError(f"cannot parse endpoint {text!r}; "
                              "expected [NAME:]PLUGIN[@ADDR][,key=value...]")
        opts = {}
        for part in filter(None, (m["opts"] or "").split(",")):
            key, _, value = part.partition("=")
            opts[key] = value
        addr = int(m["addr"], 0) if m["addr"] else None
        return cls(m["plugin"], m["name"] or None, addr, opts, m["name"] is not None)


def build(specs: list[str], first_addr: int = RESERVED_ADDRESSES) -> list[Endpoint]:
    """Instantiate endpoints from spec strings, allocating addresses where none is given."""
    available = plugins()
    parsed = [EndpointSpec.parse(s) for s in specs]
    taken = {p.addr for p in parsed if p.addr is not None}
    next_addr = first_addr
    out = []
    for spec in parsed:
        cls = available.get(spec.plugin)
        if cls is None:
            raise PluginError(f"no endpoint plugin {spec.plugin!r}; "
                              f"installed: {', '.join(sorted(available))}")
        addr = spec.addr
        if addr is None:
            while next_addr in taken:
                next_addr += 1
            addr = next_addr
            taken.add(addr)
        if addr == NS_ADDR:
            raise PluginError(f"address {NS_ADDR} belongs to the name service")
        name = spec.name if spec.explicit_name else cls.default_name
        try:
            ep = cls(addr, name, **spec.options)
        except (TypeError, ValueError) as e:
            raise PluginError(f"endpoint {spec.plugin}@{addr}: {e}") from e
        ep.plugin = spec.plugin  # type: ignore[misc]
        out.append(ep)
    return out
