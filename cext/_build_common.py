"""What the cffi build scripts (build_vring.py, build_guest.py) share.

A module's cdef is not retyped here: it is read from its header, which marks its public
API with two comments, ``/* cffi:begin */`` and ``/* cffi:end */``, each alone on its
line (a header may hold several such sections; they are concatenated in order).  What is
inside is handed to ``ffi.cdef`` as it is, so it holds only what cffi's cdef parses:
``#define NAME <integer literal>`` (cffi checks each value against the compiler's when
the module is imported), typedef structs, prototypes and comments.  Includes, include
guards, static inline helpers and macros that are not integer literals stay outside the
markers.  tests/test_cext.py checks that the compiled modules and their headers'
sections agree.
"""

from __future__ import annotations

import glob
import os
import re
import shutil

from cffi import FFI

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

BEGIN = re.compile(r"^\s*/\*\s*cffi:begin\s*\*/\s*$")
END = re.compile(r"^\s*/\*\s*cffi:end\s*\*/\s*$")
COMPILE_ARGS = ["-std=c11", "-O2", "-Wall"]


def cdef_sections(path: str) -> str:
    """The marked sections of the header at ``path``, concatenated, begin/end lines left out.

    Raises ValueError on a header without a section, a begin inside a section, an end
    outside one, or a section left open.
    """
    with open(path, encoding="utf-8") as f:
        lines = f.read().splitlines()
    out: list[str] = []
    start: int | None = None
    found = False
    for n, line in enumerate(lines, 1):
        if BEGIN.match(line):
            if start is not None:
                raise ValueError(f"{path}:{n}: cffi:begin inside the section of line {start}")
            start = n
            found = True
        elif END.match(line):
            if start is None:
                raise ValueError(f"{path}:{n}: cffi:end outside a section")
            start = None
        elif start is not None:
            out.append(line)
    if start is not None:
        raise ValueError(f"{path}:{start}: cffi:begin without cffi:end")
    if not found:
        raise ValueError(f"{path}: no cffi:begin / cffi:end section")
    return "\n".join(out) + "\n"


def _path(name: str, absolute: bool) -> str:
    # setuptools wants source paths relative to the project root, which is the working
    # directory when cffi runs a build script from setup.py; ffi.compile() changes
    # directory, so the in-tree build uses absolute paths.
    path = os.path.join(HERE, name)
    return path if absolute else os.path.relpath(path)


def make_ffi(module: str, header: str, sources: list[str], depends: list[str],
             absolute: bool = False) -> FFI:
    """An API-mode FFI for ``module``: the cdef from ``header``'s sections, the C sources."""
    ffi = FFI()
    ffi.cdef(cdef_sections(os.path.join(HERE, header)))
    extra: dict[str, object] = {}
    if absolute:
        # Named <module>.abi3.so like the setuptools build (cffi asks setuptools for the
        # limited API there), so the two builds replace each other instead of the
        # version-tagged file of one shadowing the other.
        extra["py_limited_api"] = True
    ffi.set_source(
        module,
        f'#include "{header}"',
        sources=[_path(s, absolute) for s in sources],
        depends=[_path(d, absolute) for d in [header, *depends]],
        include_dirs=[_path(".", absolute)],
        extra_compile_args=COMPILE_ARGS,
        **extra,
    )
    return ffi


def build_in_tree(module: str, ffi: FFI) -> str:
    """Compile ``ffi`` (made with absolute=True) into the project root; the path built."""
    built = ffi.compile(tmpdir=os.path.join(ROOT, "build", "cffi"), verbose=False)
    for old in glob.glob(os.path.join(ROOT, f"{module}*.so")):
        os.remove(old)
    dest = os.path.join(ROOT, os.path.basename(built))
    shutil.copy2(built, dest)
    return dest
