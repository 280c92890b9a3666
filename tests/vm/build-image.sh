#!/usr/bin/env bash
# Build, once, the guest image of the real-OpenZFS test tier: a Debian 6.1 kernel
# (vmlinuz) and an uncompressed newc initramfs (base.cpio) with one OpenZFS line of
# Debian 12 (ZUA_VM_ZFS: 2.3, bookworm-backports, the default; or 2.1, bookworm's own),
# busybox, udev, python3.11 and an /init that runs /payload/run.sh and prints
# "ZFSVM-EXIT: <rc>". Also builds the guest's Python site directory (the agent's runtime
# dependencies, for Debian's python3.11).
#
# OpenZFS never gets installed on the build host: its packages are downloaded and unpacked
# into a staging tree, and DKMS builds zfs.ko there (its own source and DKMS trees), so
# both lines' images build on one host and the host's own ZFS, if any, plays no part.
# The modules (*.ko) are kept in the image directory (modules/) for build-rootfs.sh.
#
# Usage: tests/vm/build-image.sh        (as root, on Debian 12 x86_64)
# The last two lines on stdout are "ZUA_VM_IMAGE=<dir>" and "ZUA_VM_SITE=<dir>";
# progress and timings go to stderr, command logs to <cache root>/logs.
#
# Cache: ${ZUA_VM_CACHE:-/var/cache/zfs-unlock-agent-vm}/<KVER>_zfs-<version>_<script hash>,
# built beside it and renamed into place when complete. With a valid cache the script
# only verifies it (SHA256SUMS) and makes sure qemu, sfdisk and cpio are installed.
# Env: ZUA_VM_CACHE, ZUA_VM_KVER (kernel ABI; default: what linux-headers-amd64 points to),
# ZUA_VM_ZFS (2.3 or 2.1).
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
CACHE_ROOT=${ZUA_VM_CACHE:-/var/cache/zfs-unlock-agent-vm}
case ${ZUA_VM_ZFS:-2.3} in
2.3) SUITE=bookworm-backports ;;
2.1) SUITE=bookworm ;;
*)
    echo "build-image: ZUA_VM_ZFS must be 2.3 or 2.1, not ${ZUA_VM_ZFS}" >&2
    exit 64
    ;;
esac
GUEST_MODULES="virtio_pci virtio_blk virtio_net virtio_rng 9pnet_virtio 9p"
RUNTIME_PACKAGES=(qemu-system-x86 fdisk cpio)
export DEBIAN_FRONTEND=noninteractive

T_START=$(date +%s.%N)
say() { echo "build-image: $*" >&2; }
die() { say "ERROR: $*"; exit 1; }
elapsed() { awk -v a="$1" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }'; }
step() { # step NAME COMMAND...: run COMMAND, print how long it took
    local name=$1 t0
    shift
    t0=$(date +%s.%N)
    say "== $name"
    "$@"
    say "   $name: $(elapsed "$t0") s"
}
have_pkg() { [[ "$(dpkg-query -W -f='${Status}' "$1" 2>/dev/null)" == *"install ok installed"* ]]; }
apt_install() { # apt_install LOGNAME ARGS...: apt-get install, log kept, tail shown on failure
    local log=$LOGS/apt-$1.log
    shift
    apt-get install -y --no-install-recommends "$@" >"$log" 2>&1 || {
        tail -n 30 "$log" >&2
        die "apt-get install $* failed (log: $log)"
    }
}

[ "$(id -u)" = 0 ] || die "must run as root (apt, dkms)"
mkdir -p "$CACHE_ROOT/logs"
LOGS=$CACHE_ROOT/logs
exec 9>"$CACHE_ROOT/.lock"
flock 9 # one build at a time; a second caller waits, then finds the cache

# --- versions, hence the cache key -------------------------------------------

