#!/usr/bin/env bash
# provision.sh - build everything needed to boot a Linux guest with the stock
# virtio rpmsg drivers against a vhost-user socket:
#
#   * QEMU 11.x from Debian sid, fetched through a PRIVATE apt tree (the host's
#     apt configuration is never touched) and run from an extracted root;
#   * a minimal guest kernel built from sid's linux-source-X.Y with
#     kernel.config merged on top of allnoconfig;
#   * a base initramfs (static busybox, rpmsg modules, /init, test programs).
#
# Idempotent: every step leaves a stamp with a hash of its inputs and is
# skipped when the stamp matches.  See README.md for the cache layout.
#
# Environment:
#   VHOST_RPMSG_CACHE         cache dir (default $HOME/.cache/vhost-rpmsg)
#   VHOST_RPMSG_JOBS          make -j (default: nproc)
#   VHOST_RPMSG_REFRESH=1     re-resolve sid (new QEMU / kernel versions)
#   VHOST_RPMSG_KERNEL_PKG    linux-source package (default: newest in sid)
#   VHOST_RPMSG_DEBIAN_MIRROR Debian archive URI (default: from host apt config)
#   VHOST_RPMSG_KEEP_BUILD=1  keep the kernel build tree ($CACHE/build)
#   VHOST_RPMSG_NO_HOST_DEPS=1  never apt-get install host build tools
#   VHOST_RPMSG_APT_INSECURE=1  accept an unsigned sid index (last resort)
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
CACHE=${VHOST_RPMSG_CACHE:-$HOME/.cache/vhost-rpmsg}
JOBS=${VHOST_RPMSG_JOBS:-$(nproc 2>/dev/null || echo 2)}
REFRESH=${VHOST_RPMSG_REFRESH:-0}
KEYRING=/usr/share/keyrings/debian-archive-keyring.gpg

T_START=$(date +%s)
log() { echo "[provision] $*"; }
die() { echo "[provision] ERROR: $*" >&2; exit 1; }
step_time() { echo "[provision] ... $1 took $(( $(date +%s) - $2 ))s"; }

mkdir -p "$CACHE"
CACHE=$(cd "$CACHE" && pwd)
log "cache: $CACHE"

# ---------------------------------------------------------------------------
# stamps: $CACHE/.stamps/NAME holds the hash of the step's inputs
# ---------------------------------------------------------------------------
mkdir -p "$CACHE/.stamps"
stamp_ok() { [ -f "$CACHE/.stamps/$1" ] && [ "$(cat "$CACHE/.stamps/$1")" = "$2" ]; }
stamp_set() { printf '%s\n' "$2" > "$CACHE/.stamps/$1"; }
stamp_get() { cat "$CACHE/.stamps/$1" 2>/dev/null || true; }
hash_of() { cat "$@" | sha256sum | cut -c1-16; }

# ---------------------------------------------------------------------------
# 0. host build tools (host apt sources are used as they are, never changed)
# ---------------------------------------------------------------------------
need_host_tools() {
	local missing=() c
	for c in gcc make flex bison bc cpio xz dpkg-deb apt-get sha256sum perl patch; do
		command -v "$c" >/dev/null 2>&1 || missing+=("$c")
	done
	[ -f /usr/include/libelf.h ] || missing+=(libelf.h)
	[ -f /usr/include/x86_64-linux-gnu/sys/cdefs.h ] || [ -f /usr/include/sys/cdefs.h ] || missing+=(libc-dev)
	command -v depmod >/dev/null 2>&1 || [ -x /sbin/depmod ] || missing+=(depmod)
	local tmp
	tmp=$(mktemp -d)
	gcc -static -x c -o "$tmp/a.out" - <<<'int main(void){return 0;}' >/dev/null 2>&1 || missing+=(libc.a)
	rm -rf "$tmp"
	printf '%s\n' "${missing[@]}"
}
missing=$(need_host_tools)
if [ -n "$missing" ]; then
	log "host tools missing: $(echo $missing)"
	[ "${VHOST_RPMSG_NO_HOST_DEPS:-0}" = 1 ] && die "install them (VHOST_RPMSG_NO_HOST_DEPS=1 set)"
	[ "$(id -u)" = 0 ] || die "not root: install gcc make flex bison bc cpio xz-utils libelf-dev libc6-dev kmod"
	pkgs="gcc make flex bison bc cpio xz-utils libelf-dev libc6-dev kmod perl patch"
	log "apt-get install $pkgs (host apt sources, unchanged)"
	mkdir -p "$CACHE/logs"
	if ! DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $pkgs \
		> "$CACHE/logs/host-apt.log" 2>&1; then
		log "apt-get install failed; running apt-get update and retrying"
		apt-get update -q >> "$CACHE/logs/host-apt.log" 2>&1
		DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $pkgs \
			>> "$CACHE/logs/host-apt.log" 2>&1 || { tail -n 20 "$CACHE/logs/host-apt.log" >&2; die "host apt-get install failed"; }
	fi
	missing=$(need_host_tools)
	[ -z "$missing" ] || die "still missing: $(echo $missing)"
