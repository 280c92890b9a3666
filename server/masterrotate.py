"""`master-key rotate`: a new master key, every sealed value re-sealed under it while serve
releases keys, and the old key retired once no value needs it.

Each step leaves a data directory that starts and releases every key, whichever of the two
keys the server is given, and a second run picks up where a killed one stopped:

1. publish: the ring (masterring.py) gets the new key as its sealing key and keeps the old
   one, each sealed under the other, in one write. From here on every process that holds
   either key learns the other from the database.
2. the new key replaces the old one in the file it was read from: the systemd credential,
   or the data directory's own file.
3. re-seal the check value, then each key not yet under the new one, in batches; a value
   changed meanwhile (deleted, revoked and enrolled again) is left to the next pass.
4. wait until every serving process has looked at the ring (idle workers look at least
   every request_timeout/2 s), so that none is left holding only the old key.
5. retire: the ring keeps the new key alone, in one transaction that first finds nothing
   sealed under any other; a value sealed by a node that had not yet seen the ring sends
   the rotation back to 3.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from zfs_unlock_server import atomicfile, masterring
from zfs_unlock_server.admin import Admin
from zfs_unlock_server.atomicout import AtomicOutput
from zfs_unlock_server.errors import Conflict, DataError
from zfs_unlock_server.masterkey import CHECK, CHECK_VALUE
from zfs_unlock_server.sealing import (
    MasterKeyWrap,
    Ring,
    Sealer,
    new_master_key,
    sealed_by,
)
from zfs_unlock_server.service import context_of

BATCH = 500  # keys re-sealed per transaction: short enough not to hold up a release
PASSES = 10  # re-seal passes before a retirement that keeps failing is given up


@dataclass(frozen=True)
class Report:
    old: str
    new: str
    resumed: bool
    resealed: int
    seconds: float


def rotate(
    ops: Admin,
    key_file: AtomicOutput | None,
    wait: float,
    say: Callable[[str], None],
) -> Report:
    """Rotate OPS' master key. KEY_FILE: where the credential goes (opened before the
    command gave up root); None writes the data directory's own file."""
    started = time.monotonic()
    sealer = ops.sealer()  # proved to be the directory's; holds the ring's keys
    ring = masterring.load(ops.store)
    if key_file is None and sealer.path is None:
        raise DataError("the master key was not read from a file, so none can be replaced")
    if ring is None:
        raise DataError("the database has no master key ring; run 'zfs-unlock-server migrate'")
    resumed = len(ring.wrapped) > 1
    if resumed:
        new = ring.sealing
        old = next(kid for kid in ring.wrapped if kid != new)
        say(f"resuming the rotation from master key {old} to {new}")
    else:
        old = ring.sealing
        new = _publish(ops, sealer, ring)
        say(f"new master key {new} published; re-sealing what master key {old} sealed")
    sealer.sealing_id = new
    where = _write_key_file(sealer, key_file)
    say(f"master key {new} written to {where}; the old one opens nothing once this ends")
    resealed = 0
    for _ in range(PASSES):
        resealed += _reseal(ops, sealer)
        say(f"re-sealed {resealed} value(s); waiting {wait:.0f} s for every server to follow")
        time.sleep(wait)
        resealed += _reseal(ops, sealer)
        current = ops.store.meta(Ring.META_NAME)
        if current is None:
            raise Conflict("the master key ring disappeared during the rotation")
        alone = Ring(new, {new: b""})
        if ops.store.retire_master_keys(current, alone):
            ops.record("master_key_retired", key_id=old, reason=f"replaced_by_{new}")
            sealer.forget(old)
            return Report(old, new, resumed, resealed, time.monotonic() - started)
    raise Conflict(
        f"master key {old} still seals values after {PASSES} passes; nothing is lost:"
        " run 'zfs-unlock-server master-key rotate' again"
    )


def settle_seconds(ops: Admin) -> float:
    """How long serving processes may take to look at the ring: idle gunicorn workers wake
    every request_timeout/2 s, and look at most every REFRESH_SECONDS."""
    return ops.config.request_timeout / 2 + 2 * masterring.REFRESH_SECONDS + 1


@dataclass(frozen=True)
class Status:
    ring: Ring | None
    values: dict[str, int]  # master key id (or "format 1") -> values sealed under it


def status(ops: Admin) -> Status:
    """The ring and what each key seals; needs no master key."""
    values: dict[str, int] = {}
    records = ops.store.keys()
    check = ops.store.master_key_check()
    for value in [*(r.sealed for r in records), *([check] if check is not None else [])]:
        kid = sealed_by(value) or "format 1"
        values[kid] = values.get(kid, 0) + 1
    return Status(masterring.load(ops.store), values)


def _publish(ops: Admin, sealer: Sealer, ring: Ring) -> str:
    old = ring.sealing
    old_material = sealer.material(old)
    material = new_master_key()
    new = sealer.add(material)
    published = Ring(
        new,
        {
            new: sealer.seal_under(old, material, MasterKeyWrap(new)),
            old: sealer.seal_under(new, old_material, MasterKeyWrap(old)),
        },
    )
    with ops.granting("master_key_rotation_started", key_id=new, reason=f"replaces_{old}"):
        if not ops.store.swap_meta(Ring.META_NAME, ring.encode(), published.encode()):
            raise Conflict("the master key ring changed meanwhile: is another rotation running?")
    return new


def _write_key_file(sealer: Sealer, key_file: AtomicOutput | None) -> str:
    """Put the sealing key where SEALER's own key came from; returns where that is."""
    material = sealer.material(sealer.sealing_id)
    if key_file is not None:
        key_file.write(material)
        key_file.commit()
        return str(key_file.path)
    if sealer.path is None:
        raise DataError("the master key was not read from a file, so none can be replaced")
    atomicfile.write_whole(sealer.path, material, mode=0o400, replace=True)
    return str(sealer.path)


def _reseal(ops: Admin, sealer: Sealer) -> int:
    """One pass: the check value, then every key not under the sealing key. Returns how
    many values were re-sealed."""
    done = 0
    check = ops.store.master_key_check()
    if check is not None and sealed_by(check) != sealer.sealing_id:
        if sealer.open(check, CHECK) != CHECK_VALUE:
            raise DataError("the master key check value does not open")
        done += ops.store.swap_meta("master_key_check", check, sealer.seal(CHECK_VALUE, CHECK))
    records = ops.store.keys()
    stale = [r for r in records if sealed_by(r.sealed) != sealer.sealing_id]
    for start in range(0, len(stale), BATCH):
        updates = []
        for record in stale[start : start + BATCH]:
            material = bytearray(sealer.open(record.sealed, context_of(record)))
            try:
                updates.append(
                    (record.key_id, record.sealed, sealer.seal(material, context_of(record)))
                )
            finally:
                material[:] = bytes(len(material))
        done += ops.store.replace_sealed(updates)
    return done
