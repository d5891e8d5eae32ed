"""Endpoint plugins: found through the ``vhost_rpmsg.endpoints`` entry-point group and
chosen by a spec string such as ``echo@1024`` or ``rpmsg-raw:sink@1025``.

Discovery reads only package metadata; a plugin's module is imported the first time
something asks for that plugin (an endpoint spec naming it, ``vhost-rpmsg plugins``).
A plugin that fails to import, or is not an :class:`Endpoint` subclass, is *broken*: it
is reported (a logged warning, and ``vhost-rpmsg plugins`` shows why) and never stops
the built-ins or any other plugin.

Names: the built-ins (echo, sink, source, rpmsg-raw, unix) always keep their names.  A
third-party entry point with a built-in's name is *shadowed*: reported, and reachable
only as ``DIST/NAME`` (its distribution's name, then the entry-point name, e.g.
``my-plugins/echo``).  Every plugin can be named that way; two third-party plugins
with one name must be.
"""

from __future__ import annotations

import inspect
import logging
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from importlib.metadata import Distribution, EntryPoint, distributions

from .. import __version__
from ..rpmsg.codec import NS_ADDR, RESERVED_ADDRESSES
from .base import Endpoint
from .builtin import Echo, RawEcho, Sink, Source
from .unix import UnixBridge

log = logging.getLogger(__name__)

GROUP = "vhost_rpmsg.endpoints"
#: the distribution that provides the built-ins
PROJECT = "vhost-rpmsg"
_BUILTIN: dict[str, type[Endpoint]] = {
    "echo": Echo, "sink": Sink, "source": Source, "rpmsg-raw": RawEcho, "unix": UnixBridge,
}
_NAME = r"[A-Za-z0-9_.-]+"
_PLUGIN_NAME = re.compile(_NAME)
_SPEC = re.compile(
    rf"^(?:(?P<name>[^:@,]*):)?(?P<plugin>(?:{_NAME}/)?{_NAME})"
    r"(?:@(?P<addr>\d+|0x[0-9a-fA-F]+))?"
    r"(?P<opts>(?:,[A-Za-z_][A-Za-z0-9_]*=[^,]*)*)$"
)


class PluginError(ValueError):
    """An endpoint spec names an unknown or broken plugin, or cannot be parsed."""


def normalize(dist: str) -> str:
    """A distribution name as package indexes compare them (PEP 503)."""
    return re.sub(r"[-_.]+", "-", dist).lower()


@dataclass
class Plugin:
    """One endpoint plugin: where it comes from, and (once loaded) its class."""

    name: str  #: the entry-point name
    value: str  #: ``module:attr``
    dist: str  #: the distribution providing it
    version: str
    builtin: bool = False
    #: why the plain name does not reach this plugin (it is shadowed or ambiguous)
    clash: str | None = None
    #: the clash is with a built-in of the same name
    shadowed: bool = False
    #: why it cannot be used (an import error, not an Endpoint...); None: not known broken
    error: str | None = None
    entry_point: EntryPoint | None = field(default=None, repr=False)
    _cls: type[Endpoint] | None = field(default=None, repr=False)

    @property
    def qualified(self) -> str:
        """``DIST/NAME``: reaches this plugin whatever else is installed."""
        return f"{normalize(self.dist)}/{self.name}"

    @property
    def spec_name(self) -> str:
        """What to write in an endpoint spec to get this plugin."""
        return self.qualified if self.clash else self.name

    @property
    def loaded(self) -> bool:
        return self._cls is not None

    def load(self) -> type[Endpoint]:
        """Import the plugin's class (once); PluginError saying why if it is broken."""
        if self._cls is not None:
            return self._cls
        if self.error is None:
            assert self.entry_point is not None
            try:
                obj = self.entry_point.load()
            except (Exception, SystemExit) as e:
                self.error = f"{self.value} failed to import: {type(e).__name__}: {e}"
            else:
                if isinstance(obj, type) and issubclass(obj, Endpoint):
                    self._cls = obj
                    return obj
                self.error = f"{self.value} is not an Endpoint subclass (it is {obj!r})"
            log.warning("endpoint plugin %r from %s %s is broken: %s", self.name, self.dist,
                        self.version, self.error)
        raise PluginError(f"plugin {self.spec_name!r} (from {self.dist} {self.version}) is "
                          f"broken: {self.error}")


