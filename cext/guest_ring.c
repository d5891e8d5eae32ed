/*
 * guest_ring.c - the simulated guest's hot loops (see guest_ring.h).
 *
 * Every rule here mirrors vhost_rpmsg/guest/ring.py and rpmsg_guest.py; when changing
 * one, change the other and run tests/test_guest_fastpath.py.
 */
#include "guest_ring.h"

#include <stddef.h>
#include <string.h>

#define DESC_SIZE 16u
#define F_WRITE 2u
#define USED_F_NO_NOTIFY 1u
#define MAX_SIZE 32768u

#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
#define LE16(x) __builtin_bswap16(x)
#define LE32(x) __builtin_bswap32(x)
#define LE64(x) __builtin_bswap64(x)
#else
#define LE16(x) (x)
#define LE32(x) (x)
#define LE64(x) (x)
#endif

/* Ring fields are naturally aligned (gr_ring_ok checks), so these are single accesses. */

static inline uint16_t ld16(const uint8_t *p)
{
    return LE16(__atomic_load_n((const uint16_t *)(const void *)p, __ATOMIC_RELAXED));
}

static inline uint16_t ld16_acquire(const uint8_t *p)
{
    return LE16(__atomic_load_n((const uint16_t *)(const void *)p, __ATOMIC_ACQUIRE));
}

static inline uint32_t ld32(const uint8_t *p)
{
    return LE32(__atomic_load_n((const uint32_t *)(const void *)p, __ATOMIC_RELAXED));
}

static inline void st16(uint8_t *p, uint16_t v)
{
    __atomic_store_n((uint16_t *)(void *)p, LE16(v), __ATOMIC_RELAXED);
}

static inline void st16_release(uint8_t *p, uint16_t v)
{
    __atomic_store_n((uint16_t *)(void *)p, LE16(v), __ATOMIC_RELEASE);
}

static inline void st64(uint8_t *p, uint64_t v)
{
    __atomic_store_n((uint64_t *)(void *)p, LE64(v), __ATOMIC_RELAXED);
}

/* [off, off + len) lies inside [0, size), without overflow. */
static inline int inside(uint64_t off, uint64_t len, uint64_t size)
{
    return off <= size && len <= size - off;
}

/* The ring's three parts lie inside guest RAM, naturally aligned (as RingLayout makes). */
static int gr_ring_ok(const gr_ring *r)
{
    uint64_t n = r->size;
    if (r->ram == NULL || n == 0 || n > MAX_SIZE)
        return 0;
    if ((r->desc & 15u) || (r->avail & 1u) || (r->used & 3u))
        return 0;
    return inside(r->desc, DESC_SIZE * n, r->ram_size)
        && inside(r->avail, 6 + 2 * n, r->ram_size)
        && inside(r->used, 6 + 8 * n, r->ram_size);
}

/* The virtio event-index test (ring.need_event). */
static inline int need_event(uint16_t event, uint16_t new_idx, uint16_t old_idx)
{
    return (uint16_t)(new_idx - event - 1) < (uint16_t)(new_idx - old_idx);
}

/* DriverRing.write_desc for a one-descriptor chain: addr, len | flags << 32, next 0. */
static inline void write_desc(const gr_ring *r, uint32_t id, uint64_t addr, uint32_t len,
                              uint32_t flags)
{
    uint8_t *d = r->ram + r->desc + (uint64_t)DESC_SIZE * id;
    st64(d, addr);
    st64(d + 8, (uint64_t)len | ((uint64_t)flags << 32));
}

/* avail->ring[idx % size] = head (DriverRing.add's avail store). */
static inline void put_avail(const gr_ring *r, uint16_t idx, uint32_t head)
{
    st16(r->ram + r->avail + 4 + 2 * (uint64_t)(idx % r->size), (uint16_t)head);
}

int32_t gr_used_read(const gr_ring *r, uint16_t last_used, uint32_t cap, uint32_t *heads,
                     uint32_t *lens)
{
    if (!gr_ring_ok(r))
        return GR_ERR_RING;
    const uint8_t *used = r->ram + r->used;
    uint16_t idx = ld16_acquire(used + 2);
    uint32_t n = (uint16_t)(idx - last_used);
    if (n > cap)
        return GR_ERR_MORE;
    for (uint32_t i = 0; i < n; i++) {
        const uint8_t *e = used + 4 + 8 * (uint64_t)((uint16_t)(last_used + i) % r->size);
        heads[i] = ld32(e);
        lens[i] = ld32(e + 4);
    }
    return (int32_t)n;
}

int gr_publish(const gr_ring *r, uint16_t old_idx, uint16_t new_idx)
{
    if (!gr_ring_ok(r))
        return GR_ERR_RING;
    const uint8_t *used = r->ram + r->used;
    st16_release(r->ram + r->avail + 2, new_idx); /* ring entries and buffers first */
    __atomic_thread_fence(__ATOMIC_SEQ_CST);      /* the idx before reading their wishes */
    if (old_idx == new_idx)
        return 0;
    if (r->event_idx)
        return need_event(ld16(used + 4 + 8 * (uint64_t)r->size), new_idx, old_idx);
    return !(ld16(used) & USED_F_NO_NOTIFY);
}

