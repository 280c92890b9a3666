"""Rotate a managed dataset's key without ever risking its data, as enrollment moves one.

Order of operations, and what an interruption at each point leaves behind:

1. The server makes the dataset's *next* key beside its active one (repeating the
   request returns the same one). Interrupted: the active key still opens the dataset.
2. `zfs change-key` re-wraps the dataset's data key with the next key (children that
   inherit the key follow; mounted datasets stay mounted). ZFS does this atomically.
   Interrupted after: the next key opens it; the server releases it beside the active
   key, and an unlock that finds the active key refused tries the next one.
3. `zfs load-key -n` proves the next key.
4. The server makes the next key active and retires the one before, which stays sealed
   for retired_key_grace_days. An unlock that opens a dataset with a next key completes
   this step itself.
"""

from __future__ import annotations

from zfs_unlock_agent.enroll import already_moved
from zfs_unlock_agent.errors import UsageError
from zfs_unlock_agent.keyclient import KeyClient
from zfs_unlock_agent.log import log
from zfs_unlock_agent.zfs import Dataset, Inventory, Zfs
from zfs_unlock_common.protocol import DatasetRef


def rotate(
    zfs: Zfs, client: KeyClient, machine_id: str, inventory: Inventory, root: Dataset
) -> str:
    """Rotate ROOT's key (an encryption root whose key is loaded); return what was done."""
    if root.keystatus != "available":
        raise UsageError(
            f"{root.name}: its key is not loaded; unlock it first ('zfs-unlock-agent --dataset"
            f" {root.name}'): zfs changes a key only while the current one is loaded"
        )
    ref = DatasetRef(inventory.pool_guid(root), root.guid)
    key = client.next_key(machine_id, ref)
    try:
        if key.keyformat != root.keyformat:
            raise UsageError(
                f"{root.name}: keyformat is {root.keyformat}, the server's key {key.keyformat}"
            )
        if already_moved(zfs, root, key.secret, key.keyformat):
            log.info("%s: already wrapped with key %s (resuming a rotation)", root.name, key.key_id)
        else:
            zfs.change_key(root.name, key.secret, key.keyformat)
            log.info("%s: now wrapped with the next key %s", root.name, key.key_id)
        zfs.load_key(root.name, key.secret, dry_run=True)  # the proof
    finally:
        key.secret.wipe()
    client.activate(machine_id, ref, key.key_id)
    return f"{root.name}: key rotated; {key.key_id} is now active"