class Registry:
    """The endpoint plugins installed: the built-ins, then every entry point of
    :data:`GROUP` (from ``dists``, default every distribution on ``sys.path``).

    Only metadata is read here; :meth:`resolve` imports the one plugin it is asked for.
    """

    def __init__(self, dists: Iterable[Distribution] | None = None) -> None:
        self.plugins: list[Plugin] = [
            Plugin(name, f"{cls.__module__}:{cls.__qualname__}", PROJECT, __version__,
                   builtin=True, _cls=cls)
            for name, cls in _BUILTIN.items()]
        builtin = {p.name: p for p in self.plugins}
        seen: set[str] = set()
        for dist in distributions() if dists is None else dists:
            try:
                dist_name = dist.metadata["Name"] or "(unnamed distribution)"
                version = dist.version or "?"
                eps = list(dist.entry_points.select(group=GROUP))
            except Exception as e:  # unreadable metadata: nothing of it can be used
                log.warning("cannot read the metadata of %s: %s",
                            getattr(dist, "_path", dist), e)
                continue
            key = normalize(dist_name)
            if key in seen:
                continue  # the same distribution further along sys.path: not imported
            seen.add(key)
            for ep in eps:
                if key == PROJECT and ep.name in builtin:
                    builtin[ep.name].version = version  # a built-in's own entry point
                    continue
                p = Plugin(ep.name, ep.value, dist_name, version, entry_point=ep)
                if not _PLUGIN_NAME.fullmatch(ep.name):
                    p.error = (f"entry-point name {ep.name!r} cannot be written in an "
                               "endpoint spec (letters, digits, '_', '.', '-')")
                    log.warning("endpoint plugin %r from %s %s is broken: %s", ep.name,
                                dist_name, p.version, p.error)
                self.plugins.append(p)
        by_name: dict[str, list[Plugin]] = {}
        for p in self.plugins:
            by_name.setdefault(p.name, []).append(p)
        for name, found in by_name.items():
            others = [p for p in found if not p.builtin]
            if name in builtin and others:
                for p in others:
                    p.shadowed = True
                    p.clash = (f"shadowed by the built-in {name!r}, which keeps the name; "
                               f"use it as {p.qualified}")
                    log.warning("endpoint plugin %r from %s %s (%s) has the name of a "
                                "built-in, which wins; it is reachable as %s", name, p.dist,
                                p.version, p.value, p.qualified)
            elif len(others) > 1:
                names = ", ".join(p.qualified for p in others)
                for p in others:
                    p.clash = f"{name!r} is provided by several distributions; use {p.qualified}"
                log.warning("endpoint plugin name %r is provided by several distributions; "
                            "name one of %s", name, names)

    def find(self, name: str) -> Plugin:
        """The plugin a spec's PLUGIN part names (``NAME`` or ``DIST/NAME``)."""
        dist, sep, plain = name.rpartition("/")
        if sep:
            for p in self.plugins:
                if p.name == plain and normalize(p.dist) == normalize(dist):
                    return p
        else:
            found = [p for p in self.plugins if p.name == name]
            if len(found) == 1 and not found[0].clash:
                return found[0]
            for p in found:
                if p.builtin:
                    return p
            if found:
                raise PluginError(f"plugin name {name!r} is ambiguous: name one of "
                                  f"{', '.join(p.qualified for p in found)}")
        raise PluginError(f"no endpoint plugin {name!r}; "
                          f"installed: {', '.join(sorted(self.usable_names()))}")

    def resolve(self, name: str) -> type[Endpoint]:
        """The class of the plugin ``name`` names, imported now if need be."""
        return self.find(name).load()

    def usable_names(self) -> list[str]:
        """What an endpoint spec may name, without importing anything."""
        return [p.spec_name for p in self.plugins if p.error is None]

    def load_all(self) -> None:
        """Import every plugin (each broken one is then marked, and logged)."""
        for p in self.plugins:
            try:
                p.load()
            except PluginError:
                pass


_registry: Registry | None = None


def registry(refresh: bool = False) -> Registry:
    """The process's registry, discovered on first use (``refresh``: discover again)."""
    global _registry
    if _registry is None or refresh:
        _registry = Registry()
    return _registry


