"""The C extensions themselves: their API is their headers' cdef sections, and the ring
engine's generic header gather (vr_split_headers) called directly.

The cdef of each module is read from the ``/* cffi:begin */`` … ``/* cffi:end */``
sections of its header (cext/_build_common.py); these tests fail when a compiled module
and its header disagree (a stale build, a declaration outside the section, a section
that lost one), and check each declaration's type in the module against the header's.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import re
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest
from cffi import FFI
from hypothesis import given, settings
from hypothesis import strategies as st

ROOT = Path(__file__).resolve().parent.parent
CEXT = ROOT / "cext"
REQUIRED = os.environ.get("VHOST_RPMSG_REQUIRE_CFFI") == "1"

# (module, header, prefix of its names): the ring engine and the rpmsg header check are
# mandatory, the simulator's C fast path optional (setup.py; VHOST_RPMSG_NO_SIMULATOR_C=1
# skips it).
MODULES = [("_vhost_rpmsg_vring", "vring.h", "vr"),
           ("_vhost_rpmsg_headers", "rpmsg_headers.h", "rp"),
           ("_vhost_rpmsg_guest", "guest_ring.h", "gr")]
#: modules whose API is functions and constants only (no struct)
NO_STRUCTS = {"_vhost_rpmsg_headers"}


def _build_common() -> ModuleType:
    spec = importlib.util.spec_from_file_location("_build_common", CEXT / "_build_common.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _module(name: str) -> Any:
    try:
        return importlib.import_module(name)
    except ImportError as e:
        if REQUIRED:
            raise
        pytest.skip(f"{name} not built: {e}")


# -- reading a header ---------------------------------------------------------------------

_COMMENT = re.compile(r"/\*.*?\*/", re.DOTALL)
_DEFINE = re.compile(r"^[ \t]*#[ \t]*define[ \t]+(\w+)[ \t]+(.*?)[ \t]*$", re.MULTILINE)
_INT = re.compile(r"-?(?:0x[0-9a-f]+|\d+)[ul]*$", re.IGNORECASE)
_STRUCT = re.compile(r"typedef\s+struct\s+(\w+)\s*\{[^{}]*\}\s*(\w+)\s*;")
_PROTO = re.compile(r"(?P<ret>[A-Za-z_][\w \t\n*]*?)\s*\b(?P<name>\w+)\s*"
                    r"\((?P<args>[^()]*)\)\s*;")


def _int(text: str) -> int:
    return int(text.lower().rstrip("ul"), 0)


def _declarations(text: str, prefix: str) -> tuple[dict[str, int], dict[str, str], list[str]]:
    """Integer constants, prototypes (name -> function pointer type) and typedef structs of
    C text, keeping only names with the module's prefix (VR_, vr_ …)."""
    text = _COMMENT.sub(" ", text)
    consts = {m[1]: _int(m[2]) for m in _DEFINE.finditer(text)
              if m[1].startswith(prefix.upper() + "_") and _INT.match(m[2])}
    text = _DEFINE.sub(" ", text)
    structs = [m[2] for m in _STRUCT.finditer(text)]
    text = _STRUCT.sub(" ", text)
    protos = {m["name"]: f"{' '.join(m['ret'].split())}(*)({' '.join(m['args'].split())})"
              for m in _PROTO.finditer(text) if m["name"].startswith(prefix + "_")}
    return consts, protos, structs


@pytest.mark.parametrize(("module", "header", "prefix"), MODULES, ids=[m[0] for m in MODULES])
def test_module_is_its_header_section(module: str, header: str, prefix: str) -> None:
    """The compiled module exports exactly the section's constants (same values) and
    functions (same types), and has its structs with the same fields."""
    mod = _module(module)
    ffi, lib = mod.ffi, mod.lib
    section = _build_common().cdef_sections(str(CEXT / header))
    consts, protos, structs = _declarations(section, prefix)
    assert consts and protos  # the section is where the API is
    assert bool(structs) == (module not in NO_STRUCTS)

    assert sorted(dir(lib)) == sorted([*consts, *protos]), "rebuild the module?"
    assert {n: getattr(lib, n) for n in consts} == consts, "rebuild the module?"
    ref = FFI()
    ref.cdef(section)
    def spelled(cname: str) -> str:  # the typedef names are the struct tags
        return cname.replace("struct ", "")

    for name, fptr in protos.items():
        assert spelled(ffi.typeof(ffi.addressof(lib, name)).cname) == spelled(
            ref.typeof(fptr).cname), name
    assert sorted(structs) == sorted(ffi.list_types()[0])
    for name in structs:
        assert ffi.sizeof(name) == ref.sizeof(name), name
        got = [(f, spelled(t.type.cname), t.offset) for f, t in ffi.typeof(name).fields]
        want = [(f, spelled(t.type.cname), t.offset) for f, t in ref.typeof(name).fields]
        assert got == want, name


@pytest.mark.parametrize(("module", "header", "prefix"), MODULES, ids=[m[0] for m in MODULES])
def test_whole_api_is_in_the_section(module: str, header: str, prefix: str) -> None:
    """No prefixed prototype, struct or integer constant of the header is outside the
    section (where the build would silently leave it out)."""
    text = (CEXT / header).read_text()
    section = _build_common().cdef_sections(str(CEXT / header))
    everything = _declarations(text, prefix)
    inside = _declarations(section, prefix)
    assert everything == inside, "declared outside the cffi:begin / cffi:end section"


