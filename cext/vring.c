/*
 * vring.c - split-virtqueue engine for vhost-rpmsg (see vring.h).
 *
 * Every rule here mirrors vhost_rpmsg/virtio/queue_python.py; when changing one, change the other
 * and run tests/test_engine_differential.py.
 */
#include "vring.h"

#include <stddef.h>
#include <string.h>

#include "ring_primitives.h"

/* -- address translation ---------------------------------------------------------------- */

/* GuestMemory.find_gpa: the first region holding all of [gpa, gpa + len). */
/* "Guest addresses map to the vhost memory region containing that guest address."
 * (vhost-user.rst, Memory access) */
static inline int find_gpa(const vr_region *regions, uint32_t nregions, uint64_t gpa,
                           uint64_t len, uint32_t *region, uint64_t *off)
{
    for (uint32_t i = 0; i < nregions; i++) {
        const vr_region *g = &regions[i];
        if (gpa < g->gpa)
            continue;
        uint64_t o = gpa - g->gpa;
        if (!range_ok(o, len, g->size))
            continue;
        *region = i;
        *off = o;
        return 1;
    }
    return 0;
}

/* Host address of [off, off + len) of region r, or NULL if not wholly inside it. */
static inline uint8_t *region_range(const vr_region *regions, uint32_t nregions, uint64_t r,
                                    uint64_t off, uint64_t len)
{
    if (r >= nregions)
        return NULL;
    const vr_region *g = &regions[r];
    if (!range_ok(off, len, g->size))
        return NULL;
    return g->base + off;
}

/* -- the chain walk ---------------------------------------------------------------------- */

typedef struct {
    uint64_t nseg; /* segments found; stored only while they fit */
    uint32_t nread, nwrite;
    uint64_t read_len, write_len;
    uint64_t reads; /* descriptors read, indirect ones included */
} walk_result;

/* Where a walk records segments: the segment arrays of a vr_batch or a vr_raw. */
typedef struct {
    uint64_t cap;
    uint32_t *region;
    uint64_t *off;
    uint32_t *len;
    uint8_t *writable;
} seg_sink;

static inline void record(const seg_sink *b, uint64_t slot, uint32_t region, uint64_t off,
                          uint32_t len, uint8_t writable)
{
    if (slot < b->cap) {
        b->region[slot] = region;
        b->off[slot] = off;
        b->len[slot] = len;
        b->writable[slot] = writable;
    }
}