ensure_sources() {
    local policy
    policy=$(apt-cache policy zfs-dkms 2>/dev/null || true) # no "| grep -q": SIGPIPE + pipefail
    if [[ "$policy" == *" bookworm/contrib"* && "$policy" == *" bookworm-backports/contrib"* ]]; then
        return
    fi
    cat >/etc/apt/sources.list.d/zfs-unlock-agent-vm.sources <<EOF
# Added by zfs-unlock-agent tests/vm/build-image.sh: OpenZFS (contrib) from bookworm and
# bookworm-backports.
Types: deb
URIs: http://deb.debian.org/debian
Suites: bookworm bookworm-updates
Components: contrib
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: http://deb.debian.org/debian
Suites: bookworm-backports
Components: main contrib
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
    apt-get update >"$LOGS/apt-update.log" 2>&1 || die "apt-get update failed (log: $LOGS/apt-update.log)"
}

resolve_versions() {
    local depends madison line
    KVER=${ZUA_VM_KVER:-}
    if [ -z "$KVER" ]; then
        depends=$(apt-cache depends linux-headers-amd64 2>/dev/null || true)
        KVER=$(awk '/Depends: linux-headers-/ { sub("linux-headers-", "", $2); print $2; exit }' \
            <<<"$depends")
    fi
    [ -n "$KVER" ] || die "cannot tell the kernel ABI (apt-cache depends linux-headers-amd64)"
    madison=$(apt-cache madison zfs-dkms 2>/dev/null || true)
    ZVER=
    while IFS='|' read -r _ version source; do
        if [[ "$source" == *" $SUITE/"* ]]; then
            ZVER=${version// /}
            break
        fi
    done <<<"$madison"
    [ -n "$ZVER" ] || die "zfs-dkms is not available from $SUITE"
    line=$(sha256sum "${BASH_SOURCE[0]}")
    KEY="${KVER}_zfs-${ZVER}_${line:0:12}"
}

# --- the image ------------------------------------------------------------------

install_build_packages() {
    # The host: headers and what zfs-dkms needs to build; the libraries OpenZFS's own link
    # against. OpenZFS itself: its packages of $ZVER, unpacked into $STAGE.
    apt_install base "linux-headers-$KVER" "${RUNTIME_PACKAGES[@]}" busybox-static kmod \
        libcurl4 python3 udev dkms file libc6-dev lsb-release perl python3-distutils \
        libblkid1 libuuid1 libssl3 libudev1 zlib1g libtirpc3 age
    local packages=() depends package
    depends=$(apt-cache depends "zfsutils-linux=$ZVER" 2>/dev/null || true)
    # its libraries: libzfs4linux, libnvpair3linux... (the names change between lines)
    mapfile -t packages < <(awk '$1 == "Depends:" && $2 ~ /^lib.*linux$/ { print $2 }' <<<"$depends")
    packages+=(zfs-dkms zfsutils-linux)
    mkdir -p "$WORK/debs"
    (cd "$WORK/debs" && apt-get download "${packages[@]/%/=$ZVER}" >"$LOGS/apt-zfs.log" 2>&1) ||
        die "apt-get download ${packages[*]} (=$ZVER) failed (log: $LOGS/apt-zfs.log)"
    for package in "$WORK"/debs/*.deb; do
        dpkg-deb -x "$package" "$STAGE"
    done
    rm -rf "$WORK/debs"
}

build_modules() { # DKMS, as zfs-dkms's postinst runs it, on the staged source
    local zver_upstream=${ZVER%%-*} tree=$WORK/dkms built module
    mkdir -p "$tree"
    dkms add -m zfs -v "$zver_upstream" --sourcetree "$STAGE/usr/src" --dkmstree "$tree" \
        >"$LOGS/dkms.log" 2>&1 || die "dkms add failed (log: $LOGS/dkms.log)"
    dkms build -m zfs -v "$zver_upstream" -k "$KVER" --sourcetree "$STAGE/usr/src" \
        --dkmstree "$tree" >>"$LOGS/dkms.log" 2>&1 || {
        tail -n 30 "$LOGS/dkms.log" >&2
        die "dkms build failed (log: $LOGS/dkms.log)"
    }
    built=$tree/zfs/$zver_upstream/$KVER/x86_64/module
    MODDIR=$WORK/modules
    mkdir -p "$MODDIR"
    # 2.3 builds zfs.ko and spl.ko; 2.1 also icp.ko, zavl.ko, znvpair.ko... (zfs.ko needs them)
    for module in zfs spl; do
        [ -f "$built/$module.ko" ] || die "DKMS built no $module.ko in $built"
    done
    cp "$built"/*.ko "$MODDIR/"
    rm -rf "$tree" "$STAGE/usr/src"
}

fetch_kernel() {
    KPKG=$WORK/kpkg
    mkdir -p "$KPKG"
    (cd "$WORK" && apt-get download "linux-image-$KVER" >"$LOGS/apt-kernel.log" 2>&1) ||
        die "apt-get download linux-image-$KVER failed"
    dpkg-deb -x "$WORK"/linux-image-"$KVER"_*.deb "$KPKG"
    rm -f "$WORK"/linux-image-"$KVER"_*.deb
    cp "$KPKG/boot/vmlinuz-$KVER" "$WORK/vmlinuz"
}

image_path() { # where a host or staged file goes in the image: merged /usr, no $STAGE
    local path=${1#"$STAGE"}
    case $path in /lib/* | /lib64/* | /bin/* | /sbin/*) path=/usr$path ;; esac
    echo "$path"
}

staged() { # staged NAME DIR...: the staged file NAME in the first DIR that has it
    local name=$1 dir
    shift
    for dir in "$@"; do
        [ -e "$STAGE$dir/$name" ] && { echo "$STAGE$dir/$name"; return; }
    done
    die "OpenZFS $ZVER's packages have no $name (in $*)"
}

copy_with_libs() { # copy files, and the shared libraries of ELF ones, into $R (merged /usr)
    local file dest
    for file in "$@"; do
        [ -e "$file" ] || die "missing $file"
        dest=$(image_path "$file")
        mkdir -p "$R$(dirname "$dest")"
        cp -aL "$file" "$R$dest"
        copy_libs_of "$file"
    done
}

copy_libs_of() { # copy the shared libraries FILE needs into $R (FILE may be in $R already)
    local file=$1 lib dest libs
    # The staged libraries (libzfs...) before the host's
    libs=$(LD_LIBRARY_PATH=$STAGE/lib/x86_64-linux-gnu:$STAGE/usr/lib/x86_64-linux-gnu \
        ldd "$file" 2>/dev/null || true)
    [[ "$libs" != *"not found"* ]] || die "$file needs a library the host lacks: $libs"
    while read -r lib; do
        dest=$(image_path "$lib")
        [ -e "$R$dest" ] && continue
        mkdir -p "$R$(dirname "$dest")"
        cp -L "$lib" "$R$dest"
    done < <(awk '/=> \// { print $3 } /^\t\/lib/ { print $1 }' <<<"$libs")
}

add_busybox() {
    local applet
    cp /bin/busybox "$R/usr/bin/busybox"
    for applet in $("$R/usr/bin/busybox" --list-full); do
        applet=${applet/#bin\//usr\/bin\/}
        applet=${applet/#sbin\//usr\/sbin\/}
        mkdir -p "$R/$(dirname "$applet")"
        [ -e "$R/$applet" ] || ln -s /usr/bin/busybox "$R/$applet"
    done
}

add_modules() {
    local mroot=$R/usr/lib/modules/$KVER module path rel
    mkdir -p "$mroot/updates"
    cp "$MODDIR"/*.ko "$mroot/updates/"
    cp "$KPKG/lib/modules/$KVER"/modules.{order,builtin,builtin.modinfo} "$mroot/"
    depmod -b "$KPKG" "$KVER" # the deb ships no modules.dep
    for module in $GUEST_MODULES; do
        for path in $(modprobe -d "$KPKG" -S "$KVER" --show-depends "$module" |
            awk '$1 == "insmod" { print $2 }'); do
            rel=${path#*/lib/modules/"$KVER"/}
            mkdir -p "$mroot/$(dirname "$rel")"
            cp -L "$path" "$mroot/$rel"
        done
    done
    depmod -b "$R/usr" "$KVER"
}

