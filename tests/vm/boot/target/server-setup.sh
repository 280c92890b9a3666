#!/bin/sh
# The key server's set-up as the README's Install section gives it, on the booted target
# (report.py runs it with zua.server=1): the zfs-unlock-server package has made the system
# user, /var/lib/zfs-unlock-server and /etc/zfs-unlock-server; init is what is left. The
# unit itself is started by report.py.
set -eu
zfs-unlock-server init --master-key-out /etc/zfs-unlock-server/master-key
ls -la /var/lib/zfs-unlock-server /etc/zfs-unlock-server
