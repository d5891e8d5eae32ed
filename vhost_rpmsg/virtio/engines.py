"""Choosing a queue engine: the pure-Python reference or the C one (cffi).

Both meet :class:`~.queue.Queue` with identical behaviour; the back-end takes the engine
as a factory ``QueueState -> Queue``::

    VhostUserServer(device, sock, queue_factory=queue_factory("auto"))
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from .queue import Queue, QueueState
from .queue_python import PythonQueue

log = logging.getLogger(__name__)

QueueFactory = Callable[[QueueState], Queue]

ENGINES = ("python", "cffi")
AUTO_FALLBACK_WARNING = "cffi engine not built; using the python engine"


class EngineUnavailable(RuntimeError):
    """The engine asked for cannot be used here."""


def _cffi_class() -> QueueFactory:
    """CffiQueue, or EngineUnavailable saying why it cannot be imported."""
    try:
        from .queue_cffi import CffiQueue
    except ImportError as e:
        raise EngineUnavailable(
            "the cffi engine is not built (_vhost_rpmsg_vring cannot be imported: "
            f"{e}); build it with `pip install .` (needs a C compiler and cffi), "
            "or for a work tree `python cext/build_vring.py`"
        ) from e
    return CffiQueue


def available_engines() -> list[str]:
    """The engines usable here, the reference one first."""
    out = ["python"]
    try:
        _cffi_class()
    except EngineUnavailable:
        pass
    else:
        out.append("cffi")
    return out


def engine_name(factory: QueueFactory) -> str:
    """The name an engine goes by (``python``, ``cffi``)."""
    return str(getattr(factory, "name", "?"))


def queue_factory(name: str = "auto") -> QueueFactory:
    """The queue engine ``name``: "python", "cffi", or "auto".

    "auto" takes cffi when it is built and otherwise python, with a warning.  Asking for
    "cffi" where it is not built raises :class:`EngineUnavailable`.
    """
    if name == "python":
        return PythonQueue
    if name == "cffi":
        return _cffi_class()
    if name == "auto":
        try:
            return _cffi_class()
        except EngineUnavailable as e:
            log.warning("%s (%s)", AUTO_FALLBACK_WARNING, e.__cause__)
            return PythonQueue
    raise ValueError(f"unknown engine {name!r}: choose one of auto, {', '.join(ENGINES)}")