fi
DEPMOD=$(command -v depmod || echo /sbin/depmod)

# ---------------------------------------------------------------------------
# 1. private apt tree for Debian sid
# ---------------------------------------------------------------------------
APT=$CACHE/apt

# Print the Debian archive URI used by the host (first enabled "deb" entry
# that is not the security archive), from one-line .list and deb822 .sources.
host_debian_uri() {
	local f
	{
		for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
			[ -f "$f" ] || continue
			# deb [opts] URI SUITE COMPONENTS...
			sed -e 's/#.*//' -e 's/\[[^]]*\]//' "$f" |
				awk '$1 == "deb" && NF >= 3 { print $2, $3 }'
		done
		for f in /etc/apt/sources.list.d/*.sources; do
			[ -f "$f" ] || continue
			awk 'BEGIN { RS = ""; FS = "\n" }
			{
				types = ""; uris = ""; suites = ""; enabled = "yes"
				for (i = 1; i <= NF; i++) {
					line = $i
					if (line ~ /^[ \t]*#/) continue
					k = line; sub(/:.*/, "", k); v = line; sub(/^[^:]*:[ \t]*/, "", v)
					k = tolower(k)
					if (k == "types") types = v
					else if (k == "uris") uris = v
					else if (k == "suites") suites = v
					else if (k == "enabled") enabled = tolower(v)
				}
				if (enabled == "no" || types !~ /(^|[ \t])deb([ \t]|$)/) next
				split(uris, u, /[ \t]+/); split(suites, s, /[ \t]+/)
				for (a in u) if (u[a] != "") for (b in s) if (s[b] != "") print u[a], s[b]
			}' "$f"
		done
	} | awk '$2 !~ /security/ && $1 !~ /security/ && $1 ~ /^(https?|file|cdrom|mirror\+[a-z]+):/ { print $1; exit }'
}

apt_opts() {
	echo "-o Dir::Etc::sourcelist=$APT/sources.list" \
		"-o Dir::Etc::sourceparts=$APT/sources.list.d" \
		"-o Dir::Etc::preferences=$APT/preferences" \
		"-o Dir::Etc::preferencesparts=$APT/preferences.d" \
		"-o Dir::State=$APT/state" \
		"-o Dir::State::Lists=$APT/lists" \
		"-o Dir::State::status=$APT/state/status" \
		"-o Dir::Cache=$APT/cache" \
		"-o Dir::Cache::pkgcache=" "-o Dir::Cache::srcpkgcache=" \
		"-o APT::Architecture=amd64" "-o APT::Architectures=amd64" \
		"-o APT::Install-Recommends=false" \
		"-o APT::Sandbox::User=root" \
		"-o Debug::NoLocking=1" \
		"-o Acquire::Languages=none" \
		"-o Acquire::IndexTargets::deb::Contents-deb::DefaultEnabled=false"
}
papt_get() { apt-get $(apt_opts) "$@"; }
papt_cache() { apt-cache $(apt_opts) "$@"; }

