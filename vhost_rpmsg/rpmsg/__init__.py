"""The RPMsg device, its codecs and the kernel-style API."""

from .api import VHOST_RPMSG_ITER, EptEntry, RpmsgIter, VhostRpmsg
from .device import TO_GUEST, TO_HOST, RpmsgDevice
from .errors import AddressInUse, PayloadTooLarge, RpmsgError, WouldBlock

__all__ = [
    "TO_GUEST", "TO_HOST", "VHOST_RPMSG_ITER", "AddressInUse", "EptEntry", "PayloadTooLarge",
    "RpmsgDevice", "RpmsgError", "RpmsgIter", "VhostRpmsg", "WouldBlock",
]
