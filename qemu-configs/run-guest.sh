#!/usr/bin/env bash
# run-guest.sh - boot the vhost-rpmsg test guest (built by provision.sh) with a
# virtio-rpmsg device served by a vhost-user back-end on --socket.
#
#   run-guest.sh --socket PATH [--timeout S] [--append-cmd "CMD" | --script FILE]
#                [--add FILE[:/guest/path]]... [--vq-size 256] [--mmio]
#                [--no-device] [--kvm] [--mem 256M] [--smp 1] [--patched]
#                [--cmdline "extra kernel args"] [--qemu-arg ARG]...
#                [--log FILE] [--dry-run]
#
# The guest prints (on the serial console = our stdout):
#   VR-READY kernel=... uptime=... ctrl=/dev/rpmsg_ctrl0   modules loaded
#   VR-EXIT <rc>                                            run script done
# and powers off.  Exit status: the guest script's rc (from VR-EXIT), 124 on
# timeout, 125 if the guest ended without a VR-EXIT line (crash/QEMU error).
#
# --patched boots the guest with qemu-configs/patches/ applied to its rpmsg
# modules (provision.sh builds them with the kernel): the same kernel otherwise.
#
# The run script and extra files travel in a small per-run cpio appended to
# the cached base initramfs (Linux unpacks concatenated newc archives in
# order, later files override earlier ones), so nothing is rebuilt per run.
#
# Environment: VHOST_RPMSG_CACHE (as provision.sh), VHOST_RPMSG_KVM=1 (= --kvm),
# VR_QEMU / VR_KERNEL / VR_INITRD_BASE to override the cached artefacts, VR_PYTHON
# (default python3) the interpreter that builds the QEMU line.
set -euo pipefail

CACHE=${VHOST_RPMSG_CACHE:-$HOME/.cache/vhost-rpmsg}
QEMU=${VR_QEMU:-$CACHE/bin/qemu-system-x86_64}
KERNEL=${VR_KERNEL:-$CACHE/kernel/vmlinux}
INITRD_BASE=${VR_INITRD_BASE:-$CACHE/initramfs-base.cpio}
PYTHON=${VR_PYTHON:-python3}
HERE=$(cd "$(dirname "$0")" && pwd)

socket="" timeout=120 cmd="" script="" vq_size=256 mmio=0 nodev=0
kvm=${VHOST_RPMSG_KVM:-0} mem=256M smp=1 extra_cmdline=""
logfile="" dry=0 patched=0
adds=() qemu_extra=()

usage() { sed -n '2,26p' "$0" | sed 's/^# \{0,1\}//'; }
die() { echo "run-guest: $*" >&2; exit 2; }

while [ $# -gt 0 ]; do
	case "$1" in
	--socket) socket=$2; shift 2 ;;
	--timeout) timeout=$2; shift 2 ;;
	--append-cmd) cmd=$2; shift 2 ;;
	--script) script=$2; shift 2 ;;
	--add) adds+=("$2"); shift 2 ;;
	--vq-size) vq_size=$2; shift 2 ;;
	--mmio) mmio=1; shift ;;
	--no-device) nodev=1; shift ;;
	--kvm) kvm=1; shift ;;
	--patched) patched=1; shift ;;
	--mem) mem=$2; shift 2 ;;
	--smp) smp=$2; shift 2 ;;
	--cmdline) extra_cmdline="$extra_cmdline $2"; shift 2 ;;
	--qemu-arg) qemu_extra+=("$2"); shift 2 ;;
	--log) logfile=$2; shift 2 ;;
	--dry-run) dry=1; shift ;;
	-h|--help) usage; exit 0 ;;
	*) die "unknown argument: $1 (see --help)" ;;
	esac
done

[ -n "$cmd" ] && [ -n "$script" ] && die "--append-cmd and --script are exclusive"
[ "$nodev" = 1 ] || [ -n "$socket" ] || die "--socket PATH is required (or --no-device)"
for f in "$QEMU" "$KERNEL" "$INITRD_BASE"; do
	[ -e "$f" ] || die "$f missing: run qemu-configs/provision.sh first"
done
command -v cpio >/dev/null || die "cpio not installed"