APT_READY=0
apt_prepare() {
	[ "$APT_READY" = 1 ] && return 0
	local mirror opts t0
	mirror=${VHOST_RPMSG_DEBIAN_MIRROR:-$(host_debian_uri)}
	[ -n "$mirror" ] || die "cannot find a Debian archive URI in the host apt config; set VHOST_RPMSG_DEBIAN_MIRROR"
	mkdir -p "$APT/lists/partial" "$APT/cache/archives/partial" "$APT/sources.list.d" \
		"$APT/preferences.d" "$APT/state"
	: > "$APT/state/status"
	: > "$APT/preferences"
	if [ "${VHOST_RPMSG_APT_INSECURE:-0}" = 1 ]; then
		opts="[arch=amd64 trusted=yes]"
	elif [ -f "$KEYRING" ]; then
		opts="[arch=amd64 signed-by=$KEYRING]"
	else
		die "$KEYRING missing (install debian-archive-keyring) or set VHOST_RPMSG_APT_INSECURE=1"
	fi
	echo "deb $opts $mirror sid main" > "$APT/sources.list"
	log "private apt tree: $APT (deb $mirror sid main)"
	t0=$(date +%s)
	if ! papt_get update -q > "$APT/update.log" 2>&1; then
		cat "$APT/update.log" >&2
		die "apt-get update of the private sid tree failed (signature? try VHOST_RPMSG_APT_INSECURE=1)"
	fi
	step_time "apt-get update (sid)" "$t0"
	APT_READY=1
}

# ---------------------------------------------------------------------------
# 2. QEMU from sid
# ---------------------------------------------------------------------------
QROOT=$CACHE/qemu-root
QEMU=$CACHE/bin/qemu-system-x86_64

write_qemu_wrapper() {
	mkdir -p "$CACHE/bin"
	cat > "$QEMU.tmp" <<'EOF'
#!/bin/sh
# Runs Debian sid's QEMU from the extracted root next to this bin/ directory,
# through that root's own dynamic loader and libraries (generated by
# qemu-configs/provision.sh).
ROOT=$(cd "$(dirname "$(readlink -f "$0")")/../qemu-root" && pwd)
exec "$ROOT/usr/lib64/ld-linux-x86-64.so.2" \
	--library-path "$ROOT/usr/lib/x86_64-linux-gnu:$ROOT/lib/x86_64-linux-gnu" \
	"$ROOT/usr/bin/qemu-system-x86_64" "$@"
EOF
	chmod +x "$QEMU.tmp"
	mv "$QEMU.tmp" "$QEMU"
}

