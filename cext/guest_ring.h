/*
 * guest_ring.h - the simulated guest's hot loops in C (vhost_rpmsg._guest_c).
 *
 * The driver side of a split ring, as vhost_rpmsg/guest/ring.py (DriverRing) and
 * vhost_rpmsg/guest/rpmsg_guest.py (SimGuest) keep it: fill tx buffers and put them on
 * the avail ring, read used entries, look at received RPMsg buffers, re-post rx buffers,
 * publish with the same event-idx / NO_NOTIFY rules.  Every store here is one the Python
 * path makes too, to the same bytes and in the same order of visibility; the bookkeeping
 * (free descriptor stack, outstanding chains, buffer maps) stays in Python, which hands
 * C the values it would have popped and applies C's results in bulk.
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
 * send_burst's inner loop: n messages, each the len bytes at msg.  The buffers and the
 * descriptor ids come as the tops of the Python stacks they would be popped from (the
 * last element is popped first): message k goes to gpas[n-1-k] with descriptor
 * ids[n-1-k] (one descriptor: addr, len, no flags, next 0) on avail slot
 * (avail_idx + k) % size.  The avail idx itself is left to gr_publish.  Returns n, or
 * GR_ERR_RANGE / GR_ERR_RING having stored nothing.
 */
int32_t gr_tx_fill(const gr_ring *r, uint16_t avail_idx, const uint8_t *msg, uint32_t len,
                   const uint64_t *gpas, const uint32_t *ids, uint32_t n);

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

#endif /* VHOST_RPMSG_GUEST_RING_H */
