#!/bin/sh
# The one-time set-up that systemd/zfs-unlock-server.service's header asks for, on the booted
# target (report.py runs it with zua.server=1): its system user, a throw-away data directory
# and a master key kept outside it. The unit itself is started by report.py.
set -eu
systemd-sysusers zfs-unlock-server.conf
install -d -m 0700 -o zfs-unlock -g zfs-unlock /var/lib/zfs-unlock-server
install -d -m 0755 /etc/zfs-unlock-server
zfs-unlock-server --data-dir /var/lib/zfs-unlock-server init \
    --master-key-out /etc/zfs-unlock-server/master-key
ls -la /var/lib/zfs-unlock-server /etc/zfs-unlock-server
