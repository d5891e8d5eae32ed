/*
 * rpmsg_headers.c - see rpmsg_headers.h.
 */
#include "rpmsg_headers.h"

#include "ring_primitives.h"

int64_t rp_check_headers(const uint8_t *headers, const int64_t *offsets,
                         const int64_t *lengths, int64_t n, int64_t *out)
{
    int64_t *src = out, *dst = out + n, *poff = out + 2 * n, *plen = out + 3 * n;
    int64_t *bad_idx = out + 4 * n, *bad_why = out + 5 * n;
    int64_t good = 0, bad = 0, same = 1;

    for (int64_t i = 0; i < n; i++) {
        const uint8_t *h = headers + RP_HDR_SIZE * i;
        const int64_t len = lengths[i];
        if (len < RP_HDR_SIZE) {
            bad_idx[bad] = i;
            bad_why[bad++] = RP_MSG_SHORT;
            continue;
        }
        const int64_t payload = (int64_t)get_le16(h + 12);
        if (payload > len - RP_HDR_SIZE) {
            bad_idx[bad] = i;
            bad_why[bad++] = RP_MSG_TOO_LONG;
            continue;
        }
        src[good] = get_le32(h);
        dst[good] = get_le32(h + 4);
        if (good && dst[good] != dst[0])
            same = 0;
        poff[good] = offsets[i] + RP_HDR_SIZE;
        plen[good] = payload;
        good++;
    }
    out[6 * n] = bad;
    out[6 * n + 1] = same;
    return good;
}