int gr_enable_interrupts(const gr_ring *r, uint16_t last_used)
{
    if (!gr_ring_ok(r))
        return GR_ERR_RING;
    uint8_t *avail = r->ram + r->avail;
    if (r->event_idx)
        st16(avail + 4 + 2 * (uint64_t)r->size, last_used); /* used_event */
    else
        st16(avail, 0);
    __atomic_thread_fence(__ATOMIC_SEQ_CST); /* the wish before re-reading the used idx */
    return ld16(r->ram + r->used + 2) != last_used;
}

int32_t gr_tx_fill(const gr_ring *r, uint16_t avail_idx, const uint8_t *msg, uint32_t len,
                   const uint64_t *gpas, const uint32_t *ids, uint32_t n)
{
    if (!gr_ring_ok(r))
        return GR_ERR_RING;
    if (n > 0 && (msg == NULL || gpas == NULL || ids == NULL))
        return GR_ERR_RANGE;
    for (uint32_t i = 0; i < n; i++)
        if (ids[i] >= r->size || !inside(gpas[i], len, r->ram_size))
            return GR_ERR_RANGE;
    for (uint32_t k = 0; k < n; k++) {
        uint64_t gpa = gpas[n - 1 - k];
        uint32_t id = ids[n - 1 - k];
        memcpy(r->ram + gpa, msg, len);
        write_desc(r, id, gpa, len, 0);
        put_avail(r, (uint16_t)(avail_idx + k), id);
    }
    return (int32_t)n;
}

int gr_rx_process(const gr_ring *r, gr_rx *x)
{
    if (!gr_ring_ok(r))
        return GR_ERR_RING;
    uint32_t n = x->n;
    /* Check everything first, so that an error stores nothing. */
    for (uint32_t i = 0; i < n; i++)
        if (!inside(x->gpas[i], GR_BUF_SIZE, r->ram_size))
            return GR_ERR_RANGE;
    if (x->nstack < n)
        return GR_ERR_RANGE; /* room for a re-post of every entry */
    for (uint32_t j = 0; j < n; j++)
        if (x->stack[x->nstack - 1 - j] >= r->size)
            return GR_ERR_RANGE;

    for (uint32_t k = 0; k < x->ncounters; k++)
        x->counter_msgs[k] = x->counter_bytes[k] = 0;
    uint32_t nrest = 0, counted = 0, reposted = 0;
    for (uint32_t i = 0; i < n; i++) {
        uint32_t length = x->lens[i];
        uint64_t gpa = x->gpas[i];
        uint8_t action;
        if (length > GR_BUF_SIZE || length < GR_HDR_SIZE) {
            action = GR_RX_BAD_LEN;
        } else {
            /* One fetch of the message: header fields come from the copy, when made. */
            uint8_t hdr[GR_HDR_SIZE];
            memcpy(hdr, r->ram + gpa, GR_HDR_SIZE);
            __asm__ __volatile__("" : : "r"(hdr) : "memory"); /* no re-fetch from RAM */
            uint32_t dst;
            uint16_t hlen;
            memcpy(&dst, hdr + 4, 4);
            memcpy(&hlen, hdr + 12, 2);
            dst = LE32(dst);
            hlen = LE16(hlen);
            int c = -1;
            if (hlen <= length - GR_HDR_SIZE) {
                for (uint32_t k = 0; k < x->ncounters; k++) {
                    if (x->counter_addr[k] == dst) {
                        c = (int)k;
                        break;
                    }
                }
            }
            if (c >= 0) {
                x->counter_msgs[c] += 1;
                x->counter_bytes[c] += hlen;
                counted++;
                action = GR_RX_COUNTED;
            } else {
                /* Python decodes these from the copy: header as validated, then payload */
                uint8_t *out = x->data + (uint64_t)i * GR_BUF_SIZE;
                memcpy(out, hdr, GR_HDR_SIZE);
                memcpy(out + GR_HDR_SIZE, r->ram + gpa + GR_HDR_SIZE, length - GR_HDR_SIZE);
                action = hlen <= length - GR_HDR_SIZE ? GR_RX_OTHER : GR_RX_BAD_HDR;
            }
        }
        x->actions[i] = action;
        if (action != GR_RX_COUNTED)
            x->rest[nrest++] = i;
        if (action == GR_RX_COUNTED || action == GR_RX_OTHER) {
            uint32_t id = x->stack[x->nstack - 1 - reposted];
            write_desc(r, id, gpa, GR_BUF_SIZE, F_WRITE);
            put_avail(r, (uint16_t)(x->avail_idx + reposted), id);
            x->post_ids[reposted] = id;
            x->post_gpas[reposted] = gpa;
            reposted++;
        }
    }
    x->nrest = nrest;
    x->counted = counted;
    x->reposted = reposted;
    return 0;
}
