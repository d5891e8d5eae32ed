"""cffi (API mode) build of the simulated guest's C fast path: ``_vhost_rpmsg_guest``.

Built by ``pip install .`` through ``setup.py``'s ``cffi_modules``.  The module is
top-level, not inside ``vhost_rpmsg``: installed into site-packages, it is found
whichever copy of the pure-Python package is imported (``python -m pytest`` in a
checkout imports the work tree's).  For a quick build in the work tree (the module
lands in the project root, ignored by git)::

    python cext/build_guest.py
"""

from __future__ import annotations

import os

from cffi import FFI

_HERE = os.path.dirname(os.path.abspath(__file__))


def _path(name: str, absolute: bool) -> str:
    # setuptools wants source paths relative to the project root, which is the working
    # directory when cffi runs this file from setup.py; ffi.compile() changes directory,
    # so the in-tree build uses absolute paths.
    path = os.path.join(_HERE, name)
    return path if absolute else os.path.relpath(path)


CDEF = """
#define GR_BUF_SIZE ...
#define GR_HDR_SIZE ...
#define GR_ERR_RING ...
#define GR_ERR_RANGE ...
#define GR_ERR_MORE ...
#define GR_RX_COUNTED ...
#define GR_RX_OTHER ...
#define GR_RX_BAD_LEN ...
#define GR_RX_BAD_HDR ...
#define GR_TX_DONE ...
#define GR_TX_WAIT ...
#define GR_TX_PY_RECLAIM ...
#define GR_TX_PY_FILL ...
#define GR_TX_OS_ERROR ...
#define GR_TX_TOP ...
#define GR_TX_GOT ...
#define GR_TX_WAIT_LOOP ...
#define GR_TX_AFTER_SELECT ...

typedef struct gr_ring {
    uint8_t *ram;
    uint64_t ram_size;
    uint64_t desc;
    uint64_t avail;
    uint64_t used;
    uint32_t size;
    uint32_t event_idx;
} gr_ring;

typedef struct gr_tx {
    uint32_t *free;
    uint32_t nfree;
    uint32_t free_cap;
    uint64_t *bufs;
    uint32_t nbufs;
    uint32_t buf_cap;
    uint32_t *chain_len;
    int64_t *inflight;
    uint32_t *heads;
    uint32_t nout;
    uint32_t ninfl;
    uint16_t avail_idx;
    uint16_t last_kicked;
    uint16_t last_used;
    const uint8_t *msg;
    uint32_t len;
    uint64_t left;
    int32_t call_fd;
    int32_t kick_fd;
    uint32_t want_irq;
    uint32_t phase;
    uint32_t wait_new;
    uint32_t batch;
    int32_t err;
    uint64_t sent;
    uint64_t kicks;
    uint64_t interrupts;
} gr_tx;

typedef struct gr_rx {
    uint32_t n;
    const uint32_t *lens;
    const uint64_t *gpas;
    uint32_t nstack;
    const uint32_t *stack;
    uint32_t ncounters;
    const uint32_t *counter_addr;
    uint16_t avail_idx;
    uint64_t *counter_msgs;
    uint64_t *counter_bytes;
    uint8_t *actions;
    uint32_t *rest;
    uint32_t *post_ids;
    uint64_t *post_gpas;
    uint8_t *data;
    uint32_t nrest;
    uint32_t counted;
    uint32_t reposted;
} gr_rx;

int32_t gr_used_read(const gr_ring *r, uint16_t last_used, uint32_t cap, uint32_t *heads,
                     uint32_t *lens);
int gr_publish(const gr_ring *r, uint16_t old_idx, uint16_t new_idx);
int gr_enable_interrupts(const gr_ring *r, uint16_t last_used);
int gr_tx_load(const gr_ring *r, gr_tx *t, uint32_t m, const uint32_t *keys,
               const uint32_t *lens, uint32_t mi, const uint32_t *ikeys, const int64_t *gpas);
int gr_tx_run(const gr_ring *r, gr_tx *t);
void gr_tx_store(const gr_ring *r, const gr_tx *t, uint32_t *keys, uint32_t *lens,
                 uint32_t *ikeys, int64_t *gpas);
int gr_rx_process(const gr_ring *r, gr_rx *x);
"""


def make_ffi(absolute: bool = False) -> FFI:
    ffi = FFI()
    ffi.cdef(CDEF)
    extra: dict[str, object] = {}
    if absolute:
        # Named _vhost_rpmsg_guest.abi3.so like the setuptools build (cffi asks
        # setuptools for the limited API there), so the two builds replace each other
        # instead of the version-tagged file of one shadowing the other.
        extra["py_limited_api"] = True
    ffi.set_source(
        "_vhost_rpmsg_guest",
        '#include "guest_ring.h"',
        sources=[_path("guest_ring.c", absolute)],
        depends=[_path("guest_ring.h", absolute), _path("le.h", absolute)],
        include_dirs=[_path(".", absolute)],
        extra_compile_args=["-std=c11", "-O2", "-Wall"],
        **extra,
    )
    return ffi


ffibuilder = make_ffi()


def _build_in_tree() -> str:
    import glob
    import shutil

    root = os.path.dirname(_HERE)
    tmp = os.path.join(root, "build", "cffi")
    built = make_ffi(absolute=True).compile(tmpdir=tmp, verbose=False)
    for old in glob.glob(os.path.join(root, "_vhost_rpmsg_guest*.so")):
        os.remove(old)
    dest = os.path.join(root, os.path.basename(built))
    shutil.copy2(built, dest)
    return dest


if __name__ == "__main__":
    print(_build_in_tree())