/* PythonQueue._walk, check for check.  Segments go to b from index s0 on. */
static uint8_t walk(const vr_ring *ring, int indirect_ok, uint32_t head, const seg_sink *b,
                    uint64_t s0, walk_result *w)
{
    const vr_region *regions = ring->regions;
    const uint32_t nregions = ring->nregions;
    const uint8_t *table = ring->desc;
    uint64_t limit = ring->size;
    uint64_t idx = head;
    uint64_t seen = 0;
    int nested = 0;

    memset(w, 0, sizeof *w);
    /* virtio 1.2 §2.7.5: "The number of descriptors in the table is defined by the queue size" */
    if (head >= ring->size)
        return VR_CHAIN_HEAD_OUT_OF_RANGE;
    for (;;) {
        uint32_t r;
        uint64_t off;

        /* virtio 1.2 §2.7.5: "this is the maximum possible descriptor chain length"; §2.7.5.2:
         * "this implies that loops in the descriptor chain are forbidden!" */
        if (++seen > limit)
            return VR_CHAIN_LOOP;
        w->reads++;
        const uint8_t *d = table + DESC_SIZE * idx; /* idx < limit: inside the table */
        const uint64_t addr = ld64(d);
        const uint64_t word = ld64(d + 8);
        const uint32_t len = (uint32_t)word;
        const uint32_t flags = (uint32_t)(word >> 32) & 0xFFFFu;
        const uint32_t next = (uint32_t)(word >> 48);

        if (flags & F_INDIRECT) {
            /* virtio 1.2 §2.7.5.3: "MUST NOT set the VIRTQ_DESC_F_INDIRECT flag unless the
             * VIRTIO_F_INDIRECT_DESC feature was negotiated" */
            if (!indirect_ok)
                return VR_CHAIN_INDIRECT_NOT_NEGOTIATED;
            /* virtio 1.2 §2.7.5.3: "(ie. only one table per descriptor)" */
            if (nested)
                return VR_CHAIN_INDIRECT_NESTED;
            /* virtio 1.2 §2.7.5.3: "MUST NOT set both VIRTQ_DESC_F_INDIRECT and
             * VIRTQ_DESC_F_NEXT" */
            if (flags & F_NEXT)
                return VR_CHAIN_INDIRECT_WITH_NEXT;
            /* Empty, ragged, or more descriptors than the queue holds. */
            /* virtio 1.2 §2.7.5.3: "struct virtq_desc desc[len / 16];" and "A driver MUST NOT
             * create a descriptor chain longer than the Queue Size of the device." */
            if (len == 0 || len % DESC_SIZE || len / DESC_SIZE > ring->size)
                return VR_CHAIN_INDIRECT_BAD_LEN;
            if (!find_gpa(regions, nregions, addr, len, &r, &off))
                return VR_CHAIN_ADDR_OUT_OF_BOUNDS;
            table = regions[r].base + off;
            limit = len / DESC_SIZE;
            idx = 0;
            seen = 0;
            nested = 1;
            continue;
        }
        if (len) {
            if (!find_gpa(regions, nregions, addr, len, &r, &off))
                return VR_CHAIN_ADDR_OUT_OF_BOUNDS;
            if (flags & F_WRITE) {
                record(b, s0 + w->nseg++, r, off, len, 1);
                w->nwrite++;
                w->write_len += len;
            } else {
                /* virtio 1.2 §2.7.4.2: "The driver MUST place any device-writable descriptor
                 * elements after any device-readable descriptor elements." */
                if (w->nwrite)
                    return VR_CHAIN_READABLE_AFTER_WRITABLE;
                record(b, s0 + w->nseg++, r, off, len, 0);
                w->nread++;
                w->read_len += len;
            }
        } else if (!(flags & F_WRITE) && w->nwrite) {
            /* virtio 1.2 §2.7.4.2: "The driver MUST place any device-writable descriptor
             * elements after any device-readable descriptor elements." */
            return VR_CHAIN_READABLE_AFTER_WRITABLE;
        }
        if (!(flags & F_NEXT))
            return VR_CHAIN_OK;
        /* next indexes this table: queue size entries (virtio 1.2 §2.7.5), or len / 16
         * (§2.7.5.3) */
        if (next >= limit)
            return VR_CHAIN_NEXT_OUT_OF_RANGE;
        idx = next;
    }
}

/* Descriptor reads one pop or fill may start (vring.h, VR_WALK_BUDGET). */
static inline uint64_t walk_budget(const vr_ring *ring)
{
    return (uint64_t)VR_WALK_BUDGET * ring->size;
}

/* Copy the first `want` readable bytes of a chain just walked (its segments are valid). */
static void copy_readable(const vr_ring *ring, const seg_sink *b, uint64_t s0, uint32_t nread,
                          uint64_t want, uint8_t *out)
{
    for (uint32_t k = 0; k < nread && want; k++) {
        uint64_t j = s0 + k;
        uint64_t take = b->len[j] < want ? b->len[j] : want;
        memcpy(out, ring->regions[b->region[j]].base + b->off[j], (size_t)take);
        out += take;
        want -= take;
    }
}

int vr_pop_batch(const vr_ring *ring, vr_batch *b)
{
    const uint32_t mask = ring->size - 1;
    const int indirect_ok = (b->flags & VR_F_INDIRECT) != 0;
    const seg_sink sink = {b->seg_cap, b->seg_region, b->seg_off, b->seg_len, b->seg_writable};
    uint32_t n;
    uint16_t last = b->last_avail;

    b->nchains = b->nsegs = b->nbad = 0;
    b->need = 0;
    if (!(b->flags & VR_F_CONTINUE)) {
        b->reads = 0;
        /* The acquire orders every later read of ring entries and descriptors after it. */
        const uint16_t avail_idx = ld16_acquire(ring->avail + 2);
        const uint32_t pending = (uint16_t)(avail_idx - last);
        b->avail_idx = avail_idx;
        b->pending = pending;
        /* virtio 1.2 §2.7: "Queue Size corresponds to the maximum number of buffers in the
         * virtqueue" */
        if (pending > ring->size)
            return VR_POP_AHEAD;
        n = pending < b->max_chains ? pending : b->max_chains;
        b->total = n;
    } else {
        n = b->max_chains;
    }

    for (uint32_t i = 0; i < n; i++) {
        walk_result w;
        if (b->reads >= walk_budget(ring)) {
            b->total -= n - i; /* left for the next batch */
            break;
        }
        const uint32_t head = ld16(ring->avail + 4 + 2 * (last & mask));
        const uint64_t s0 = b->nsegs;
        const uint8_t err = walk(ring, indirect_ok, head, &sink, s0, &w);

        if (w.nseg > (uint64_t)b->seg_cap - s0) {
            b->need = w.nseg;
            return VR_POP_NEED_SEGS; /* walked again, and counted then */
        }
        b->reads += w.reads;
        b->heads[i] = head;
        b->errors[i] = err;
        b->seg_start[i] = (uint32_t)s0;
        b->nread[i] = w.nread;
        b->nwrite[i] = w.nwrite;
        b->read_len[i] = w.read_len;
        b->write_len[i] = w.write_len;
        b->nsegs = (uint32_t)(s0 + w.nseg);
        if (err != VR_CHAIN_OK)
            b->nbad++;
        b->nchains = i + 1;
        last = (uint16_t)(last + 1);
        b->last_avail = last;
    }
    return VR_POP_DONE;
}

