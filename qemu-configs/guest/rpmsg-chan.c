// SPDX-License-Identifier: MIT
/*
 * rpmsg-chan: wait for a channel endpoint device /dev/rpmsgN whose sysfs
 * name matches NAME (default "rpmsg-raw"), open it and run a traffic mode.
 *
 *   rpmsg-chan [-w wait_ms] [-T reply_timeout_ms] [-n NAME] [-d DST] MODE ...
 *
 * Such devices are made by rpmsg_char's channel driver, which binds to the
 * channel names "rpmsg-raw" and "rpmsg_chrdev".  A channel appears when the
 * HOST announces it (name-service CREATE to address 53: the guest's rpmsg_ns
 * creates the channel with src=any, dst=announced address; the device's
 * sysfs dst is then the host address) or when the guest creates it with
 * RPMSG_CREATE_DEV_IOCTL (see rpmsg-dev).  These devices use the channel's
 * default endpoint, so they cannot be destroyed with RPMSG_DESTROY_EPT_IOCTL;
 * they go away when the channel is released (NS DESTROY from the host, or
 * RPMSG_RELEASE_DEV_IOCTL).
 */
#include "rpmsg-common.h"

static void usage(void)
{
	fprintf(stderr,
		"usage: rpmsg-chan [-w WAIT_MS] [-T MS] [-n NAME] [-d DST] MODE [ARGS]\n"
		"  waits up to WAIT_MS (default 10000) for /dev/rpmsgN named NAME\n"
		"  (default rpmsg-raw) [whose remote address is DST], then runs MODE\n");
	vr_modes_usage(stderr);
}

int main(int argc, char **argv)
{
	const char *name = "rpmsg-raw";
	long long want_dst = VR_DONTCARE;
	int wait_ms = 10000;
	struct vr_eptinfo e;
	int i = 1, fd, idx, rc;

	vr_prog = "rpmsg-chan";
	/* local options first, then the common ones */
	while (i < argc) {
		if (!strcmp(argv[i], "-n") && i + 1 < argc) {
			name = argv[i + 1];
		} else if (!strcmp(argv[i], "-d") && i + 1 < argc) {
			want_dst = vr_sysfs_addr(vr_parse_addr(argv[i + 1]));
		} else if (!strcmp(argv[i], "-w") && i + 1 < argc) {
			wait_ms = (int)vr_parse_ul(argv[i + 1], "-w");
		} else if (!strcmp(argv[i], "-T") && i + 1 < argc) {
			vr_timeout_ms = (int)vr_parse_ul(argv[i + 1], "-T");
		} else if (!strcmp(argv[i], "-h") || !strcmp(argv[i], "--help")) {
			usage();
			return 0;
		} else if (argv[i][0] == '-') {
			fprintf(stderr, "rpmsg-chan: unknown option %s\n", argv[i]);
			usage();
			return 2;
		} else {
			break;
		}
		i += 2;
	}
	if (i >= argc) {
		usage();
		return 2;
	}

	idx = vr_find_eptdev(name, VR_DONTCARE, want_dst, NULL, wait_ms, &e);
	if (idx < 0) {
		printf("CHAN-MISSING no /dev/rpmsgN named '%s' after %d ms\n",
		       name, wait_ms);
		return 1;
	}
	fd = vr_open_eptdev(idx, 5000);
	printf("CHAN /dev/rpmsg%d name=%s src=%lld dst=%lld\n", idx, e.name,
	       e.src, e.dst);
	rc = vr_run_mode(fd, argc - i, argv + i);
	close(fd);
	fflush(stdout);
	return rc;
}