provision_qemu() {
	local t0 want ver ldreal deb
	if [ "$REFRESH" != 1 ] && [ -n "$(stamp_get qemu)" ] && [ -x "$QROOT/usr/bin/qemu-system-x86_64" ]; then
		write_qemu_wrapper
		log "QEMU: cached ($(stamp_get qemu))"
		return 0
	fi
	apt_prepare
	want=$(papt_cache policy qemu-system-x86 | awk '/Candidate:/ { print $2 }')
	[ -n "$want" ] && [ "$want" != "(none)" ] || die "qemu-system-x86 not found in sid"
	if stamp_ok qemu "qemu-system-x86=$want" && [ -x "$QROOT/usr/bin/qemu-system-x86_64" ]; then
		write_qemu_wrapper
		log "QEMU: cached ($want)"
		return 0
	fi
	log "QEMU: downloading qemu-system-x86 $want and its dependency closure (sid)"
	t0=$(date +%s)
	rm -f "$APT/cache/archives"/*.deb
	papt_get install -q -y --download-only --no-install-recommends qemu-system-x86 \
		> "$APT/download-qemu.log" 2>&1 || { cat "$APT/download-qemu.log" >&2; die "download failed"; }
	step_time "QEMU download ($(ls "$APT/cache/archives"/*.deb | wc -l) debs, $(du -sh "$APT/cache/archives" | cut -f1))" "$t0"

	t0=$(date +%s)
	log "QEMU: extracting into $QROOT"
	rm -rf "$QROOT.new"
	mkdir -p "$QROOT.new"
	for deb in "$APT/cache/archives"/*.deb; do
		dpkg-deb -x "$deb" "$QROOT.new"
	done
	# QEMU locates its modules/firmware relative to /proc/self/exe, which is
	# the (resolved) dynamic loader we run it through: it looks for
	# <dir of real ld.so>/qemu-bundle/<configured path>.  Without this link it
	# falls back to the host's /usr/lib/.../qemu and /usr/share/qemu (and
	# aborts on a host QEMU's modules).  usr/lib64/ld-linux-x86-64.so.2 is a
	# symlink into usr/lib/x86_64-linux-gnu, so link both places.
	ln -sfn ../.. "$QROOT.new/usr/lib64/qemu-bundle"
	ldreal=$(readlink -f "$QROOT.new/usr/lib64/ld-linux-x86-64.so.2")
	ldreal=$(dirname "$ldreal")
	case "$ldreal" in
	"$QROOT.new/usr/lib/x86_64-linux-gnu") ln -sfn ../../.. "$ldreal/qemu-bundle" ;;
	"$QROOT.new/lib/x86_64-linux-gnu") ln -sfn ../.. "$ldreal/qemu-bundle" ;;
	"$QROOT.new/usr/lib64") ;;
	*) die "unexpected ld.so location $ldreal" ;;
	esac
	# not needed here: other system emulators, docs, translations
	rm -rf "$QROOT.new/usr/bin/qemu-system-i386" "$QROOT.new/usr/bin/qemu-system-x86_64-microvm" \
		"$QROOT.new/usr/share/doc" "$QROOT.new/usr/share/man" "$QROOT.new/usr/share/locale"
	rm -rf "$QROOT"
	mv "$QROOT.new" "$QROOT"
	write_qemu_wrapper
	ver=$("$QEMU" --version | head -n 1)
	case "$ver" in
	*"version 1"[1-9].*) ;;
	*) die "unexpected QEMU version: $ver" ;;
	esac
	"$QEMU" -device vhost-user-test-device-pci,help >/dev/null 2>&1 ||
		die "QEMU lacks vhost-user-test-device-pci"
	step_time "QEMU extract ($(du -sh "$QROOT" | cut -f1))" "$t0"
	rm -f "$APT/cache/archives"/*.deb
	stamp_set qemu "qemu-system-x86=$want"
	log "QEMU: $ver"
}

# ---------------------------------------------------------------------------
# 3. kernel
# ---------------------------------------------------------------------------
KFRAG=$HERE/kernel.config
BUILD=$CACHE/build

# newest linux-source-X.Y in sid
pick_kernel_pkg() {
	if [ -n "${VHOST_RPMSG_KERNEL_PKG:-}" ]; then
		echo "$VHOST_RPMSG_KERNEL_PKG"
		return
	fi
	papt_cache search --names-only '^linux-source-[0-9]+\.[0-9]+$' |
		awk '{ print $1 }' | sort -V | tail -n 1
}

# verify every CONFIG_ line of the fragment in the final .config
check_kconfig() {
	local cfg=$1 bad=0 line name
	while IFS= read -r line; do
		case "$line" in
		CONFIG_*=*) ;;
		"# CONFIG_"*" is not set") ;;
		*) continue ;;
		esac
		if [[ "$line" == "#"* ]]; then
			name=${line#\# }; name=${name%% *}
			if grep -q "^$name=" "$cfg"; then
				log "kconfig MISMATCH: want '$line', have '$(grep "^$name=" "$cfg")'"
				bad=1
			fi
		elif ! grep -qx -- "$line" "$cfg"; then
			name=${line%%=*}
			log "kconfig MISSING: want '$line', have '$(grep -E "^$name=|^# $name is not set" "$cfg" || echo absent)'"
			bad=1
		fi
	done < "$KFRAG"
	return $bad
}

provision_kernel() {
	local pkg ver key kdir t0 debdir src krel
	pkg=$(stamp_get kernel-pkg)
	if [ "$REFRESH" = 1 ] || [ -z "$pkg" ] || [ -n "${VHOST_RPMSG_KERNEL_PKG:-}" ]; then
		apt_prepare
		pkg=$(pick_kernel_pkg)
		[ -n "$pkg" ] || die "no linux-source-* package in sid"
		ver=$(papt_cache policy "$pkg" | awk '/Candidate:/ { print $2 }')
		[ -n "$ver" ] && [ "$ver" != "(none)" ] || die "$pkg has no candidate"
		pkg="$pkg=$ver"
	fi
	key="$pkg cfg=$(hash_of "$KFRAG") patches=$(hash_of "$HERE"/patches/*.patch)"
	krel=$(cat "$CACHE/kernel/release" 2>/dev/null || true)
	if stamp_ok kernel "$key" && [ -n "$krel" ] && [ -f "$CACHE/kernel/vmlinux" ]; then
		log "kernel: cached ($krel from $pkg)"
		return 0
	fi

	apt_prepare
	t0=$(date +%s)
	debdir=$CACHE/tmp-kdeb
	rm -rf "$debdir"
	mkdir -p "$debdir"
	log "kernel: downloading $pkg"
	(cd "$debdir" && papt_get download -q "$pkg" > download.log 2>&1) ||
		{ cat "$debdir/download.log" >&2; die "download of $pkg failed"; }
	step_time "kernel source download ($(du -sh "$debdir"/*.deb | cut -f1))" "$t0"

	t0=$(date +%s)
	rm -rf "$BUILD"
	mkdir -p "$BUILD"
	log "kernel: extracting source into $BUILD"
	dpkg-deb --fsys-tarfile "$debdir"/*.deb |
		tar -xO --wildcards './usr/src/linux-source-*.tar.xz' | tar -xJ -C "$BUILD"
	rm -rf "$debdir"
	src=$(ls -d "$BUILD"/linux-source-*)
	step_time "kernel source extract" "$t0"

	t0=$(date +%s)
	log "kernel: allnoconfig + $(basename "$KFRAG")"
	make -s -C "$src" allnoconfig > "$BUILD/config.log" 2>&1
	(cd "$src" && scripts/kconfig/merge_config.sh -m .config "$KFRAG") >> "$BUILD/config.log" 2>&1
	make -s -C "$src" olddefconfig >> "$BUILD/config.log" 2>&1
	check_kconfig "$src/.config" || die "kernel config check failed (see above)"
	log "kernel: config verified (all $(grep -c '^CONFIG_' "$KFRAG") fragment options set)"

	log "kernel: make -j$JOBS vmlinux modules (a few minutes; log: $BUILD/build.log)"
	if ! make -C "$src" -j"$JOBS" vmlinux modules > "$BUILD/build.log" 2>&1; then
		tail -n 40 "$BUILD/build.log" >&2
		die "kernel build failed"
	fi
	krel=$(make -s -C "$src" kernelrelease)
	step_time "kernel build ($krel)" "$t0"

	# The patched guest: the same kernel with qemu-configs/patches/ applied to its
	# rpmsg modules, built in the same tree (seconds), then the tree put back.
	local patched=$BUILD/patched
	mkdir -p "$patched"
	for p in "$HERE"/patches/*.patch; do
		log "kernel: patched modules: $(basename "$p")"
		patch -s -d "$src" -p1 < "$p" || die "$(basename "$p") does not apply to $pkg"
	done
	if ! make -C "$src" -j"$JOBS" M=drivers/rpmsg modules > "$BUILD/patched.log" 2>&1; then
		tail -n 40 "$BUILD/patched.log" >&2
		die "patched module build failed"
	fi
	cp "$src/drivers/rpmsg/virtio_rpmsg_bus.ko" "$patched/"
	local psum
	psum=$(sha256sum < "$patched/virtio_rpmsg_bus.ko")
	strip --strip-debug "$patched/virtio_rpmsg_bus.ko"
	for p in $(ls -r "$HERE"/patches/*.patch); do
		patch -s -R -d "$src" -p1 < "$p"
	done
	# the stock modules again, for modules_install below
	make -C "$src" -j"$JOBS" M=drivers/rpmsg modules >> "$BUILD/patched.log" 2>&1 ||
		die "stock rpmsg modules rebuild failed"
	[ "$(sha256sum < "$src/drivers/rpmsg/virtio_rpmsg_bus.ko")" != "$psum" ] ||
		die "the patched module is identical to the stock one"

	kdir=$CACHE/kernel-$krel
	rm -rf "$kdir.new"
	mkdir -p "$kdir.new"
	cp "$src/vmlinux" "$kdir.new/vmlinux"
	strip --strip-debug "$kdir.new/vmlinux" 2>/dev/null || true
	cp "$src/.config" "$kdir.new/config"
	cp "$src/System.map" "$kdir.new/System.map"
	cp -a "$patched" "$kdir.new/patched"
	make -s -C "$src" modules_install INSTALL_MOD_PATH="$kdir.new/modroot" \
		INSTALL_MOD_STRIP=1 DEPMOD="$DEPMOD" > "$BUILD/modules_install.log" 2>&1
	rm -f "$kdir.new/modroot/lib/modules/$krel/build" "$kdir.new/modroot/lib/modules/$krel/source"
	[ -f "$kdir.new/modroot/lib/modules/$krel/modules.dep" ] || log "warning: no modules.dep (depmod missing?)"
	# uAPI headers for the guest programs (same as headers_install, without
	# needing rsync)
	make -s -C "$src" headers > "$BUILD/headers.log" 2>&1
	mkdir -p "$kdir.new/headers"
	cp -a "$src/usr/include" "$kdir.new/headers/include"
	find "$kdir.new/headers/include" -name '.*' -type f -delete
	echo "$krel" > "$kdir.new/release"
	echo "$pkg" > "$kdir.new/source-package"
	rm -rf "$kdir"
	mv "$kdir.new" "$kdir"
	ln -sfn "kernel-$krel" "$CACHE/kernel"
	find "$CACHE" -mindepth 1 -maxdepth 1 -name 'kernel-*' ! -name "kernel-$krel" -exec rm -rf {} +
	if [ "${VHOST_RPMSG_KEEP_BUILD:-0}" != 1 ]; then
		rm -rf "$BUILD"
	fi
	stamp_set kernel-pkg "$pkg"
	stamp_set kernel "$key"
	log "kernel: $krel ready in $kdir"
}

# ---------------------------------------------------------------------------
# 4. guest programs (static, against the kernel's exported uAPI headers)
# ---------------------------------------------------------------------------
provision_guest_bin() {
	local key out p
	key="$(cat "$CACHE/kernel/release") $(hash_of "$HERE"/guest/*.c "$HERE"/guest/*.h)"
	out=$CACHE/guest-bin
	if stamp_ok guest-bin "$key" && [ -x "$out/rpmsg-ept" ]; then
		log "guest programs: cached"
		return 0
	fi
	rm -rf "$out"
	mkdir -p "$out"
	for p in "$HERE"/guest/*.c; do
		log "guest programs: gcc -static -O2 $(basename "$p")"
		gcc -static -O2 -Wall -Wextra -Werror -I "$CACHE/kernel/headers/include" \
			-o "$out/$(basename "$p" .c)" "$p" -lpthread
		strip "$out/$(basename "$p" .c)"
	done
	stamp_set guest-bin "$key"
}

# ---------------------------------------------------------------------------
# 5. busybox + base initramfs
# ---------------------------------------------------------------------------
provision_busybox() {
	local t0 d
	if [ -x "$CACHE/busybox/busybox" ] && [ "$REFRESH" != 1 ]; then
		log "busybox: cached ($(stamp_get busybox))"
		return 0
	fi
	apt_prepare
	t0=$(date +%s)
	d=$CACHE/tmp-bb
	rm -rf "$d"
	mkdir -p "$d"
	(cd "$d" && papt_get download -q busybox-static > download.log 2>&1) ||
		{ cat "$d/download.log" >&2; die "download of busybox-static failed"; }
	dpkg-deb -x "$d"/busybox-static_*.deb "$d/root"
	mkdir -p "$CACHE/busybox"
	cp "$d/root/bin/busybox" "$CACHE/busybox/busybox.new" 2>/dev/null ||
		cp "$d/root/usr/bin/busybox" "$CACHE/busybox/busybox.new"
	mv "$CACHE/busybox/busybox.new" "$CACHE/busybox/busybox"
	stamp_set busybox "busybox-static=$(dpkg-deb -f "$d"/busybox-static_*.deb Version)"
	rm -rf "$d"
	step_time "busybox-static download" "$t0"
}

provision_initramfs() {
	local key krel st a out
	krel=$(cat "$CACHE/kernel/release")
	key="$krel $(stamp_get busybox) $(stamp_get guest-bin) $(hash_of "$HERE/guest/init" "$HERE/provision.sh")"
	out=$CACHE/initramfs-base.cpio
	if stamp_ok initramfs "$key" && [ -f "$out" ]; then
		log "initramfs: cached ($out)"
		return 0
	fi
	st=$CACHE/tmp-initramfs
	rm -rf "$st"
	mkdir -p "$st"/{bin,dev,proc,sys,tmp,run,etc,root,lib,usr/bin}
	ln -s bin "$st/sbin"
	ln -s ../bin "$st/usr/sbin"
	cp "$CACHE/busybox/busybox" "$st/bin/busybox"
	for a in $("$CACHE/busybox/busybox" --list); do
		[ "$a" = busybox ] || [ -e "$st/bin/$a" ] || ln -s busybox "$st/bin/$a"
	done
	cp "$HERE/guest/init" "$st/init"
	chmod 755 "$st/init"
	cp "$CACHE"/guest-bin/* "$st/usr/bin/"
	cp -a "$CACHE/kernel/modroot/lib/modules" "$st/lib/"
	echo "root:x:0:0:root:/root:/bin/sh" > "$st/etc/passwd"
	echo "root:x:0:" > "$st/etc/group"
	if [ "$(id -u)" = 0 ]; then
		# lets the kernel give /init a console before devtmpfs is mounted
		mknod -m 600 "$st/dev/console" c 5 1
	fi
	(cd "$st" && find . -mindepth 1 | LC_ALL=C sort | cpio -o -H newc -R 0:0 --quiet) > "$out.new"
	mv "$out.new" "$out"
	rm -rf "$st"
	stamp_set initramfs "$key"
	log "initramfs: $out ($(du -h "$out" | cut -f1))"
}

write_env() {
	local krel
	krel=$(cat "$CACHE/kernel/release")
	cat > "$CACHE/env.sh.new" <<EOF
# generated by qemu-configs/provision.sh
export VHOST_RPMSG_CACHE="$CACHE"
export VR_QEMU="$QEMU"
export VR_KERNEL="$CACHE/kernel/vmlinux"
export VR_KERNEL_RELEASE="$krel"
export VR_INITRD_BASE="$CACHE/initramfs-base.cpio"
export VR_QEMU_VERSION="$("$QEMU" --version | head -n 1 | sed 's/.*version \([^ ]*\).*/\1/')"
EOF
	mv "$CACHE/env.sh.new" "$CACHE/env.sh"
}

