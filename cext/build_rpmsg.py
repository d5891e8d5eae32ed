"""cffi (API mode) build of the rpmsg header check and the fd endpoints' batch writer:
``_vhost_rpmsg_headers``.

Built by ``pip install .`` through ``setup.py``'s ``cffi_modules``.  The module is
top-level, not inside ``vhost_rpmsg``: installed into site-packages, it is found
whichever copy of the pure-Python package is imported (``python -m pytest`` in a
checkout imports the work tree's).  Its cdef is the marked section of cext/rpmsg_headers.h
(see cext/_build_common.py).  For a quick build in the work tree (the module lands in
the project root, ignored by git)::

    python cext/build_rpmsg.py
"""

from __future__ import annotations

import os
import sys

from cffi import FFI

# cffi runs this file with exec(), not as an import: find the shared helper beside it.
_HERE = os.path.dirname(os.path.abspath(__file__))
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)
import _build_common  # noqa: E402

MODULE = "_vhost_rpmsg_headers"
HEADER = "rpmsg_headers.h"


def make_ffi(absolute: bool = False) -> FFI:
    return _build_common.make_ffi(MODULE, HEADER, ["rpmsg_headers.c", "datagrams.c"],
                                  ["ring_primitives.h"], absolute)


ffibuilder = make_ffi()


if __name__ == "__main__":
    print(_build_common.build_in_tree(MODULE, make_ffi(absolute=True)))
