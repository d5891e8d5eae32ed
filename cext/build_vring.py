"""cffi (API mode) build of the C split-ring engine: ``_vhost_rpmsg_vring``.

Built by ``pip install .`` through ``setup.py``'s ``cffi_modules``.  The module is
top-level, not inside ``vhost_rpmsg``: installed into site-packages, it is found
whichever copy of the pure-Python package is imported (``python -m pytest`` in a
checkout imports the work tree's).  For a quick build in the work tree (the module
lands in the project root, ignored by git)::

    python cext/build_vring.py
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
#define VR_CHAIN_OK ...
#define VR_F_INDIRECT ...
#define VR_F_CONTINUE ...
#define VR_POP_DONE ...
#define VR_POP_NEED_SEGS ...
#define VR_POP_NEED_DATA ...
#define VR_POP_AHEAD ...
#define VR_COPY_BAD_SEGMENT ...
#define VR_RAW_CHAIN_BYTES ...

typedef struct vr_region {
    uint8_t *base;
    uint64_t gpa;
    uint64_t size;
} vr_region;

typedef struct vr_ring {
    uint8_t *desc;
    uint8_t *avail;
    uint8_t *used;
    uint32_t size;
    uint32_t nregions;
    const vr_region *regions;
} vr_ring;

typedef struct vr_batch {
    uint32_t max_chains;
    uint32_t flags;
    uint32_t seg_cap;
    uint64_t data_cap;
    uint64_t data_limit;
    uint16_t last_avail;
    uint16_t avail_idx;
    uint32_t pending;
    uint32_t total;
    uint32_t nchains;
    uint32_t nsegs;
    uint32_t nbad;
    uint64_t need;
    uint64_t data_used;
    uint32_t *heads;
    uint8_t *errors;
    uint32_t *seg_start;
    uint32_t *nread;
    uint32_t *nwrite;
    uint64_t *read_len;
    uint64_t *write_len;
    uint64_t *data_off;
    uint64_t *data_len;
    uint32_t *seg_region;
    uint64_t *seg_off;
    uint32_t *seg_len;
    uint8_t *seg_writable;
    uint8_t *data;
} vr_batch;

typedef struct vr_raw {
    uint32_t seg_cap;
    uint64_t data_cap;
    uint32_t max_chains;
    uint32_t flags;
    uint64_t data_limit;
    uint16_t last_avail;
    uint32_t nchains;
    uint32_t nbad;
    uint32_t nwritable;
    uint32_t nhead_bad;
    uint64_t data_used;
    uint16_t avail_idx;
    uint32_t pending;
    uint32_t total;
    uint64_t need;
    int64_t *offsets;
    int64_t *lengths;
    uint32_t *heads;
    uint8_t *errors;
    uint8_t *has_writable;
    uint32_t *seg_region;
    uint64_t *seg_off;
    uint32_t *seg_len;
    uint8_t *seg_writable;
    uint8_t *data;
} vr_raw;

int vr_pop_batch(const vr_ring *ring, vr_batch *b);
int vr_pop_raw(const vr_ring *ring, vr_raw *r, void *block, uint32_t cap,
               uint16_t last_avail, uint32_t flags, uint64_t data_limit);
uint16_t vr_push_batch(const vr_ring *ring, uint16_t used_idx, const uint32_t *entries,
                       uint32_t n);
uint16_t vr_push_used(const vr_ring *ring, uint16_t used_idx, const uint32_t *heads,
                      uint32_t n, uint32_t len);
void vr_full_fence(void);
int vr_need_notify(const vr_ring *ring, uint16_t new_idx, uint16_t old_idx, int event_idx);
void vr_disable_kicks(const vr_ring *ring, int event_idx);
int vr_enable_kicks(const vr_ring *ring, uint16_t last_avail, int event_idx);
char *vr_range(const vr_region *regions, uint32_t nregions, uint64_t r, uint64_t off,
               uint64_t len);
int64_t vr_gather(const vr_region *regions, uint32_t nregions, const uint64_t *segs,
                  uint32_t nsegs, uint64_t offset, uint64_t want, uint8_t *out);
int64_t vr_scatter(const vr_region *regions, uint32_t nregions, const uint64_t *segs,
                   uint32_t nsegs, uint64_t offset, const uint8_t *src, uint64_t len);
#define VR_MSG_SHORT ...
#define VR_MSG_TOO_LONG ...
int64_t vr_rpmsg_split(const uint8_t *data, uint64_t data_len, const int64_t *offsets,
                       const int64_t *lengths, const uint8_t *skip, int64_t n, int64_t *out);
"""



def make_ffi(absolute: bool = False) -> FFI:
    ffi = FFI()
    ffi.cdef(CDEF)
    extra: dict[str, object] = {}
    if absolute:
        # Named _vhost_rpmsg_vring.abi3.so like the setuptools build (cffi asks
        # setuptools for the limited API there), so the two builds replace each other
        # instead of the version-tagged file of one shadowing the other.
        extra["py_limited_api"] = True
    ffi.set_source(
        "_vhost_rpmsg_vring",
        '#include "vring.h"',
        sources=[_path("vring.c", absolute)],
        depends=[_path("vring.h", absolute), _path("le.h", absolute)],
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
    for old in glob.glob(os.path.join(root, "_vhost_rpmsg_vring*.so")):
        os.remove(old)
    dest = os.path.join(root, os.path.basename(built))
    shutil.copy2(built, dest)
    return dest


if __name__ == "__main__":
    print(_build_in_tree())
