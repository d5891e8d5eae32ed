/*
 * guest_ring.h - the simulated guest's hot loops in C (_vhost_rpmsg_guest).
 *
 * The driver side of a split ring, as vhost_rpmsg/guest/ring.py (DriverRing) and
 * vhost_rpmsg/guest/rpmsg_guest.py (SimGuest) keep it: fill tx buffers and put them on
 * the avail ring, read used entries, take tx buffers back, wait for them the way the
 * Python path does, look at received RPMsg buffers, re-post rx buffers, publish with the
 * same event-idx / NO_NOTIFY rules.  Every store here is one the Python path makes too,
 * to the same bytes and in the same order of visibility.
 *
 * Bookkeeping: for rx, it stays in Python, which hands C the values it would have popped
 * and applies C's results in bulk.  For a tx burst (gr_tx_*), C takes a copy of it (the
 * free descriptor stack, the free tx buffer stack, the outstanding chains and the
 * buffers they hold) for the whole burst, so that no per-message work is left to Python;
 * Python loads it before the burst and stores it back after (or before any step it does
 * itself), so the Python objects are what the Python path would have left.
 *
 * Memory model: `ram` is the guest's own RAM (a mapping of `ram_size` bytes at guest
 * physical address 0).  Rings and buffers lie inside it; every range is checked before
 * use, so a bad argument is an error code, never a stray access.  The device (the
 * back-end under test) may write its side of the rings and the rx buffers at any time:
 * each of its values is read once into a local (no double fetch) and validated there.
 * Ring fields are little endian.
 */
#ifndef VHOST_RPMSG_GUEST_RING_H
#define VHOST_RPMSG_GUEST_RING_H

#include <stdint.h>

/*
 * The public API, from the cffi:begin line to the cffi:end line, is the cdef of
 * _vhost_rpmsg_guest: cext/build_guest.py hands that text to ffi.cdef as it is, so it holds
 * only what cffi's cdef parses (#define NAME <integer literal>, typedef structs,
 * prototypes, comments).  tests/test_cext.py checks that the module and it agree.
 */
/* cffi:begin */

#define GR_BUF_SIZE 512u /* every buffer the Linux driver posts */
#define GR_HDR_SIZE 16u  /* struct rpmsg_hdr */

/* Error results (negative); every function checks before it stores anything. */
#define GR_ERR_RING -1  /* the ring does not lie inside guest RAM, or size is 0 / > 32768 */
#define GR_ERR_RANGE -2 /* a buffer outside guest RAM, or a descriptor id >= size */
#define GR_ERR_MORE -3  /* more used entries than the caller's arrays hold */

/* gr_rx_process(): what happened to used entry i (actions[i]) */
#define GR_RX_COUNTED 0 /* for a counting endpoint: counted, buffer re-posted */
#define GR_RX_OTHER 1   /* well formed, for Python to dispatch: copied to data, re-posted */
#define GR_RX_BAD_LEN 2 /* used length outside [16, 512]: "too big", buffer lost */
#define GR_RX_BAD_HDR 3 /* header len beyond the used length: copied to data, buffer lost */

typedef struct gr_ring {
    uint8_t *ram;      /* host address of guest-physical address 0 */
    uint64_t ram_size; /* bytes of guest RAM at ram */
    uint64_t desc;     /* guest-physical addresses of the three parts (RingLayout) */
    uint64_t avail;
    uint64_t used;
    uint32_t size;      /* ring entries, 1..32768 (indices are taken modulo size) */
    uint32_t event_idx; /* VIRTIO_RING_F_EVENT_IDX negotiated */
} gr_ring;

/*
 * Read the used entries from last_used up to the used idx (acquire load): heads[i] and
 * lens[i] of entry last_used + i.  Nothing is stored.  Returns how many, or GR_ERR_MORE
 * if there are more than cap (nothing written to the arrays), or GR_ERR_RING.
 */
int32_t gr_used_read(const gr_ring *r, uint16_t last_used, uint32_t cap, uint32_t *heads,
                     uint32_t *lens);

/*
 * DriverRing.publish: store avail idx = new_idx (release), full fence, then whether the
 * device wants a kick for old_idx -> new_idx: 0 if they are equal, else the event-idx
 * test against avail_event (event_idx) or !VRING_USED_F_NO_NOTIFY.  1, 0 or GR_ERR_RING.
 */
