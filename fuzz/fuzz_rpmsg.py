#!/usr/bin/env python3
"""Fuzzing the rpmsg codec and the parsing of raw chain batches into messages.

One input is a byte string for the codec (header, message and name-service decoding,
with round trips through the encoders), a raw batch as an engine would hand it to the
device (chains with errors, device-writable buffers, well-formed, truncated and lying
rpmsg headers, cut at a read limit), and a name-service payload.  The batch is parsed
every way the project can parse it (struct path, numpy path, C header check, either
engine's header split) and each result must equal an independent oracle written from
the message format; the device's own parse and delivery to built-in endpoints must not
raise or count a handler failure.  The only exception allowed is the codec's own
RpmsgFormatError.

    python fuzz/fuzz_rpmsg.py fuzz/corpus/rpmsg -runs=1000     # see fuzz/README.md
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import Any

import atheris
import numpy as np
from _common import Reader, Writer, capture_logs, main, use_asan_build_if_asked

use_asan_build_if_asked()

with atheris.instrument_imports(include=["vhost_rpmsg"]):
    from vhost_rpmsg.endpoints.builtin import Echo, Sink
    from vhost_rpmsg.rpmsg import batch
    from vhost_rpmsg.rpmsg import codec as rp
    from vhost_rpmsg.rpmsg.device import RpmsgDevice
    from vhost_rpmsg.virtio.queue import QueueState, RawBatch
    from vhost_rpmsg.virtio.queue_cffi import CffiQueue
    from vhost_rpmsg.virtio.queue_python import PythonQueue
    from vhost_rpmsg.virtio.queue_python import split_headers as numpy_split

_HDR = struct.Struct("<IIIHH")
SRCS = (1024, 1030, 0, rp.ADDR_ANY)
DSTS = (1024, 1025, rp.NS_ADDR, 1026, 0)
LIMITS = (None, 512, 16, 20, 15, 0, 8)
SPLITS: list[Callable[[RawBatch, int], np.ndarray]] = [
    numpy_split, CffiQueue(QueueState(1)).split_headers]
LOGS = capture_logs()


# -- the codec ---------------------------------------------------------------------------------


def check_codec(buf: bytes) -> None:
    """Decoders refuse with RpmsgFormatError only; what they accept re-encodes the same."""
    try:
        h = rp.decode_header(buf)
    except rp.RpmsgFormatError:
        assert len(buf) < rp.HDR_SIZE
    else:
        assert len(buf) >= rp.HDR_SIZE
        again = rp.encode_header(h.src, h.dst, h.length, h.flags)
        assert again[:8] == buf[:8] and again[12:] == buf[12:16], (again, buf[:16])
        assert h.reserved == int.from_bytes(buf[8:12], "little")
    try:
        hdr, payload = rp.decode_message(buf)
    except rp.RpmsgFormatError:
        assert len(buf) < rp.HDR_SIZE or _HDR.unpack_from(buf)[3] > len(buf) - rp.HDR_SIZE
    else:
        assert payload == buf[rp.HDR_SIZE : rp.HDR_SIZE + hdr.length]
        assert len(payload) == hdr.length
        msg = rp.encode_message(hdr.src, hdr.dst, payload, hdr.flags)
        assert rp.decode_message(msg) == (hdr, payload) or hdr.reserved != 0
    check_ns(buf[rp.HDR_SIZE :] if len(buf) > rp.NS_MSG_SIZE else buf)


def check_ns(payload: bytes) -> None:
    try:
        ns = rp.decode_ns(payload)
    except rp.RpmsgFormatError:
        return
    assert len(payload) == rp.NS_MSG_SIZE
    assert "\0" not in ns.name and len(ns.name.encode()) <= 3 * (rp.NAME_SIZE - 1)
    try:
        raw = rp.encode_ns(ns)
    except rp.RpmsgFormatError:
        assert not ns.name or len(ns.name.encode()) >= rp.NAME_SIZE  # refused, and why
        return
    assert rp.decode_ns(raw) == ns


# -- raw batches and their oracle ---------------------------------------------------------------


class Chain:
    """One chain of the batch as the oracle sees it."""

    def __init__(self, error: int, writable: bool, payload: bytes) -> None:
        self.error = error
        self.writable = writable
        self.payload = payload


def read_batch(r: Reader) -> list[Chain]:
    count = r.u8() % 48
    sel = r.u8() % (len(LIMITS) + 1)
    limit = r.u16() if sel == len(LIMITS) else LIMITS[sel]
    chains = []
    for _ in range(count):
        e = r.u8()
        error = 1 + e % 9 if e & 0x80 else 0
        writable = bool(e & 0x40) and not error
        if error:
            chains.append(Chain(error, False, b""))
            continue
        if e & 0x20:
            payload = r.blob()
        else:
            s = r.u8()
            src = r.u32() if s & 1 else SRCS[(s >> 1) % len(SRCS)]
            dst = r.u32() if s & 8 else DSTS[(s >> 4) % len(DSTS)]
            body = r.blob()
            length = len(body)
            if e & 0x10:  # a header that lies about its length
                length = (length + r.u8() - 128) & 0xFFFF
            payload = _HDR.pack(src, dst, r.u32() if s & 0x80 else 0, length, r.u16()) + body
        chains.append(Chain(0, writable, payload[:limit] if limit is not None else payload))
    return chains


def raw_batch(chains: list[Chain], heads: int) -> RawBatch:
    """The batch an engine hands the device for ``chains`` (bad ones: no bytes)."""
    n = len(chains)
    lengths = np.array([len(c.payload) for c in chains], np.int64)
    offsets = (np.cumsum(lengths) - lengths).astype(np.int64)
    return RawBatch(
        (np.arange(n, dtype=np.uint32) + heads).astype(np.uint32),
        np.array([c.error for c in chains], np.uint8),
        np.array([c.writable for c in chains], np.bool_),
        lengths, offsets, b"".join(c.payload for c in chains))


Result = tuple[list[tuple[int, list[tuple[int, bytes]]]], list[int], list[int]]


def oracle(chains: list[Chain]) -> Result:
    """Runs of (src, payload) per destination, bad chains, bad messages: from the format."""
    runs: list[tuple[int, list[tuple[int, bytes]]]] = []
    bad_chains: list[int] = []
    bad_messages: list[int] = []
    for i, c in enumerate(chains):
        if c.error or c.writable:
            bad_chains.append(i)
            continue
        if len(c.payload) < 16:
            bad_messages.append(i)
            continue
        src, dst, _reserved, length, _flags = _HDR.unpack_from(c.payload)
        if length > len(c.payload) - 16:
            bad_messages.append(i)
            continue
        if not runs or runs[-1][0] != dst:
            runs.append((dst, []))
        runs[-1][1].append((src, c.payload[16 : 16 + length]))
    return runs, bad_chains, bad_messages


def normal(p: batch.Parsed) -> tuple[Result, list[str]]:
    """A Parsed as plain lists (and the reasons given), checking each run's own API."""
    runs = []
    for run in p.runs:
        items = [(int(s), bytes(d)) for s, d in run]
        assert items and len(run) == len(items)
        assert [run.payload(i) for i in range(len(run))] == [d for _, d in items]
        assert run.total_bytes() == sum(len(d) for _, d in items)
        runs.append((int(run.dst), items))
    return (runs, list(p.bad_chains), [i for i, _ in p.bad_messages]), [
        why for _, why in p.bad_messages]


