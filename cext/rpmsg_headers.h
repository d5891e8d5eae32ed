/*
 * rpmsg_headers.h - the rpmsg step of the guest->host hot path, in C.
 *
 * Apart from the ring engine (vring.c knows nothing of rpmsg): it takes the header array
 * the engine cut out of a raw batch (Queue.split_headers: the first 16 bytes of every
 * chain, zero-filled) and checks and splits the rpmsg headers (u32 src, u32 dst,
 * u32 reserved, u16 len, u16 flags, little-endian) in one pass.  What
 * vhost_rpmsg/rpmsg/batch.py does with numpy, with the same results.
 */
#ifndef RPMSG_HEADERS_H
#define RPMSG_HEADERS_H

#include <stdint.h>

/* cffi:begin */
#define RP_HDR_SIZE 16
#define RP_MSG_SHORT 1
#define RP_MSG_TOO_LONG 2

/*
 * n messages: message i has header headers[16 i, +16), lies at offsets[i] and is
 * lengths[i] bytes long (header included).  out holds 6 n + 2 int64 slots: the good
 * messages, in order, go to out[0..) (src), out[n..) (dst), out[2n..) (payload offset,
 * offsets[i] + 16), out[3n..) (payload length); the malformed ones to out[4n..) (index
 * i) and out[5n..) (why: RP_MSG_SHORT, no room for a header; RP_MSG_TOO_LONG, len
 * exceeds what follows the header).  out[6n] is the number of malformed messages,
 * out[6n + 1] is 1 when all good messages share one destination.  Returns the number of
 * good messages.
 */
int64_t rp_check_headers(const uint8_t *headers, const int64_t *offsets,
                         const int64_t *lengths, int64_t n, int64_t *out);
/* cffi:end */

#endif
