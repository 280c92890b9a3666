#!/bin/sh
# Install and enable the systemd units of one role from this checkout:
#   agent   zfs-unlock-agent.service and .target, the password agent
#           (zfs-unlock-agent-password.path and .service), and the zfs-load-key@.service drop-ins
#   server  zfs-unlock-server.service, its sysusers.d entry, the daily backup
#           (zfs-unlock-server-backup.timer and .service, into /var/backups/zfs-unlock-server)
#           and the daily audit retention (zfs-unlock-server-audit-prune.timer and .service)
# into ROOT (default /; an image or a chroot works the same, offline: enabling is
# the [Install] section's symlinks, made here rather than by systemctl).
set -eu

usage() {
    echo "usage: $0 [--root DIR] [--bindir DIR] agent|server" >&2
    exit 64
}

here=$(cd "$(dirname "$0")" && pwd)
root=/
role=
bindir=
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
    --bindir)
        [ $# -ge 2 ] || usage
        bindir=$2
        shift 2
        ;;
    -h | --help)
        echo "usage: $0 [--root DIR] [--bindir DIR] agent|server"
        echo "  --bindir: where zfs-unlock-agent/-server are installed (default: found on PATH"
        echo "            when ROOT is /, else /usr/local/bin); the units' ExecStart uses it"
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

program=zfs-unlock-$role
if [ -z "$bindir" ]; then
    bindir=/usr/local/bin
    if [ "$root" = "" ] && found=$(command -v "$program"); then
        bindir=$(dirname "$found")
    fi
fi
case $bindir in
/*) ;;
*) usage ;;
esac
[ -x "$root$bindir/$program" ] ||
    echo "$0: warning: $root$bindir/$program is not there (yet); the unit will not start without it" >&2

# Install FILE as DEST with the program's real directory in its Exec lines.
install_with_bindir() {
    mkdir -p "$(dirname "$2")"
    sed "s#/usr/bin/zfs-unlock-#$bindir/zfs-unlock-#g" "$1" >"$2.tmp"
    chmod 0644 "$2.tmp"
    mv -f "$2.tmp" "$2"
}

# Install one unit file and make the symlinks 'systemctl enable' would.
install_unit() {
    name=$(basename "$1")
    [ -f "$1" ] || {
        echo "$0: $1: missing from this checkout" >&2
        exit 66
    }
    install_with_bindir "$1" "$units/$name"
    for target in $(wanted_by "$1"); do
        mkdir -p "$units/$target.wants"
        ln -sfn "/etc/systemd/system/$name" "$units/$target.wants/$name"
    done
    echo "installed and enabled $units/$name"
}

case $role in
server)
    install_unit "$here/zfs-unlock-server.service"
    install_unit "$here/zfs-unlock-server-backup.service"
    install_unit "$here/zfs-unlock-server-backup.timer"
    install_unit "$here/zfs-unlock-server-audit-prune.service"
    install_unit "$here/zfs-unlock-server-audit-prune.timer"
    # The backups' directory: the server user's (the backup service runs as it), once
    # systemd-sysusers has made that user.
    install -d -m 0700 "$root/var/backups/zfs-unlock-server"
    if [ -z "$root" ] && id zfs-unlock >/dev/null 2>&1; then
        chown zfs-unlock:zfs-unlock /var/backups/zfs-unlock-server
    else
        echo "$0: then: chown zfs-unlock:zfs-unlock $root/var/backups/zfs-unlock-server" >&2
    fi
    # /etc: an admin's install, not a package's (that would be /usr/lib/sysusers.d).
    install -D -m 0644 "$here/sysusers.d/zfs-unlock-server.conf" \
        "$root/etc/sysusers.d/zfs-unlock-server.conf"
    echo "installed $root/etc/sysusers.d/zfs-unlock-server.conf"
    ;;
agent)
    install_unit "$here/zfs-unlock-agent.service"
    install_unit "$here/zfs-unlock-agent.target"
    install_unit "$here/zfs-unlock-agent-password.path"
    install_unit "$here/zfs-unlock-agent-password.service"
    if [ -d "$here/zfs-load-key@.service.d" ]; then
        for conf in "$here"/zfs-load-key@.service.d/*.conf; do
            [ -f "$conf" ] || continue
            install_with_bindir "$conf" "$units/zfs-load-key@.service.d/$(basename "$conf")"
            echo "installed $units/zfs-load-key@.service.d/$(basename "$conf")"
        done
    fi
    ;;
esac
