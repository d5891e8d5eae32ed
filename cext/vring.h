/*
 * vring.h - the split-virtqueue engine of vhost-rpmsg in C.
 *
 * The loops of vhost_rpmsg/virtio/queue_python.py (PythonQueue) in C: every function here
 * does exactly what the Python reference does, check for check and in the same order, so
 * the two engines give identical results on any ring, including hostile ones.  Python
 * keeps all policy (stats, logging, QueueBroken); C only walks, copies and orders.
 *
 * Memory model: guest memory is a table of regions, each a host mapping of `size` bytes
 * for guest-physical addresses [gpa, gpa + size).  A guest range is usable only if it lies
 * wholly inside ONE region; all arithmetic is 64-bit and overflow safe.  Ring fields are
 * little endian.  The guest may change any byte at any time: every descriptor is read
 * once into locals and validated there (no double fetch).
 */
#ifndef VHOST_RPMSG_VRING_H
#define VHOST_RPMSG_VRING_H

#include <stdint.h>

/*
 * The public API, from the cffi:begin line to the cffi:end line, is the cdef of
 * _vhost_rpmsg_vring: cext/build_vring.py hands that text to ffi.cdef as it is, so it holds
 * only what cffi's cdef parses (#define NAME <integer literal>, typedef structs,
 * prototypes, comments).  tests/test_cext.py checks that the module and it agree.
 */
/* cffi:begin */

/* Chain errors: the values of vhost_rpmsg.virtio.queue.ChainError. */
#define VR_CHAIN_OK                      0
#define VR_CHAIN_HEAD_OUT_OF_RANGE       1
#define VR_CHAIN_NEXT_OUT_OF_RANGE       2
#define VR_CHAIN_LOOP                    3
#define VR_CHAIN_ADDR_OUT_OF_BOUNDS      4
#define VR_CHAIN_INDIRECT_NESTED         5
#define VR_CHAIN_INDIRECT_BAD_LEN        6
#define VR_CHAIN_INDIRECT_WITH_NEXT      7
#define VR_CHAIN_INDIRECT_NOT_NEGOTIATED 8
#define VR_CHAIN_READABLE_AFTER_WRITABLE 9

/* vr_batch.flags */
#define VR_F_INDIRECT 1u /* VIRTIO_RING_F_INDIRECT_DESC negotiated */
#define VR_F_CONTINUE 2u /* go on with a batch: pop exactly max_chains, no avail idx read */
#define VR_F_LOCATE 4u   /* vr_pop_raw: leave one-segment chains in place (see vr_raw) */

/* vr_pop_batch() results */
#define VR_POP_DONE      0  /* every chain of the batch popped */
#define VR_POP_NEED_SEGS 1  /* stopped before a chain whose segments do not fit: see need */
#define VR_POP_NEED_DATA 2  /* stopped before a chain whose payload does not fit: see need */
#define VR_POP_AHEAD     -1 /* avail idx is more than size ahead: the queue is broken */

/*
 * Descriptor reads one call of vr_pop_batch / vr_pop_raw / vr_fill_rx may start, in units
 * of the queue size (PythonQueue's WALK_BUDGET).  A chain is walked only while fewer
 * have been read in the call (a VR_F_CONTINUE call goes on counting); the rest wait for
 * the next call.  A well-formed batch of direct chains reads at most size descriptors,
 * but a chain that loops reads size (and an indirect table size more) before it is
 * refused: without a bound, a ring of them costs size^2 reads in one call.
 */
#define VR_WALK_BUDGET 4

/* vr_gather() / vr_scatter() result when a segment fails the bounds re-check */
#define VR_COPY_BAD_SEGMENT -1

typedef struct vr_region {
    uint8_t *base; /* host address of guest-physical address gpa */
    uint64_t gpa;
    uint64_t size;
} vr_region;

typedef struct vr_ring {
    uint8_t *desc;  /* descriptor table: 16 * size bytes */
    uint8_t *avail; /* flags, idx, ring[size], used_event: 6 + 2 * size bytes */
    uint8_t *used;  /* flags, idx, ring[size] of (id, len), avail_event: 6 + 8 * size */
    uint32_t size;  /* a power of two, 1..32768 */
    uint32_t nregions;
    const vr_region *regions;
} vr_ring;

/*
 * One pop: inputs, outputs, and caller-owned flat output arrays.
 *
 * Chain i (i < nchains) has head heads[i], error errors[i], and the segments
 * seg_start[i] .. seg_start[i] + nread[i] + nwrite[i] - 1: its nread[i] readable
 * segments first, then its nwrite[i] writable ones (the walk never records a readable
 * buffer after a writable one).  Segment j is (seg_region[j], seg_off[j], seg_len[j])
 * with seg_writable[j] 0 or 1.  A chain with an error keeps the segments found before it.
 * Payloads are not copied: vr_pop_raw does that, for the hot path.
 */