int vr_pop_raw(const vr_ring *ring, vr_raw *r, void *block, uint32_t cap,
               uint16_t last_avail, uint32_t flags, uint64_t data_limit)
{
    const uint32_t mask = ring->size - 1;
    const seg_sink sink = {r->seg_cap, r->seg_region, r->seg_off, r->seg_len, r->seg_writable};
    int indirect_ok;
    uint16_t last;
    uint64_t used;

    r->need = 0;
    if (!(flags & VR_F_CONTINUE)) {
        r->max_chains = cap;
        r->flags = flags;
        r->data_limit = data_limit;
        r->last_avail = last_avail;
        r->offsets = (int64_t *)block;
        r->lengths = r->offsets + cap;
        r->heads = (uint32_t *)(void *)(r->lengths + cap);
        r->errors = (uint8_t *)(r->heads + cap);
        r->has_writable = r->errors + cap;
        r->nchains = r->nbad = r->nwritable = r->nhead_bad = 0;
        r->data_used = 0;
        r->reads = 0;
        r->total = 0;

        const uint16_t avail_idx = ld16_acquire(ring->avail + 2);
        const uint32_t pending = (uint16_t)(avail_idx - last_avail);
        r->avail_idx = avail_idx;
        r->pending = pending;
        /* virtio 1.2 §2.7: "Queue Size corresponds to the maximum number of buffers in the
         * virtqueue" */
        if (pending > ring->size)
            return VR_POP_AHEAD;
        r->total = pending < cap ? pending : cap;
    }
    indirect_ok = (r->flags & VR_F_INDIRECT) != 0;
    last = r->last_avail;
    used = r->data_used;
    for (uint32_t i = r->nchains; i < r->total; i++) {
        walk_result w;
        if (r->reads >= walk_budget(ring)) {
            r->total = i; /* the rest are left for the next batch */
            break;
        }
        const uint32_t head = ld16(ring->avail + 4 + 2 * (last & mask));
        const uint8_t err = walk(ring, indirect_ok, head, &sink, 0, &w);
        uint64_t want = 0;
        uint8_t writable = 0;
        int in_place = 0;

        if (err == VR_CHAIN_OK) {
            /* Only the readable segments are copied; they are recorded first. */
            if (w.nread > r->seg_cap) {
                r->need = w.nread;
                return VR_POP_NEED_SEGS;
            }
            want = w.read_len < r->data_limit ? w.read_len : r->data_limit;
            in_place = (r->flags & VR_F_LOCATE) && w.nread == 1;
            if (in_place && want > r->head_limit)
                want = r->head_limit;
            if (want > r->data_cap - used) {
                r->need = used + want;
                return VR_POP_NEED_DATA;
            }
            copy_readable(ring, &sink, 0, w.nread, want, r->data + used);
            writable = w.nwrite != 0;
            r->nwritable += writable;
        } else {
            r->nbad++;
            r->nhead_bad += err == VR_CHAIN_HEAD_OUT_OF_RANGE;
        }
        r->reads += w.reads; /* taken: a chain that stopped the call is walked again */
        if (r->flags & VR_F_LOCATE) {
            /* the readable segments were recorded first: the one segment is number 0 */
            r->loc_region[i] = in_place ? (int32_t)r->seg_region[0] : -1;
            r->loc_off[i] = in_place ? (int64_t)r->seg_off[0] : 0;
            r->read_len[i] = err == VR_CHAIN_OK ? (int64_t)w.read_len : 0;
        }
        r->heads[i] = head;
        r->errors[i] = err;
        r->has_writable[i] = writable;
        r->offsets[i] = (int64_t)used;
        r->lengths[i] = (int64_t)want;
        used += want;
        r->data_used = used;
        r->nchains = i + 1;
        last = (uint16_t)(last + 1);
        r->last_avail = last;
    }
    return VR_POP_DONE;
}

