"""Guest messages as arrays: parsing a raw chain batch without an object per message.

The engines hand the device a :class:`~vhost_rpmsg.virtio.queue.RawBatch` (every chain's
bytes in one buffer); :func:`parse` checks and splits the rpmsg headers, vectorised for
large batches over the header array the queue engine cuts out (``Queue.split_headers``:
one C call on the cffi engine, numpy on the Python one), and :class:`MessageBatch` is
what endpoints receive: one buffer, the payload offsets and lengths, the senders.

The header check of a large batch is one C call (``_vhost_rpmsg_headers``,
cext/rpmsg_headers.c: rpmsg C apart from the ring C) where that extension is built, and
numpy otherwise; both give the same result (tests/test_rpmsg_batch.py).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from ..virtio.queue import Located, RawBatch
from ..virtio.queue_python import split_headers as numpy_split_headers
from . import codec as rp

try:
    from _vhost_rpmsg_headers import ffi as _ffi
    from _vhost_rpmsg_headers import lib as _lib  # cext/build_rpmsg.py
except ImportError:
    _lib = None

_HDR_DTYPE = np.dtype([("src", "<u4"), ("dst", "<u4"), ("reserved", "<u4"), ("len", "<u2"),
                       ("flags", "<u2")])
#: ``Queue.split_headers``: the first n bytes of every chain, as a (count, n) uint8 array
SplitHeaders = Callable[[RawBatch, int], np.ndarray]
VECTOR_MIN = 16  # below this many messages, plain struct unpacking is cheaper
#: check headers in C (where built): one pass instead of several numpy ones
NATIVE_CHECK = _lib is not None


class MessageBatch:
    """Consecutive guest messages to one host address, sharing one buffer.

    ``srcs[i]`` sent ``data[offsets[i] : offsets[i] + lengths[i]]``.  The sequences are
    numpy arrays for large batches and lists for small ones; both index and iterate the
    same way.  ``data`` is bytes, or for a zero-copy endpoint (``Endpoint.zero_copy``) a
    read-only memoryview of guest memory; :meth:`payload` and iteration give bytes
    either way, :meth:`view` a view.
    """

    __slots__ = ("data", "dst", "lengths", "offsets", "srcs")

    def __init__(self, data: bytes | memoryview, dst: int, srcs: np.ndarray | list[int],
                 offsets: np.ndarray | list[int], lengths: np.ndarray | list[int]) -> None:
        self.data = data
        self.dst = dst
        self.srcs = srcs
        self.offsets = offsets
        self.lengths = lengths

    def __len__(self) -> int:
        return len(self.srcs)

    def payload(self, i: int) -> bytes:
        """Message ``i``'s payload as bytes (a copy, when ``data`` is guest memory)."""
        o = int(self.offsets[i])
        chunk = self.data[o : o + int(self.lengths[i])]
        return chunk if type(chunk) is bytes else bytes(chunk)

    def view(self, i: int) -> memoryview:
        """Message ``i``'s payload without a copy: in guest memory for a zero-copy
        endpoint's batch (valid while its handler runs; the guest may change the bytes)."""
        o = int(self.offsets[i])
        return memoryview(self.data)[o : o + int(self.lengths[i])]

    def __iter__(self) -> Iterator[tuple[int, bytes]]:
        return iter(self.pairs())

    def pairs(self) -> list[tuple[int, bytes]]:
        """Every (src, payload) of the batch: one list, made in one pass."""
        data = self.data
        srcs, offsets, lengths = self.srcs, self.offsets, self.lengths
        if isinstance(srcs, np.ndarray):
            srcs = srcs.tolist()
        if isinstance(offsets, np.ndarray):
            offsets = offsets.tolist()
        if isinstance(lengths, np.ndarray):
            lengths = lengths.tolist()
        if type(data) is memoryview:
            return [(s, bytes(data[o : o + n]))
                    for s, o, n in zip(srcs, offsets, lengths, strict=True)]
        return [(s, data[o : o + n]) for s, o, n in zip(srcs, offsets, lengths, strict=True)]

    def copied(self) -> MessageBatch:
        """The same messages in a buffer of their own: for a batch whose ``data`` is a
        view of guest memory (zero-copy receive) going to a handler that keeps bytes."""
        data = self.data
        lengths = self.lengths.tolist() if isinstance(self.lengths, np.ndarray) else self.lengths
        offsets = self.offsets.tolist() if isinstance(self.offsets, np.ndarray) else self.offsets
        buf = b"".join([data[o : o + n] for o, n in zip(offsets, lengths, strict=True)])
        starts = list(itertools.accumulate(lengths, initial=0))[:-1]
        return MessageBatch(buf, self.dst, self.srcs, starts, lengths)

    def total_bytes(self) -> int:
        lengths = self.lengths
        return int(lengths.sum()) if isinstance(lengths, np.ndarray) else sum(lengths)

    def longest(self) -> int:
        """The longest payload's length (0 for an empty batch)."""
        lengths = self.lengths
        if isinstance(lengths, np.ndarray):
            return int(lengths.max()) if len(lengths) else 0
        return max(lengths, default=0)


