#!/usr/bin/env bash
# Build, once, the clean Debian 12 (bookworm) tree of the package tier (tests/deb): a
# debootstrap --variant=minbase with apt pointed at Debian alone (bookworm,
# bookworm-updates and bookworm-security; main and contrib, where zfsutils-linux is).
# Nothing of this project is in it. apt's package lists stay, and the .deb files of
# the packages ours depend on are downloaded (not installed) into apt's archive cache,
# so that a test run installs without the network; apt still resolves every dependency
# itself from Debian's lists, and fetches what the cache lacks.
#
# Usage: tests/deb/build-tree.sh        (as root, on Debian)
# The last line on stdout is "ZUA_DEB_ROOT=<dir>"; progress and timings go to stderr,
# command logs to <cache root>/logs.
#
# Cache: ${ZUA_VM_CACHE:-/var/cache/zfs-unlock-agent-vm}/debroot_<script hash>, built
# beside it and renamed into place when complete (marker: COMPLETE). Delete it to get
# Debian's newest packages.
set -euo pipefail

CACHE_ROOT=${ZUA_VM_CACHE:-/var/cache/zfs-unlock-agent-vm}
MIRROR=http://deb.debian.org/debian
SECURITY=http://deb.debian.org/debian-security
SUITE=bookworm
# Warm-up only (downloaded, never installed): what debian/control names, and systemd,
# which apt picks for the server's sysusers dependency.
PREFETCH=(python3 python3-cryptography python3-gunicorn python3-pyudev python3-sdnotify
    zfsutils-linux systemd procps age)
export DEBIAN_FRONTEND=noninteractive LC_ALL=C.UTF-8

T_START=$(date +%s.%N)
say() { echo "build-tree: $*" >&2; }
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
    local log=$LOGS/debroot-$1.log
    shift
    "$@" >"$log" 2>&1 || {
        tail -n 40 "$log" >&2
        die "$* failed (log: $log)"
    }
}

[ "$(id -u)" = 0 ] || die "must run as root (debootstrap, chroot)"
mkdir -p "$CACHE_ROOT/logs"
LOGS=$CACHE_ROOT/logs
line=$(sha256sum "${BASH_SOURCE[0]}")
DEST=$CACHE_ROOT/debroot_${line:0:12}

exec 8>"$CACHE_ROOT/.debroot.lock"
flock 8 # one build at a time; a second caller waits, then finds the cache

in_root() { # in_root COMMAND...: in the tree being built, with a clean environment
    chroot "$ROOT" /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root \
        DEBIAN_FRONTEND=noninteractive LC_ALL=C.UTF-8 "$@"
}

need_debootstrap() {
    command -v debootstrap >/dev/null && return
    logged apt-host apt-get install -y --no-install-recommends debootstrap
}

bootstrap() {
    logged debootstrap debootstrap --variant=minbase --components=main,contrib \
        "$SUITE" "$ROOT" "$MIRROR"
}

configure() {
    cat >"$ROOT/etc/apt/sources.list" <<EOF
deb $MIRROR $SUITE main contrib
deb $MIRROR $SUITE-updates main contrib
deb $SECURITY $SUITE-security main contrib
EOF
    # No translations, lists kept compressed, recommends only when asked for.
    cat >"$ROOT/etc/apt/apt.conf.d/90zua-deb-tier" <<'EOF'
Acquire::Languages "none";
Acquire::GzipIndexes "true";
Acquire::CompressionTypes::Order:: "gz";
APT::Install-Recommends "false";
EOF
    # No documentation, manual pages or locales, now and from every later package.
    cat >"$ROOT/etc/dpkg/dpkg.cfg.d/01-zua-trim" <<'EOF'
path-exclude=/usr/share/doc/*
path-exclude=/usr/share/man/*
path-exclude=/usr/share/info/*
path-exclude=/usr/share/locale/*
path-exclude=/usr/share/lintian/*
EOF
    rm -rf "$ROOT"/usr/share/doc/* "$ROOT"/usr/share/man/* "$ROOT"/usr/share/info/* \
        "$ROOT"/usr/share/locale/*
    cp /etc/resolv.conf "$ROOT/etc/resolv.conf"
    rm -rf "$ROOT"/var/lib/apt/lists/* # debootstrap's, uncompressed
    logged apt-update in_root apt-get update
    logged apt-upgrade in_root apt-get -y dist-upgrade
    in_root apt-get clean # debootstrap's and the upgrade's .deb files
}

prefetch() {
    logged prefetch in_root apt-get install -y --download-only "${PREFETCH[@]}"
}

finish() {
    rm -f "$ROOT/etc/resolv.conf"
    rm -rf "$ROOT"/var/cache/apt/*.bin "$ROOT"/tmp/* "$ROOT"/var/tmp/* \
        "$ROOT"/var/cache/apt/archives/partial/*
    : >"$ROOT/etc/machine-id"
}

build() {
    local work=$DEST.partial
    ROOT=$work/root
    rm -rf "$work"
    mkdir -p "$work"
    step "host tool (debootstrap)" need_debootstrap
    step "debootstrap $SUITE (minbase)" bootstrap
    step "apt sources (Debian only), trimming, update and upgrade" configure
    step "download (not install) ${PREFETCH[*]} and their dependencies" prefetch
    finish
    {
        echo "suite=$SUITE"
        echo "built=$(date -Is)"
        echo "seconds=$(elapsed "$T_START")"
        echo "prefetched=$(find "$ROOT/var/cache/apt/archives" -name '*.deb' | wc -l)"
    } >"$work/COMPLETE"
    rm -rf "$DEST"
    mv "$work" "$DEST"
}

prune_stale() { # trees of other script versions unused for a day
    local dir
    for dir in "$CACHE_ROOT"/debroot_*; do
        if [ ! -d "$dir" ] || [ "$dir" = "$DEST" ]; then continue; fi
        [ -n "$(find "$dir/last-used" -mmin -1440 2>/dev/null)" ] && continue
        say "removing the stale tree $dir"
        rm -rf "$dir"
    done
}

say "cache $DEST"
if [ -f "$DEST/COMPLETE" ]; then
    say "cached tree found"
else
    step "build the tree from scratch" build
fi
touch "$DEST/last-used"
prune_stale
say "tree: $(du -sh "$DEST/root" | cut -f1); total $(elapsed "$T_START") s"
echo "ZUA_DEB_ROOT=$DEST/root"
