/*
 * rpmsg_headers.h - the rpmsg steps of the guest->host hot path, in C: the header check
 * (rpmsg_headers.c) and the fd endpoints' batch writer (datagrams.c).
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

/*
 * Send messages 0..n-1 to the SOCK_SEQPACKET socket fd without blocking, one datagram
 * each, in order: datagram i is data[offsets[i], +lengths[i]), after a 4-byte
 * little-endian addrs[i] when addrs is not NULL.  Stops at the first datagram the socket
 * does not take now.  Returns how many were sent; -errno if the first could not be sent
 * for another reason than a full socket; -EINVAL (nothing sent) if a datagram does not
 * lie inside data[0, data_len) or an address does not fit 32 bits.
 */
int64_t rp_send_datagrams(int fd, const uint8_t *data, int64_t data_len,
                          const int64_t *offsets, const int64_t *lengths,
                          const int64_t *addrs, int64_t n);
/* cffi:end */

#endif