typedef struct vr_batch {
    /* in */
    uint32_t max_chains; /* capacity of the per-chain arrays; the most to pop */
    uint32_t flags;      /* VR_F_* */
    uint32_t seg_cap;    /* capacity of the segment arrays */
    /* in/out */
    uint16_t last_avail;
    /* out */
    uint16_t avail_idx; /* the avail idx read (not with VR_F_CONTINUE) */
    uint32_t pending;   /* (avail_idx - last_avail) mod 2^16 as read */
    uint32_t total;     /* chains in this batch: min(pending, max_chains), less the ones
                           the walk budget left for the next batch */
    uint32_t nchains;   /* chains popped by this call */
    uint64_t reads;     /* descriptors read in this batch (kept across VR_F_CONTINUE) */
    uint32_t nsegs;
    uint32_t nbad;      /* chains with an error among them */
    uint64_t need;      /* NEED_SEGS: segments of the chain that did not fit */
    /* per-chain arrays, max_chains entries each */
    uint32_t *heads;
    uint8_t *errors;
    uint32_t *seg_start;
    uint32_t *nread;
    uint32_t *nwrite;
    uint64_t *read_len;
    uint64_t *write_len;
    /* segment arrays, seg_cap entries each */
    uint32_t *seg_region;
    uint64_t *seg_off;
    uint32_t *seg_len;
    uint8_t *seg_writable;
} vr_batch;

/*
 * Take available chains, walking each like PythonQueue._walk.  Unless VR_F_CONTINUE is
 * set, first reads the avail idx (acquire) and fails with VR_POP_AHEAD if it is more
 * than size ahead of last_avail, before looking at max_chains.  last_avail advances past
 * every chain popped, also when the call stops early with VR_POP_NEED_*; the caller then
 * grows its arrays and calls again with VR_F_CONTINUE and max_chains = total - nchains.
 */
int vr_pop_batch(const vr_ring *ring, vr_batch *b);

/*
 * One raw pop (PythonQueue.pop_raw_batch): per-chain results go straight into one
 * caller block, nothing per segment comes back.
 *
 * The block holds cap chains as five arrays, in this order (8-byte aligned):
 *   int64_t offsets[cap]; int64_t lengths[cap]; uint32_t heads[cap];
 *   uint8_t errors[cap]; uint8_t has_writable[cap];
 * VR_RAW_CHAIN_BYTES * cap bytes in all.  Chain i (i < total) gets heads[i], errors[i],
 * has_writable[i] (1 when errors[i] is VR_CHAIN_OK and the chain has a non-empty
 * device-writable buffer), and, for a chain without error, its first min(data_limit,
 * read_len) readable bytes copied to data + offsets[i], lengths[i] bytes long (a chain
 * with an error: lengths[i] = 0, offsets[i] = the bytes copied before it).  The chains'
 * bytes are consecutive in data.
 *
 * The segments of one chain at a time are recorded in the scratch segment arrays; only
 * the readable ones of a chain without error must fit (NEED_SEGS otherwise).
 *
 * With VR_F_LOCATE (zero-copy receive), a chain without error whose readable bytes are
 * one segment has only its first min(head_limit, data_limit, read_len) bytes copied, and
 * loc_region[i] / loc_off[i] say where the whole segment lies (a region index and an
 * offset in it; the walk checked that it lies inside that region); every other chain is
 * copied as above, with loc_region[i] = -1.  read_len[i] is the chain's readable length
 * (0 with an error).  The three arrays are the caller's, cap entries each.
 */
#define VR_RAW_CHAIN_BYTES 22

