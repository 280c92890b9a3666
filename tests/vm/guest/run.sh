#!/bin/sh
# /payload/run.sh of the real-OpenZFS test guest (booted by tests/vm/vm.py).
# Mounted by /init: the checkout at /mnt/src and the agent's Python dependencies at
# /mnt/site (both read-only), the host's share at /mnt/host (agent configuration and
# credentials in, results.json out). Creates the pools, runs the scenarios, and exits
# with their status, which /init reports as "ZFSVM-EXIT: <rc>".
set -u
export PYTHONPATH=/mnt/src:/mnt/site
export PYTHONPYCACHEPREFIX=/tmp/pycache # the checkout is read-only; compile once per boot

config=/etc/zfs-unlock-agent
mkdir -p "$config"
cp /mnt/host/agent/agent.toml /mnt/host/agent/client.crt /mnt/host/agent/client.key "$config/" ||
    exit 90
chmod 0400 "$config/client.key"
echo "ZFSVM: machine-id $(cat /etc/machine-id); $(zfs version | tr '\n' ' ')"

# Partitions, not whole disks: see make_disk in tests/vm/vm.py.
zpool create -f -o cachefile=none tank /dev/vda1 || exit 91
zpool create -f -o cachefile=none tank2 /dev/vdb1 || exit 91

# The cases are modules of the package tests.vm.guest (cases/__init__.py lists them); the
# host's share may name those to run (/mnt/host/scenarios, one line), or else all run.
# shellcheck disable=SC2046 # names, one word each
python3 -m tests.vm.guest.runner --results /mnt/host/results.json $(cat /mnt/host/scenarios 2>/dev/null)