work=$(mktemp -d "${TMPDIR:-/tmp}/vr-guest.XXXXXX")
qpid=""
cleanup() {
	[ -n "$qpid" ] && kill "$qpid" 2>/dev/null || true
	rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# ---- per-run overlay cpio -------------------------------------------------
ov=$work/overlay
mkdir -p "$ov"
if [ -n "$script" ]; then
	cp "$script" "$ov/run.sh"
elif [ -n "$cmd" ]; then
	printf '%s\n' "$cmd" > "$ov/run.sh"
fi
if [ "$patched" = 1 ]; then
	krel=$(cat "$CACHE/kernel/release")
	mod=${VR_PATCHED_MODULE:-$CACHE/kernel/patched/virtio_rpmsg_bus.ko}
	[ -e "$mod" ] || die "$mod missing: run qemu-configs/provision.sh first"
	# later cpio members override earlier ones: this replaces the stock module
	adds+=("$mod:/lib/modules/$krel/kernel/drivers/rpmsg/virtio_rpmsg_bus.ko")
fi
for spec in "${adds[@]+"${adds[@]}"}"; do
	src=${spec%%:*}
	if [ "$src" != "$spec" ]; then dst=${spec#*:}; else dst=/usr/bin/$(basename "$src"); fi
	[ -e "$src" ] || die "--add: $src not found"
	mkdir -p "$ov$(dirname "$dst")"
	cp -a "$src" "$ov$dst"
done
[ -f "$ov/run.sh" ] && chmod 755 "$ov/run.sh"
initrd=$work/initrd.cpio
cp "$INITRD_BASE" "$initrd"
(cd "$ov" && find . -mindepth 1 | LC_ALL=C sort | cpio -o -H newc -R 0:0 --quiet) >> "$initrd"

# ---- QEMU command line ------------------------------------------------------
# Exactly the line `vhost-rpmsg qemu-cmdline` prints for these options (one builder,
# vhost_rpmsg/qemu.py, run here with the stdlib only): what a user copies is what the
# suite boots.  Only the kernel, initrd and its command line are the suite's own.
append="console=ttyS0 panic=-1 loglevel=4 $extra_cmdline"
if [ "$mmio" = 1 ] && [ "$kvm" = 0 ]; then
	# Host fact: microvm has no HPET or PM timer and PIT calibration under TCG fails
	# now and then, so the guest is told its TSC rate, which under TCG is the host's.
	tsc=$CACHE/bin/tsc-khz
	if [ ! -x "$tsc" ] || [ "$HERE/host/tsc-khz.c" -nt "$tsc" ]; then
		mkdir -p "$CACHE/bin"
		cc -O2 -Wall -Wextra -Werror -o "$tsc.tmp" "$HERE/host/tsc-khz.c" &&
			mv "$tsc.tmp" "$tsc" || die "cannot build $tsc (needs cc)"
	fi
	khz=$("$tsc") || die "the host TSC rate cannot be measured: microvm under TCG needs it"
	echo "run-guest: host TSC ${khz} kHz (measured), passed as tsc_early_khz" >&2
	append="$append tsc_early_khz=$khz"
fi
device=()  # --no-device (provisioning's smoke boot): the same line without the device
[ "$nodev" = 1 ] || device=(socket_path="$socket")
line=$(PYTHONPATH="$HERE/..${PYTHONPATH:+:$PYTHONPATH}" "$PYTHON" -m vhost_rpmsg.qemu \
	"${device[@]+"${device[@]}"}" qemu="$QEMU" memory="$mem" smp="$smp" \
	vq_size="$vq_size" mmio="$mmio" accel="$([ "$kvm" = 1 ] && echo kvm || echo tcg)" \
	kernel="$KERNEL" initrd="$initrd" append="$append" no_reboot=1) ||
	die "the QEMU line could not be built (vhost_rpmsg/qemu.py)"
eval "args=($line)"   # shlex-quoted by qemu-cmdline
args=("${args[@]:1}")  # argv[0] is the QEMU binary
args+=("${qemu_extra[@]+"${qemu_extra[@]}"}")

if [ "$dry" = 1 ]; then
	printf '%q ' "$QEMU" "${args[@]}"
	echo
	exit 0
fi

# ---- run ------------------------------------------------------------------
out=$work/console.log
start=$(date +%s.%N)
set +e
"$QEMU" "${args[@]}" < /dev/null > >(tee "$out") 2>&1 &
qpid=$!
deadline=$(( $(date +%s) + timeout ))
while kill -0 "$qpid" 2>/dev/null; do
	if [ "$(date +%s)" -ge "$deadline" ]; then
		echo "VR-TIMEOUT after ${timeout}s"
		kill "$qpid" 2>/dev/null
		sleep 1
		kill -9 "$qpid" 2>/dev/null
		wait "$qpid" 2>/dev/null
		qpid=""
		[ -n "$logfile" ] && cp "$out" "$logfile"
		exit 124
	fi
	sleep 0.2
done
wait "$qpid"
qrc=$?
qpid=""
set -e
sleep 0.1   # let tee flush
[ -n "$logfile" ] && cp "$out" "$logfile"
end=$(date +%s.%N)
rc=$(tr -d '\r' < "$out" | sed -n 's/.*VR-EXIT \([0-9][0-9]*\).*/\1/p' | tail -n 1)
echo "run-guest: qemu exited $qrc after $(awk -v a="$start" -v b="$end" 'BEGIN { printf "%.1f", b - a }')s" >&2
if [ -z "$rc" ]; then
	echo "run-guest: no VR-EXIT line (guest crashed or QEMU failed)" >&2
	exit 125
fi
exit "$rc"
