"""Host endpoints: the handler interface, built-ins and the plugin registry."""

from .base import Endpoint, Port
from .builtin import Echo, RawEcho, Sink, Source

__all__ = ["Echo", "Endpoint", "Port", "RawEcho", "Sink", "Source"]
