#!/usr/bin/env bash
# Build, once, the Debian bookworm root trees of the boot-proof tier (tests/vm/test_boot.py):
# a real system (systemd, udev, systemd-networkd with DHCP, Debian's kernel, OpenZFS, the
# agent's and the server's dependencies from Debian, what their packages depend on) that the
# tier installs on an encrypted ZFS root and boots. Two trees, since their initramfs generators
# conflict:
#   initramfs-tools/  initramfs-tools + zfs-initramfs; also ifupdown (Debian's default
#                     /etc/network/interfaces) and NetworkManager: the installed root, of
#                     whose three network stacks each boot runs one (test_boot.py)
#   dracut/           dracut + dracut-network + zfs-dracut   (OpenZFS 2.3 only; its initramfs
#                     only: dracut-network would pick NetworkManager if the tree had it)
# Each also gets a baseline initramfs built without our integration; only its size is kept.
# ZUA_VM_ZFS picks the OpenZFS line, as for build-image.sh: 2.3 (bookworm-backports, the
# default) or 2.1 (bookworm's own).
#
# Usage: tests/vm/build-rootfs.sh        (as root, on Debian 12 x86_64)
# The last line on stdout is "ZUA_VM_ROOTFS=<dir>"; progress and timings go to stderr, command
# logs to <cache root>/logs.
#
# The kernel is the one build-image.sh uses (run first; cached), and so are its DKMS-built
# zfs.ko and spl.ko (the image's modules/): compiling them again in the chroot takes minutes.
# Cache: ${ZUA_VM_CACHE:-/var/cache/zfs-unlock-agent-vm}/rootfs_<KVER>_zfs-<version>_<script
# hash>, built beside it and renamed into place when complete (marker: COMPLETE).
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
CACHE_ROOT=${ZUA_VM_CACHE:-/var/cache/zfs-unlock-agent-vm}
MIRROR=http://deb.debian.org/debian
SECURITY=http://deb.debian.org/debian-security
BACKPORTS=bookworm-backports
case ${ZUA_VM_ZFS:-2.3} in
2.3)
    ZFS_SUITE=(-t "$BACKPORTS") # OpenZFS and its libraries all from backports
    TREES=(initramfs-tools dracut)
    ;;
2.1)
    ZFS_SUITE=() # bookworm's own, apt's default
    TREES=(initramfs-tools)
    ;;
*)
    echo "build-rootfs: ZUA_VM_ZFS must be 2.3 or 2.1, not ${ZUA_VM_ZFS}" >&2
    exit 64
    ;;
esac
export DEBIAN_FRONTEND=noninteractive LC_ALL=C.UTF-8

T_START=$(date +%s.%N)
say() { echo "build-rootfs: $*" >&2; }
die() {
    say "ERROR: $*"
    exit 1
}
elapsed() { awk -v a="$1" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }'; }
step() { # step NAME COMMAND...: run COMMAND, print how long it took
    local name=$1 t0
    shift
    t0=$(date +%s.%N)
    say "== $name"
    "$@"
    say "   $name: $(elapsed "$t0") s"
}
logged() { # logged LOGNAME COMMAND...: output to a log, its tail shown on failure
    local log=$LOGS/rootfs-$1.log
    shift
    "$@" >"$log" 2>&1 || {
        tail -n 40 "$log" >&2
        die "$* failed (log: $log)"
    }
}

[ "$(id -u)" = 0 ] || die "must run as root (debootstrap, chroot)"
mkdir -p "$CACHE_ROOT/logs"
LOGS=$CACHE_ROOT/logs

# --- the kernel and ZFS modules: build-image.sh's --------------------------------------

