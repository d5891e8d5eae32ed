/*
 * datagrams.c - the fd endpoints' batch writer: guest messages to a host process, one
 * SOCK_SEQPACKET datagram each, many per system call.  See rpmsg_headers.h.
 *
 * Why C: from Python every datagram is one send() and a few calls around it (issue 10
 * measured an fd sink at a tenth of the in-process one); sendmmsg() takes 64 at a time,
 * and the iovecs point into the batch's own buffer, so nothing is copied on the way.
 */
#define _GNU_SOURCE
#include "rpmsg_headers.h"

#include <errno.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/uio.h>

#define CHUNK 64

int64_t rp_send_datagrams(int fd, const uint8_t *data, int64_t data_len,
                          const int64_t *offsets, const int64_t *lengths,
                          const int64_t *addrs, int64_t n)
{
    struct mmsghdr msgs[CHUNK];
    struct iovec iov[CHUNK][2];
    uint8_t prefix[CHUNK][4];
    int64_t sent = 0;

    if (n < 0 || data_len < 0)
        return -EINVAL;
    for (int64_t i = 0; i < n; i++) {
        /* Every datagram inside the buffer, before anything is sent. */
        if (offsets[i] < 0 || lengths[i] < 0 || offsets[i] > data_len
            || lengths[i] > data_len - offsets[i])
            return -EINVAL;
        if (addrs && (addrs[i] < 0 || addrs[i] > 0xFFFFFFFFll))
            return -EINVAL;
    }
    while (sent < n) {
        const int k = n - sent < CHUNK ? (int)(n - sent) : CHUNK;
        memset(msgs, 0, sizeof msgs[0] * (size_t)k);
        for (int j = 0; j < k; j++) {
            const int64_t i = sent + j;
            int v = 0;
            if (addrs) {
                const uint32_t a = (uint32_t)addrs[i];
                prefix[j][0] = (uint8_t)a;
                prefix[j][1] = (uint8_t)(a >> 8);
                prefix[j][2] = (uint8_t)(a >> 16);
                prefix[j][3] = (uint8_t)(a >> 24);
                iov[j][v].iov_base = prefix[j];
                iov[j][v++].iov_len = 4;
            }
            iov[j][v].iov_base = (void *)(data + offsets[i]);
            iov[j][v++].iov_len = (size_t)lengths[i];
            msgs[j].msg_hdr.msg_iov = iov[j];
            msgs[j].msg_hdr.msg_iovlen = (size_t)v;
        }
        int r;
        do
            r = sendmmsg(fd, msgs, (unsigned int)k, MSG_DONTWAIT | MSG_NOSIGNAL);
        while (r < 0 && errno == EINTR);
        if (r < 0) {
            if (errno == EAGAIN || errno == EWOULDBLOCK || sent)
                return sent; /* full now; an error after some went shows on the next call */
            return -errno;
        }
        sent += r;
        if (r < k)
            return sent; /* the socket took only part of this chunk: it is full */
    }
    return sent;
}
