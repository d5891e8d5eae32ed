"""Choosing a split-ring engine: the pure-Python reference or the C one (cffi).

Both engines are :class:`~vhost_rpmsg.virtqueue.SplitQueue` classes with identical
behaviour; the back-end takes a queue factory ``(index, max_size) -> SplitQueue``::

    VhostUserServer(device, sock, queue_factory=queue_factory("auto"))
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from .virtqueue import Chain, SplitQueue

log = logging.getLogger(__name__)

QueueFactory = Callable[[int, int], SplitQueue]

ENGINES = ("python", "cffi")
AUTO_FALLBACK_WARNING = "cffi engine not built; using the python engine"


class EngineUnavailable(RuntimeError):
    """The engine asked for cannot be used here."""


def _cffi_class() -> type[SplitQueue]:
    """CffiSplitQueue, or EngineUnavailable saying why it cannot be imported."""
    try:
        from .engine_cffi import CffiSplitQueue
    except ImportError as e:
        raise EngineUnavailable(
            "the cffi engine is not built (_vhost_rpmsg_vring cannot be imported: "
            f"{e}); build it with `pip install .` (needs a C compiler and cffi), "
            "or for a work tree `python cext/build_vring.py`"
        ) from e
    return CffiSplitQueue


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


def queue_factory(name: str = "auto") -> QueueFactory:
    """The queue class for engine ``name``: "python", "cffi", or "auto".

    "auto" takes cffi when it is built and otherwise python, with a warning.  Asking for
    "cffi" where it is not built raises :class:`EngineUnavailable`.
    """
    if name == "python":
        return SplitQueue
    if name == "cffi":
        return _cffi_class()
    if name == "auto":
        try:
            return _cffi_class()
        except EngineUnavailable as e:
            log.warning("%s (%s)", AUTO_FALLBACK_WARNING, e.__cause__)
            return SplitQueue
    raise ValueError(f"unknown engine {name!r}: choose one of auto, {', '.join(ENGINES)}")


def pop_read_batch(
    q: SplitQueue, max_chains: int, limit: int
) -> tuple[list[Chain], list[bytes | None]]:
    """Pop up to ``max_chains`` chains with the payload of each (None for a bad chain).

    In one C call on the cffi engine; the same result from pop_batch + read_chain on any
    other.
    """
    fast = getattr(q, "pop_read_batch", None)
    if fast is not None:
        chains, payloads = fast(max_chains, limit)
        return chains, payloads
    chains = q.pop_batch(max_chains)
    return chains, [q.read_chain(c, limit) if c.ok else None for c in chains]
