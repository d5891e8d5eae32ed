// SPDX-License-Identifier: MIT
/*
 * rpmsg-ept: create a local endpoint char device through /dev/rpmsg_ctrlN
 * (RPMSG_CREATE_EPT_IOCTL), open the resulting /dev/rpmsgN and run a traffic
 * mode against the remote address DST (expected to be an echo service).
 *
 *   rpmsg-ept [-c /dev/rpmsg_ctrl0] [-T reply_timeout_ms] NAME SRC DST MODE ...
 *
 * SRC may be "any" (-1): the endpoint then gets a dynamic address (>= 1024)
 * when the char device is opened.  DST must be a real address: the virtio
 * rpmsg bus refuses to send to RPMSG_ADDR_ANY (-EINVAL, "invalid addr").
 * An endpoint created this way is NOT announced to the host (no name-service
 * message); the host learns the guest address from the first message's src.
 * On exit the endpoint device is destroyed with RPMSG_DESTROY_EPT_IOCTL.
 */
#include "rpmsg-common.h"

static void usage(void)
{
	fprintf(stderr,
		"usage: rpmsg-ept [-c CTRL] [-T MS] NAME SRC DST MODE [ARGS]\n"
		"  CTRL defaults to /dev/rpmsg_ctrl0; SRC/DST: number, 0x.., or any\n"
		"  -T MS: per-reply timeout (default 10000)\n");
	vr_modes_usage(stderr);
}

int main(int argc, char **argv)
{
	const char *ctrl = "/dev/rpmsg_ctrl0";
	struct rpmsg_endpoint_info info;
	unsigned char seen[VR_MAX_IDX];
	struct vr_eptinfo e;
	uint32_t src, dst;
	int i, cfd, fd, idx, rc;

	vr_prog = "rpmsg-ept";
	i = vr_parse_opts(argc, argv, &ctrl, NULL, usage);
	if (argc - i < 4) {
		usage();
		return 2;
	}
	src = vr_parse_addr(argv[i + 1]);
	dst = vr_parse_addr(argv[i + 2]);
	vr_fill_info(&info, argv[i], src, dst);

	cfd = vr_open_ctrl(ctrl);
	vr_snapshot(seen);
	if (ioctl(cfd, RPMSG_CREATE_EPT_IOCTL, &info) < 0)
		vr_die("RPMSG_CREATE_EPT_IOCTL(%s, src %lld, dst %lld): %s",
		       info.name, vr_sysfs_addr(src), vr_sysfs_addr(dst),
		       strerror(errno));
	idx = vr_find_eptdev(info.name, vr_sysfs_addr(src), vr_sysfs_addr(dst),
			     seen, 5000, &e);
	if (idx < 0)
		vr_die("endpoint device for %s did not appear in /sys/class/rpmsg",
		       info.name);
	fd = vr_open_eptdev(idx, 5000);
	printf("EPT /dev/rpmsg%d name=%s src=%lld dst=%lld\n", idx, e.name,
	       e.src, e.dst);

	rc = vr_run_mode(fd, argc - i - 3, argv + i + 3);

	if (ioctl(fd, RPMSG_DESTROY_EPT_IOCTL) < 0)
		fprintf(stderr, "%s: RPMSG_DESTROY_EPT_IOCTL: %s\n", vr_prog,
			strerror(errno));
	close(fd);
	close(cfd);
	fflush(stdout);
	return rc;
}
