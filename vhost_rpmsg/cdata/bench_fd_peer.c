/*
 * bench_fd_peer: the far end of an fd endpoint for `vhost-rpmsg bench`, in C so that
 * what the benchmark measures is the server's fd path, not the holder's interpreter.
 *
 *     bench_fd_peer [-f FD] sink N [ACK]
 *     bench_fd_peer [-f FD] source N SIZE
 *     bench_fd_peer floor N SIZE
 *
 * FD is the endpoint socket (default 3, where `vhost-rpmsg endpoint open -- CMD` puts
 * it).  One datagram is one rpmsg message.
 *
 * sink:   reads N datagrams, then prints "N BYTES" on stdout and exits 0.  With ACK > 0
 *         it also writes a 4-byte little-endian count back after every ACK datagrams
 *         and after the last one (to the guest address that last wrote, the endpoint's
 *         plain framing): the guest can keep a bounded window in flight, since the
 *         server drops, by design, what a reader that falls too far behind cannot take.
 *         If the endpoint hangs up, or nothing arrives for 10 s, it prints what it
 *         read and exits 1.
 * source: waits for a byte (or end of file) on stdin, the start signal, so that the
 *         process start-up is outside the timed window; writes N datagrams of SIZE
 *         bytes (blocking writes: the server reads only while the guest has room, so
 *         the writer is held back, nothing is dropped); then waits for end of file on
 *         stdin before it exits, so that the endpoint outlives its last message.  It
 *         prints "N" on stdout once all are written.
 * floor:  the transport alone, no server: a socketpair, with this sink's reader in a
 *         child and, as the server's writer does, sendmmsg of up to 64 datagrams of
 *         SIZE bytes at a time until N have gone; prints the rate, "MSGS_PER_S".  What
 *         an fd endpoint's guest-to-process rate can at best be on this machine.
 *
 * Built by the bench at run time with the system compiler: cc -O2 -o bench_fd_peer
 * bench_fd_peer.c.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <poll.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define MAX_DATAGRAM 65536
#define IDLE_MS 10000

static unsigned long parse(const char *s, const char *what)
{
	char *end;
	unsigned long v;

	errno = 0;
	v = strtoul(s, &end, 10);
	if (errno || !*s || *end) {
		fprintf(stderr, "bench_fd_peer: bad %s: %s\n", what, s);
		exit(2);
	}
	return v;
}

/* A zero-length read is an empty message, or the hang-up: the poll tells which. */
static int hung_up(int fd)
{
	struct pollfd p = { .fd = fd, .events = POLLIN | POLLRDHUP };

	return poll(&p, 1, 0) == 1 && (p.revents & (POLLHUP | POLLRDHUP | POLLERR));
}

static int send_ack(int fd, unsigned long count)
{
	unsigned char le[4];
	uint32_t c = (uint32_t)count;

	le[0] = (unsigned char)c;
	le[1] = (unsigned char)(c >> 8);
	le[2] = (unsigned char)(c >> 16);
	le[3] = (unsigned char)(c >> 24);
	while (send(fd, le, sizeof(le), MSG_NOSIGNAL) < 0) {
		if (errno != EINTR) {
			perror("bench_fd_peer: send ack");
			return -1;
		}
	}
	return 0;
}

static int sink(int fd, unsigned long n, unsigned long ack)
{
	static char buf[MAX_DATAGRAM];
	unsigned long count = 0, bytes = 0;
	struct pollfd p = { .fd = fd, .events = POLLIN };

	int waiting = 1; /* poll first; after a datagram, read on until the socket is empty */

	while (count < n) {
		ssize_t r;

		if (waiting) {
			int ready = poll(&p, 1, IDLE_MS);

			if (ready < 0 && errno == EINTR)
				continue;
			if (ready <= 0) {
				fprintf(stderr, "bench_fd_peer: sink: %s after %lu of %lu datagrams\n",
					ready ? strerror(errno) : "nothing for 10 s", count, n);
				break;
			}
		}
		r = recv(fd, buf, sizeof(buf), MSG_DONTWAIT);
		if (r < 0) {
			if (errno == EINTR || errno == EAGAIN) {
				waiting = errno == EAGAIN;
				continue;
			}
			perror("bench_fd_peer: sink: recv");
			break;
		}
		waiting = 0;
		if (r == 0 && hung_up(fd)) {
			fprintf(stderr, "bench_fd_peer: sink: hung up after %lu of %lu datagrams\n",
				count, n);
			break;
		}
		count++;
		bytes += (unsigned long)r;
		if (ack && (count % ack == 0 || count == n) && send_ack(fd, count))
			break;
	}
	printf("%lu %lu\n", count, bytes);
	fflush(stdout);
	return count == n ? 0 : 1;
}

