/*
 * guest_ring.c - the simulated guest's hot loops (see guest_ring.h).
 *
 * Every rule here mirrors vhost_rpmsg/guest/ring.py and rpmsg_guest.py; when changing
 * one, change the other and run tests/test_guest_fastpath.py.
 */
#define _POSIX_C_SOURCE 200809L /* read, write */

#include "guest_ring.h"

#include <errno.h>
#include <stddef.h>
#include <string.h>
#include <unistd.h>

#include "ring_primitives.h"

/* Ring fields are naturally aligned (gr_ring_ok checks): every ring access of the
   primitives takes their single-access atomic branch. */

/* The ring's three parts lie inside guest RAM, naturally aligned (as RingLayout makes). */
static int gr_ring_ok(const gr_ring *r)
{
    uint64_t n = r->size;
    if (r->ram == NULL || n == 0 || n > RING_MAX_SIZE)
        return 0;
    if ((r->desc & 15u) || (r->avail & 1u) || (r->used & 3u))
        return 0;
    return range_ok(r->desc, DESC_SIZE * n, r->ram_size)
        && range_ok(r->avail, 6 + 2 * n, r->ram_size)
        && range_ok(r->used, 6 + 8 * n, r->ram_size);
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
    full_fence();                                 /* the idx before reading their wishes */
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
    full_fence(); /* the wish before re-reading the used idx */
    return ld16(r->ram + r->used + 2) != last_used;
}

/* DriverRing.disable_interrupts */
static void disable_interrupts(const gr_ring *r)
{
    uint8_t *avail = r->ram + r->avail;
    if (r->event_idx)
        st16(avail + 4 + 2 * (uint64_t)r->size, 0); /* fires only as idx wraps past 0 */
    else
        st16(avail, AVAIL_F_NO_INTERRUPT);
}

/* ---- tx bursts ------------------------------------------------------------------- */

#define CHAIN_MARK 0x80000000u /* on chain_len[head] while a reclaim looks at head */

int gr_tx_load(const gr_ring *r, gr_tx *t, uint32_t m, const uint32_t *keys,
               const uint32_t *lens, uint32_t mi, const uint32_t *ikeys, const int64_t *gpas)
{
    if (!gr_ring_ok(r))
        return GR_ERR_RING;
    uint32_t size = r->size;
    if (t->nfree > t->free_cap || t->nbufs > t->buf_cap || m > size || mi > size)
        return GR_ERR_RANGE;
    /* what a burst can give back: one id per chain, one buffer per tx_inflight entry */
    if (t->free_cap - t->nfree < m || t->buf_cap - t->nbufs < mi)
        return GR_ERR_RANGE;
    for (uint32_t i = 0; i < t->nfree; i++)
        if (t->free[i] >= size)
            return GR_ERR_RANGE;
    for (uint32_t i = 0; i < t->nbufs; i++)
        if (!range_ok(t->bufs[i], GR_BUF_SIZE, r->ram_size))
            return GR_ERR_RANGE;
    for (uint32_t i = 0; i < m; i++)
        if (keys[i] >= size || lens[i] == 0 || lens[i] > 0xFFFFu)
            return GR_ERR_RANGE;
    for (uint32_t i = 0; i < mi; i++) {
        if (ikeys[i] >= size || gpas[i] == GR_TX_ABSENT)
            return GR_ERR_RANGE;
        if (gpas[i] >= 0 && !range_ok((uint64_t)gpas[i], GR_BUF_SIZE, r->ram_size))
            return GR_ERR_RANGE;
    }
    memset(t->chain_len, 0, sizeof(uint32_t) * size);
    for (uint32_t h = 0; h < size; h++)
        t->inflight[h] = GR_TX_ABSENT;
    t->nout = t->ninfl = 0;
    for (uint32_t i = 0; i < m; i++) {
        if (t->chain_len[keys[i]])
            return GR_ERR_RANGE; /* a repeated key: not a dict */
        t->chain_len[keys[i]] = lens[i];
    }
    for (uint32_t i = 0; i < mi; i++) {
        if (t->inflight[ikeys[i]] != GR_TX_ABSENT)
            return GR_ERR_RANGE;
        t->inflight[ikeys[i]] = gpas[i];
    }
    t->nout = m;
    t->ninfl = mi;
    return 0;
}

