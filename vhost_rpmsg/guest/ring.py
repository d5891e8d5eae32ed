"""The driver's side of a split virtqueue, as a guest kernel keeps it.

Used by the simulated guest: it owns the descriptor table, writes the avail ring,
reads the used ring, and applies the same notification rules (event idx, flags) a
Linux guest does.  Guest memory is a numpy array over the memfd the front-end shares.
"""

from __future__ import annotations

import numpy as np

from ..virtio.constants import (
    VRING_AVAIL_F_NO_INTERRUPT,
    VRING_DESC_F_NEXT,
    VRING_USED_F_NO_NOTIFY,
)
from ..virtio.queue import ring_sizes
from ..virtio.queue_python import full_fence


def need_event(event: int, new: int, old: int) -> bool:
    """The virtio event-index test: did the index move past ``event`` in (old, new]?"""
    return ((new - event - 1) & 0xFFFF) < ((new - old) & 0xFFFF)


class RingLayout:
    """Where a ring of ``size`` entries lives in guest memory (guest-physical)."""

    def __init__(self, base: int, size: int) -> None:
        dlen, alen, ulen = ring_sizes(size)
        self.size = size
        self.desc = base
        self.avail = base + dlen
        self.used = (self.avail + alen + 3) & ~3
        self.end = self.used + ulen

    @staticmethod
    def bytes_needed(size: int) -> int:
        return RingLayout(0, size).end + 64


class DriverRing:
    """A split ring from the driver's point of view."""

    def __init__(self, mem: np.ndarray, layout: RingLayout, event_idx: bool) -> None:
        n = layout.size
        self.size = n
        self.layout = layout
        self.event_idx = event_idx
        dlen, alen, ulen = ring_sizes(n)
        self.desc = mem[layout.desc : layout.desc + dlen].view("<u8")
        self.avail = mem[layout.avail : layout.avail + alen].view("<u2")
        used = mem[layout.used : layout.used + ulen]
        self.used16 = used.view("<u2")
        self.used32 = used[4 : 4 + 8 * n].view("<u4")
        self.free = list(range(n - 1, -1, -1))
        self.avail_idx = 0
        self.last_kicked = 0
        self.last_used = 0
        self.chain_len: dict[int, int] = {}

    def write_desc(self, i: int, addr: int, length: int, flags: int, nxt: int = 0) -> None:
        self.desc[2 * i] = addr
        self.desc[2 * i + 1] = length | (flags << 32) | (nxt << 48)

    def add(self, bufs: list[tuple[int, int, int]]) -> int:
        """Add one chain of (gpa, length, flags) buffers; returns its head.  Not yet visible."""
        if len(bufs) > len(self.free):
            raise BufferError("ring full")
        ids = [self.free.pop() for _ in bufs]
        for k, (addr, length, flags) in enumerate(bufs):
            last = k == len(bufs) - 1
            self.write_desc(ids[k], addr, length, flags | (0 if last else VRING_DESC_F_NEXT),
                            0 if last else ids[k + 1])
        head = ids[0]
        self.chain_len[head] = len(ids)
        self.avail[2 + self.avail_idx % self.size] = head
        self.avail_idx = (self.avail_idx + 1) & 0xFFFF
        return head

    def add_raw(self, head: int) -> None:
        """Put an arbitrary head on the avail ring (tests of hostile guests)."""
        self.avail[2 + self.avail_idx % self.size] = head
        self.avail_idx = (self.avail_idx + 1) & 0xFFFF

    def publish(self) -> bool:
        """Make added chains visible; True if the device wants a kick for them."""
        self.avail[1] = self.avail_idx  # stores stay ordered on x86: ring entries first
        full_fence()
        old, new = self.last_kicked, self.avail_idx
        self.last_kicked = new
        if old == new:
            return False
        if self.event_idx:
            return need_event(int(self.used16[2 + 4 * self.size]), new, old)
        return not int(self.used16[0]) & VRING_USED_F_NO_NOTIFY

    def get_used(self) -> list[tuple[int, int]]:
        """Take (head, length) entries the device has returned; their descriptors are freed."""
        idx = int(self.used16[1])
        out = []
        while self.last_used != idx:
            slot = 2 * (self.last_used % self.size)
            head = int(self.used32[slot])
            length = int(self.used32[slot + 1])
            out.append((head, length))
            self.last_used = (self.last_used + 1) & 0xFFFF
            self._free_chain(head)
        return out

    def _free_chain(self, head: int) -> None:
        n = self.chain_len.pop(head, None)
        if n is None:
            raise ValueError(f"device returned head {head} that is not outstanding")
        i = head
        for _ in range(n):
            self.free.append(i)
            i = (int(self.desc[2 * i + 1]) >> 48) & 0xFFFF

    def enable_interrupts(self) -> bool:
        """Ask for an interrupt on the next used entry; True if some are there already."""
        if self.event_idx:
            self.avail[2 + self.size] = self.last_used
        else:
            self.avail[0] = 0
        full_fence()
        return int(self.used16[1]) != self.last_used

    def disable_interrupts(self) -> None:
        if self.event_idx:
            self.avail[2 + self.size] = 0  # what Linux writes: fires only as idx wraps past 0
        else:
            self.avail[0] = VRING_AVAIL_F_NO_INTERRUPT

    @property
    def outstanding(self) -> int:
        return len(self.chain_len)
