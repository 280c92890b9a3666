#!/bin/sh
# Install the zfs-unlock-agent initramfs integration for one initramfs tool.
#   initramfs/install.sh [--root DIR] initramfs-tools|dracut
# Then rebuild the initramfs (update-initramfs -u, or dracut --force).
set -eu

usage() {
	echo "usage: $0 [--root DIR] initramfs-tools|dracut" >&2
	exit 64
}

root=""
while [ $# -gt 0 ]; do
	case "$1" in
	--root)
		[ $# -ge 2 ] || usage
		root="$2"
		shift 2
		;;
	initramfs-tools | dracut)
		[ -z "${tool:-}" ] || usage
		tool="$1"
		shift
		;;
	*) usage ;;
	esac
done
[ -n "${tool:-}" ] || usage
[ -z "$root" ] || [ -d "$root" ] || {
	echo "$0: $root is not a directory" >&2
	exit 66
}

here="$(cd "$(dirname "$0")" && pwd)"
case "$tool" in
initramfs-tools)
	install -D -m 0755 "$here/initramfs-tools/hooks/zfs-unlock-agent" \
		"$root/etc/initramfs-tools/hooks/zfs-unlock-agent"
	install -D -m 0644 "$here/initramfs-tools/load-key.d/zfs-unlock-agent" \
		"$root/etc/zfs/initramfs-tools-load-key.d/zfs-unlock-agent"
	install -D -m 0644 "$here/initramfs-tools/conf.d/zfs-unlock-agent" \
		"$root/etc/initramfs-tools/conf.d/zfs-unlock-agent"
	;;
dracut)
	install -D -m 0755 "$here/dracut/90zfs-unlock-agent/module-setup.sh" \
		"$root/usr/lib/dracut/modules.d/90zfs-unlock-agent/module-setup.sh"
	install -D -m 0755 "$here/dracut/90zfs-unlock-agent/zfs-unlock-agent-load-key.sh" \
		"$root/usr/lib/dracut/modules.d/90zfs-unlock-agent/zfs-unlock-agent-load-key.sh"
	;;
esac
echo "installed the $tool integration into ${root:-/}; now rebuild the initramfs"
