"""Is this the data directory's master key? Checked before anything is served or sealed.

A wrong master key (the credential of another installation, a decoy left in place of a
moved key) would otherwise start the server normally and answer every release with 403:
the mistake would show only at the first reboot of a host. init therefore seals a check value
under the master key into the database. A data directory made before that has none:
there the oldest sealed key is the proof, and once a master key has opened it, the
check value is stored so that the next check needs no key at all. A data directory
with neither has nothing sealed yet, so whichever master key it is first given is its.
"""

from __future__ import annotations

from zfs_unlock_server import masterring
from zfs_unlock_server.config import Layout
from zfs_unlock_server.errors import IntegrityError, WrongMasterKey
from zfs_unlock_server.sealing import (
    CREDENTIAL_NAME,
    DEFAULT_CREDENTIAL_FILE,
    MasterKeyCheck,
    Sealer,
)
from zfs_unlock_server.service import context_of
from zfs_unlock_server.store import Store

CHECK = MasterKeyCheck()
CHECK_VALUE = b"zfs-unlock-server master key check"


def seal_check(sealer: Sealer) -> bytes:
    return sealer.seal(CHECK_VALUE, CHECK)


def check_master_key(sealer: Sealer, store: Store, layout: Layout) -> None:
    """Raise WrongMasterKey (exit 78) unless SEALER opens what STORE holds sealed. SEALER
    learns the ring's keys it can open (a rotation's other key) on the way."""
    ring = masterring.refresh(sealer, store)
    sealed = store.master_key_check()
    if sealed is not None:
        try:
            opened = sealer.open(sealed, CHECK)
        except IntegrityError:
            opened = b""
        if opened != CHECK_VALUE:
            raise wrong_master_key(sealer, layout, "the check value that init stored")
        if ring is None:
            masterring.register(sealer, store)
        return
    first = store.first_sealed_key()
    if first is not None:
        try:
            sealer.open(first.sealed, context_of(first))
        except IntegrityError:
            raise wrong_master_key(
                sealer, layout, f"key {first.key_id}, the oldest (unless its row was changed)"
            ) from None
    store.set_master_key_check(seal_check(sealer))
    masterring.register(sealer, store)


def wrong_master_key(sealer: Sealer, layout: Layout, tried: str) -> WrongMasterKey:
    return WrongMasterKey(
        f"{sealer.source} is not the master key of {layout.root}: it does not open {tried}"
        f" ({layout.database}). Check which master key is given: the credential"
        f" {CREDENTIAL_NAME} ($CREDENTIALS_DIRECTORY/{CREDENTIAL_NAME}; the systemd unit loads"
        f" it from {DEFAULT_CREDENTIAL_FILE}) when there is one, else {layout.master_key}."
        " A master key replaced by 'master-key rotate' opens nothing once the rotation ends"
    )