int gr_publish(const gr_ring *r, uint16_t old_idx, uint16_t new_idx);

/*
 * DriverRing.enable_interrupts: used_event = last_used (event_idx) or avail flags = 0,
 * full fence, then whether the used idx differs from last_used.  1, 0 or GR_ERR_RING.
 */
int gr_enable_interrupts(const gr_ring *r, uint16_t last_used);

/*
 * A tx burst: SimGuest.send_burst (its Python loop, _get_tx_buf, _reclaim_tx, _fill_tx)
 * over C copies of the tx bookkeeping.
 *
 * Python fills in the arrays and counts, calls gr_tx_load, sets the burst fields and
 * phase GR_TX_TOP, then calls gr_tx_run until it returns GR_TX_DONE or Python raises:
 *
 *   GR_TX_WAIT        out of tx buffers, interrupts enabled, nothing used yet: Python
 *                     checks its deadline (set when wait_new is 1: the first wait of
 *                     this _get_tx_buf), select()s on call_fd and calls gr_tx_run again
 *   GR_TX_PY_RECLAIM  used entries C does not take (not outstanding, repeated, chains of
 *                     more than one descriptor): the interrupt eventfd has been read
 *                     already; Python stores the bookkeeping, runs _reclaim_used (which
 *                     raises or takes them), loads again and calls gr_tx_run again
 *   GR_TX_PY_FILL     a batch (batch buffers) C cannot fill (fewer free descriptors,
 *                     a buffer outside RAM): Python stores, runs _fill_tx (which raises
 *                     where the Python path does), loads, sets phase GR_TX_TOP
 *   GR_TX_OS_ERROR    a read of call_fd or a write of kick_fd failed with errno err
 *
 * C stores nothing in guest RAM, and changes no bookkeeping, for a step it hands back.
 * The counters are what the burst adds to GuestStats (tx_messages, tx_kicks,
 * tx_interrupts); Python adds and zeroes them when it stores.
 */
#define GR_TX_DONE 0
#define GR_TX_WAIT 1
#define GR_TX_PY_RECLAIM 2
#define GR_TX_PY_FILL 3
#define GR_TX_OS_ERROR 4

/* gr_tx.phase: where gr_tx_run resumes */
#define GR_TX_TOP 0          /* send_burst's loop: done, or take a buffer, or fill */
#define GR_TX_GOT 1          /* _get_tx_buf after its first reclaim */
#define GR_TX_WAIT_LOOP 2    /* _get_tx_buf's wait loop: while not tx_free */
#define GR_TX_AFTER_SELECT 3 /* ... after select(): reclaim, then the loop again */

typedef struct gr_tx {
    /* bookkeeping (stacks bottom first: the last element is popped first) */
    uint32_t *free;      /* DriverRing.free: descriptor ids */
    uint32_t nfree;
    uint32_t free_cap;
    uint64_t *bufs;      /* SimGuest.tx_free: buffer addresses */
    uint32_t nbufs;
    uint32_t buf_cap;
    uint32_t *chain_len; /* [size] DriverRing.chain_len by head; 0: not a key */
    int64_t *inflight;   /* [size] SimGuest.tx_inflight by head; GR_TX_ABSENT: not a key */
    uint32_t *heads;     /* [size] scratch */
    uint32_t nout;       /* keys of chain_len (outstanding chains) */
    uint32_t ninfl;      /* keys of tx_inflight (the same, unless a reclaim failed) */
    uint16_t avail_idx;  /* DriverRing.avail_idx, last_kicked, last_used */
    uint16_t last_kicked;
    uint16_t last_used;
    /* the burst */
    const uint8_t *msg; /* the encoded message, len bytes, sent left more times */
    uint32_t len;
    uint64_t left;
    int32_t call_fd; /* SimGuest.call[TX] (read: interrupts), kick[TX] (written: kicks) */
    int32_t kick_fd;
    uint32_t want_irq; /* SimGuest.tx_interrupts */
    uint32_t phase;
    uint32_t wait_new; /* set with GR_TX_WAIT_LOOP entered; Python clears it */
    uint32_t batch;    /* GR_TX_PY_FILL: the batch size */
    int32_t err;       /* GR_TX_OS_ERROR: errno */
    /* GuestStats increments */
    uint64_t sent;
    uint64_t kicks;
    uint64_t interrupts;
} gr_tx;