add_userland() {
    local file
    # libzfs dlopen()s libcurl for keylocation=https://; pyudev finds libudev through
    # ldconfig's cache (ctypes.util.find_library), hence ldconfig and ld.so.cache.
    for file in zfs zpool zdb mount.zfs; do
        copy_with_libs "$(staged "$file" /usr/sbin /sbin)"
    done
    copy_with_libs /usr/lib/x86_64-linux-gnu/libcurl.so.4 /usr/lib/x86_64-linux-gnu/libudev.so.1 \
        /usr/sbin/ldconfig /usr/bin/udevadm /usr/lib/systemd/systemd-udevd
    # Debian's age: the recovery kit opens with it, by the agent or by hand
    copy_with_libs /usr/bin/age /usr/bin/age-keygen
    # udev: the host's rules and helpers, no hwdb, no OpenZFS's (a host may have its own
    # ZFS); then the staged OpenZFS's (60-zvol.rules and zvol_id make /dev/zvol/*)
    mkdir -p "$R/usr/lib/udev" "$R/etc/udev"
    tar -C /usr/lib/udev --exclude=./hwdb.d --exclude=./hwdb.bin --exclude='*zvol*' \
        --exclude='*vdev*' --exclude='*zfs*' -cf - . | tar -C "$R/usr/lib/udev" -xf -
    tar -C "$(dirname "$(staged rules.d/60-zvol.rules /usr/lib/udev /lib/udev)")/.." -cf - . |
        tar -C "$R/usr/lib/udev" -xf -
    # The helpers are in the image already (the staged zvol_id need not be on this host):
    # only their libraries are missing.
    for file in "$R"/usr/lib/udev/*; do
        if [ -f "$file" ] && [ "$(head -c 4 "$file")" = $'\x7fELF' ]; then
            copy_libs_of "$file"
        fi
    done
    echo 'udev_log=err' >"$R/etc/udev/udev.conf"
    # Debian's python3.11 and its standard library, without what tests never use; the
    # system libraries manylinux wheels may link (cryptography's Rust part: libgcc_s)
    copy_with_libs /usr/bin/python3.11
    for file in libgcc_s.so.1 libstdc++.so.6 libpthread.so.0 libdl.so.2 librt.so.1 libm.so.6 \
        libutil.so.1 libresolv.so.2; do
        copy_with_libs "/usr/lib/x86_64-linux-gnu/$file"
    done
    ln -s python3.11 "$R/usr/bin/python3"
    mkdir -p "$R/usr/lib/python3.11"
    tar -C /usr/lib/python3.11 --exclude=./test --exclude=./idlelib --exclude=./tkinter \
        --exclude=./turtledemo --exclude=./ensurepip --exclude=./lib2to3 \
        --exclude=./pydoc_data --exclude='./config-3.11-*' --exclude=./site-packages \
        --exclude=./dist-packages -cf - . | tar -C "$R/usr/lib/python3.11" -xf -
    copy_with_libs /usr/lib/python3.11/lib-dynload/*.so
    cp -a /etc/ssl "$R/etc/"
    mkdir -p "$R/usr/lib/ssl"
    cp -a /usr/lib/ssl/. "$R/usr/lib/ssl/"
}

add_etc() {
    local group
    echo 'root:x:0:0:root:/root:/bin/sh' >"$R/etc/passwd"
    for group in root:0 adm:4 tty:5 disk:6 lp:7 kmem:15 dialout:20 cdrom:24 floppy:25 \
        tape:26 audio:29 video:44 input:101 kvm:102 render:103 sgx:104; do
        echo "${group%%:*}:x:${group#*:}:" >>"$R/etc/group"
    done
    ln -s /proc/self/mounts "$R/etc/mtab"
    echo zfsvm >"$R/etc/hostname"
    printf '127.0.0.1 localhost\n' >"$R/etc/hosts"
    printf '/usr/lib/x86_64-linux-gnu\n' >"$R/etc/ld.so.conf"
    ldconfig -r "$R"
}

add_init() {
    cat >"$R/init" <<'EOF'
#!/bin/sh
# /init of the zfs-unlock-agent test guest (written by tests/vm/build-image.sh).
export PATH=/usr/sbin:/usr/bin HOME=/root
up() { cut -d' ' -f1 /proc/uptime; }
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mkdir -p /dev/pts /dev/shm
mount -t devpts devpts /dev/pts
mount -t tmpfs tmpfs /dev/shm
mount -t tmpfs tmpfs /run
echo "ZFSVM: init at $(up) s"
for m in virtio_pci virtio_blk virtio_net virtio_rng 9pnet_virtio 9p zfs; do
    modprobe "$m" || echo "ZFSVM: modprobe $m failed"
done
echo "ZFSVM: modules loaded at $(up) s"
[ -s /payload/machine-id ] && cp /payload/machine-id /etc/machine-id
if [ -x /usr/lib/systemd/systemd-udevd ]; then
    /usr/lib/systemd/systemd-udevd --daemon --resolve-names=never
    udevadm trigger --type=subsystems --action=add
    udevadm trigger --type=devices --action=add
    udevadm settle --timeout=60 || echo "ZFSVM: udevadm settle timed out"
    echo "ZFSVM: udev running at $(up) s"
fi
hostname zfsvm
ip link set lo up
if [ -e /sys/class/net/eth0 ]; then # QEMU user networking
    ip link set eth0 up
    ip addr add 10.0.2.15/24 dev eth0
    ip route add default via 10.0.2.2
fi
for tagfile in /sys/bus/virtio/drivers/9pnet_virtio/*/mount_tag; do
    [ -e "$tagfile" ] || continue
    tag=$(tr -d '\000' <"$tagfile")
    dir=/mnt/$tag
    [ "$tag" = hostshare ] && dir=/mnt/host
    mkdir -p "$dir"
    mount -t 9p -o trans=virtio,version=9p2000.L,msize=262144 "$tag" "$dir" ||
        echo "ZFSVM: mounting 9p share $tag failed"
done
rc=99
if [ -f /payload/run.sh ]; then
    sh /payload/run.sh </dev/console
    rc=$?
else
    echo "ZFSVM: no /payload/run.sh"
fi
echo "ZFSVM: payload done at $(up) s"
echo "ZFSVM-EXIT: $rc"
sync
poweroff -f
EOF
    chmod 755 "$R/init"
}

