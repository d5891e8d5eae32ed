#!/usr/bin/env bash
# debug-kernel.sh - an opt-in DEBUG variant of the test guest's kernel, and a way
# to boot it (docs/qemu.md, "Diagnosis from a debug kernel").
#
#   debug-kernel.sh build
#       Builds the kernel provision.sh built (same linux-source package, read from
#       $CACHE/kernel/source-package), with kernel.config + kernel-debug.config
#       (lockdep, might_sleep checks, hung-task/soft-lockup detectors, sysrq,
#       KALLSYMS_ALL), in its own output directory (make O=...).  The stock
#       kernel, its modules and initramfs-base.cpio are not touched.  Result:
#         $CACHE/debug-kernel/vmlinux, config, System.map, release (7.2.13-debug)
#         $CACHE/debug-kernel/modroot/lib/modules/<release>/   its own modules
#         $CACHE/debug-kernel/patched/virtio_rpmsg_bus.ko      with patches/
#         $CACHE/debug-kernel/initramfs.cpio  initramfs-base.cpio + those modules
#       Idempotent (stamps $CACHE/.stamps/debug-kernel, debug-initramfs: a new
#       initramfs-base.cpio only re-assembles the initramfs).  The build took
#       43 min niced on a busy 2-core host (the stock one: ~6.5 min idle).
#       Run provision.sh first.  The build runs under `nice -n 15`.
#
#   debug-kernel.sh run [--patched] [--monitor PATH] [run-guest.sh options...]
#       run-guest.sh with the debug kernel and initramfs, console loglevel 8 and
#       sysctl.kernel.hung_task_timeout_secs=5.  --patched: the debug build of the patched
#       virtio_rpmsg_bus.ko.  --monitor PATH: a QEMU HMP monitor on the unix
#       socket PATH, e.g. for a hung guest (see the next command):
#         sendkey alt-sysrq-t   all tasks' backtraces (sysrq-l: the CPU's)
#         info registers        RIP / RFL of the vCPU (look RIP up in System.map)
#         nmi                   with --cmdline unknown_nmi_panic the NMI panics and
#                               prints where the CPU was, even with IRQs off
#
#   debug-kernel.sh monitor PATH 'HMP COMMAND'...
#       sends each command to the monitor socket PATH, prints the replies
#
# Environment: VHOST_RPMSG_CACHE, VHOST_RPMSG_JOBS (as provision.sh),
# VHOST_RPMSG_KEEP_BUILD=1 keeps $CACHE/debug-kernel/build (source + O= tree,
# ~2 GB; later builds are then incremental), VHOST_RPMSG_KERNEL_SRC=DIR an
# unpacked, pristine linux-source tree to use instead of downloading it,
# VHOST_RPMSG_DEBIAN_MIRROR (default: the one provision.sh's apt tree uses).
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
CACHE=${VHOST_RPMSG_CACHE:-$HOME/.cache/vhost-rpmsg}
JOBS=${VHOST_RPMSG_JOBS:-$(nproc 2>/dev/null || echo 2)}
KEYRING=/usr/share/keyrings/debian-archive-keyring.gpg
DK=$CACHE/debug-kernel          # not "kernel-*": provision.sh prunes those
FRAGS=("$HERE/kernel.config" "$HERE/kernel-debug.config")

log() { echo "[debug-kernel] $*"; }
die() { echo "[debug-kernel] ERROR: $*" >&2; exit 1; }

# ---------------------------------------------------------------------------
# run
# ---------------------------------------------------------------------------
if [ "${1:-}" = run ]; then
	shift
	[ -f "$DK/vmlinux" ] && [ -f "$DK/initramfs.cpio" ] || die "no debug kernel: run $0 build"
	krel=$(cat "$DK/release")
	pre=()
	while [ $# -gt 0 ]; do
		case "$1" in
		--patched)
			pre+=(--add "$DK/patched/virtio_rpmsg_bus.ko:/lib/modules/$krel/kernel/drivers/rpmsg/virtio_rpmsg_bus.ko")
			shift ;;
		--monitor)
			pre+=(--qemu-arg -monitor --qemu-arg "unix:$2,server=on,wait=off")
			shift 2 ;;
		*) break ;;
		esac
	done
	VR_KERNEL=$DK/vmlinux VR_INITRD_BASE=$DK/initramfs.cpio \
		exec "$HERE/run-guest.sh" --cmdline "loglevel=8 sysrq_always_enabled sysctl.kernel.hung_task_timeout_secs=5" \
		"${pre[@]+"${pre[@]}"}" "$@"