/* -- filling rx chains ------------------------------------------------------------------ */

int vr_fill_rx(const vr_ring *ring, vr_fill *f, const uint8_t *data, const uint64_t *lens,
            uint32_t nmsgs)
{
    const uint32_t mask = ring->size - 1;
    const int indirect_ok = (f->flags & VR_F_INDIRECT) != 0;
    const seg_sink sink = {f->seg_cap, f->seg_region, f->seg_off, f->seg_len, f->seg_writable};
    uint16_t last = f->last_avail;
    uint16_t idx = f->used_idx;
    uint64_t pos = 0;
    uint32_t m = 0, i;
    int status = VR_POP_DONE;

    f->written = f->popped = f->nbad = f->pushed = f->nrefused = f->exhausted = 0;
    f->reads = 0;
    const uint16_t avail_idx = ld16_acquire(ring->avail + 2);
    const uint32_t pending = (uint16_t)(avail_idx - last);
    f->avail_idx = avail_idx;
    f->pending = pending;
    /* virtio 1.2 §2.7: "Queue Size corresponds to the maximum number of buffers in the
     * virtqueue" */
    if (pending > ring->size)
        return VR_POP_AHEAD;
    for (i = 0; i < pending && m < nmsgs; i++) {
        walk_result w;
        if (f->reads >= walk_budget(ring))
            break; /* the rest wait for the next call; not exhausted */
        const uint32_t head = ld16(ring->avail + 4 + 2 * (last & mask));
        const uint8_t err = walk(ring, indirect_ok, head, &sink, 0, &w);
        const uint64_t len = lens[m];
        uint8_t kind = err;
        uint64_t detail = 0;
        uint32_t used_len = 0;

        if (err == VR_CHAIN_OK && w.nseg > f->seg_cap) {
            status = VR_POP_NEED_SEGS;
            break;
        }
        f->reads += w.reads;
        if (err != VR_CHAIN_OK)
            f->nbad++;
        else if (w.nread)
            kind = VR_FILL_READABLE;
        else if (w.write_len < len) {
            kind = VR_FILL_TOO_SMALL;
            detail = w.write_len;
        }
        last = (uint16_t)(last + 1);
        f->popped++;
        if (kind == VR_CHAIN_OK) {
            /* Every segment is writable (nread == 0) and was checked to lie wholly inside
             * one region by the walk; write_len >= len, so the message fits. */
            const uint8_t *src = data + pos;
            uint64_t left = len;
            for (uint64_t s = 0; s < w.nseg && left; s++) {
                const uint64_t take = f->seg_len[s] < left ? f->seg_len[s] : left;
                memcpy(ring->regions[f->seg_region[s]].base + f->seg_off[s], src, (size_t)take);
                src += take;
                left -= take;
            }
            used_len = (uint32_t)len;
            pos += len;
            m++;
            f->written++;
        } else {
            if (f->nrefused < f->ref_cap) {
                f->ref_head[f->nrefused] = head;
                f->ref_kind[f->nrefused] = kind;
                f->ref_detail[f->nrefused] = detail;
                f->ref_msg[f->nrefused] = m;
            }
            f->nrefused++;
            if (err == VR_CHAIN_HEAD_OUT_OF_RANGE)
                continue; /* not a descriptor: nothing to give back */
        }
        /* Kept until every copy is done: a guest buffer may overlap the used ring, and
         * the Python engine writes the used elements after all its copies too. */
        f->used_ent[2 * f->pushed] = head;
        f->used_ent[2 * f->pushed + 1] = used_len;
        f->pushed++;
    }
    for (uint32_t k = 0; k < f->pushed; k++) {
        uint8_t *elem = ring->used + 4 + 8 * (uint32_t)(idx & mask);
        st32(elem, f->used_ent[2 * k]);
        /* virtio 1.2 §2.7.8.2: "the device MUST set len to the number of bytes it wrote" */
        st32(elem + 4, f->used_ent[2 * k + 1]);
        idx = (uint16_t)(idx + 1);
    }
    if (f->pushed)
        /* virtio 1.2 §2.7.8.2: "The device MUST set len prior to updating the used idx." */
        st16_release(ring->used + 2, idx);
    f->last_avail = last;
    f->used_idx = idx;
    f->exhausted = status == VR_POP_DONE && i == pending && m < nmsgs;
    return status;
}

