/*
 * ring_primitives.h - the split-ring primitives shared by the device-side engine
 * (vring.c, _vhost_rpmsg_vring) and the simulated guest's fast path (guest_ring.c,
 * _vhost_rpmsg_guest): the ring layout constants, little-endian loads and stores of ring
 * fields, the acquire / release / full fences, the event-index test, and an overflow-safe
 * range check.
 *
 * Private to the C files: not part of either module's cdef (nothing here is exported).
 *
 * Every load is a single fetch (the other side may change any byte at any time): a
 * naturally aligned field is one relaxed atomic access; a misaligned one (possible only
 * for guest-chosen addresses, such as an indirect table) is one memcpy into a local
 * that PIN then keeps the compiler from fetching again.  Ring fields are little endian.
 */
#ifndef VHOST_RPMSG_RING_PRIMITIVES_H
#define VHOST_RPMSG_RING_PRIMITIVES_H

#include <stdint.h>
#include <string.h>

/* -- the split ring's layout (VIRTIO 1.x, 2.7) ----------------------------------------- */

#define DESC_SIZE 16u           /* struct virtq_desc: addr, len, flags, next */
#define F_NEXT 1u               /* VIRTQ_DESC_F_NEXT */
#define F_WRITE 2u              /* VIRTQ_DESC_F_WRITE */
#define F_INDIRECT 4u           /* VIRTQ_DESC_F_INDIRECT */
#define AVAIL_F_NO_INTERRUPT 1u /* VIRTQ_AVAIL_F_NO_INTERRUPT */
#define USED_F_NO_NOTIFY 1u     /* VIRTQ_USED_F_NO_NOTIFY */
#define RING_MAX_SIZE 32768u    /* the largest queue size */

/* -- little-endian conversions ---------------------------------------------------------- */

#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
#define LE16(x) __builtin_bswap16(x)
#define LE32(x) __builtin_bswap32(x)
#define LE64(x) __builtin_bswap64(x)
#else
#define LE16(x) (x)
#define LE32(x) (x)
#define LE64(x) (x)
#endif

/* Pin a value read by memcpy, so the compiler cannot fetch it again from shared memory. */
#define PIN(v) __asm__ __volatile__("" : "+r"(v))

/* -- loads and stores of ring fields (shared memory) ------------------------------------ */

static inline uint16_t ld16(const uint8_t *p)
{
    uint16_t v;
    if (((uintptr_t)p & 1u) == 0) {
        v = __atomic_load_n((const uint16_t *)(const void *)p, __ATOMIC_RELAXED);
    } else {
        memcpy(&v, p, sizeof v);
        PIN(v);
    }
    return LE16(v);
}

static inline uint32_t ld32(const uint8_t *p)
{
    uint32_t v;
    if (((uintptr_t)p & 3u) == 0) {
        v = __atomic_load_n((const uint32_t *)(const void *)p, __ATOMIC_RELAXED);
    } else {
        memcpy(&v, p, sizeof v);
        PIN(v);
    }
    return LE32(v);
}

static inline uint64_t ld64(const uint8_t *p)
{
    uint64_t v;
    if (((uintptr_t)p & 7u) == 0) {
        v = __atomic_load_n((const uint64_t *)(const void *)p, __ATOMIC_RELAXED);
    } else {
        memcpy(&v, p, sizeof v);
        PIN(v);
    }
    return LE64(v);
}

/* A load that orders every later load after it (an idx before the entries it covers). */
static inline uint16_t ld16_acquire(const uint8_t *p)
{
    uint16_t v;
    if (((uintptr_t)p & 1u) == 0) {
        v = __atomic_load_n((const uint16_t *)(const void *)p, __ATOMIC_ACQUIRE);
    } else {
        memcpy(&v, p, sizeof v);
        PIN(v);
        __atomic_thread_fence(__ATOMIC_ACQUIRE);
    }
    return LE16(v);
}

static inline void st16(uint8_t *p, uint16_t v)
{
    v = LE16(v);
    if (((uintptr_t)p & 1u) == 0)
        __atomic_store_n((uint16_t *)(void *)p, v, __ATOMIC_RELAXED);
    else
        memcpy(p, &v, sizeof v);
}

static inline void st32(uint8_t *p, uint32_t v)
{
    v = LE32(v);
    if (((uintptr_t)p & 3u) == 0)
        __atomic_store_n((uint32_t *)(void *)p, v, __ATOMIC_RELAXED);
    else
        memcpy(p, &v, sizeof v);
}

static inline void st64(uint8_t *p, uint64_t v)
{
    v = LE64(v);
    if (((uintptr_t)p & 7u) == 0)
        __atomic_store_n((uint64_t *)(void *)p, v, __ATOMIC_RELAXED);
    else
        memcpy(p, &v, sizeof v);
}

/* A store that orders every earlier store before it (entries before the idx). */
static inline void st16_release(uint8_t *p, uint16_t v)
{
    v = LE16(v);
    if (((uintptr_t)p & 1u) == 0) {
        __atomic_store_n((uint16_t *)(void *)p, v, __ATOMIC_RELEASE);
    } else {
        __atomic_thread_fence(__ATOMIC_RELEASE);
        memcpy(p, &v, sizeof v);
    }
}

/* A full barrier: our idx (or wish) store before reading the other side's wish (or idx). */
static inline void full_fence(void)
{
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
}

/* -- little-endian reads of private (not shared) bytes, any alignment ------------------- */

static inline uint16_t get_le16(const uint8_t *p)
{
    uint16_t v;
    memcpy(&v, p, sizeof v);
    return LE16(v);
}

static inline uint32_t get_le32(const uint8_t *p)
{
    uint32_t v;
    memcpy(&v, p, sizeof v);
    return LE32(v);
}

/* -- ring rules ------------------------------------------------------------------------- */

/* The virtio event-index test: does moving idx from old_idx to new_idx pass event? */
static inline int need_event(uint16_t event, uint16_t new_idx, uint16_t old_idx)
{
    return (uint16_t)(new_idx - event - 1) < (uint16_t)(new_idx - old_idx);
}

/* [off, off + len) lies inside [0, size), computed without overflow. */
static inline int range_ok(uint64_t off, uint64_t len, uint64_t size)
{
    return off <= size && len <= size - off;
}

#endif /* VHOST_RPMSG_RING_PRIMITIVES_H */