fi
if [ "${1:-}" = monitor ]; then
	shift
	[ $# -ge 2 ] || die "usage: $0 monitor PATH 'HMP COMMAND'..."
	exec python3 - "$@" <<'EOF'
import socket, sys, time
s = socket.socket(socket.AF_UNIX)
s.connect(sys.argv[1])
s.settimeout(1.0)
for cmd in sys.argv[2:]:
    s.sendall(cmd.encode() + b"\n")
    time.sleep(1.0)
out = b""
try:
    while True:
        chunk = s.recv(65536)
        if not chunk:
            break
        out += chunk
except OSError:
    pass
import re
text = re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", out.decode(errors="replace"))
# the monitor echoes what it is sent keystroke by keystroke: keep its last state
sys.stdout.write("\n".join(l.split("\r")[-1] for l in text.split("\n")))
EOF
fi
[ "${1:-build}" = build ] || die "usage: $0 build | run [--patched] [--monitor PATH] [run-guest.sh options] | monitor PATH CMD..."

# ---------------------------------------------------------------------------
# build
# ---------------------------------------------------------------------------
[ -f "$CACHE/kernel/source-package" ] && [ -f "$CACHE/initramfs-base.cpio" ] ||
	die "run qemu-configs/provision.sh first"
pkg=$(cat "$CACHE/kernel/source-package")    # e.g. linux-source-7.2=7.2.13-1
# (the inputs of the build; not this script: editing run/monitor must not rebuild)
key="$pkg $(cat "${FRAGS[@]}" "$HERE"/patches/*.patch | sha256sum | cut -c1-16)"
ikey=$(sha256sum < "$CACHE/initramfs-base.cpio" | cut -c1-16)
mkdir -p "$CACHE/.stamps"
# the initramfs: the stock base (busybox, /init, programs) + a cpio with this
# kernel's modules; /init loads from /lib/modules/$(uname -r)
make_initramfs() {  # DIR
	cp "$CACHE/initramfs-base.cpio" "$1/initramfs.cpio.new"
	(cd "$1/modroot" && find . -mindepth 1 | LC_ALL=C sort | cpio -o -H newc -R 0:0 --quiet) >> "$1/initramfs.cpio.new"
	mv "$1/initramfs.cpio.new" "$1/initramfs.cpio"
}
if [ "$(cat "$CACHE/.stamps/debug-kernel" 2>/dev/null)" = "$key" ] && [ -f "$DK/vmlinux" ]; then
	if [ "$(cat "$CACHE/.stamps/debug-initramfs" 2>/dev/null)" != "$ikey" ] || [ ! -f "$DK/initramfs.cpio" ]; then
		make_initramfs "$DK"   # provision.sh rebuilt the base: the kernel stays
		printf '%s\n' "$ikey" > "$CACHE/.stamps/debug-initramfs"
		log "initramfs: rebuilt on the new initramfs-base.cpio"
	fi
	log "cached: $DK ($(cat "$DK/release"), from $pkg)"
	exit 0
fi
T0=$(date +%s)
B=$DK/build
mkdir -p "$B"

# --- the source: the same package provision.sh built from ---------------------
src=${VHOST_RPMSG_KERNEL_SRC:-}
if [ -z "$src" ]; then
	if [ "$(cat "$B/source-package" 2>/dev/null)" = "$pkg" ] && [ -f "$B"/src/linux-source-*/Makefile ]; then
		log "source: $pkg already unpacked in $B/src"
	else
		# a private apt tree of our own (never /etc/apt, nor provision.sh's)
		A=$B/apt
		mirror=${VHOST_RPMSG_DEBIAN_MIRROR:-$(awk '$1 == "deb" { for (i = 2; i <= NF; i++) if ($i ~ /^[a-z+]+:/) { print $i; exit } }' "$CACHE/apt/sources.list" 2>/dev/null || true)}
		mirror=${mirror:-http://deb.debian.org/debian}
		rm -rf "$A" "$B/src"
		mkdir -p "$A/lists/partial" "$A/cache/archives/partial" "$A/sources.list.d" "$A/preferences.d" "$A/state" "$B/src"
		: > "$A/state/status"
		: > "$A/preferences"
		echo "deb [arch=amd64 signed-by=$KEYRING] $mirror sid main" > "$A/sources.list"
		o=(-o "Dir::Etc::sourcelist=$A/sources.list" -o "Dir::Etc::sourceparts=$A/sources.list.d"
		   -o "Dir::Etc::preferences=$A/preferences" -o "Dir::Etc::preferencesparts=$A/preferences.d"
		   -o "Dir::State=$A/state" -o "Dir::State::Lists=$A/lists" -o "Dir::State::status=$A/state/status"
		   -o "Dir::Cache=$A/cache" -o "Dir::Cache::pkgcache=" -o "Dir::Cache::srcpkgcache="
		   -o APT::Architecture=amd64 -o APT::Architectures=amd64 -o APT::Sandbox::User=root
		   -o Debug::NoLocking=1 -o Acquire::Languages=none
		   -o Acquire::IndexTargets::deb::Contents-deb::DefaultEnabled=false)
		log "source: downloading $pkg (deb $mirror sid main)"
		apt-get "${o[@]}" update -q > "$B/apt.log" 2>&1 || { cat "$B/apt.log" >&2; die "apt-get update failed"; }
		(cd "$B" && apt-get "${o[@]}" download -q "$pkg" >> apt.log 2>&1) ||
			{ cat "$B/apt.log" >&2; die "download of $pkg failed (gone from sid? set VHOST_RPMSG_KERNEL_SRC)"; }
		log "source: extracting into $B/src"
		dpkg-deb --fsys-tarfile "$B"/linux-source-*.deb |
			tar -xO --wildcards './usr/src/linux-source-*.tar.xz' | nice -n 15 tar -xJ -C "$B/src"
		rm -rf "$A" "$B"/linux-source-*.deb
		echo "$pkg" > "$B/source-package"
	fi
	src=$(ls -d "$B"/src/linux-source-*)
fi
[ -f "$src/Makefile" ] || die "no kernel source in $src"
[ ! -f "$src/.config" ] || die "$src was configured in-tree: make O= needs a pristine tree"

# --- config: allnoconfig + both fragments, every line checked -----------------
out=$B/out
mkdir -p "$out"
mk() { nice -n 15 make -C "$src" O="$out" "$@"; }
log "config: allnoconfig + kernel.config + kernel-debug.config (O=$out)"
mk -s allnoconfig > "$B/config.log" 2>&1
(cd "$src" && scripts/kconfig/merge_config.sh -m -O "$out" "$out/.config" "${FRAGS[@]}") >> "$B/config.log" 2>&1
mk -s olddefconfig >> "$B/config.log" 2>&1
bad=0
for f in "${FRAGS[@]}"; do
	while IFS= read -r line; do
		case "$line" in CONFIG_*=*) ;; *) continue ;; esac
		if ! grep -qx -- "$line" "$out/.config"; then
			log "kconfig MISSING: want '$line', have '$(grep -E "^${line%%=*}=|^# ${line%%=*} is not set" "$out/.config" || echo absent)'"
			bad=1
		fi
	done < "$f"