/* -- used ring and notifications ------------------------------------------------------- */

uint16_t vr_push_batch(const vr_ring *ring, uint16_t used_idx, const uint32_t *entries,
                       uint32_t n)
{
    const uint32_t mask = ring->size - 1;
    uint16_t idx = used_idx;

    for (uint32_t k = 0; k < n; k++) {
        uint8_t *elem = ring->used + 4 + 8 * (uint32_t)(idx & mask);
        st32(elem, entries[2 * k]);
        st32(elem + 4, entries[2 * k + 1]);
        idx = (uint16_t)(idx + 1);
    }
    /* The publication point: the elements above are visible before the new idx. */
    /* virtio 1.2 §2.7.8.2: "The device MUST set len prior to updating the used idx." */
    st16_release(ring->used + 2, idx);
    return idx;
}

uint16_t vr_push_used(const vr_ring *ring, uint16_t used_idx, const uint32_t *heads,
                      uint32_t n, uint32_t len)
{
    const uint32_t mask = ring->size - 1;
    uint16_t idx = used_idx;

    for (uint32_t k = 0; k < n; k++) {
        uint8_t *elem = ring->used + 4 + 8 * (uint32_t)(idx & mask);
        st32(elem, heads[k]);
        st32(elem + 4, len);
        idx = (uint16_t)(idx + 1);
    }
    /* virtio 1.2 §2.7.8.2: "The device MUST set len prior to updating the used idx." */
    st16_release(ring->used + 2, idx);
    return idx;
}

void vr_full_fence(void)
{
    full_fence();
}

int vr_need_notify(const vr_ring *ring, uint16_t new_idx, uint16_t old_idx, int event_idx)
{
    full_fence(); /* our used idx store before their wishes */
    if (new_idx == old_idx)
        return 0;
    if (event_idx) {
        /* virtio 1.2 §2.7.7.2: "The device MUST ignore the lower bit of flags." */
        return need_event(ld16(ring->avail + 4 + 2 * ring->size), new_idx, old_idx);
    }
    /* virtio 1.2 §2.7.7.2: "If flags is 0, the device MUST send a notification." */
    return !(ld16(ring->avail) & AVAIL_F_NO_INTERRUPT);
}

void vr_disable_kicks(const vr_ring *ring, int event_idx)
{
    /* virtio 1.2 §2.7.10.2: "The device MUST set flags to 0 or 1." */
    if (!event_idx)
        st16(ring->used, USED_F_NO_NOTIFY);
}

int vr_enable_kicks(const vr_ring *ring, uint16_t last_avail, int event_idx)
{
    /* virtio 1.2 §2.7.10.2: "The device MAY use avail_event to advise the driver" (event idx);
     * "The device MUST set flags to 0 or 1." (no event idx) */
    if (event_idx)
        st16(ring->used + 4 + 8 * ring->size, last_avail);
    else
        st16(ring->used, 0);
    full_fence(); /* publish the wish before re-reading idx */
    return ld16_acquire(ring->avail + 2) != last_avail;
}

/* -- payload copies --------------------------------------------------------------------- */

/*
 * Both copies walk the segments as PythonQueue.read_chain/write_chain do: skip whole
 * segments while the offset covers them, then take min(rest of segment, rest wanted).
 * A first pass checks every byte range that will be touched; only then is anything copied.
 */
static int64_t check(const vr_region *regions, uint32_t nregions, const uint64_t *segs,
                     uint32_t nsegs, uint64_t offset, uint64_t want)
{
    uint64_t done = 0;

    for (uint32_t k = 0; k < nsegs && want; k++) {
        const uint64_t r = segs[3 * k], off = segs[3 * k + 1], length = segs[3 * k + 2];
        if (offset >= length) {
            offset -= length;
            continue;
        }
        const uint64_t take = length - offset < want ? length - offset : want;
        if (off > UINT64_MAX - offset || !region_range(regions, nregions, r, off + offset, take))
            return VR_COPY_BAD_SEGMENT;
        offset = 0;
        want -= take;
        done += take;
    }
    return (int64_t)done;
}