typedef struct vr_raw {
    /* in (set up by the caller once; grown on NEED_*) */
    uint32_t seg_cap;    /* capacity of the scratch segment arrays */
    uint64_t data_cap;   /* capacity of data */
    /* kept across VR_F_CONTINUE calls (set from the arguments when a batch starts) */
    uint32_t max_chains; /* cap: the most to pop */
    uint32_t flags;
    uint64_t data_limit;
    uint16_t last_avail; /* in/out: advanced past every chain taken */
    uint32_t nchains;    /* chains done in this batch (arrays filled up to here) */
    uint32_t nbad;       /* chains with an error among them */
    uint32_t nwritable;  /* chains with has_writable set */
    uint32_t nhead_bad;  /* chains with VR_CHAIN_HEAD_OUT_OF_RANGE (cannot be returned) */
    uint64_t data_used;  /* bytes of data filled */
    uint64_t reads;      /* descriptors read in this batch */
    /* out */
    uint16_t avail_idx;  /* the avail idx read (not with VR_F_CONTINUE) */
    uint32_t pending;    /* (avail_idx - last_avail) mod 2^16 as read */
    uint32_t total;      /* chains in this batch: min(pending, max_chains), less the ones
                            the walk budget left for the next batch */
    uint64_t need;       /* NEED_SEGS: readable segments of the chain; NEED_DATA: data
                            bytes needed in all */
    /* the per-chain arrays, in the block */
    int64_t *offsets;
    int64_t *lengths;
    uint32_t *heads;
    uint8_t *errors;
    uint8_t *has_writable;
    /* scratch segment arrays, seg_cap entries each */
    uint32_t *seg_region;
    uint64_t *seg_off;
    uint32_t *seg_len;
    uint8_t *seg_writable;
    uint8_t *data;
    /* VR_F_LOCATE only (set with the batch's first call) */
    uint64_t head_limit;
    int32_t *loc_region;
    int64_t *loc_off;
    int64_t *read_len;
} vr_raw;

/*
 * Take available chains like vr_pop_batch (same avail idx check, same walk), filling the
 * per-chain arrays in block.  Unless flags has VR_F_CONTINUE, starts a batch of at most
 * cap chains from last_avail: the counters and data_used are reset and the avail idx is
 * read.  On VR_POP_NEED_SEGS / VR_POP_NEED_DATA the chain nchains was not taken
 * (r->last_avail is past the ones that were); the caller grows the scratch segments or
 * data (keeping its first data_used bytes) and calls again with VR_F_CONTINUE (the other
 * arguments are then ignored), which goes on up to total.
 */
int vr_pop_raw(const vr_ring *ring, vr_raw *r, void *block, uint32_t cap,
               uint16_t last_avail, uint32_t flags, uint64_t data_limit);

/*
 * Publish n used elements (entries[2k] = id, entries[2k+1] = len) from used_idx on, then
 * store the new used idx with release ordering.  Returns the new used idx.
 */
uint16_t vr_push_batch(const vr_ring *ring, uint16_t used_idx, const uint32_t *entries,
                       uint32_t n);

/* vr_push_batch with entries (heads[k], len) for k < n. */
uint16_t vr_push_used(const vr_ring *ring, uint16_t used_idx, const uint32_t *heads,
                      uint32_t n, uint32_t len);

/* A full memory barrier (what queue_python.full_fence() approximates with a lock). */
void vr_full_fence(void);

/*
 * Full fence, then whether the driver wants an interrupt for used idx moving from
 * old_idx to new_idx: the event-idx test when event_idx, else !VRING_AVAIL_F_NO_INTERRUPT.
 */
int vr_need_notify(const vr_ring *ring, uint16_t new_idx, uint16_t old_idx, int event_idx);

/* Set VRING_USED_F_NO_NOTIFY (only without event idx, as the Python engine does). */
void vr_disable_kicks(const vr_ring *ring, int event_idx);

/*
 * Ask for a kick at last_avail (avail_event, or clear the used flags), full fence, then
 * return whether the avail idx differs from last_avail.
 */
int vr_enable_kicks(const vr_ring *ring, uint16_t last_avail, int event_idx);

/*
 * Copy `want` bytes of a chain's segments (nsegs triples region, offset, length), starting
 * `offset` bytes into them, to out.  Only the bytes actually copied are re-checked against
 * the region table; if any lies outside it, nothing is copied and VR_COPY_BAD_SEGMENT is
 * returned.  Otherwise returns the bytes copied (fewer than want if the segments end).
 */
int64_t vr_gather(const vr_region *regions, uint32_t nregions, const uint64_t *segs,
                  uint32_t nsegs, uint64_t offset, uint64_t want, uint8_t *out);

/* The reverse of vr_gather: copy len bytes of src into the segments from offset on. */
int64_t vr_scatter(const vr_region *regions, uint32_t nregions, const uint64_t *segs,
                   uint32_t nsegs, uint64_t offset, const uint8_t *src, uint64_t len);

/*
 * Gather the first hdr_size bytes of each of count chains packed into data (as vr_pop_raw
 * packs them): chain i is data[offsets[i], offsets[i] + lengths[i]), and its first
 * min(hdr_size, lengths[i]) bytes go to out[i * hdr_size, ...), the rest of its hdr_size
 * bytes zero-filled.  out holds count * hdr_size bytes.  Knows nothing of the headers.
 * Returns 0, or -1 having written nothing when an offset or length is negative or a
 * chain does not lie wholly inside data_len bytes (every pair is checked first, without
 * overflow), or count * hdr_size does not fit a size_t.
 */