done
[ "$bad" = 0 ] || die "kernel config check failed (see above)"

# --- build ---------------------------------------------------------------------
log "make -j$JOBS vmlinux modules under nice -n 15 (log: $B/build.log)"
if ! mk -j"$JOBS" vmlinux modules > "$B/build.log" 2>&1; then
	tail -n 40 "$B/build.log" >&2
	die "kernel build failed"
fi
krel=$(mk -s kernelrelease)
log "built $krel in $(( $(date +%s) - T0 ))s"

# the patched bus module: patches/ applied to a copy of drivers/rpmsg, built as an
# external module against this tree (the source tree itself stays pristine)
pd=$B/patched-rpmsg
rm -rf "$pd"
cp -a "$src/drivers/rpmsg" "$pd"
for p in "$HERE"/patches/*.patch; do
	patch -s -d "$pd" -p3 < "$p" || die "$(basename "$p") does not apply"
done
mk -j"$JOBS" M="$pd" modules > "$B/patched.log" 2>&1 || { tail -n 40 "$B/patched.log" >&2; die "patched module build failed"; }

new=$DK.new
rm -rf "$new"
mkdir -p "$new/patched"
cp "$out/vmlinux" "$out/System.map" "$new/"
cp "$out/.config" "$new/config"
cp "$pd/virtio_rpmsg_bus.ko" "$new/patched/"
strip --strip-debug "$new/patched/virtio_rpmsg_bus.ko"
mk -s modules_install INSTALL_MOD_PATH="$new/modroot" INSTALL_MOD_STRIP=1 \
	DEPMOD="$(command -v depmod || echo /sbin/depmod)" > "$B/modules_install.log" 2>&1
rm -f "$new/modroot/lib/modules/$krel/build" "$new/modroot/lib/modules/$krel/source"
echo "$krel" > "$new/release"
echo "$pkg" > "$new/source-package"
make_initramfs "$new"
if [ "${VHOST_RPMSG_KEEP_BUILD:-0}" = 1 ]; then
	mv "$B" "$new/build"
fi
rm -rf "$DK"
mv "$new" "$DK"

# --- smoke boot ------------------------------------------------------------------
log "smoke boot (no device)"
smoke=$DK/smoke-boot.log
"$0" run --no-device --timeout 180 --append-cmd 'grep -q "^virtio_rpmsg_bus " /proc/modules' \
	> "$smoke" 2>&1 || { tail -n 40 "$smoke" >&2; die "smoke boot failed (log: $smoke)"; }
grep -q "VR-READY kernel=$krel " "$smoke" || die "smoke boot: no VR-READY kernel=$krel (log: $smoke)"
log "smoke boot: $(tr -d '\r' < "$smoke" | grep -o 'VR-READY .*')"
printf '%s\n' "$key" > "$CACHE/.stamps/debug-kernel"
printf '%s\n' "$ikey" > "$CACHE/.stamps/debug-initramfs"
log "ready: $DK ($krel) in $(( $(date +%s) - T0 ))s"
