/* SPDX-License-Identifier: MIT */
/*
 * Shared helpers for the vhost-rpmsg guest test programs.
 *
 * Built static on the host against the kernel's exported uAPI headers
 * (include/uapi/linux/rpmsg.h), run inside the test guest.  Stock uAPI only.
 *
 * Traffic modes run on an open /dev/rpmsgN descriptor whose peer is expected
 * to be an echo service (every message is sent straight back):
 *
 *   echo N            N round trips, payload sizes cycling 0..496, content
 *                     deterministic pseudo-random; replies compared byte for
 *                     byte.  Prints "ECHO-OK N" or "ECHO-FAIL ..." (exit 1).
 *   lat N [SIZE]      N ping-pongs of SIZE bytes (default 64); prints
 *                     "LAT n=.. size=.. min=..us p50=..us p99=..us max=..us".
 *   tput N SIZE [-e]  write N messages as fast as possible, print msgs/s
 *                     ("TPUT ...").  With -e also wait for N echoes (read by
 *                     a second thread) and report the round-trip rate.
 *   recv N            read N messages (host -> guest), print msgs/s ("RECV ...").
 *   send TEXT         send one message with TEXT as payload ("SENT n").
 *   hold SECONDS      keep the endpoint open for SECONDS, printing what arrives.
 *
 * Zero-length messages: a write(2) of 0 bytes on /dev/rpmsgN is NOT filtered
 * by the VFS (vfs_write has no count==0 shortcut), rpmsg_eptdev_write_iter()
 * kzalloc(0)s (ZERO_SIZE_PTR, not NULL) and rpmsg_sendto() accepts len 0, so
 * the guest really sends a header-only message.  Likewise an inbound 0-byte
 * message becomes a 0-byte read() (the char device reports a vanished
 * endpoint as EPIPE, never as a 0-byte read), so the echo mode starts its size
 * cycle at 0.
 */
#ifndef VR_RPMSG_COMMON_H
#define VR_RPMSG_COMMON_H

#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include <linux/rpmsg.h>

#define VR_MAX_PAYLOAD 496          /* 512-byte buffer minus 16-byte header */
#define VR_ADDR_ANY 0xFFFFFFFFu

static const char *vr_prog = "rpmsg";
static int vr_timeout_ms = 10000;   /* per-reply wait, -T to change */

__attribute__((noreturn, format(printf, 1, 2)))
static inline void vr_die(const char *fmt, ...)
{
	va_list ap;

	fprintf(stderr, "%s: ", vr_prog);
	va_start(ap, fmt);
	vfprintf(stderr, fmt, ap);
	va_end(ap);
	fputc('\n', stderr);
	exit(1);
}