void gr_tx_store(const gr_ring *r, const gr_tx *t, uint32_t *keys, uint32_t *lens,
                 uint32_t *ikeys, int64_t *gpas)
{
    uint32_t m = 0, mi = 0;
    for (uint32_t h = 0; h < r->size; h++) {
        if (t->chain_len[h] && m < t->nout) {
            keys[m] = h;
            lens[m++] = t->chain_len[h];
        }
        if (t->inflight[h] != GR_TX_ABSENT && mi < t->ninfl) {
            ikeys[mi] = h;
            gpas[mi++] = t->inflight[h];
        }
    }
}

/* SimGuest._tx_irq: take a pending interrupt (counted), if there is one. */
static int tx_irq(gr_tx *t)
{
    uint64_t v;
    for (;;) {
        ssize_t got = read(t->call_fd, &v, sizeof v);
        if (got == (ssize_t)sizeof v) {
            t->interrupts++;
            return 0;
        }
        if (got < 0 && errno == EINTR)
            continue;
        if (got < 0 && (errno == EAGAIN || errno == EWOULDBLOCK))
            return 0;
        t->err = got < 0 ? errno : EIO;
        return GR_TX_OS_ERROR;
    }
}

/* SimGuest._kick(TX) */
static int tx_kick(gr_tx *t)
{
    const uint64_t one = 1;
    for (;;) {
        ssize_t put = write(t->kick_fd, &one, sizeof one);
        if (put == (ssize_t)sizeof one) {
            t->kicks++;
            return 0;
        }
        if (put < 0 && errno == EINTR)
            continue;
        t->err = put < 0 ? errno : EIO;
        return GR_TX_OS_ERROR;
    }
}

/*
 * SimGuest._reclaim_tx (_tx_irq, then _reclaim_used: DriverRing.get_used and the
 * tx_inflight pops) where every used entry is a distinct outstanding chain of one
 * descriptor; anything else is left, untouched, to Python (GR_TX_PY_RECLAIM).  Each
 * used entry is read once.
 */
static int tx_reclaim(const gr_ring *r, gr_tx *t)
{
    int rc = tx_irq(t);
    if (rc)
        return rc;
    const uint8_t *used = r->ram + r->used;
    uint16_t last = t->last_used;
    uint32_t n = (uint16_t)(ld16_acquire(used + 2) - last);
    if (n == 0)
        return 0;
    if (n > t->nout || n > t->ninfl || t->free_cap - t->nfree < n)
        return GR_TX_PY_RECLAIM; /* cannot all be distinct outstanding chains */
    uint32_t i, give = 0;
    for (i = 0; i < n; i++) {
        uint32_t head = ld32(used + 4 + 8 * (uint64_t)((uint16_t)(last + i) % r->size));
        if (head >= r->size || t->chain_len[head] != 1 || t->inflight[head] == GR_TX_ABSENT)
            break; /* not outstanding, longer, seen already (marked), no tx_inflight */
        t->chain_len[head] = 1 | CHAIN_MARK;
        t->heads[i] = head;
        give += t->inflight[head] >= 0;
    }
    if (i < n || t->buf_cap - t->nbufs < give) {
        while (i--)
            t->chain_len[t->heads[i]] = 1;
        return GR_TX_PY_RECLAIM;
    }
    for (i = 0; i < n; i++) {
        uint32_t head = t->heads[i];
        t->chain_len[head] = 0;
        t->free[t->nfree++] = head;
        if (t->inflight[head] >= 0)
            t->bufs[t->nbufs++] = (uint64_t)t->inflight[head];
        t->inflight[head] = GR_TX_ABSENT;
    }
    t->nout -= n;
    t->ninfl -= n;
    t->last_used = (uint16_t)(last + n);
    return 0;
}

