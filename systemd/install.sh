#!/bin/sh
# Install and enable the systemd units of one role from this checkout:
#   agent   zfs-unlock-agent.service, and the zfs-load-key@.service drop-ins
#   server  zfs-unlock-server.service and its sysusers.d entry
# into ROOT (default /; an image or a chroot works the same, offline: enabling is
# the [Install] section's symlinks, made here rather than by systemctl).
set -eu

usage() {
    echo "usage: $0 [--root DIR] agent|server" >&2
    exit 64
}

here=$(cd "$(dirname "$0")" && pwd)
root=/
role=
while [ $# -gt 0 ]; do
    case $1 in
    --root)
        [ $# -ge 2 ] || usage
        root=$2
        shift 2
        ;;
    --root=*)
        root=${1#--root=}
        shift
        ;;
    -h | --help)
        echo "usage: $0 [--root DIR] agent|server"
        exit 0
        ;;
    agent | server)
        [ -z "$role" ] || usage
        role=$1
        shift
        ;;
    *) usage ;;
    esac
done
[ -n "$role" ] || usage
[ -n "$root" ] || usage
[ -d "$root" ] || {
    echo "$0: $root: no such directory" >&2
    exit 66
}
root=${root%/}
units=$root/etc/systemd/system

# The targets named by WantedBy= in FILE's [Install] section, one a line.
wanted_by() {
    sed -n '/^\[Install\]/,/^\[/s/^WantedBy=//p' "$1" | tr ' ' '\n' | sed '/^$/d'
}

# Install one unit file and make the symlinks 'systemctl enable' would.
install_unit() {
    name=$(basename "$1")
    [ -f "$1" ] || {
        echo "$0: $1: missing from this checkout" >&2
        exit 66
    }
    install -D -m 0644 "$1" "$units/$name"
    for target in $(wanted_by "$1"); do
        mkdir -p "$units/$target.wants"
        ln -sfn "/etc/systemd/system/$name" "$units/$target.wants/$name"
    done
    echo "installed and enabled $units/$name"
}

case $role in
server)
    install_unit "$here/zfs-unlock-server.service"
    # /etc: an admin's install, not a package's (that would be /usr/lib/sysusers.d).
    install -D -m 0644 "$here/sysusers.d/zfs-unlock-server.conf" \
        "$root/etc/sysusers.d/zfs-unlock-server.conf"
    echo "installed $root/etc/sysusers.d/zfs-unlock-server.conf"
    ;;
agent)
    install_unit "$here/zfs-unlock-agent.service"
    if [ -d "$here/zfs-load-key@.service.d" ]; then
        for conf in "$here"/zfs-load-key@.service.d/*.conf; do
            [ -f "$conf" ] || continue
            install -D -m 0644 "$conf" "$units/zfs-load-key@.service.d/$(basename "$conf")"
            echo "installed $units/zfs-load-key@.service.d/$(basename "$conf")"
        done
    fi
    ;;
esac
