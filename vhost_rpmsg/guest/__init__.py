"""A simulated guest: QEMU-like front-end plus a Linux virtio_rpmsg_bus driver model."""

from .rpmsg_guest import GuestTimeout, SimGuest

__all__ = ["GuestTimeout", "SimGuest"]