/* One byte from stdin, or its end of file; with all = 1, everything until the end. */
static void read_stdin(int all)
{
	char c;

	for (;;) {
		ssize_t r = read(0, &c, 1);

		if ((r < 0 && errno == EINTR) || (r > 0 && all))
			continue;
		return;
	}
}

static int source(int fd, unsigned long n, unsigned long size)
{
	static char buf[MAX_DATAGRAM];
	unsigned long i = 0;

	if (size > sizeof(buf)) {
		fprintf(stderr, "bench_fd_peer: source: SIZE above %zu\n", sizeof(buf));
		return 2;
	}
	memset(buf, 0x5a, size);
	read_stdin(0);
	while (i < n) {
		if (send(fd, buf, size, MSG_NOSIGNAL) < 0) {
			if (errno == EINTR)
				continue;
			fprintf(stderr, "bench_fd_peer: source: send %lu of %lu: %s\n", i + 1, n,
				strerror(errno));
			return 1;
		}
		i++;
	}
	printf("%lu\n", n);
	fflush(stdout);
	read_stdin(1);  /* whatever else comes is ignored */
	return 0;
}

#define FLOOR_BATCH 64

static int floor_rate(unsigned long n, unsigned long size)
{
	static char buf[MAX_DATAGRAM];
	struct mmsghdr m[FLOOR_BATCH];
	struct iovec iov = { .iov_base = buf, .iov_len = size };
	struct timespec t0, t1;
	unsigned long sent = 0;
	int sv[2], status;
	pid_t pid;

	if (size > sizeof(buf)) {
		fprintf(stderr, "bench_fd_peer: floor: SIZE above %zu\n", sizeof(buf));
		return 2;
	}
	if (socketpair(AF_UNIX, SOCK_SEQPACKET, 0, sv) < 0) {
		perror("bench_fd_peer: floor: socketpair");
		return 1;
	}
	fflush(stdout);
	pid = fork();
	if (pid < 0) {
		perror("bench_fd_peer: floor: fork");
		return 1;
	}
	if (pid == 0) {
		close(sv[0]);
		if (!freopen("/dev/null", "w", stdout))
			_exit(1);
		_exit(sink(sv[1], n, 0));
	}
	close(sv[1]);
	memset(buf, 0x5a, size);
	memset(m, 0, sizeof(m));
	for (int k = 0; k < FLOOR_BATCH; k++) {
		m[k].msg_hdr.msg_iov = &iov;
		m[k].msg_hdr.msg_iovlen = 1;
	}
	clock_gettime(CLOCK_MONOTONIC, &t0);
	while (sent < n) {
		unsigned int k = n - sent < FLOOR_BATCH ? (unsigned int)(n - sent) : FLOOR_BATCH;
		int r = sendmmsg(sv[0], m, k, MSG_NOSIGNAL);

		if (r < 0) {
			if (errno == EINTR)
				continue;
			perror("bench_fd_peer: floor: sendmmsg");
			close(sv[0]);  /* the reader, if still there, sees the hang-up and exits */
			waitpid(pid, &status, 0);
			return 1;
		}
		sent += (unsigned long)r;
	}
	if (waitpid(pid, &status, 0) < 0 || !WIFEXITED(status) || WEXITSTATUS(status)) {
		fprintf(stderr, "bench_fd_peer: floor: the reader failed\n");
		return 1;
	}
	clock_gettime(CLOCK_MONOTONIC, &t1);
	printf("%.0f\n", (double)n / ((double)(t1.tv_sec - t0.tv_sec) +
				     (double)(t1.tv_nsec - t0.tv_nsec) / 1e9));
	return 0;
}

int main(int argc, char **argv)
{
	int fd = 3, i = 1;

	if (argc > 2 && !strcmp(argv[1], "-f")) {
		fd = (int)parse(argv[2], "fd");
		i = 3;
	}
	if (argc - i >= 2 && argc - i <= 3 && !strcmp(argv[i], "sink"))
		return sink(fd, parse(argv[i + 1], "N"),
			    argc - i == 3 ? parse(argv[i + 2], "ACK") : 0);
	if (argc - i == 3 && !strcmp(argv[i], "source"))
		return source(fd, parse(argv[i + 1], "N"), parse(argv[i + 2], "SIZE"));
	if (argc == 4 && !strcmp(argv[1], "floor"))
		return floor_rate(parse(argv[2], "N"), parse(argv[3], "SIZE"));
	fprintf(stderr, "usage: bench_fd_peer [-f FD] sink N [ACK] | source N SIZE | "
		"floor N SIZE\n");
	return 2;
}