def plugins() -> dict[str, type[Endpoint]]:
    """Every usable endpoint plugin by the name a spec gives it (this imports them all;
    broken ones are logged and left out)."""
    reg = registry()
    reg.load_all()
    return {p.spec_name: p.load() for p in reg.plugins if p.error is None}


# -- what ``vhost-rpmsg plugins`` shows ---------------------------------------------------

_ROLE = re.compile(r":[\w.-]+(?::[\w.-]+)*:`(?P<tilde>~?)(?P<target>[^`]+)`")
_LITERAL = re.compile(r"``(?P<text>[^`]+)``|`(?P<text1>[^`]+)`")


def plain(text: str) -> str:
    """Docstring text without RST and Markdown markup: roles (``:meth:`x```,
    ``:class:`~a.B``` → ``B``) and literals (````x````, ```x```) become their text."""
    def role(m: re.Match[str]) -> str:
        target = m["target"]
        if "<" in target and target.endswith(">"):  # :ref:`title <target>`
            return target.split("<", 1)[0].strip()
        return target.rsplit(".", 1)[-1] if m["tilde"] else target

    text = _ROLE.sub(role, text)
    return _LITERAL.sub(lambda m: m["text"] or m["text1"], text)


def summary(cls: type) -> str:
    """The first paragraph of the class's own docstring, as one line of plain text."""
    doc = cls.__dict__.get("__doc__")
    if not isinstance(doc, str) or not doc.strip():
        return ""
    first = inspect.cleandoc(doc).split("\n\n", 1)[0]
    return " ".join(plain(first).split())


def options(cls: type[Endpoint]) -> list[str]:
    """The ``k=v`` options the constructor declares, as ``name`` or ``name=default``.

    They are its keyword parameters after ``addr`` and ``name``; a constructor that also
    takes ``**options`` is taken to pass them on to its base class's (the convention
    docs/plugins.md describes), whose parameters count too, down to
    :meth:`Endpoint.__init__`, which refuses any left over.
    """
    out: list[str] = []
    for klass in cls.__mro__:
        init = klass.__dict__.get("__init__")
        if init is None:
            continue
        if klass is Endpoint or not issubclass(klass, Endpoint):
            break
        try:
            params = list(inspect.signature(init).parameters.values())[3:]  # self, addr, name
        except (TypeError, ValueError):
            break
        for p in params:
            if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and not any(
                    o.split("=", 1)[0] == p.name for o in out):
                if p.default is p.empty or p.default is None:
                    out.append(p.name)
                else:
                    shown = '""' if p.default == "" else p.default
                    out.append(f"{p.name}={shown}")
        if not any(p.kind is p.VAR_KEYWORD for p in params):
            break
    return out


# -- building endpoints ------------------------------------------------------------------


@dataclass
class EndpointSpec:
    """``[NAME:]PLUGIN[@ADDR][,key=value...]`` — NAME empty means "do not announce";
    PLUGIN is an entry-point name or ``DIST/NAME``."""

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
        try:
            addr = int(m["addr"], 0) if m["addr"] else None
        except ValueError:
            raise PluginError(f"bad address in endpoint {text!r}: {m['addr']!r} "
                              "(decimal, or hex with 0x)") from None
        return cls(m["plugin"], m["name"] or None, addr, opts, m["name"] is not None)


def build(specs: list[str], first_addr: int = RESERVED_ADDRESSES,
          reg: Registry | None = None) -> list[Endpoint]:
    """Instantiate endpoints from spec strings, allocating addresses where none is given.
    Only the plugins the specs name are imported."""
    reg = registry() if reg is None else reg
    parsed = [EndpointSpec.parse(s) for s in specs]
    classes = [reg.resolve(spec.plugin) for spec in parsed]
    taken = {p.addr for p in parsed if p.addr is not None}
    next_addr = first_addr
    out = []
    for spec, cls in zip(parsed, classes, strict=True):
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
        except Exception as e:  # a plugin's constructor failing otherwise
            raise PluginError(f"endpoint {spec.plugin}@{addr}: {type(e).__name__}: {e}") from e
        ep.plugin = spec.plugin  # type: ignore[misc]
        out.append(ep)
    return out
