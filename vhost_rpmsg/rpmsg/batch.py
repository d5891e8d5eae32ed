"""Guest messages as arrays: parsing a raw chain batch without an object per message.

The engines hand the device a :class:`~vhost_rpmsg.virtqueue.RawBatch` (every chain's
bytes in one buffer); :func:`parse` checks and splits the rpmsg headers, vectorised for
large batches, and :class:`MessageBatch` is what endpoints receive: one buffer, the
payload offsets and lengths, the senders.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from ..virtqueue import RawBatch
from . import codec as rp

_HDR_DTYPE = np.dtype([("src", "<u4"), ("dst", "<u4"), ("reserved", "<u4"), ("len", "<u2"),
                       ("flags", "<u2")])
_HDR_INDEX = np.arange(rp.HDR_SIZE, dtype=np.int64)
VECTOR_MIN = 16  # below this many messages, plain struct unpacking is cheaper


class MessageBatch:
    """Consecutive guest messages to one host address, sharing one buffer.

    ``srcs[i]`` sent ``data[offsets[i] : offsets[i] + lengths[i]]``.  The sequences are
    numpy arrays for large batches and lists for small ones; both index and iterate the
    same way.
    """

    __slots__ = ("data", "dst", "lengths", "offsets", "srcs")

    def __init__(self, data: bytes, dst: int, srcs: np.ndarray | list[int],
                 offsets: np.ndarray | list[int], lengths: np.ndarray | list[int]) -> None:
        self.data = data
        self.dst = dst
        self.srcs = srcs
        self.offsets = offsets
        self.lengths = lengths

    def __len__(self) -> int:
        return len(self.srcs)

    def payload(self, i: int) -> bytes:
        o = int(self.offsets[i])
        return self.data[o : o + int(self.lengths[i])]

    def __iter__(self) -> Iterator[tuple[int, bytes]]:
        data = self.data
        for s, o, n in zip(_tolist(self.srcs), _tolist(self.offsets), _tolist(self.lengths),
                           strict=True):
            yield s, data[o : o + n]

    def total_bytes(self) -> int:
        lengths = self.lengths
        return int(lengths.sum()) if isinstance(lengths, np.ndarray) else sum(lengths)


def _tolist(a: np.ndarray | list[int]) -> list[int]:
    return a.tolist() if isinstance(a, np.ndarray) else a


@dataclass
class Parsed:
    """What one raw batch held: runs of messages per destination, and what was wrong."""

    runs: list[MessageBatch]
    bad_chains: list[int]  # indices of chains with a ring-level error or writable buffers
    bad_messages: list[tuple[int, str]]  # (chain index, why) for unparseable messages


def parse(rb: RawBatch, native: bool = False) -> Parsed:
    """Split ``rb`` into per-destination runs of valid messages, in ring order.

    Small batches use struct; large ones C (``native``, the cffi engine's path) or numpy.
    All three give the same result.
    """
    bad_chains: list[int] = []
    skip = None
    if rb.nbad or rb.nwritable:
        ok = (rb.errors == 0) & ~rb.has_writable
        bad_chains = np.flatnonzero(~ok).tolist()
        idx = np.flatnonzero(ok)
        skip = ~ok
    else:
        idx = None  # all good
    n = rb.count - len(bad_chains)
    if n == 0:
        return Parsed([], bad_chains, [])
    if n < VECTOR_MIN:  # setting up arrays costs more than a few struct unpacks
        return _parse_small(rb, idx, bad_chains)
    if native:
        return _parse_native(rb, skip, bad_chains)
    offsets = rb.offsets if idx is None else rb.offsets[idx]
    lengths = rb.lengths if idx is None else rb.lengths[idx]
    chain_ids = np.arange(rb.count) if idx is None else idx
    short = lengths < rp.HDR_SIZE
    buf = np.frombuffer(rb.data, np.uint8)
    safe = np.where(short, 0, offsets)  # never index past the buffer for short chains
    if len(buf) < rp.HDR_SIZE:
        buf = np.zeros(rp.HDR_SIZE, np.uint8)
    hdr = buf[safe[:, None] + _HDR_INDEX].view(_HDR_DTYPE)[:, 0]
    plen = hdr["len"].astype(np.int64)
    too_long = ~short & (plen > lengths - rp.HDR_SIZE)
    bad = short | too_long
    bad_messages = []
    if bad.any():
        for k in np.flatnonzero(bad).tolist():
            n = int(lengths[k])
            why = _short_why(n) if short[k] else _long_why(int(plen[k]), n)
            bad_messages.append((int(chain_ids[k]), why))
        keep = ~bad
        hdr, offsets, plen = hdr[keep], offsets[keep], plen[keep]
    return Parsed(_runs(rb.data, hdr["src"], hdr["dst"], offsets + rp.HDR_SIZE, plen),
                  bad_chains, bad_messages)


def _runs(data: bytes, srcs: np.ndarray, dsts: np.ndarray, starts: np.ndarray,
          plen: np.ndarray) -> list[MessageBatch]:
    """Cut the messages where the destination changes."""
    n = len(dsts)
    if not n:
        return []
    if dsts[0] == dsts[n - 1] and (dsts == dsts[0]).all():
        return [MessageBatch(data, int(dsts[0]), srcs, starts, plen)]
    cuts = np.flatnonzero(dsts[1:] != dsts[:-1]) + 1
    bounds = [0, *cuts.tolist(), n]
    return [MessageBatch(data, int(dsts[a]), srcs[a:b], starts[a:b], plen[a:b])
            for a, b in itertools.pairwise(bounds)]


def _short_why(n: int) -> str:
    """Why an ``n``-byte message is refused when it has no room for a header."""
    return f"{n} bytes cannot hold a {rp.HDR_SIZE}-byte header"


def _long_why(declared: int, n: int) -> str:
    """Why an ``n``-byte message is refused when its header claims ``declared`` bytes."""
    return f"header says {declared} payload bytes, buffer holds {n - rp.HDR_SIZE}"


def _why(rb: RawBatch, i: int, short: bool) -> str:
    n = int(rb.lengths[i])
    if short:
        return _short_why(n)
    o = int(rb.offsets[i])
    return _long_why(int.from_bytes(rb.data[o + 12 : o + 14], "little"), n)


def _parse_native(rb: RawBatch, skip: np.ndarray | None, bad_chains: list[int]) -> Parsed:
    from _vhost_rpmsg_vring import ffi, lib

    n = rb.count
    out = np.empty(6 * n + 2, np.int64)
    good = lib.vr_rpmsg_split(
        ffi.from_buffer(rb.data), len(rb.data),
        ffi.from_buffer("int64_t[]", rb.offsets), ffi.from_buffer("int64_t[]", rb.lengths),
        ffi.from_buffer("uint8_t[]", skip.view(np.uint8)) if skip is not None else ffi.NULL,
        n, ffi.from_buffer("int64_t[]", out))
    if good < 0:
        raise ValueError("raw batch offsets and lengths do not fit its data")
    nbad = int(out[6 * n])
    bad_messages = [(i, _why(rb, i, w == lib.VR_MSG_SHORT))
                    for i, w in zip(out[4 * n : 4 * n + nbad].tolist(),
                                    out[5 * n : 5 * n + nbad].tolist(), strict=True)]
    srcs, dsts = out[:good], out[n : n + good]
    starts, plen = out[2 * n : 2 * n + good], out[3 * n : 3 * n + good]
    if good and out[6 * n + 1]:  # one destination: one run, no scan needed
        runs = [MessageBatch(rb.data, int(dsts[0]), srcs, starts, plen)]
    else:
        runs = _runs(rb.data, srcs, dsts, starts, plen)
    return Parsed(runs, bad_chains, bad_messages)


def _parse_small(rb: RawBatch, idx: np.ndarray | None, bad_chains: list[int]) -> Parsed:
    data = rb.data
    offsets = rb.offsets.tolist()
    lengths = rb.lengths.tolist()
    runs: list[MessageBatch] = []
    bad_messages = []
    cur: MessageBatch | None = None
    for i in (range(rb.count) if idx is None else idx.tolist()):
        o, n = offsets[i], lengths[i]
        if n < rp.HDR_SIZE:
            bad_messages.append((i, _short_why(n)))
            continue
        h = rp.decode_header(data[o : o + rp.HDR_SIZE])
        if h.length > n - rp.HDR_SIZE:
            bad_messages.append((i, _long_why(h.length, n)))
            continue
        if cur is None or cur.dst != h.dst:
            cur = MessageBatch(data, h.dst, [], [], [])
            runs.append(cur)
        cur.srcs.append(h.src)  # type: ignore[union-attr]
        cur.offsets.append(o + rp.HDR_SIZE)  # type: ignore[union-attr]
        cur.lengths.append(h.length)  # type: ignore[union-attr]
    return Parsed(runs, bad_chains, bad_messages)