int64_t vr_split_headers(const uint8_t *data, uint64_t data_len, const int64_t *offsets,
                         const int64_t *lengths, uint64_t count, uint32_t hdr_size,
                         uint8_t *out);

/*
 * Fill rx chains with host messages (PythonQueue.fill_rx): message m (lens[m] bytes, the
 * messages packed one after another in data) goes into the next available chain that
 * can take it, from the start of its device-writable buffers.  A chain that cannot
 * (an error, a device-readable buffer, writable bytes < lens[m]) is refused: recorded
 * in the ref_* arrays (ref_msg = m) with ref_kind = its ChainError, VR_FILL_READABLE or
 * VR_FILL_TOO_SMALL (ref_detail = its writable bytes), and given back with length 0
 * unless its head is out of range; the message tries the next chain.
 *
 * Reads the avail idx once (acquire; VR_POP_AHEAD, nothing done, if more than size
 * ahead of last_avail) and looks at no more chains than it showed, so at most size
 * chains are refused: ref_cap must be at least the queue size.  The used elements are
 * written after every copy (a buffer may overlap the used ring) and published with one
 * release store of the used idx, also when the call returns
 * VR_POP_NEED_SEGS: a chain without error had more segments than seg_cap (2 * size + 1
 * always suffice); it was not taken, and the caller grows the arrays and fills the rest.
 * exhausted is 1 when every chain shown was taken and messages are left (not when the
 * walk budget stopped the call first).
 */
#define VR_FILL_READABLE 64
#define VR_FILL_TOO_SMALL 65

typedef struct vr_fill {
    /* in */
    uint32_t flags;      /* VR_F_INDIRECT */
    uint32_t seg_cap;    /* capacity of the scratch segment arrays */
    uint32_t ref_cap;    /* capacity of the refusal arrays */
    uint32_t *seg_region;
    uint64_t *seg_off;
    uint32_t *seg_len;
    uint8_t *seg_writable;
    uint32_t *ref_head;
    uint8_t *ref_kind;
    uint64_t *ref_detail;
    uint32_t *ref_msg;   /* which message the refused chain was tried for */
    uint32_t *used_ent;  /* scratch: 2 * ref_cap (head, len) pairs, written at the end */
    /* in/out */
    uint16_t last_avail;
    uint16_t used_idx;
    /* out */
    uint16_t avail_idx;  /* the avail idx read */
    uint32_t pending;    /* (avail_idx - last_avail) mod 2^16 as read */
    uint32_t written;    /* messages written */
    uint32_t popped;     /* chains taken */
    uint32_t nbad;       /* chains taken with an error */
    uint32_t pushed;     /* used elements published */
    uint32_t nrefused;
    uint32_t exhausted;
    uint64_t reads;      /* descriptors read */
} vr_fill;

int vr_fill_rx(const vr_ring *ring, vr_fill *f, const uint8_t *data, const uint64_t *lens,
            uint32_t nmsgs);

/*
 * The one-chain path of a consumer that copies what it reads, in one call.  When the
 * avail idx (read with acquire; VR_POP_AHEAD if more than size ahead) shows exactly one
 * chain: take it as vr_pop_raw with cap 1 (same checks, its bytes up to t->limit into
 * r->data; a VR_POP_NEED_* status takes nothing, and the caller grows r and calls again),
 * give it back used with length 0 (unless its head is out of range), decide whether the
 * driver wants an interrupt for that (vr_need_notify from t->signalled, which becomes
 * the new used idx), and ask for a kick again (vr_enable_kicks: more says whether a
 * chain is there to take, one that raced in or one vr_pop_raw's own read showed).  When
 * that read shows none (the guest moved the idx back), nothing is taken.  When none is
 * shown, kicks are asked for again in the same way and taken is 0; when several are,
 * nothing is done (taken 0, more 0): they are for the batch path.
 */
typedef struct vr_take {
    /* in */
    uint32_t flags;      /* VR_F_INDIRECT */
    uint32_t event_idx;
    uint64_t limit;
    void *block;         /* vr_pop_raw's per-chain arrays for one chain */
    /* in/out */
    uint16_t last_avail;
    uint16_t used_idx;
    uint16_t signalled;  /* the used idx the driver last heard of */
    /* out */
    uint16_t avail_idx;
    uint32_t pending;    /* as vr_raw.pending */
    uint32_t taken;
    uint32_t head;
    uint8_t error;
    uint8_t writable;
    uint8_t returned;    /* the chain went back on the used ring */
    uint8_t notify;
    uint8_t more;
    uint64_t length;     /* bytes copied to r->data */
} vr_take;

int vr_take_one(const vr_ring *ring, vr_raw *r, vr_take *t);

/* cffi:end */

#endif /* VHOST_RPMSG_VRING_H */