build_image() {
    WORK=$CACHE_ROOT/$KEY.partial
    R=$WORK/root
    STAGE=$WORK/stage # OpenZFS's packages, unpacked
    rm -rf "$WORK"
    mkdir -p "$R" "$STAGE"
    (cd "$R" && mkdir -p usr/bin usr/sbin usr/lib/x86_64-linux-gnu usr/lib64 dev proc sys run \
        tmp etc/zfs mnt/host payload var/tmp root &&
        ln -s usr/bin bin && ln -s usr/sbin sbin && ln -s usr/lib lib && ln -s usr/lib64 lib64)
    step "apt install (headers, qemu, busybox, udev); OpenZFS $ZVER's packages staged" \
        install_build_packages
    step "DKMS build of zfs.ko $ZVER for $KVER" build_modules
    step "fetch linux-image-$KVER" fetch_kernel
    step "assemble the initramfs" assemble
    (cd "$WORK" && sha256sum vmlinuz base.cpio modules/*.ko >SHA256SUMS)
    echo "KVER=$KVER ZFS=$ZVER built=$(date -Is)" >"$WORK/stamp"
    rm -rf "$R" "$KPKG" "$STAGE"
    rm -rf "${CACHE_ROOT:?}/$KEY"
    mv "$WORK" "$CACHE_ROOT/$KEY"
}

assemble() {
    add_busybox
    add_modules
    add_userland
    add_etc
    add_init
    (cd "$R" && find . -print0 | LC_ALL=C sort -z | cpio --null -o -H newc --quiet) >"$WORK/base.cpio"
}

# --- the guest's Python site directory (keyed on the requirement list) -------------

build_site() {
    local pip=$REPO/.venv/bin/pip
    [ -x "$pip" ] || die "$pip missing: run scripts/bootstrap.sh first"
    rm -rf "$SITE.partial"
    # pip --python: resolve and install for the guest's interpreter (Debian's 3.11)
    "$pip" --python /usr/bin/python3.11 install --quiet --disable-pip-version-check \
        --root-user-action=ignore --no-compile --target "$SITE.partial" "${REQUIREMENTS[@]}" \
        >"$LOGS/pip-site.log" 2>&1 || { tail -n 20 "$LOGS/pip-site.log" >&2; die "pip install failed"; }
    /usr/bin/python3.11 -m compileall -q "$SITE.partial" >/dev/null # the guest's share is read-only
    check_site_libraries "$SITE.partial"
    printf '%s\n' "${REQUIREMENTS[@]}" >"$SITE.partial/REQUIREMENTS"
    mv "$SITE.partial" "$SITE"
}

check_site_libraries() { # every shared library the site's extensions need is in the image
    local site=$1 listing lib missing=()
    listing=$(cpio -t --quiet <"$IMAGE/base.cpio")
    while read -r lib; do
        lib=${lib/#\/lib\//\/usr\/lib\/}
        [[ "$lib" == "$site"/* ]] || [[ $'\n'"$listing"$'\n' == *$'\n'"${lib#/}"$'\n'* ]] ||
            missing+=("$lib")
    done < <(find "$site" -name '*.so*' -type f -exec ldd {} + 2>/dev/null |
        awk '/=> \// { print $3 }' | sort -u)
    [ ${#missing[@]} -eq 0 ] || die "the guest image lacks ${missing[*]} (add it in add_userland)"
}

prune_stale() { # images of other keys (older scripts, kernels) unused for a day
    local dir
    for dir in "$CACHE_ROOT"/*_zfs-*; do
        if [ ! -d "$dir" ] || [ "$dir" = "$IMAGE" ]; then continue; fi
        [ -n "$(find "$dir/last-used" -mmin -1440 2>/dev/null)" ] && continue
        say "removing the stale image $dir"
        rm -rf "$dir"
    done
}

# --- main ----------------------------------------------------------------------------

ensure_sources
resolve_versions
IMAGE=$CACHE_ROOT/$KEY
mapfile -t REQUIREMENTS < <("$REPO/.venv/bin/python" -c 'import sys, tomllib
print("\n".join(sorted(tomllib.load(open(sys.argv[1], "rb"))["project"]["dependencies"])))' \
    "$REPO/pyproject.toml")
REQHASH=$(printf '%s\n' "${REQUIREMENTS[@]}" | sha256sum)
say "kernel $KVER, OpenZFS $ZVER, cache $IMAGE"

if [ -f "$IMAGE/SHA256SUMS" ]; then
    (cd "$IMAGE" && sha256sum --quiet -c SHA256SUMS) || die "$IMAGE is corrupt: remove it and rerun"
    missing=()
    for p in "${RUNTIME_PACKAGES[@]}"; do have_pkg "$p" || missing+=("$p"); done
    if [ ${#missing[@]} -gt 0 ]; then
        step "apt install ${missing[*]}" apt_install runtime "${missing[@]}"
    fi
    say "cached image verified"
else
    step "build the image from scratch" build_image
fi
touch "$IMAGE/last-used"
prune_stale
SITE=$IMAGE/site-${REQHASH:0:12}
if [ ! -f "$SITE/REQUIREMENTS" ]; then
    step "guest site directory (${REQUIREMENTS[*]})" build_site
fi
say "image: $(du -sh --apparent-size "$IMAGE/base.cpio" | cut -f1) base.cpio," \
    "$(du -sh --apparent-size "$IMAGE/vmlinuz" | cut -f1) vmlinuz," \
    "$(du -sh "$SITE" | cut -f1) site; total $(elapsed "$T_START") s"
echo "ZUA_VM_IMAGE=$IMAGE"
echo "ZUA_VM_SITE=$SITE"
