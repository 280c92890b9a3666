#!/bin/sh
# /payload/run.sh of the install guest of the boot-proof tier (tests/vm/rootonzfs.py): the
# installer of the target machine, run in the minimal test guest with the TARGET's identity
# (its machine-id, /etc/hostid, agent.toml, client certificate and key; from /mnt/host).
# vda1 becomes rpool (the root), vdb1 tank, vdc1 usb (attached to the target only after it
# booted). Each encryption root is enrolled with the key server, so only the server (and
# whoever types the hex key) can open it. The root tree comes as a tar file on the 9p share.
# The altroot is /target, not /mnt: /mnt/host and /mnt/src are this guest's shares.
set -eu
export PYTHONPATH=/mnt/src:/mnt/site
export PYTHONPYCACHEPREFIX=/tmp/pycache # the checkout is read-only
share=/mnt/host
up() { cut -d' ' -f1 /proc/uptime; }
say() { echo "ZUAINSTALL: $* (at $(up) s)"; }
agent() { python3 -m zfs_unlock_agent "$@"; }

config=/etc/zfs-unlock-agent
mkdir -p "$config"
cp "$share/agent/agent.toml" "$share/agent/client.crt" "$share/agent/client.key" "$config/"
chmod 0400 "$config/client.key"
if [ -f "$share/agent/pins.json" ]; then # server pins the host learned
    mkdir -p /var/lib/zfs-unlock-agent
    cp "$share/agent/pins.json" /var/lib/zfs-unlock-agent/
fi
cp "$share/hostid" /etc/hostid # the target's: its pools must import there without -f
say "machine-id $(cat /etc/machine-id), $(zfs version | head -n1)"

# The root pool, as the OpenZFS root-on-ZFS guides lay it out: nothing mounts by
# default, one boot environment below an encryption root whose key the server keeps.
zpool create -f -o ashift=12 -o cachefile=none -R /target -O mountpoint=none \
    -O canmount=off -O compression=lz4 -O acltype=posixacl -O xattr=sa -O relatime=on \
    rpool /dev/vda1
agent enroll --dataset rpool/ROOT --keyformat hex --create
zfs set canmount=off rpool/ROOT
zfs create -o mountpoint=/ -o canmount=noauto rpool/ROOT/debian
zfs mount rpool/ROOT/debian
say "rpool/ROOT enrolled; unpacking the root tree"
tar -C /target -xf "$share/rootfs.tar"
say "root tree unpacked: $(df -k /target | awk 'NR == 2 { print $3 }') KiB used"
zpool set bootfs=rpool/ROOT/debian rpool

# A data pool the target's systemd unlocks, and one it meets only when hot-plugged.
for pool in tank usb; do
    case $pool in tank) disk=/dev/vdb1 cache=/etc/zfs/zpool.cache ;; usb) disk=/dev/vdc1 cache=none ;; esac
    zpool create -f -o ashift=12 -o cachefile=$cache -O compression=lz4 "$pool" "$disk"
    agent enroll --dataset "$pool/secure" --create
    echo "written at install time" >"/$pool/secure/marker"
done
say "tank/secure and usb/secure enrolled"

# The target imports rpool and tank at boot from its zpool.cache (zfs-import-cache.service,
# Debian's default), as the OpenZFS root-on-ZFS guides set it up; usb stays out of it.
zpool set cachefile=/etc/zfs/zpool.cache rpool
mkdir -p /target/etc/zfs
cp /etc/zfs/zpool.cache /target/etc/zfs/zpool.cache

# With the share's zfs-list-cache flag, the target also gets OpenZFS's mount-unit cache for
# rpool and tank, as OpenZFS's Debian root-on-ZFS guide sets it up (zed keeps it current;
# zfs-mount-generator makes units from it): zed's cacher's columns, the altroot dropped.
if [ -e "$share/zfs-list-cache" ]; then
    # A data dataset behind OpenZFS's own prompt (keylocation=prompt, a hex key), kept
    # with the stock units and without our drop-in: zfs-mount-generator makes its
    # zfs-load-key@ unit, whose question the password agent answers with the server's key.
    # Wanted by multi-user.target: with ifupdown the network comes after local-fs.target.
    agent enroll --dataset tank/typed --keyformat hex --create
    zfs set org.openzfs.systemd:ignore=off tank/typed
    zfs set org.openzfs.systemd:wanted-by=multi-user.target tank/typed
    echo "written at install time" >/tank/typed/marker
    rm /target/lib/systemd/system/zfs-load-key@.service.d/zfs-unlock-agent.conf
    say "tank/typed enrolled, left to OpenZFS's prompt"
    props=name,mountpoint,canmount,atime,relatime,devices,exec,readonly,setuid,nbmand
    props=$props,encroot,keylocation,org.openzfs.systemd:requires
    props=$props,org.openzfs.systemd:requires-mounts-for,org.openzfs.systemd:before
    props=$props,org.openzfs.systemd:after,org.openzfs.systemd:wanted-by
    props=$props,org.openzfs.systemd:required-by,org.openzfs.systemd:nofail
    props=$props,org.openzfs.systemd:ignore
    mkdir -p /target/etc/zfs/zfs-list.cache
    for pool in rpool tank; do
        zfs list -H -t filesystem -o "$props" -r "$pool" |
            awk 'BEGIN { FS = OFS = "\t" } { sub("^/target/?", "/", $2); print }' |
            sort >"/target/etc/zfs/zfs-list.cache/$pool"
    done
    say "zfs-list.cache: $(cat /target/etc/zfs/zfs-list.cache/* | cut -f1,2,11,20 | tr '\t\n' ' ;')"
fi

for root in rpool/ROOT tank/secure usb/secure tank/typed; do
    pool=${root%%/*}
    zfs list "$root" >/dev/null 2>&1 || continue
    echo "$root $(zpool get -Hp -o value guid "$pool") $(zfs get -Hp -o value guid "$root")" \
        "$(zfs get -H -o value keyformat,keylocation,zfs-unlock-agent:managed "$root" |
            tr '\n' ' ')"
done >"$share/install.txt"
cat "$share/install.txt"

zpool export usb
zpool export tank
zpool export rpool
say "pools exported"