@dataclass
class Parsed:
    """What one raw batch held: runs of messages per destination, and what was wrong."""

    runs: list[MessageBatch]
    bad_chains: list[int]  # indices of chains with a ring-level error or writable buffers
    bad_messages: list[tuple[int, str]]  # (chain index, why) for unparseable messages


def parse(rb: RawBatch, split_headers: SplitHeaders = numpy_split_headers) -> Parsed:
    """Split ``rb`` into per-destination runs of valid messages, in ring order.

    Small batches use struct; large ones the engine's ``split_headers`` and numpy.  Both
    give the same result.
    """
    bad_chains: list[int] = []
    if rb.nbad or rb.nwritable:
        ok = (rb.errors == 0) & ~rb.has_writable
        bad_chains = np.flatnonzero(~ok).tolist()
        idx = np.flatnonzero(ok)
    else:
        idx = None  # all good
    n = rb.count - len(bad_chains)
    if n == 0:
        return Parsed([], bad_chains, [])
    if n < VECTOR_MIN:  # setting up arrays costs more than a few struct unpacks
        return _parse_small(rb, idx, bad_chains)
    headers = split_headers(rb, rp.HDR_SIZE)
    offsets, lengths = rb.offsets, rb.lengths
    if idx is not None:
        headers, offsets, lengths = headers[idx], offsets[idx], lengths[idx]
    if not headers.flags.c_contiguous:
        headers = np.ascontiguousarray(headers)
    if NATIVE_CHECK:
        return _check_native(rb.data, headers, offsets, lengths, idx, bad_chains)
    hdr = headers.view(_HDR_DTYPE)[:, 0]
    plen = hdr["len"]
    # One comparison finds both faults: a chain shorter than a header has negative room.
    bad = plen > lengths - rp.HDR_SIZE
    bad_messages = []
    if bad.any():
        chain_ids = np.arange(rb.count) if idx is None else idx
        for k in np.flatnonzero(bad).tolist():
            bad_messages.append((int(chain_ids[k]), why_bad(int(plen[k]), int(lengths[k]))))
        keep = ~bad
        hdr, offsets, plen = hdr[keep], offsets[keep], plen[keep]
    return Parsed(_runs(rb.data, hdr["src"], hdr["dst"], offsets + rp.HDR_SIZE,
                        plen.astype(np.int64)),
                  bad_chains, bad_messages)


def parse_located(lb: Located, split_headers: SplitHeaders,
                  views: Sequence[memoryview]) -> Parsed:
    """:func:`parse` for zero-copy receive: runs over guest memory.

    A chain left in place (``lb.region[i] >= 0``) is checked against its whole readable
    length, with the header copied out (so what was checked cannot change afterwards);
    its run's ``data`` is ``views[region]``, a read-only view of that region, and the
    payload offsets point into it.  Chains copied whole run over ``lb.raw.data`` as in
    :func:`parse`.  Runs are cut where the destination or the region changes.
    """
    rb = lb.raw
    if not rb.count:
        return Parsed([], [], [])
    region = lb.region
    if (NATIVE_CHECK and not rb.nbad and not rb.nwritable and region[0] >= 0
            and (region == region[0]).all()):
        # the usual batch: every chain in place in one region, checked in one C call
        # against its whole length, starting where it lies
        return _check_native(views[int(region[0])], split_headers(rb, rp.HDR_SIZE),
                             lb.offset, lb.read_len, None, [])
    ok = (rb.errors == 0) & ~rb.has_writable
    bad_chains = np.flatnonzero(~ok).tolist() if rb.nbad or rb.nwritable else []
    hdr = split_headers(rb, rp.HDR_SIZE).view(_HDR_DTYPE)[:, 0]
    plen = hdr["len"].astype(np.int64)
    # in place: the whole chain is there to read; copied: what was copied of it
    full = np.where(region >= 0, lb.read_len, rb.lengths)
    # One comparison finds both faults: a chain shorter than a header has negative room.
    bad = ok & (plen > full - rp.HDR_SIZE)
    bad_messages = []
    for k in np.flatnonzero(bad).tolist():
        bad_messages.append((k, why_bad(int(plen[k]), int(full[k]))))
    idx = np.flatnonzero(ok & ~bad)
    if not len(idx):
        return Parsed([], bad_chains, bad_messages)
    region = region[idx]
    starts = np.where(region >= 0, lb.offset[idx], rb.offsets[idx]) + rp.HDR_SIZE
    srcs, dsts, plen = hdr["src"][idx], hdr["dst"][idx], plen[idx]
    cuts = np.flatnonzero((dsts[1:] != dsts[:-1]) | (region[1:] != region[:-1])) + 1
    bounds = [0, *cuts.tolist(), len(idx)]
    runs = []
    for a, b in itertools.pairwise(bounds):
        r = int(region[a])
        runs.append(MessageBatch(views[r] if r >= 0 else rb.data, int(dsts[a]), srcs[a:b],
                                 starts[a:b], plen[a:b]))
    return Parsed(runs, bad_chains, bad_messages)


