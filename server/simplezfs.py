"""Importing the keys of a SimpleZFSKeySystem database (the PHP/RedBean proof of concept).

Its table `key` (id, name, machine, pool, keyvalue, active) is read with the rights of
the admin who names the file; the keys are sealed and stored as legacy keys, found by
(host, pool GUID, name), which is how the opt-in SimpleZFSKeySystem route serves them.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from zfs_unlock_common import protocol, validate
from zfs_unlock_server.admin import Admin
from zfs_unlock_server.errors import Conflict, DataError
from zfs_unlock_server.sealing import KeyContext
from zfs_unlock_server.service import new_key_id
from zfs_unlock_server.store import KeyRecord


@dataclass(frozen=True)
class SimpleZfsRow:
    name: str
    machine: str
    pool: str
    keyvalue: bytes
    keyformat: str
    active: bool


def import_simplezfs(ops: Admin, path: Path, rows: Sequence[SimpleZfsRow] | None = None) -> int:
    """Import every key of a SimpleZFSKeySystem database, all or nothing. ROWS, when
    given, were read from PATH already (with the rights of the admin who named it)."""
    rows = read_simplezfs(path) if rows is None else rows
    sealer = ops.sealer()
    now = int(time.time())
    records: list[KeyRecord] = []
    missing = sorted({r.machine for r in rows} - {h.machine_id for h in ops.store.hosts()})
    if missing:
        raise DataError(
            "no host is enrolled for machine-id(s) "
            + ", ".join(missing)
            + "; add them first with 'zfs-unlock-server host add'"
        )
    for row in rows:
        host = ops.store.host_by_machine_id(row.machine)
        if host is None:  # removed since the check above
            raise DataError(f"no host is enrolled for machine-id {row.machine}")
        if ops.store.key_for_legacy_name(host.id, row.pool, row.name) is not None:
            raise Conflict(f"key {row.name!r} of pool {row.pool} was imported before")
        key_id = new_key_id()
        context = KeyContext(host.name, row.pool, "", row.name, key_id, row.keyformat)
        records.append(
            KeyRecord(
                key_id=key_id,
                host_id=host.id,
                host=host.name,
                pool_guid=row.pool,
                dataset_guid="",
                legacy_name=row.name,
                dataset=row.name,
                keyformat=row.keyformat,
                state="active" if row.active else "revoked",
                origin="imported",
                sealed=sealer.seal(row.keyvalue, context),
                created_at=now,
                updated_at=now,
            )
        )
    with ops.granting("import_simplezfs", keys=len(records), file=str(path)):
        for record in records:  # before the insert: a record that fails imports nothing
            ops.record(
                "key_imported",
                host=record.host,
                pool=record.pool_guid,
                legacy_name=record.legacy_name,
                key_id=record.key_id,
                keyformat=record.keyformat,
                origin="simplezfs",
                state=record.state,
            )
        ops.store.insert_keys(records)
    return len(records)


def read_simplezfs(path: Path) -> list[SimpleZfsRow]:
    """Read and validate the RedBean table `key` (name, machine, pool, keyvalue, active)."""
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    uri = path.resolve().as_uri() + "?mode=ro"
    try:
        db = sqlite3.connect(uri, uri=True)
        try:
            cursor = db.execute("SELECT name, machine, pool, keyvalue, active FROM key")
            raw_rows = cursor.fetchall()
        finally:
            db.close()
    except sqlite3.Error as exc:
        raise DataError(f"{path}: not a SimpleZFSKeySystem database ({exc})") from None
    rows = []
    for number, (name, machine, pool, keyvalue, active) in enumerate(raw_rows, start=1):
        where = f"{path}: row {number}"
        try:
            material = keyvalue.encode("utf-8") if isinstance(keyvalue, str) else bytes(keyvalue)
            keyformat = classify_key(material)
            rows.append(
                SimpleZfsRow(
                    name=validate.label(str(name), "name"),
                    machine=validate.machine_id(str(machine)),
                    pool=validate.guid(str(pool), "pool"),
                    keyvalue=material,
                    keyformat=keyformat,
                    active=str(active).strip().lower() in {"1", "true", "yes"},
                )
            )
        except (validate.InvalidInput, protocol.KeyMaterialError, TypeError) as exc:
            raise DataError(f"{where}: {exc}") from None
    return rows


def classify_key(material: bytes) -> str:
    """The keyformat a stored key must have been used with.

    The proof of concept stores 32 hex characters and its datasets use
    keyformat=raw, so 32 bytes of anything is raw; 64 hex digits is hex.
    """
    if len(material) == protocol.RAW_KEY_BYTES:
        return "raw"
    try:
        protocol.check_key_material(material, "hex")
        return "hex"
    except protocol.KeyMaterialError:
        protocol.check_key_material(material, "passphrase")
        return "passphrase"