int64_t vr_gather(const vr_region *regions, uint32_t nregions, const uint64_t *segs,
                  uint32_t nsegs, uint64_t offset, uint64_t want, uint8_t *out)
{
    const int64_t total = check(regions, nregions, segs, nsegs, offset, want);
    if (total < 0)
        return total;
    for (uint32_t k = 0; k < nsegs && want; k++) {
        const uint64_t r = segs[3 * k], off = segs[3 * k + 1], length = segs[3 * k + 2];
        if (offset >= length) {
            offset -= length;
            continue;
        }
        const uint64_t take = length - offset < want ? length - offset : want;
        memcpy(out, regions[r].base + off + offset, (size_t)take);
        out += take;
        offset = 0;
        want -= take;
    }
    return total;
}

int64_t vr_scatter(const vr_region *regions, uint32_t nregions, const uint64_t *segs,
                   uint32_t nsegs, uint64_t offset, const uint8_t *src, uint64_t len)
{
    const int64_t total = check(regions, nregions, segs, nsegs, offset, len);
    if (total < 0)
        return total;
    for (uint32_t k = 0; k < nsegs && len; k++) {
        const uint64_t r = segs[3 * k], off = segs[3 * k + 1], length = segs[3 * k + 2];
        if (offset >= length) {
            offset -= length;
            continue;
        }
        const uint64_t take = length - offset < len ? length - offset : len;
        memcpy(regions[r].base + off + offset, src, (size_t)take);
        src += take;
        offset = 0;
        len -= take;
    }
    return total;
}


/* -- header gathers --------------------------------------------------------------------- */

int64_t vr_split_headers(const uint8_t *data, uint64_t data_len, const int64_t *offsets,
                         const int64_t *lengths, uint64_t count, uint32_t hdr_size,
                         uint8_t *out)
{
    /* Every range first, so that a bad one leaves out untouched. */
    if (hdr_size && count > SIZE_MAX / hdr_size)
        return -1;
    for (uint64_t i = 0; i < count; i++) {
        const int64_t off = offsets[i], len = lengths[i];
        if (off < 0 || len < 0 || !range_ok((uint64_t)off, (uint64_t)len, data_len))
            return -1;
    }
    for (uint64_t i = 0; i < count; i++) {
        const uint64_t len = (uint64_t)lengths[i];
        const size_t take = len < hdr_size ? (size_t)len : hdr_size;
        uint8_t *o = out + (size_t)i * hdr_size;
        if (take)
            memcpy(o, data + offsets[i], take);
        if (take < hdr_size)
            memset(o + take, 0, hdr_size - take);
    }
    return 0;
}

int vr_take_one(const vr_ring *ring, vr_raw *r, vr_take *t)
{
    t->taken = t->returned = t->notify = t->more = 0;
    t->avail_idx = ld16_acquire(ring->avail + 2);
    t->pending = (uint16_t)(t->avail_idx - t->last_avail);
    /* virtio 1.2 §2.7: "Queue Size corresponds to the maximum number of buffers in the
     * virtqueue" */
    if (t->pending > ring->size)
        return VR_POP_AHEAD;
    if (t->pending != 1) {
        /* none: kicks asked for again, as the batch path's last round; several: theirs */
        if (!t->pending)
            t->more = (uint8_t)vr_enable_kicks(ring, t->last_avail, (int)t->event_idx);
        return VR_POP_DONE;
    }
    const int status = vr_pop_raw(ring, r, t->block, 1, t->last_avail, t->flags, t->limit);
    if (status != VR_POP_DONE) {
        t->avail_idx = r->avail_idx;
        t->pending = r->pending;
        return status;
    }
    if (!r->total)
        return status; /* the guest moved its avail idx back between the two reads */
    t->taken = 1;
    t->head = r->heads[0];
    t->error = r->errors[0];
    t->writable = r->has_writable[0];
    t->length = (uint64_t)r->lengths[0];
    t->last_avail = r->last_avail;
    if (t->error != VR_CHAIN_HEAD_OUT_OF_RANGE) {
        t->used_idx = vr_push_used(ring, t->used_idx, &t->head, 1, 0);
        t->returned = 1;
    }
    t->notify = (uint8_t)vr_need_notify(ring, t->used_idx, t->signalled, (int)t->event_idx);
    t->signalled = t->used_idx;
    /* (1 as well when the second read showed more than one: the batch path takes them) */
    t->more = (uint8_t)vr_enable_kicks(ring, t->last_avail, (int)t->event_idx);
    return status;
}