def parse_every_way(rb: RawBatch) -> list[tuple[str, tuple[Result, list[str]]]]:
    """The struct path, the numpy and C header checks over either engine's header split,
    and the defaults (what the device runs)."""
    ways: list[tuple[bool, int, int]] = [(batch.NATIVE_CHECK, batch.VECTOR_MIN, 1),
                                         (False, 1 << 30, 0)]
    for native in (False, True) if batch._lib is not None else (False,):
        ways += [(native, 0, 0), (native, 0, 1)]
    out = []
    for native, vector_min, k in ways:
        old = batch.NATIVE_CHECK, batch.VECTOR_MIN
        batch.NATIVE_CHECK, batch.VECTOR_MIN = native, vector_min
        try:
            out.append((f"native={native} vector_min={vector_min} split={k}",
                        normal(batch.parse(rb, SPLITS[k]))))
        finally:
            batch.NATIVE_CHECK, batch.VECTOR_MIN = old
    return out


def check_batch(chains: list[Chain], heads: int) -> None:
    rb = raw_batch(chains, heads)
    want = oracle(chains)
    results = parse_every_way(rb)
    first_whys = results[0][1][1]
    for how, (got, whys) in results:
        assert got == want, f"{how}: {got} != oracle {want}"
        assert whys == first_whys, f"{how}: reasons {whys} != {first_whys}"
    # the device's own parse, and delivery to built-in endpoints (no guest: nothing sent)
    dev = RpmsgDevice([Echo(1024), Sink(1025, name="sink")])
    q: Any = CffiQueue(QueueState(1)) if heads & 1 else PythonQueue(QueueState(1))
    parsed = dev.parse(rb, q)
    assert dev.stats["bad_chains"] == len(want[1]) and dev.stats["bad_messages"] == len(want[2])
    for run in parsed.runs:
        if run.dst == rp.NS_ADDR:
            for src, payload in run:
                dev.ns.from_guest(src, payload)
        else:
            dev.dispatcher.deliver(run)
    assert not dev.stats["handler_errors"], dev.stats
    assert not dev.stats["listener_errors"], dev.stats
    dev.destroy()