/*
 * Take the outstanding chains: DriverRing.chain_len as m heads keys[i] of length
 * lens[i], SimGuest.tx_inflight as mi heads ikeys[i] -> gpas[i] (usually the same heads;
 * after a device returned a head that was not outstanding, tx_inflight keeps the
 * entries whose chains were freed before that).  t->free[0..nfree) and
 * t->bufs[0..nbufs) must hold the stacks already.  Checks that every id and head is
 * < size, every length 1..65535, every buffer (free or held) inside guest RAM with room
 * for GR_BUF_SIZE bytes, no key repeated, and that the capacities hold what the burst
 * can give back.  0, or GR_ERR_RANGE / GR_ERR_RING (the C copy is then unusable: Python
 * keeps its own).  GR_TX_ABSENT: see below the cdef section.
 */
int gr_tx_load(const gr_ring *r, gr_tx *t, uint32_t m, const uint32_t *keys,
               const uint32_t *lens, uint32_t mi, const uint32_t *ikeys, const int64_t *gpas);

/* Run the burst from t->phase (see above).  GR_TX_*, or GR_ERR_RING / GR_ERR_RANGE (no
 * message, an unknown phase). */
int gr_tx_run(const gr_ring *r, gr_tx *t);

/*
 * The C copy for Python to store: chain_len as t->nout heads keys[i] (increasing) of
 * length lens[i], tx_inflight as t->ninfl heads ikeys[i] -> gpas[i]; each array must
 * hold size entries.
 */
void gr_tx_store(const gr_ring *r, const gr_tx *t, uint32_t *keys, uint32_t *lens,
                 uint32_t *ikeys, int64_t *gpas);

/*
 * One rx drain (SimGuest._rx_drain) over n used entries already taken by gr_used_read.
 *
 * Entry i is (lens[i]) bytes in the 512-byte buffer at gpas[i].  In order, like Python:
 * a length outside [16, 512] is GR_RX_BAD_LEN; a header whose len exceeds length - 16 is
 * GR_RX_BAD_HDR; a message whose dst is counter_addr[c] is counted (counter_msgs[c] and
 * counter_bytes[c], zeroed first, add 1 and the header len) as GR_RX_COUNTED; anything
 * else is GR_RX_OTHER.  The bytes of GR_RX_OTHER and GR_RX_BAD_HDR entries are copied
 * (one fetch: what was validated is what Python sees) to data + i * 512.  Every entry
 * that is not BAD_* has its buffer re-posted, in order: the j-th re-post takes
 * descriptor stack[nstack-1-j] (the Python free stack's top) and avail slot
 * (avail_idx + j) % size; post_ids[j] and post_gpas[j] record it.  rest lists the
 * entries that are not COUNTED, in order.
 *
 * counter_addr must not hold addresses Python dispatches first (name service, inbox
 * endpoints).  Returns 0, or GR_ERR_RANGE / GR_ERR_RING having stored nothing in guest
 * RAM.
 */
typedef struct gr_rx {
    /* in */
    uint32_t n;
    const uint32_t *lens;
    const uint64_t *gpas;
    uint32_t nstack;
    const uint32_t *stack;
    uint32_t ncounters;
    const uint32_t *counter_addr;
    uint16_t avail_idx;
    /* out */
    uint64_t *counter_msgs;
    uint64_t *counter_bytes;
    uint8_t *actions;    /* n entries */
    uint32_t *rest;      /* n entries */
    uint32_t *post_ids;  /* n entries */
    uint64_t *post_gpas; /* n entries */
    uint8_t *data;       /* n * 512 bytes */
    uint32_t nrest;
    uint32_t counted;
    uint32_t reposted;
} gr_rx;

int gr_rx_process(const gr_ring *r, gr_rx *x);

/* cffi:end */

/* gr_tx.inflight[head] for "not a key" (C only: a cdef #define takes integer literals). */
#define GR_TX_ABSENT INT64_MIN

#endif /* VHOST_RPMSG_GUEST_RING_H */