/*
 * SimGuest._fill_tx: batch buffers off the top of the stacks, each holding the message,
 * one descriptor (addr, len, no flags, next 0) on the next avail slot; then the
 * publish and, if the device wants one, the kick.
 */
static int tx_fill(const gr_ring *r, gr_tx *t, uint32_t batch)
{
    if (t->nfree < batch || t->nbufs < batch) {
        t->batch = batch;
        return GR_TX_PY_FILL;
    }
    for (uint32_t k = 0; k < batch; k++) {
        if (!range_ok(t->bufs[t->nbufs - 1 - k], t->len, r->ram_size)
            || t->free[t->nfree - 1 - k] >= r->size) {
            t->batch = batch;
            return GR_TX_PY_FILL;
        }
    }
    for (uint32_t k = 0; k < batch; k++) {
        uint64_t gpa = t->bufs[--t->nbufs];
        uint32_t id = t->free[--t->nfree];
        memcpy(r->ram + gpa, t->msg, t->len);
        write_desc(r, id, gpa, t->len, 0);
        put_avail(r, t->avail_idx, id);
        t->avail_idx = (uint16_t)(t->avail_idx + 1);
        t->nout += t->chain_len[id] == 0; /* dict stores: may replace */
        t->ninfl += t->inflight[id] == GR_TX_ABSENT;
        t->chain_len[id] = 1;
        t->inflight[id] = (int64_t)gpa;
    }
    t->left -= batch;
    t->sent += batch;
    int kick = gr_publish(r, t->last_kicked, t->avail_idx);
    t->last_kicked = t->avail_idx;
    return kick ? tx_kick(t) : 0;
}

int gr_tx_run(const gr_ring *r, gr_tx *t)
{
    if (!gr_ring_ok(r))
        return GR_ERR_RING;
    if (t->left && t->msg == NULL)
        return GR_ERR_RANGE;
    int rc;
    for (;;) {
        switch (t->phase) {
        case GR_TX_TOP:
            if (!t->left)
                return GR_TX_DONE;
            if (t->nbufs) {
                uint32_t batch = t->left < t->nbufs ? (uint32_t)t->left : t->nbufs;
                rc = tx_fill(r, t, batch);
                if (rc)
                    return rc;
                continue;
            }
            t->phase = GR_TX_GOT; /* _get_tx_buf: its first reclaim */
            rc = tx_reclaim(r, t);
            if (rc)
                return rc;
            continue;
        case GR_TX_GOT:
            if (t->nbufs) {
                t->phase = GR_TX_TOP;
                continue;
            }
            t->phase = GR_TX_WAIT_LOOP;
            t->wait_new = 1;
            continue;
        case GR_TX_WAIT_LOOP:
            if (t->nbufs) {
                if (!t->want_irq)
                    disable_interrupts(r);
                t->phase = GR_TX_TOP;
                continue;
            }
            if (gr_enable_interrupts(r, t->last_used)) {
                rc = tx_reclaim(r, t);
                if (rc)
                    return rc;
                continue;
            }
            t->phase = GR_TX_AFTER_SELECT;
            return GR_TX_WAIT;
        case GR_TX_AFTER_SELECT:
            t->phase = GR_TX_WAIT_LOOP;
            rc = tx_reclaim(r, t);
            if (rc)
                return rc;
            continue;
        default:
            return GR_ERR_RANGE;
        }
    }
}

/* ---- rx drains ------------------------------------------------------------------- */

int gr_rx_process(const gr_ring *r, gr_rx *x)
{
    if (!gr_ring_ok(r))
        return GR_ERR_RING;
    uint32_t n = x->n;
    /* Check everything first, so that an error stores nothing. */
    for (uint32_t i = 0; i < n; i++)
        if (!range_ok(x->gpas[i], GR_BUF_SIZE, r->ram_size))
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
            uint32_t dst = get_le32(hdr + 4);
            uint16_t hlen = get_le16(hdr + 12);
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
