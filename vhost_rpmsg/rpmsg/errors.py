"""The errors the RPMsg API raises."""

from __future__ import annotations


class RpmsgError(Exception):
    """Base of the errors the RPMsg API raises."""


class WouldBlock(RpmsgError, BlockingIOError):
    """The guest has no free rx buffer and the outbox is full: try again later."""


class PayloadTooLarge(RpmsgError, ValueError):
    """More than the guest's 496-byte payload limit."""


class AddressInUse(RpmsgError, ValueError):
    """Another endpoint already owns this host address."""


class HandlerNotSupported(RpmsgError, TypeError, ValueError):
    """An endpoint's handlers cannot be called as they are declared (an ``async def``
    batch handler, ``zero_copy`` without a synchronous ``on_message_batch``).  A
    ValueError too, so the command line reports it as a bad ``--endpoint``."""