def _check_native(data: bytes | memoryview, headers: np.ndarray, offsets: np.ndarray,
                  lengths: np.ndarray, idx: np.ndarray | None, bad_chains: list[int]) -> Parsed:
    n = len(lengths)
    if headers.shape != (n, rp.HDR_SIZE) or headers.dtype != np.uint8 or len(offsets) != n:
        raise ValueError(f"header array of shape {headers.shape} for {n} messages")
    out = np.empty(6 * n + 2, np.int64)
    good = _lib.rp_check_headers(
        _ffi.from_buffer("uint8_t[]", headers), _ffi.from_buffer("int64_t[]", offsets),
        _ffi.from_buffer("int64_t[]", lengths), n, _ffi.from_buffer("int64_t[]", out))
    nbad = int(out[6 * n])
    bad_messages = []
    if nbad:
        plen_all = headers.view(_HDR_DTYPE)[:, 0]["len"]
        for k, why in zip(out[4 * n : 4 * n + nbad].tolist(),
                          out[5 * n : 5 * n + nbad].tolist(), strict=True):
            m = int(lengths[k])
            text = (short_why(m) if why == _lib.RP_MSG_SHORT
                    else long_why(int(plen_all[k]), m))
            bad_messages.append((k if idx is None else int(idx[k]), text))
    srcs, dsts = out[:good], out[n : n + good]
    starts, plen = out[2 * n : 2 * n + good], out[3 * n : 3 * n + good]
    if good and out[6 * n + 1]:  # one destination: one run, no scan needed
        runs = [MessageBatch(data, int(dsts[0]), srcs, starts, plen)]
    else:
        runs = _runs(data, srcs, dsts, starts, plen)
    return Parsed(runs, bad_chains, bad_messages)


def _runs(data: bytes | memoryview, srcs: np.ndarray, dsts: np.ndarray, starts: np.ndarray,
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


def why_bad(declared: int, n: int) -> str:
    """Why an ``n``-byte message whose header (if it has room for one) claims
    ``declared`` payload bytes is refused."""
    return short_why(n) if n < rp.HDR_SIZE else long_why(declared, n)


def short_why(n: int) -> str:
    """Why an ``n``-byte message is refused when it has no room for a header."""
    return f"{n} bytes cannot hold a {rp.HDR_SIZE}-byte header"


def long_why(declared: int, n: int) -> str:
    """Why an ``n``-byte message is refused when its header claims ``declared`` bytes."""
    return f"header says {declared} payload bytes, buffer holds {n - rp.HDR_SIZE}"


def _parse_small(rb: RawBatch, idx: np.ndarray | None, bad_chains: list[int]) -> Parsed:
    data = rb.data
    offsets = rb.offsets.tolist()
    lengths = rb.lengths.tolist()
    runs: list[MessageBatch] = []
    bad_messages = []
    unpack = rp.unpack_header
    hdr = rp.HDR_SIZE
    run_dst = -1  # no address is negative: the first message starts a run
    srcs: list[int] = []
    starts: list[int] = []
    plens: list[int] = []
    for i in (range(rb.count) if idx is None else idx.tolist()):
        o, n = offsets[i], lengths[i]
        if n < hdr:
            bad_messages.append((i, short_why(n)))
            continue
        src, dst, _, length, _ = unpack(data, o)
        if length > n - hdr:
            bad_messages.append((i, long_why(length, n)))
            continue
        if dst != run_dst:
            srcs, starts, plens = [], [], []
            runs.append(MessageBatch(data, dst, srcs, starts, plens))
            run_dst = dst
        srcs.append(src)
        starts.append(o + hdr)
        plens.append(length)
    return Parsed(runs, bad_chains, bad_messages)
