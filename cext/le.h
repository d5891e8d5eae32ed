/* Little-endian conversions for virtio ring fields (VIRTIO 1.x rings are little-endian). */
#ifndef VHOST_RPMSG_LE_H
#define VHOST_RPMSG_LE_H

#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
#define LE16(x) __builtin_bswap16(x)
#define LE32(x) __builtin_bswap32(x)
#define LE64(x) __builtin_bswap64(x)
#else
#define LE16(x) (x)
#define LE32(x) (x)
#define LE64(x) (x)
#endif

#endif /* VHOST_RPMSG_LE_H */
