#!/bin/sh
# /payload/run.sh of the demo's VM (booted by scripts/demo.py with tests/vm/vm.py's Guest).
# /init has mounted this checkout at /mnt/src and the agent's Python dependencies at
# /mnt/site (read-only), and the run's share at /mnt/host (settings.json in). Runs the
# demo's ZFS host steps (scripts/demo_zfs_host.py) with the agent installed as
# `zfs-unlock-agent`, and exits with their status ("ZFSVM-EXIT: <rc>" on the console).
set -u
export PYTHONPATH=/mnt/src:/mnt/site
export PYTHONPYCACHEPREFIX=/tmp/pycache # the checkout is read-only
mkdir -p /usr/local/bin
printf '#!/bin/sh\nexec python3 -m zfs_unlock_agent "$@"\n' >/usr/local/bin/zfs-unlock-agent
chmod 755 /usr/local/bin/zfs-unlock-agent
export PATH="/usr/local/bin:$PATH"
python3 /mnt/src/scripts/demo_zfs_host.py --settings /mnt/host/settings.json
