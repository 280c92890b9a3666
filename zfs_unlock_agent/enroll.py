"""Put a dataset under the key server's care without ever risking its data.

Order of operations, and what an interruption at each point leaves behind:

1. The server issues a *pending* key (repeating the request returns the same one).
   Interrupted: the dataset still opens with its old key.
2. `zfs change-key -o keylocation=prompt` re-wraps the dataset's data key with the
   server key. ZFS does this atomically. Interrupted before: old key; after: the
   pending server key, which the server releases to this host.
3. `zfs load-key -n` proves the server key opens the dataset.
4. The key is marked *active* on the server, and the dataset is marked managed.
   An unlock that opens a dataset with a pending key completes this step itself.

With create (`--create`), a dataset that does not exist is first created with a
throw-away random key (its GUID is needed to enroll), then moved to the server key
the same way; without it, a name that does not exist is refused, so that a typo
never makes a new dataset. If the machine restarts
between those two steps the new, empty dataset cannot be opened: destroy it
and enroll again.
"""

from __future__ import annotations

import contextlib
import os

from zfs_unlock_agent.errors import KeyAlreadyLoaded, UsageError, ZfsError, ZfsUnavailable
from zfs_unlock_agent.keyclient import KeyClient
from zfs_unlock_agent.log import log
from zfs_unlock_agent.secret import Secret
from zfs_unlock_agent.zfs import MANAGED_PROPERTIES, Dataset, Zfs
from zfs_unlock_common.protocol import DatasetRef

MIGRATABLE_LOCATIONS = ("file://", "https://", "http://")


def enroll(
    zfs: Zfs, client: KeyClient, machine_id: str, name: str, keyformat: str, create: bool = False
) -> str:
    """Enroll dataset NAME (with CREATE, creating it when absent); return what was done."""
    inventory = zfs.inventory()
    created = False
    if name not in inventory.datasets:
        if not create:
            raise ZfsUnavailable(
                f"{name}: no such dataset; check the name, or add --create to create it"
                " (encrypted, with a key from the server)"
            )
        _create(zfs, name)
        inventory = zfs.inventory()
        created = True
    dataset = inventory.get(name)
    if not dataset.encryption_root:
        raise UsageError(
            f"{name}: not encrypted; ZFS cannot encrypt an existing dataset in place"
            " (create a new encrypted one and copy the data with zfs send/receive)"
        )
    if not dataset.is_encryption_root:
        raise UsageError(
            f"{name}: its key is inherited from {dataset.encryption_root}; enroll that instead"
        )
    _ensure_key_loaded(zfs, dataset)
    ref = DatasetRef(inventory.pool_guid(dataset), dataset.guid)
    key = client.enroll(machine_id, ref, name, keyformat)
    try:
        if already_moved(zfs, dataset, key.secret, keyformat):
            log.info("%s: already uses the server key (resuming an interrupted enrollment)", name)
        else:
            zfs.change_key(name, key.secret, keyformat)
            log.info("%s: now wrapped with the server key %s", name, key.key_id)
        zfs.mark_managed(name)
        zfs.load_key(name, key.secret, dry_run=True)  # the proof
    finally:
        key.secret.wipe()
    client.activate(machine_id, ref, key.key_id)
    return f"{name}: {'created and ' if created else ''}enrolled with key {key.key_id}"


def _create(zfs: Zfs, name: str) -> None:
    with Secret(os.urandom(32)) as throwaway:
        zfs.create_encrypted(name, throwaway, "raw", MANAGED_PROPERTIES)
    log.info("%s: created (encrypted); moving it to a server key", name)


def _ensure_key_loaded(zfs: Zfs, dataset: Dataset) -> None:
    if dataset.keystatus == "available":
        return
    if dataset.keylocation.startswith(MIGRATABLE_LOCATIONS):
        with contextlib.suppress(KeyAlreadyLoaded):  # loaded meanwhile: all we need
            zfs.load_key_from_location(dataset.name)
        return
    if dataset.managed or dataset.keylocation == "prompt":
        hint = (
            f"load it first: 'zfs load-key {dataset.name}' with its passphrase, or, if an"
            f" earlier enrollment was interrupted, 'zfs-unlock-agent --dataset {dataset.name}'"
            " (the server's pending key opens it)"
        )
    else:
        hint = f"load it first: 'zfs load-key {dataset.name}'"
    raise UsageError(f"{dataset.name}: its key is not loaded; {hint}")


def already_moved(zfs: Zfs, dataset: Dataset, key: Secret, keyformat: str) -> bool:
    """True when an earlier, interrupted run (of enroll or rotate) already changed the key
    to this one."""
    if dataset.keylocation != "prompt" or dataset.keyformat != keyformat:
        return False
    try:
        zfs.load_key(dataset.name, key, dry_run=True)
    except ZfsError:
        return False
    return True