static inline uint64_t vr_now_ns(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static inline unsigned long vr_parse_ul(const char *s, const char *what)
{
	char *end;
	unsigned long v;

	errno = 0;
	v = strtoul(s, &end, 0);
	if (errno || *s == '\0' || *end != '\0')
		vr_die("bad %s: '%s'", what, s);
	return v;
}

/* "any", "-1" or a number (decimal or 0x..) -> u32 address */
static inline uint32_t vr_parse_addr(const char *s)
{
	if (!strcmp(s, "any") || !strcmp(s, "-1"))
		return VR_ADDR_ANY;
	return (uint32_t)vr_parse_ul(s, "address");
}

/* Deterministic pseudo-random payload for message number idx. */
static inline void vr_fill(unsigned char *buf, size_t len, uint32_t idx)
{
	uint32_t x = idx * 2654435761u + 0x9e3779b9u;
	size_t i;

	for (i = 0; i < len; i++) {
		x ^= x << 13;
		x ^= x >> 17;
		x ^= x << 5;
		buf[i] = (unsigned char)(x >> 24);
	}
}

static inline int vr_read_file(const char *path, char *out, size_t outsz)
{
	FILE *f = fopen(path, "r");
	size_t n;

	if (!f)
		return -1;
	n = fread(out, 1, outsz - 1, f);
	fclose(f);
	out[n] = '\0';
	while (n && (out[n - 1] == '\n' || out[n - 1] == ' '))
		out[--n] = '\0';
	return 0;
}

/* Endpoint char devices are /sys/class/rpmsg/rpmsgN (N decimal); the class
 * also holds rpmsg_ctrlN, which we skip. */
static inline int vr_is_eptdev_name(const char *d)
{
	const char *p;

	if (strncmp(d, "rpmsg", 5) || !d[5])
		return 0;
	for (p = d + 5; *p; p++)
		if (*p < '0' || *p > '9')
			return 0;
	return 1;
}

struct vr_eptinfo {
	int index;
	char name[64];
	long long src, dst;  /* as printed by sysfs (%d: ANY shows as -1) */
};

static inline int vr_get_eptinfo(const char *dname, struct vr_eptinfo *e)
{
	char path[300], buf[64];

	e->index = atoi(dname + 5);
	snprintf(path, sizeof(path), "/sys/class/rpmsg/%s/name", dname);
	if (vr_read_file(path, e->name, sizeof(e->name)))
		return -1;
	snprintf(path, sizeof(path), "/sys/class/rpmsg/%s/src", dname);
	if (vr_read_file(path, buf, sizeof(buf)))
		return -1;
	e->src = atoll(buf);
	snprintf(path, sizeof(path), "/sys/class/rpmsg/%s/dst", dname);
	if (vr_read_file(path, buf, sizeof(buf)))
		return -1;
	e->dst = atoll(buf);
	return 0;
}

static inline long long vr_sysfs_addr(uint32_t a)
{
	return a == VR_ADDR_ANY ? -1 : (long long)(int32_t)a;
}

/* Bitmap of existing endpoint device indexes (for "what is new" detection). */
#define VR_MAX_IDX 4096
static inline void vr_snapshot(unsigned char *seen)
{
	DIR *d = opendir("/sys/class/rpmsg");
	struct dirent *de;

	memset(seen, 0, VR_MAX_IDX);
	if (!d)
		return;
	while ((de = readdir(d))) {
		if (vr_is_eptdev_name(de->d_name)) {
			int i = atoi(de->d_name + 5);
			if (i >= 0 && i < VR_MAX_IDX)
				seen[i] = 1;
		}
	}
	closedir(d);
}

/*
 * Find an endpoint device.  name may be NULL (any); want_src/want_dst are
 * sysfs-style values or VR_DONTCARE.  If skip is non-NULL,
 * indexes marked there are ignored.  Waits up to timeout_ms.  Returns index
 * or -1.
 */
#define VR_DONTCARE (-0x7fffffffffffffffLL)
static inline int vr_find_eptdev(const char *name, long long want_src,
			  long long want_dst, const unsigned char *skip,
			  int timeout_ms, struct vr_eptinfo *out)
{
	uint64_t deadline = vr_now_ns() + (uint64_t)timeout_ms * 1000000ull;

	for (;;) {
		DIR *d = opendir("/sys/class/rpmsg");
		struct dirent *de;
		int best = -1;

		while (d && (de = readdir(d))) {
			struct vr_eptinfo e;

			if (!vr_is_eptdev_name(de->d_name))
				continue;
			if (vr_get_eptinfo(de->d_name, &e))
				continue;
			if (skip && e.index >= 0 && e.index < VR_MAX_IDX &&
			    skip[e.index])
				continue;
			if (name && strcmp(e.name, name))
				continue;
			if (want_src != VR_DONTCARE && e.src != want_src)
				continue;
			if (want_dst != VR_DONTCARE && e.dst != want_dst)
				continue;
			if (e.index > best) {
				best = e.index;
				*out = e;
			}
		}
		if (d)
			closedir(d);
		if (best >= 0)
			return best;
		if (vr_now_ns() >= deadline)
			return -1;
		usleep(20000);
	}
}

/* Open /dev/rpmsgN, waiting for devtmpfs to create the node. */
static inline int vr_open_eptdev(int index, int timeout_ms)
{
	char path[64];
	uint64_t deadline = vr_now_ns() + (uint64_t)timeout_ms * 1000000ull;
	int fd;

	snprintf(path, sizeof(path), "/dev/rpmsg%d", index);
	for (;;) {
		fd = open(path, O_RDWR | O_CLOEXEC);
		if (fd >= 0)
			return fd;
		if (errno != ENOENT || vr_now_ns() >= deadline)
			vr_die("open %s: %s", path, strerror(errno));
		usleep(10000);
	}
}

static inline int vr_open_ctrl(const char *path)
{
	int fd = open(path, O_RDWR | O_CLOEXEC);

	if (fd < 0)
		vr_die("open %s: %s (is virtio_rpmsg_bus bound to a device?)",
		       path, strerror(errno));
	return fd;
}

static inline void vr_fill_info(struct rpmsg_endpoint_info *info, const char *name,
			 uint32_t src, uint32_t dst)
{
	memset(info, 0, sizeof(*info));
	if (strlen(name) >= sizeof(info->name))
		vr_die("name '%s' too long (max %zu)", name,
		       sizeof(info->name) - 1);
	strncpy(info->name, name, sizeof(info->name) - 1);
	info->src = src;
	info->dst = dst;
}

/* Wait until fd is readable (or timeout).  Returns 1 readable, 0 timeout. */
static inline int vr_wait_readable(int fd, int timeout_ms)
{
	struct pollfd p = { .fd = fd, .events = POLLIN };
	int r;

	do {
		r = poll(&p, 1, timeout_ms);
	} while (r < 0 && errno == EINTR);
	if (r < 0)
		vr_die("poll: %s", strerror(errno));
	if (r > 0 && (p.revents & (POLLERR | POLLHUP)) && !(p.revents & POLLIN))
		vr_die("endpoint error/hangup (revents 0x%x)", p.revents);
	return r > 0;
}

static inline void vr_write_msg(int fd, const void *buf, size_t len, uint32_t idx)
{
	ssize_t w = write(fd, buf, len);

	if (w < 0)
		vr_die("write of message %u (%zu bytes): %s", idx, len,
		       strerror(errno));
	if ((size_t)w != len)
		vr_die("short write of message %u: %zd of %zu", idx, w, len);
}

/* Read one message (blocking, bounded by vr_timeout_ms). */
static inline ssize_t vr_read_msg(int fd, void *buf, size_t cap, uint32_t idx)
{
	ssize_t r;

	if (!vr_wait_readable(fd, vr_timeout_ms))
		vr_die("timeout (%d ms) waiting for reply to message %u",
		       vr_timeout_ms, idx);
	r = read(fd, buf, cap);
	if (r < 0)
		vr_die("read reply to message %u: %s", idx, strerror(errno));
	return r;
}

static inline int vr_mode_echo(int fd, unsigned long n)
{
	unsigned char tx[VR_MAX_PAYLOAD + 16], rx[VR_MAX_PAYLOAD + 64];
	unsigned long i;
	uint64_t t0 = vr_now_ns();

	for (i = 0; i < n; i++) {
		size_t len = i % (VR_MAX_PAYLOAD + 1);   /* 0..496 */
		ssize_t r;
		size_t k;

		vr_fill(tx, len, (uint32_t)i);
		vr_write_msg(fd, tx, len, (uint32_t)i);
		r = vr_read_msg(fd, rx, sizeof(rx), (uint32_t)i);
		if ((size_t)r != len) {
			printf("ECHO-FAIL msg %lu: sent %zu bytes, got %zd\n",
			       i, len, r);
			return 1;
		}
		for (k = 0; k < len; k++) {
			if (rx[k] != tx[k]) {
				printf("ECHO-FAIL msg %lu (%zu bytes): byte %zu is 0x%02x, expected 0x%02x\n",
				       i, len, k, rx[k], tx[k]);
				return 1;
			}
		}
	}
	printf("ECHO-OK %lu (%.1f ms)\n", n, (vr_now_ns() - t0) / 1e6);
	return 0;
}

static inline int vr_cmp_u64(const void *a, const void *b)
{
	uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;

	return x < y ? -1 : x > y;
}

static inline int vr_mode_lat(int fd, unsigned long n, size_t size)
{
	unsigned char tx[VR_MAX_PAYLOAD + 16], rx[VR_MAX_PAYLOAD + 64];
	uint64_t *t, sum = 0;
	unsigned long i;

	if (!n)
		vr_die("lat: N must be > 0");
	if (size > VR_MAX_PAYLOAD)
		vr_die("lat: size %zu > %d", size, VR_MAX_PAYLOAD);
	t = calloc(n, sizeof(*t));
	if (!t)
		vr_die("out of memory");
	vr_fill(tx, size, 1);
	for (i = 0; i < n; i++) {
		uint64_t a = vr_now_ns();
		ssize_t r;

		vr_write_msg(fd, tx, size, (uint32_t)i);
		r = vr_read_msg(fd, rx, sizeof(rx), (uint32_t)i);
		t[i] = vr_now_ns() - a;
		sum += t[i];
		if ((size_t)r != size)
			vr_die("lat: reply %lu has %zd bytes, expected %zu",
			       i, r, size);
	}
	qsort(t, n, sizeof(*t), vr_cmp_u64);
	printf("LAT n=%lu size=%zu min=%.1fus p50=%.1fus p99=%.1fus max=%.1fus avg=%.1fus\n",
	       n, size, t[0] / 1e3, t[(n - 1) / 2] / 1e3,
	       t[(n * 99 + 99) / 100 - 1] / 1e3, t[n - 1] / 1e3,
	       (double)sum / n / 1e3);
	free(t);
	return 0;
}

struct vr_reader {
	int fd;
	unsigned long want, got;
	uint64_t t_end;
	int err;
};

static inline void *vr_reader_thread(void *arg)
{
	struct vr_reader *rd = arg;
	unsigned char rx[VR_MAX_PAYLOAD + 64];

	while (rd->got < rd->want) {
		ssize_t r;

		if (!vr_wait_readable(rd->fd, vr_timeout_ms)) {
			rd->err = ETIMEDOUT;
			break;
		}
		r = read(rd->fd, rx, sizeof(rx));
		if (r < 0) {
			if (errno == EINTR || errno == EAGAIN)
				continue;
			rd->err = errno;
			break;
		}
		rd->got++;
	}
	rd->t_end = vr_now_ns();
	return NULL;
}

static inline int vr_mode_tput(int fd, unsigned long n, size_t size, int expect_echo)
{
	unsigned char tx[VR_MAX_PAYLOAD + 16];
	struct vr_reader rd = { .fd = fd, .want = n };
	pthread_t th;
	unsigned long i;
	uint64_t t0, t1;
	double s;

	if (!n)
		vr_die("tput: N must be > 0");
	if (size > VR_MAX_PAYLOAD)
		vr_die("tput: size %zu > %d", size, VR_MAX_PAYLOAD);
	vr_fill(tx, size, 7);
	t0 = vr_now_ns();
	if (expect_echo && pthread_create(&th, NULL, vr_reader_thread, &rd))
		vr_die("pthread_create failed");
	for (i = 0; i < n; i++)
		vr_write_msg(fd, tx, size, (uint32_t)i);
	t1 = vr_now_ns();
	s = (t1 - t0) / 1e9;
	printf("TPUT n=%lu size=%zu tx_time=%.3fs tx_rate=%.0f msgs/s (%.2f MB/s)\n",
	       n, size, s, n / s, n * (double)size / s / 1e6);
	if (expect_echo) {
		pthread_join(th, NULL);
		s = (rd.t_end - t0) / 1e9;
		printf("TPUT-ECHO got=%lu/%lu time=%.3fs rate=%.0f msgs/s%s%s\n",
		       rd.got, n, s, rd.got / s, rd.err ? " error=" : "",
		       rd.err ? strerror(rd.err) : "");
		if (rd.got != n)
			return 1;
	}
	return 0;
}

static inline int vr_mode_recv(int fd, unsigned long n)
{
	unsigned char rx[VR_MAX_PAYLOAD + 64];
	unsigned long i;
	uint64_t t0 = 0, bytes = 0;
	double s;

	for (i = 0; i < n; i++) {
		ssize_t r = vr_read_msg(fd, rx, sizeof(rx), (uint32_t)i);

		if (i == 0)
			t0 = vr_now_ns();
		bytes += (uint64_t)r;
	}
	s = t0 ? (vr_now_ns() - t0) / 1e9 : 0;
	printf("RECV n=%lu bytes=%llu time=%.3fs rate=%.0f msgs/s\n", n,
	       (unsigned long long)bytes, s, s > 0 ? (n - 1) / s : 0.0);
	return 0;
}

static inline int vr_mode_hold(int fd, unsigned long seconds)
{
	unsigned char rx[VR_MAX_PAYLOAD + 64];
	uint64_t deadline = vr_now_ns() + seconds * 1000000000ull;
	unsigned long count = 0;

	while (vr_now_ns() < deadline) {
		int left = (int)((deadline - vr_now_ns()) / 1000000ull);
		ssize_t r;

		if (!vr_wait_readable(fd, left > 0 ? left : 1))
			continue;
		r = read(fd, rx, sizeof(rx));
		if (r < 0)
			vr_die("read: %s", strerror(errno));
		count++;
		printf("RX %zd bytes: '%.*s'\n", r, (int)r, (char *)rx);
		fflush(stdout);
	}
	printf("HOLD-DONE received=%lu\n", count);
	return 0;
}

static inline void vr_modes_usage(FILE *f)
{
	fprintf(f,
		"modes:\n"
		"  echo N            N echo round trips, sizes 0..496, byte-exact check\n"
		"  lat N [SIZE]      ping-pong latency, prints p50/p99 in us (SIZE 64)\n"
		"  tput N SIZE [-e]  write N messages fast, print msgs/s (-e: also\n"
		"                    wait for the N echoes)\n"
		"  recv N            read N messages, print msgs/s\n"
		"  send TEXT         send one message\n"
		"  sizes SIZE...     one message of each size to an echo, print what\n"
		"                    the kernel and the host made of it\n"
		"  hold SECONDS      keep the endpoint open, print what arrives\n"
		"  info              only print the endpoint device\n");
}

/*
 * One message of each size, to an echo: a write the kernel accepts is answered
 * with the same length ("SIZE n ECHO m"); a refused one prints its errno name
 * ("SIZE n ERR EMSGSIZE").  Then "EXTRA k": messages that arrived unasked within
 * 500 ms (a refused write that still reached the host would show up here).
 */
static inline int vr_mode_sizes(int fd, int argc, char **argv)
{
	unsigned char tx[2048], rx[2048];
	int i, extra = 0;

	for (i = 0; i < argc; i++) {
		size_t len = vr_parse_ul(argv[i], "SIZE");
		ssize_t w;

		if (len > sizeof(tx))
			vr_die("sizes: %zu is larger than this test's buffer", len);
		vr_fill(tx, len, (uint32_t)i);
		w = write(fd, tx, len);
		if (w < 0) {
			printf("SIZE %zu ERR %s\n", len,
			       errno == EMSGSIZE ? "EMSGSIZE" : strerror(errno));
			continue;
		}
		printf("SIZE %zu ECHO %zd\n", len, vr_read_msg(fd, rx, sizeof(rx), (uint32_t)i));
	}
	while (vr_wait_readable(fd, 500) && read(fd, rx, sizeof(rx)) >= 0)
		extra++;
	printf("EXTRA %d\n", extra);
	return 0;
}

/* argv[0] is the mode name. */
static inline int vr_run_mode(int fd, int argc, char **argv)
{
	const char *m;

	if (argc < 1)
		return 0;
	m = argv[0];
	fflush(stdout);
	if (!strcmp(m, "info"))
		return 0;
	if (!strcmp(m, "echo") && argc == 2)
		return vr_mode_echo(fd, vr_parse_ul(argv[1], "N"));
	if (!strcmp(m, "lat") && (argc == 2 || argc == 3))
		return vr_mode_lat(fd, vr_parse_ul(argv[1], "N"),
				   argc == 3 ? vr_parse_ul(argv[2], "SIZE") : 64);
	if (!strcmp(m, "tput") && (argc == 3 || argc == 4)) {
		int e = argc == 4 && !strcmp(argv[3], "-e");

		if (argc == 4 && !e)
			vr_die("tput: unknown flag '%s'", argv[3]);
		return vr_mode_tput(fd, vr_parse_ul(argv[1], "N"),
				    vr_parse_ul(argv[2], "SIZE"), e);
	}
	if (!strcmp(m, "recv") && argc == 2)
		return vr_mode_recv(fd, vr_parse_ul(argv[1], "N"));
	if (!strcmp(m, "send") && argc == 2) {
		size_t len = strlen(argv[1]);

		if (len > VR_MAX_PAYLOAD)
			vr_die("send: message too long");
		vr_write_msg(fd, argv[1], len, 0);
		printf("SENT %zu\n", len);
		return 0;
	}
	if (!strcmp(m, "sizes") && argc >= 2)
		return vr_mode_sizes(fd, argc - 1, argv + 1);
	if (!strcmp(m, "hold") && argc == 2)
		return vr_mode_hold(fd, vr_parse_ul(argv[1], "SECONDS"));
	fprintf(stderr, "%s: bad mode or arguments: %s\n", vr_prog, m);
	vr_modes_usage(stderr);
	exit(2);
}

/* Common option parsing: -T MS (reply timeout), -c CTRL.  Returns index of
 * first non-option argument. */
static inline int vr_parse_opts(int argc, char **argv, const char **ctrl,
			 int *wait_ms, void (*usage)(void))
{
	int i = 1;

	while (i < argc && argv[i][0] == '-' && argv[i][1]) {
		if (!strcmp(argv[i], "-T") && i + 1 < argc) {
			vr_timeout_ms = (int)vr_parse_ul(argv[i + 1], "-T");
			i += 2;
		} else if (!strcmp(argv[i], "-c") && i + 1 < argc && ctrl) {
			*ctrl = argv[i + 1];
			i += 2;
		} else if (!strcmp(argv[i], "-w") && i + 1 < argc && wait_ms) {
			*wait_ms = (int)vr_parse_ul(argv[i + 1], "-w");
			i += 2;
		} else if (!strcmp(argv[i], "-h") || !strcmp(argv[i], "--help")) {
			usage();
			exit(0);
		} else {
			fprintf(stderr, "%s: unknown option %s\n", vr_prog,
				argv[i]);
			usage();
			exit(2);
		}
	}
	return i;
}

#endif
