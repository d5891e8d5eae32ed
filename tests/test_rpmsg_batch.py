"""Parsing raw chain batches: the vectorised and the small-batch paths agree, and
every malformed message is reported, never delivered."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vhost_rpmsg.rpmsg import batch as B
from vhost_rpmsg.rpmsg import codec as rp
from vhost_rpmsg.virtio.engines import EngineUnavailable, queue_factory
from vhost_rpmsg.virtio.queue import ChainError, QueueState, RawBatch
from vhost_rpmsg.virtio.queue_python import split_headers as numpy_split

try:
    # The cffi engine's hook: one C call cuts every header out.
    native_split: B.SplitHeaders = queue_factory("cffi")(QueueState(0)).split_headers
    NATIVE = True
except EngineUnavailable:  # the cffi tests elsewhere fail under VHOST_RPMSG_REQUIRE_CFFI=1
    native_split = numpy_split
    NATIVE = False

message = st.one_of(
    # well formed: header + payload, maybe trailing bytes after the declared length
    st.builds(lambda src, dst, p, extra: rp.encode_message(src, dst, p) + extra,
              st.integers(0, 2**32 - 1), st.sampled_from([53, 1024, 1025, 7]),
              st.binary(max_size=40), st.binary(max_size=4)),
    st.binary(max_size=15),  # too short for a header
    st.builds(lambda p: rp.encode_header(1, 1024, len(p) + 5) + p, st.binary(max_size=8)),
)


def _raw(chunks: list[bytes], errors: list[int], writable: list[bool]) -> RawBatch:
    lengths = np.array([0 if e else len(c) for c, e in zip(chunks, errors, strict=True)],
                       np.int64)
    data = b"".join(c for c, e in zip(chunks, errors, strict=True) if not e)
    return RawBatch(np.arange(len(chunks), dtype=np.uint32), np.array(errors, np.uint8),
                    np.array([w and not e for w, e in zip(writable, errors, strict=True)]),
                    lengths, np.cumsum(lengths) - lengths, data)


def _flat(p: B.Parsed) -> tuple[list[tuple[int, int, bytes]], list[int], list[int]]:
    msgs = [(run.dst, src, data) for run in p.runs for src, data in run]
    return msgs, p.bad_chains, [i for i, _ in p.bad_messages]


@settings(max_examples=300)
@given(st.lists(st.tuples(message, st.sampled_from([0, 0, 0, 3]), st.booleans()),
                max_size=40))
def test_vector_and_small_paths_agree(items: list[tuple[bytes, int, bool]]) -> None:
    rb = _raw([m for m, _, _ in items], [e for _, e, _ in items], [w for _, _, w in items])
    old = B.VECTOR_MIN
    try:
        B.VECTOR_MIN = 10**9
        small = B.parse(rb)
        B.VECTOR_MIN, old_check, B.NATIVE_CHECK = 1, B.NATIVE_CHECK, False
        vector = B.parse(rb)
    finally:
        B.VECTOR_MIN = old
        B.NATIVE_CHECK = old_check
    assert _flat(small) == _flat(vector)
    assert small.bad_messages == vector.bad_messages  # same reasons, word for word
    splits = [numpy_split, native_split] if NATIVE else [numpy_split]
    checks = [False, True] if B._lib is not None else [False]
    for split in splits:
        for check in checks:
            B.VECTOR_MIN, old, B.NATIVE_CHECK, old_check = 1, B.VECTOR_MIN, check, B.NATIVE_CHECK
            try:
                other = B.parse(rb, split)
            finally:
                B.VECTOR_MIN, B.NATIVE_CHECK = old, old_check
            assert _flat(other) == _flat(small), (split, check)
            assert other.bad_messages == small.bad_messages
    flat = _flat(small)
    # and both match a plain decode of each good chain
    expect = []
    for m, e, w in items:
        if e or w:
            continue
        try:
            h, p = rp.decode_message(m)
        except rp.RpmsgFormatError:
            continue
        expect.append((h.dst, h.src, p))
    assert flat[0] == expect


@pytest.mark.parametrize("check", [False, True], ids=["numpy-check", "c-check"])
@pytest.mark.parametrize("path", ["vector", "small", "native"])
def test_runs_split_by_destination_in_order(path: str, check: bool,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    if (path == "native" and not NATIVE) or (check and B._lib is None):
        pytest.skip("cffi extension not built")
    monkeypatch.setattr(B, "NATIVE_CHECK", check)
    msgs = [rp.encode_message(9, d, b"%d" % i) for i, d in enumerate([5, 5, 6, 5, 5, 5])]
    B.VECTOR_MIN, old = (100 if path == "small" else 1), B.VECTOR_MIN
    try:
        p = B.parse(_raw(msgs, [0] * 6, [False] * 6),
                    native_split if path == "native" else numpy_split)
    finally:
        B.VECTOR_MIN = old
    assert [(r.dst, len(r)) for r in p.runs] == [(5, 2), (6, 1), (5, 3)]
    assert [d for r in p.runs for _, d in r] == [b"%d" % i for i in range(6)]
    assert p.runs[2].total_bytes() == 3


@pytest.mark.parametrize("check", [False, True], ids=["numpy-check", "c-check"])
@pytest.mark.parametrize("native", [False, True])
@pytest.mark.parametrize("err", [ChainError.LOOP, ChainError.ADDR_OUT_OF_BOUNDS])
def test_bad_chains_are_reported(err: ChainError, native: bool, check: bool,
                                 monkeypatch: pytest.MonkeyPatch) -> None:
    if (native and not NATIVE) or (check and B._lib is None):
        pytest.skip("cffi extension not built")
    monkeypatch.setattr(B, "NATIVE_CHECK", check)
    B.VECTOR_MIN, old = 1, B.VECTOR_MIN
    try:
        p = B.parse(_raw([rp.encode_message(1, 2, b"x"), b"", rp.encode_message(1, 2, b"y")],
                         [0, int(err), 0], [False, False, True]),
                    native_split if native else numpy_split)
    finally:
        B.VECTOR_MIN = old
    assert p.bad_chains == [1, 2]
    assert [d for r in p.runs for _, d in r] == [b"x"]
