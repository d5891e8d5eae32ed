/*
 * An rpmsg endpoint in C: echo every guest message back.
 *
 * Run it through the server's control socket, which passes the endpoint as fd 3:
 *
 *     cc -O2 -o rpmsg-echo echo.c
 *     vhost-rpmsg endpoint open -s /run/vm0.sock rpmsg-raw -- ./rpmsg-echo
 *
 * The endpoint is a connected SOCK_SEQPACKET socket: one datagram is one rpmsg message
 * (at most 496 bytes of payload towards the guest).  In the default framing a datagram
 * is the payload alone, and what we write goes back to the guest address that last
 * wrote to us.  With --addressed, each datagram starts with the guest address as 4
 * bytes, little-endian.  The endpoint lives exactly as long as this fd: exiting (or
 * being killed) removes it and withdraws its announcement.
 *
 * Nothing here is specific to C: any language that can read and write a socket fd can
 * be an endpoint.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#define ENDPOINT_FD 3
#define MAX_MESSAGE 65536

static int endpoint_fd(void)
{
	/* systemd's socket activation convention: LISTEN_PID is us, LISTEN_FDS is 1 */
	const char *pid = getenv("LISTEN_PID");
	const char *fds = getenv("LISTEN_FDS");

	if (!pid || !fds || atol(pid) != (long)getpid() || atoi(fds) != 1) {
		fprintf(stderr, "rpmsg-echo: no endpoint fd (run me with 'vhost-rpmsg endpoint open ... --')\n");
		return -1;
	}
	return ENDPOINT_FD;
}

int main(void)
{
	static char buf[MAX_MESSAGE];
	unsigned long messages = 0;
	int fd = endpoint_fd();

	if (fd < 0)
		return 2;
	for (;;) {
		ssize_t n = recv(fd, buf, sizeof(buf), 0);

		if (n < 0) {
			if (errno == EINTR)
				continue;
			perror("rpmsg-echo: recv");
			return 1;
		}
		/* 0 is an empty message, or the server going away: send() then tells which */
		if (send(fd, buf, (size_t)n, MSG_NOSIGNAL) < 0) {
			if (errno == EPIPE || errno == ECONNRESET || errno == ENOTCONN)
				break;
			perror("rpmsg-echo: send");
			return 1;
		}
		messages++;
	}
	fprintf(stderr, "rpmsg-echo: endpoint closed after %lu messages\n", messages);
	return 0;
}