IMAGE_OUT=$(bash "$HERE/build-image.sh") || die "build-image.sh failed"
IMAGE=$(sed -n 's/^ZUA_VM_IMAGE=//p' <<<"$IMAGE_OUT")
[ -d "$IMAGE" ] || die "build-image.sh named no image"
IMAGE_NAME=$(basename "$IMAGE")
KVER=${IMAGE_NAME%%_zfs-*}
ZVER=${IMAGE_NAME#*_zfs-}
ZVER=${ZVER%_*}
MODDIR=$IMAGE/modules
for module in zfs spl; do
    [ -f "$MODDIR/$module.ko" ] ||
        die "$MODDIR/$module.ko is missing (remove $IMAGE and rerun build-image.sh)"
done
line=$(sha256sum "${BASH_SOURCE[0]}")
KEY="rootfs_${KVER}_zfs-${ZVER}_${line:0:12}"
DEST=$CACHE_ROOT/$KEY

exec 8>"$CACHE_ROOT/.rootfs.lock"
flock 8 # one build at a time; a second caller waits, then finds the cache

# --- chroot plumbing ------------------------------------------------------------------

MOUNTED=()
mount_api() { # the kernel file systems some maintainer scripts and the initramfs tools need
    local root=$1 dir
    for dir in proc sys dev dev/pts; do
        mkdir -p "$root/$dir"
        mount --bind "/$dir" "$root/$dir"
        MOUNTED=("$root/$dir" "${MOUNTED[@]}")
    done
}
umount_api() {
    local dir
    for dir in "${MOUNTED[@]}"; do
        umount -l "$dir" 2>/dev/null || true
    done
    MOUNTED=()
}
trap umount_api EXIT

in_root() { # in_root ROOT COMMAND...
    local root=$1
    shift
    chroot "$root" /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root \
        DEBIAN_FRONTEND=noninteractive LC_ALL=C.UTF-8 INITRD=No "$@"
}

apt_in() { # apt_in ROOT LOGNAME ARGS...: apt-get install in the tree, no recommends
    local root=$1 name=$2
    shift 2
    logged "$name" in_root "$root" apt-get install -y --no-install-recommends \
        -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold "$@"
}

# --- the common base ------------------------------------------------------------------

need_host_tools() {
    local missing=()
    command -v debootstrap >/dev/null || missing+=(debootstrap)
    command -v zstd >/dev/null || missing+=(zstd)
    if [ ${#missing[@]} -gt 0 ]; then
        logged apt-host apt-get install -y --no-install-recommends "${missing[@]}"
    fi
}

bootstrap() {
    logged debootstrap debootstrap --variant=minbase --components=main,contrib \
        --include=ca-certificates bookworm "$BASE" "$MIRROR"
}

configure_base() {
    # Trim documentation now and for every later package.
    cat >"$BASE/etc/dpkg/dpkg.cfg.d/01-zfs-unlock-agent-trim" <<'EOF'
path-exclude=/usr/share/doc/*
path-exclude=/usr/share/man/*
path-exclude=/usr/share/info/*
path-exclude=/usr/share/locale/*
path-include=/usr/share/locale/locale.alias
path-exclude=/usr/share/lintian/*
EOF
    trim "$BASE"
    cat >"$BASE/etc/apt/sources.list" <<EOF
deb $MIRROR bookworm main contrib
deb $MIRROR bookworm-updates main contrib
deb $SECURITY bookworm-security main contrib
deb $MIRROR $BACKPORTS main contrib
EOF
    # The mirror here serves snapshots whose Release files may have expired.
    printf 'Acquire::Check-Valid-Until "false";\nAcquire::Check-Date "false";\n' \
        >"$BASE/etc/apt/apt.conf.d/99zfs-unlock-agent-snapshot"
    printf '#!/bin/sh\nexit 101\n' >"$BASE/usr/sbin/policy-rc.d" # no services start in the chroot
    chmod 755 "$BASE/usr/sbin/policy-rc.d"
    cp /etc/resolv.conf "$BASE/etc/resolv.conf"
    mount_api "$BASE"
    logged apt-update in_root "$BASE" apt-get update
    apt_in "$BASE" base systemd systemd-sysv udev kmod iproute2 procps zstd \
        python3 python3-requests python3-cryptography python3-pyudev python3-sdnotify \
        python3-gunicorn age
    # OpenZFS $ZVER and its libraries, matching zfs.ko, which a local package provides
    # (zfs-modules): otherwise apt pulls in zfs-dkms and a compiler.
    modules_package "$BASE/tmp/zfs-modules-local.deb"
    apt_in "$BASE" zfs "${ZFS_SUITE[@]}" /tmp/zfs-modules-local.deb "zfsutils-linux=$ZVER" \
        "zfs-zed=$ZVER"
    rm "$BASE/tmp/zfs-modules-local.deb"
    umount_api
    echo zfsboot >"$BASE/etc/hostname"
    printf '127.0.0.1 localhost\n127.0.1.1 zfsboot\n' >"$BASE/etc/hosts"
    : >"$BASE/etc/fstab" # the root is ZFS, mounted by the initramfs
    mkdir -p "$BASE/etc/systemd/network"
    cat >"$BASE/etc/systemd/network/20-wired.network" <<'EOF'
[Match]
Name=en* eth*

[Network]
DHCP=yes
EOF
    in_root "$BASE" systemctl enable systemd-networkd.service systemd-networkd-wait-online.service \
        >"$LOGS/rootfs-enable.log" 2>&1 || die "systemctl enable failed"
    in_root "$BASE" passwd -d root >/dev/null # a console login, should anyone debug a boot
}

modules_package() { # a .deb of build-image.sh's DKMS-built modules that provides zfs-modules
    local deb=$1 pkg=$WORK/zfs-modules-local
    mkdir -p "$pkg/DEBIAN" "$pkg/lib/modules/$KVER/updates/dkms"
    cp "$MODDIR"/*.ko "$pkg/lib/modules/$KVER/updates/dkms/"
    cat >"$pkg/DEBIAN/control" <<EOF
Package: zfs-modules-local
Version: $ZVER
Architecture: amd64
Maintainer: zfs-unlock-agent tests <root@localhost>
Provides: zfs-modules (= $ZVER)
Description: OpenZFS kernel modules for $KVER, built by DKMS on the build host
EOF
    dpkg-deb --root-owner-group --build "$pkg" "$deb" >/dev/null
    rm -rf "$pkg"
}

trim() { # documentation, locales, caches: not needed to boot, and copied on every run
    local root=$1
    rm -rf "$root"/usr/share/doc/* "$root"/usr/share/man/* "$root"/usr/share/info/* \
        "$root"/usr/share/lintian/* "$root"/var/cache/apt/*.bin "$root"/var/cache/apt/archives/*.deb
    find "$root/usr/share/locale" -mindepth 1 -maxdepth 1 ! -name locale.alias \
        -exec rm -rf {} + 2>/dev/null || true
}

# --- the two variants -----------------------------------------------------------------

add_kernel() { # add_kernel ROOT LOGNAME GENERATOR-PACKAGES...
    local root=$1 name=$2 mdir
    shift 2
    mount_api "$root"
    # INITRD=No (in_root): the kernel's postinst hooks build no initramfs; we build it below.
    apt_in "$root" "$name-kernel" "linux-image-$KVER" "$@"
    mdir=$root/lib/modules/$KVER
    # Hardware a QEMU guest never has: drop it to keep the tree (copied every run) small.
    rm -rf "$mdir"/kernel/drivers/{gpu,media,net/wireless,infiniband,staging,iio,bluetooth} \
        "$mdir"/kernel/{sound,net/wireless,net/mac80211,net/bluetooth}
    [ -f "$mdir/updates/dkms/zfs.ko" ] || die "zfs.ko missing from $mdir"
    in_root "$root" depmod "$KVER"
    umount_api
}

baseline_initrd() { # baseline_initrd ROOT COMMAND...: build one without our hooks, keep its size
    local root=$1 initrd size
    shift
    initrd=$root/boot/initrd.img-$KVER
    rm -f "$initrd"
    mount_api "$root"
    logged "$(basename "$root")-baseline" in_root "$root" "$@"
    umount_api
    [ -s "$initrd" ] || die "no $initrd after: $*"
    size=$(stat -c %s "$initrd")
    echo "$size" >"$WORK/$(basename "$root").baseline-initrd-bytes"
    say "   baseline initramfs of $(basename "$root"): $size bytes"
    rm -f "$initrd"
}

finish_tree() {
    local root=$1
    rm -f "$root/usr/sbin/policy-rc.d" "$root/etc/resolv.conf"
    rm -rf "$root"/var/lib/apt/lists/* "$root"/tmp/* "$root"/var/tmp/*
    : >"$root/etc/machine-id" # each run writes the host's fixed one
    trim "$root"
}

network_stacks() { # ifupdown and NetworkManager beside systemd-networkd, each set up for DHCP
    local root=$1
    apt_in_mounted "$root" network ifupdown isc-dhcp-client network-manager
    # What Debian's installer writes for the primary interface (QEMU's virtio-net is ens2).
    cat >"$root/etc/network/interfaces" <<'END'
source /etc/network/interfaces.d/*

auto lo
iface lo inet loopback

allow-hotplug ens2
iface ens2 inet dhcp
END
    # NetworkManager: its own profile for ens2 (Debian's default ifupdown plugin would leave
    # an interface that /etc/network/interfaces lists unmanaged).
    printf '[main]\nplugins=keyfile\n' >"$root/etc/NetworkManager/conf.d/zua-keyfile-only.conf"
    cat >"$root/etc/NetworkManager/system-connections/ens2.nmconnection" <<'END'
[connection]
id=ens2
type=ethernet
interface-name=ens2
autoconnect=true

[ipv4]
method=auto

[ipv6]
method=ignore
END
    chmod 0600 "$root/etc/NetworkManager/system-connections/ens2.nmconnection"
}

initramfs_tools_tree() {
    local root=$WORK/initramfs-tools
    cp -a "$BASE" "$root"
    add_kernel "$root" initramfs-tools initramfs-tools
    apt_in_mounted "$root" initramfs-tools-zfs "${ZFS_SUITE[@]}" "zfs-initramfs=$ZVER"
    network_stacks "$root"
    baseline_initrd "$root" update-initramfs -c -k "$KVER"
    finish_tree "$root"
}

dracut_tree() {
    local root=$WORK/dracut
    cp -a "$BASE" "$root"
    # dracut-network picks systemd-networkd (the tree has it), whose dracut module needs dbus.
    add_kernel "$root" dracut dracut dracut-network isc-dhcp-client dbus
    apt_in_mounted "$root" dracut-zfs "${ZFS_SUITE[@]}" "zfs-dracut=$ZVER"
    baseline_initrd "$root" dracut --force --kver "$KVER" "/boot/initrd.img-$KVER"
    finish_tree "$root"
}

apt_in_mounted() {
    local root=$1
    shift
    mount_api "$root"
    apt_in "$root" "$@"
    umount_api
}

build() {
    WORK=$DEST.partial
    BASE=$WORK/base
    rm -rf "$WORK"
    mkdir -p "$WORK"
    step "host tools (debootstrap, zstd)" need_host_tools
    step "debootstrap bookworm (minbase)" bootstrap
    step "packages: systemd, udev, python3 and the agent's dependencies, OpenZFS $ZVER" \
        configure_base
    step "tree initramfs-tools: kernel $KVER, zfs-initramfs, baseline initramfs" initramfs_tools_tree
    if [[ " ${TREES[*]} " == *" dracut "* ]]; then
        step "tree dracut: kernel $KVER, dracut, zfs-dracut, baseline initramfs" dracut_tree
    fi
    rm -rf "$BASE"
    {
        echo "KVER=$KVER"
        echo "ZFS=$ZVER"
        echo "built=$(date -Is)"
        echo "seconds=$(elapsed "$T_START")"
    } >"$WORK/COMPLETE"
    rm -rf "$DEST"
    mv "$WORK" "$DEST"
}

prune_stale() { # trees of other keys unused for a day
    local dir
    for dir in "$CACHE_ROOT"/rootfs_*; do
        if [ ! -d "$dir" ] || [ "$dir" = "$DEST" ]; then continue; fi
        [ -n "$(find "$dir/last-used" -mmin -1440 2>/dev/null)" ] && continue
        say "removing the stale tree $dir"
        rm -rf "$dir"
    done
}

say "kernel $KVER, OpenZFS $ZVER, cache $DEST"
if [ -f "$DEST/COMPLETE" ]; then
    say "cached trees found"
else
    step "build the root trees from scratch" build
fi
touch "$DEST/last-used"
prune_stale
sizes=()
for tree in "${TREES[@]}"; do
    sizes+=("$(du -sh "$DEST/$tree" | cut -f1) $tree")
done
say "trees: ${sizes[*]}; total $(elapsed "$T_START") s"
echo "ZUA_VM_ROOTFS=$DEST"
