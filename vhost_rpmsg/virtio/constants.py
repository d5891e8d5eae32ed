"""Virtio facts shared by the rings, the devices and the simulated driver.

Values are the VIRTIO 1.x specification's ("Reserved Feature Bits", "Device Status
Field", "Split Virtqueues", "Device Types"; the rpmsg bit is Linux's).  One place, so the back-end,
the rpmsg device and the simulated driver agree; vhost-user's own constants are in
``vhost_user/protocol.py``.
"""

from __future__ import annotations

# -- feature bits (2.2 Feature Bits; 6 Reserved Feature Bits) ---------------------------
VIRTIO_F_NOTIFY_ON_EMPTY = 24  # virtio 1.2 §6.3 Legacy Interface: Reserved Feature Bits
VIRTIO_RING_F_INDIRECT_DESC = 28  # the spec's VIRTIO_F_INDIRECT_DESC (28)
VIRTIO_RING_F_EVENT_IDX = 29  # the spec's VIRTIO_F_EVENT_IDX(29)
VIRTIO_F_VERSION_1 = 32

# -- device status (2.1 Device Status Field) ---------------------------------------------
STATUS_ACKNOWLEDGE = 1
STATUS_DRIVER = 2
STATUS_DRIVER_OK = 4
STATUS_FEATURES_OK = 8
STATUS_NEEDS_RESET = 64
STATUS_FAILED = 128

# -- device ids (5 Device Types) ------------------------------------------------------------
VIRTIO_ID_RPMSG = 7
#: The rpmsg device's one feature bit: name-service messages (Linux virtio_rpmsg_bus.c).
VIRTIO_RPMSG_F_NS = 0

# -- split rings (2.7 Split Virtqueues) -----------------------------------------------------
# The spec's VIRTQ_*; "the constants as VRING_DESC_F_NEXT, etc, but the layout and values
# were identical" (virtio 1.2 §2.7.5; §2.7.6 and §2.7.8 say the same of the ring flags).
VRING_DESC_F_NEXT = 1
VRING_DESC_F_WRITE = 2
VRING_DESC_F_INDIRECT = 4
VRING_AVAIL_F_NO_INTERRUPT = 1
VRING_USED_F_NO_NOTIFY = 1
DESC_SIZE = 16
#: "The maximum Queue Size value is 32768." (virtio 1.2 §2.7 Split Virtqueues)
MAX_QUEUE_SIZE = 32768