def check_name_service(src: int, payload: bytes) -> None:
    """A guest NS message: recorded or withdrawn, listeners told, or counted as malformed."""
    dev = RpmsgDevice()
    heard: list[rp.NsMessage] = []
    dev.guest_ns_listeners.append(heard.append)
    dev.ns.from_guest(src, payload)
    try:
        ns = rp.decode_ns(payload)
    except rp.RpmsgFormatError:
        assert dev.stats["bad_guest_ns"] == 1 and not heard
        return
    assert heard == [ns]
    if ns.flags is rp.NsFlags.CREATE:
        assert dev.guest_services[ns.name].addr == ns.addr
    else:
        assert ns.name not in dev.guest_services


def test_one_input(data: bytes) -> None:
    r = Reader(data)
    check_codec(r.blob())
    heads = r.u8()
    check_batch(read_batch(r), heads)
    src, k = r.u32(), r.u8() % 3
    check_name_service(src, r.take(rp.NS_MSG_SIZE + k - 1))  # 39, 40 or 41 bytes
    tracebacks = LOGS.take()
    if tracebacks:
        raise AssertionError("exception logged by project code:\n" + "\n".join(tracebacks))


# -- seeds (fuzz/gen_seeds.py) ---------------------------------------------------------------


def _message(w: Writer, src_sel: int, dst_sel: int, body: bytes, *, lie: int | None = None,
             flags: int = 0) -> None:
    """One structured chain of read_batch: SRCS[src_sel] -> DSTS[dst_sel]."""
    w.u8(0x10 if lie is not None else 0)
    w.u8((src_sel << 1) | (dst_sel << 4)).blob(body)
    if lie is not None:
        w.u8(lie + 128)
    w.u16(flags)


def _ns(name: bytes, addr: int, flags: int) -> bytes:
    return struct.pack("<32sII", name, addr, flags)


def seeds() -> dict[str, bytes]:
    """Hand-made inputs: small and large batches, every fault, name-service messages."""
    out: dict[str, bytes] = {}
    hello = rp.encode_message(1030, 1024, b"hello")
    for count, name in ((3, "small"), (20, "large")):
        w = Writer().blob(hello).u8(0).u8(count).u8(0)
        for i in range(count):
            _message(w, i % 2, (i // 5) % 2, bytes([i]) * (i % 7))
        w.u32(1030).u8(1).raw(_ns(b"rpmsg-raw", 1030, 0))
        out[f"batch-{name}"] = w.bytes()
    # every fault in one batch: chain errors, writable, short, lying header, limit cut
    w = Writer().blob(hello[:10]).u8(1).u8(8).u8(3)  # limit 20
    w.u8(0x80 | 3)  # a chain error
    w.u8(0x40)  # writable, with a good message
    w.u8(0).blob(b"ok")
    w.u16(0)
    w.u8(0x20).blob(b"short")  # raw bytes, shorter than a header
    _message(w, 0, 0, b"1234", lie=10)
    _message(w, 0, 2, _ns(b"guest-svc", 1031, 0))  # NS message, cut by the limit
    _message(w, 1, 1, b"x" * 4)
    _message(w, 0, 0, b"y" * 3)
    w.u8(0x80 | 0)
    w.u32(1031).u8(1).raw(_ns(b"guest-svc", 1031, 1))
    out["batch-faults"] = w.bytes()
    # name-service messages through a batch, create then destroy, and a bad flag
    w = Writer().blob(rp.encode_message(1031, 53, _ns(b"x" * 31, 1031, 0))).u8(0).u8(3).u8(0)
    _message(w, 1, 2, _ns(b"svc", 1031, 0))
    _message(w, 1, 2, _ns(b"svc", 1031, 1))
    _message(w, 1, 2, _ns(b"svc", 1031, 7))
    w.u32(1031).u8(1).raw(_ns(b"\xff" * 31 + b"\0", 1031, 0))
    out["name-service"] = w.bytes()
    return out


if __name__ == "__main__":
    main(test_one_input)