def test_sections_are_well_formed(tmp_path: Path) -> None:
    """Marker misuse is an error naming the line, not a silently wrong cdef."""
    cdef_sections = _build_common().cdef_sections
    begin, end = "/* cffi:begin */", "/* cffi:end */"
    cases = {
        "no cffi:begin / cffi:end section": ["int x;"],
        "without cffi:end": [begin, "int x;"],
        "outside a section": ["int x;", end],
        "inside the section": [begin, begin, end],
    }
    for why, lines in cases.items():
        h = tmp_path / "h.h"
        h.write_text("\n".join(lines) + "\n")
        with pytest.raises(ValueError, match=why):
            cdef_sections(str(h))
    h = tmp_path / "h.h"
    h.write_text("\n".join(["#include <x.h>", begin, "int a;", end, "static int b;",
                            "  " + begin, "int c;", end + "  ", ""]))
    assert cdef_sections(str(h)) == "int a;\nint c;\n"


# -- vr_split_headers ---------------------------------------------------------------------

SENTINEL = 0xA5


def _split(data: bytes, offsets: list[int], lengths: list[int], size: int,
           count: int | None = None) -> tuple[int, np.ndarray]:
    """vr_split_headers over the arguments; (result, out) where out starts as SENTINEL."""
    mod = _module("_vhost_rpmsg_vring")
    ffi, lib = mod.ffi, mod.lib
    n = len(offsets) if count is None else count
    off = np.array(offsets, np.int64)
    lens = np.array(lengths, np.int64)
    out = np.full(max(len(offsets) * size, 1), SENTINEL, np.uint8)
    buf = np.frombuffer(bytearray(data) or bytearray(1), np.uint8)
    got = lib.vr_split_headers(ffi.from_buffer("uint8_t[]", buf), len(data),
                               ffi.from_buffer("int64_t[]", off) if len(off) else ffi.NULL,
                               ffi.from_buffer("int64_t[]", lens) if len(lens) else ffi.NULL,
                               n, size, ffi.from_buffer("uint8_t[]", out))
    return got, out[: len(offsets) * size]


def _model(data: bytes, offsets: list[int], lengths: list[int], size: int) -> bytes | None:
    for o, n in zip(offsets, lengths, strict=True):
        if o < 0 or n < 0 or o + n > len(data):
            return None
    return b"".join(data[o:o + min(n, size)].ljust(size, b"\0")
                    for o, n in zip(offsets, lengths, strict=True))


def test_split_headers_copies_each_chains_first_bytes() -> None:
    data = bytes(range(100))
    offsets, lengths = [0, 20, 36, 90], [20, 16, 40, 10]
    got, out = _split(data, offsets, lengths, 16)
    assert got == 0
    assert out.reshape(4, 16).tolist() == [list(data[0:16]), list(data[20:36]),
                                           list(data[36:52]), list(data[90:100]) + [0] * 6]
    # chains may overlap or repeat, and come in any order: each is copied on its own
    got, out = _split(data, [50, 0, 50], [30, 100, 30], 8)
    assert got == 0 and out.tobytes() == data[50:58] + data[0:8] + data[50:58]


def test_split_headers_zero_fills_short_chains() -> None:
    data = b"abcdefgh"
    # empty chains too: the ones vr_pop_raw reports with an error have length 0
    got, out = _split(data, [0, 3, 8, 8, 5], [2, 0, 0, 0, 3], 4)
    assert got == 0
    assert out.tobytes() == b"ab\0\0" + b"\0" * 12 + b"fgh\0"
    got, out = _split(b"", [0, 0], [0, 0], 16)  # no data at all
    assert got == 0 and out.tobytes() == b"\0" * 32


@pytest.mark.parametrize(("offset", "length"), [
    (-1, 4), (0, -1), (-(2**63), 0), (0, -(2**63)),  # negative
    (11, 0), (10, 1), (0, 11), (5, 6),  # past the end
    (2**63 - 1, 1), (1, 2**63 - 1), (2**63 - 1, 2**63 - 1), (10, 2**63 - 1),  # overflow
])
def test_split_headers_rejects_a_bad_range_before_writing(offset: int, length: int) -> None:
    """One bad pair anywhere, even the last, and nothing at all is written."""
    data = bytes(range(10))
    for pos in (0, 2):
        offsets, lengths = [0, 4, 6], [4, 2, 4]
        offsets[pos], lengths[pos] = offset, length
        got, out = _split(data, offsets, lengths, 16)
        assert got == -1
        assert (out == SENTINEL).all()


def test_split_headers_with_nothing_to_do() -> None:
    got, out = _split(b"xyz", [], [], 16)
    assert got == 0 and out.size == 0
    # hdr_size 0 writes nothing but still checks the ranges
    assert _split(b"xyz", [0, 1], [3, 2], 0)[0] == 0
    assert _split(b"xyz", [0, 1], [3, 3], 0)[0] == -1


def test_split_headers_rejects_an_output_size_that_overflows() -> None:
    """count * hdr_size beyond size_t is refused before any array is read."""
    got, out = _split(b"xyz", [0], [3], 16, count=2**62)
    assert got == -1 and (out == SENTINEL).all()


@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=64),
       chains=st.lists(st.tuples(st.integers(-3, 70), st.integers(-3, 70)), max_size=8),
       size=st.integers(0, 24))
def test_split_headers_matches_a_model(data: bytes, chains: list[tuple[int, int]],
                                       size: int) -> None:
    offsets = [o for o, _ in chains]
    lengths = [n for _, n in chains]
    want = _model(data, offsets, lengths, size)
    got, out = _split(data, offsets, lengths, size)
    if want is None:
        assert got == -1 and (out == SENTINEL).all()
    else:
        assert got == 0 and out.tobytes() == want
