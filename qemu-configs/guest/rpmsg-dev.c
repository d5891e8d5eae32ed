// SPDX-License-Identifier: MIT
/*
 * rpmsg-dev: create / release a guest-side rpmsg channel (rpmsg device)
 * through /dev/rpmsg_ctrlN.
 *
 *   rpmsg-dev [-c CTRL] create  NAME SRC DST
 *   rpmsg-dev [-c CTRL] release NAME SRC DST
 *   rpmsg-dev [-c CTRL] [-T MS] run NAME SRC DST MODE [ARGS]
 *        (create, wait for its /dev/rpmsgN, run MODE, release)
 *
 * Kernel behaviour (Linux 7.2, drivers/rpmsg/):
 *  - RPMSG_CREATE_DEV_IOCTL -> rpmsg_create_channel() -> virtio_rpmsg_bus
 *    registers a new rpmsg device {NAME, SRC, DST}; it sets
 *    rpdev->announce = (SRC != RPMSG_ADDR_ANY).
 *  - The device only does something if a driver's id table matches NAME:
 *    rpmsg_char's channel driver matches "rpmsg-raw" and "rpmsg_chrdev"
 *    (and makes /dev/rpmsgN with sysfs name/src/dst), the sample driver
 *    matches "rpmsg-client-sample".  With no match the ioctl still succeeds
 *    but nothing is created or announced.
 *  - On bind, the rpmsg core creates the channel endpoint at SRC (or a
 *    dynamic address >= 1024 for any), runs the driver probe and then, if
 *    announce is set and the device offered VIRTIO_RPMSG_F_NS, sends a
 *    name-service message {name NAME, addr SRC, flags 0=CREATE} from SRC to
 *    address 53 on the tx virtqueue.  So the host sees the announcement
 *    only for SRC != any and a matching driver.
 *  - RPMSG_RELEASE_DEV_IOCTL unregisters the matching device; on unbind the
 *    core sends the NS DESTROY (flags 1) the same way, then removes it.
 *  - The char device writes to DST; DST=any makes every write fail EINVAL.
 */
#include "rpmsg-common.h"

static void usage(void)
{
	fprintf(stderr,
		"usage: rpmsg-dev [-c CTRL] [-T MS] create|release NAME SRC DST\n"
		"       rpmsg-dev [-c CTRL] [-T MS] run NAME SRC DST MODE [ARGS]\n");
	vr_modes_usage(stderr);
}

int main(int argc, char **argv)
{
	const char *ctrl = "/dev/rpmsg_ctrl0";
	struct rpmsg_endpoint_info info;
	struct vr_eptinfo e;
	const char *cmd;
	uint32_t src, dst;
	int i, cfd, fd, idx, rc = 0;

	vr_prog = "rpmsg-dev";
	i = vr_parse_opts(argc, argv, &ctrl, NULL, usage);
	if (argc - i < 4) {
		usage();
		return 2;
	}
	cmd = argv[i];
	src = vr_parse_addr(argv[i + 2]);
	dst = vr_parse_addr(argv[i + 3]);
	vr_fill_info(&info, argv[i + 1], src, dst);
	cfd = vr_open_ctrl(ctrl);

	if (!strcmp(cmd, "release")) {
		if (ioctl(cfd, RPMSG_RELEASE_DEV_IOCTL, &info) < 0)
			vr_die("RPMSG_RELEASE_DEV_IOCTL(%s, %lld, %lld): %s",
			       info.name, vr_sysfs_addr(src),
			       vr_sysfs_addr(dst), strerror(errno));
		printf("DEV-RELEASED %s src=%lld dst=%lld\n", info.name,
		       vr_sysfs_addr(src), vr_sysfs_addr(dst));
		return 0;
	}
	if (strcmp(cmd, "create") && strcmp(cmd, "run")) {
		usage();
		return 2;
	}
	if (!strcmp(cmd, "run") && argc - i < 5) {
		usage();
		return 2;
	}

	if (ioctl(cfd, RPMSG_CREATE_DEV_IOCTL, &info) < 0)
		vr_die("RPMSG_CREATE_DEV_IOCTL(%s, %lld, %lld): %s", info.name,
		       vr_sysfs_addr(src), vr_sysfs_addr(dst), strerror(errno));
	printf("DEV-CREATED %s src=%lld dst=%lld%s\n", info.name,
	       vr_sysfs_addr(src), vr_sysfs_addr(dst),
	       src == VR_ADDR_ANY ? " (src any: no NS announcement)" : "");
	if (!strcmp(cmd, "create"))
		return 0;

	/* run: the channel's char device (only if rpmsg_char bound to it) */
	idx = vr_find_eptdev(info.name,
			     src == VR_ADDR_ANY ? VR_DONTCARE : vr_sysfs_addr(src),
			     vr_sysfs_addr(dst), NULL, 5000, &e);
	if (idx < 0) {
		fprintf(stderr,
			"rpmsg-dev: no /dev/rpmsgN for channel %s (rpmsg_char binds only \"rpmsg-raw\"/\"rpmsg_chrdev\")\n",
			info.name);
		rc = 1;
	} else {
		fd = vr_open_eptdev(idx, 5000);
		printf("DEV /dev/rpmsg%d name=%s src=%lld dst=%lld\n", idx,
		       e.name, e.src, e.dst);
		rc = vr_run_mode(fd, argc - i - 4, argv + i + 4);
		close(fd);
	}
	if (ioctl(cfd, RPMSG_RELEASE_DEV_IOCTL, &info) < 0) {
		fprintf(stderr, "rpmsg-dev: RPMSG_RELEASE_DEV_IOCTL: %s\n",
			strerror(errno));
		rc = rc ? rc : 1;
	} else {
		printf("DEV-RELEASED %s\n", info.name);
	}
	fflush(stdout);
	return rc;
}
