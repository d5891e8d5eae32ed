#!/usr/bin/env bash
# run-guest.sh - boot the vhost-rpmsg test guest (built by provision.sh) with a
# virtio-rpmsg device served by a vhost-user back-end on --socket.
#
#   run-guest.sh --socket PATH [--timeout S] [--append-cmd "CMD" | --script FILE]
#                [--add FILE[:/guest/path]]... [--vq-size 256] [--mmio]
#                [--no-device] [--kvm] [--mem 256M] [--smp 1]
#                [--cmdline "extra kernel args"] [--qemu-arg ARG]...
#                [--reconnect-ms MS] [--log FILE] [--dry-run]
#
# The guest prints (on the serial console = our stdout):
#   VR-READY kernel=... uptime=... ctrl=/dev/rpmsg_ctrl0   modules loaded
#   VR-EXIT <rc>                                            run script done
# and powers off.  Exit status: the guest script's rc (from VR-EXIT), 124 on
# timeout, 125 if the guest ended without a VR-EXIT line (crash/QEMU error).
#
# The run script and extra files travel in a small per-run cpio appended to
# the cached base initramfs (Linux unpacks concatenated newc archives in
# order, later files override earlier ones), so nothing is rebuilt per run.
#
# Environment: VHOST_RPMSG_CACHE (as provision.sh), VHOST_RPMSG_KVM=1 (= --kvm),
# VR_QEMU / VR_KERNEL / VR_INITRD_BASE to override the cached artefacts.
set -euo pipefail

CACHE=${VHOST_RPMSG_CACHE:-$HOME/.cache/vhost-rpmsg}
QEMU=${VR_QEMU:-$CACHE/bin/qemu-system-x86_64}
KERNEL=${VR_KERNEL:-$CACHE/kernel/vmlinux}
INITRD_BASE=${VR_INITRD_BASE:-$CACHE/initramfs-base.cpio}

socket="" timeout=120 cmd="" script="" vq_size=256 mmio=0 nodev=0
kvm=${VHOST_RPMSG_KVM:-0} mem=256M smp=1 extra_cmdline="" reconnect=""
logfile="" dry=0
adds=() qemu_extra=()

usage() { sed -n '2,24p' "$0" | sed 's/^# \{0,1\}//'; }
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
	--mem) mem=$2; shift 2 ;;
	--smp) smp=$2; shift 2 ;;
	--cmdline) extra_cmdline="$extra_cmdline $2"; shift 2 ;;
	--qemu-arg) qemu_extra+=("$2"); shift 2 ;;
	--reconnect-ms) reconnect=$2; shift 2 ;;
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
append="console=ttyS0 panic=-1 loglevel=4 $extra_cmdline"
args=()
if [ "$kvm" = 1 ]; then
	args+=(-accel kvm -cpu host)
else
	args+=(-accel tcg -cpu max)
fi
args+=(-object "memory-backend-memfd,id=mem,size=$mem,share=on" -m "$mem" -smp "$smp")
if [ "$mmio" = 1 ]; then
	# microvm: virtio-mmio transports.  With ACPI (microvm default) QEMU
	# describes the used transports in the DSDT (the guest's virtio_mmio
	# binds via ACPI); with acpi=off it appends virtio_mmio.device=... to the
	# kernel command line.  virtio-mmio defaults to the legacy (v1) register
	# layout: force-legacy=off gives a modern (v2) transport so VERSION_1 is
	# negotiated exactly as on PCI.
	args+=(-machine "microvm,memory-backend=mem,rtc=on"
		-global virtio-mmio.force-legacy=off)
	# No HPET/PM timer on microvm: under TCG the PIT-based TSC calibration
	# often fails and the kernel then hangs early.  Tell it the TSC rate
	# (TCG's TSC runs at the host rate).
	khz=$(awk '/^cpu MHz/ { printf "%d", $4 * 1000; exit }' /proc/cpuinfo 2>/dev/null || true)
	[ "$kvm" = 1 ] || append="$append tsc_early_khz=${khz:-2000000}"
	devname=vhost-user-test-device
else
	args+=(-machine "q35,memory-backend=mem")
	devname=vhost-user-test-device-pci
fi
args+=(-nographic -no-reboot -nic none -kernel "$KERNEL" -initrd "$initrd" -append "$append")
if [ "$nodev" = 0 ]; then
	chr="socket,id=vr,path=$socket"
	[ -n "$reconnect" ] && chr="$chr,reconnect-ms=$reconnect"
	args+=(-chardev "$chr"
		-device "$devname,chardev=vr,virtio-id=7,num_vqs=2,vq_size=$vq_size")
fi
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