# boot the guest once without a device: modules must load, VR-READY/VR-EXIT
smoke_test() {
	local key t0 out
	key="$(stamp_get qemu) $(stamp_get kernel) $(stamp_get initramfs) $(hash_of "$HERE/run-guest.sh")"
	if stamp_ok smoke "$key"; then
		log "smoke boot: cached (passed before)"
		return 0
	fi
	t0=$(date +%s)
	mkdir -p "$CACHE/logs"
	out=$CACHE/logs/smoke-boot.log
	log "smoke boot: run-guest.sh --no-device (TCG)"
	if ! VHOST_RPMSG_CACHE=$CACHE "$HERE/run-guest.sh" --no-device --timeout 120 \
		--append-cmd 'grep -q "^virtio_rpmsg_bus " /proc/modules && grep -q "^rpmsg_ns " /proc/modules' \
		> "$out" 2>&1; then
		cat "$out" >&2
		die "smoke boot failed (log: $out)"
	fi
	grep -q 'VR-READY ' "$out" || die "smoke boot: no VR-READY (log: $out)"
	log "smoke boot: $(tr -d '\r' < "$out" | grep -o 'VR-READY .*')"
	step_time "smoke boot" "$t0"
	stamp_set smoke "$key"
}

provision_qemu
provision_kernel
provision_guest_bin
provision_busybox
provision_initramfs
write_env
smoke_test
# the sid index is re-fetched whenever apt is needed again: drop it
rm -rf "$APT/lists" "$APT/cache"

log "QEMU:      $QEMU ($("$QEMU" --version | head -n 1))"
log "kernel:    $CACHE/kernel/vmlinux ($(cat "$CACHE/kernel/release"))"
log "initramfs: $CACHE/initramfs-base.cpio"
log "env:       $CACHE/env.sh"
log "cache size: $(du -sh "$CACHE" | cut -f1)"
log "done in $(( $(date +%s) - T_START ))s"
