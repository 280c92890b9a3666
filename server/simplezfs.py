"""Importing the keys of a SimpleZFSKeySystem database (the PHP/RedBean proof of concept).

Its table `key` (id, name, machine, pool, keyvalue, active) is read with the rights of
the admin who names the file; the keys are sealed and stored as legacy keys, found by
(host, pool GUID, name), which is how the opt-in SimpleZFSKeySystem route serves them.

Two first-time GETs that race in the proof of concept each find no row and each insert
one, so a (machine, pool, name) can have several rows. Its keys.php looks a key up with
R::findOne('key', ' name = ? AND machine = ? AND pool = ? ', ...), which RedBean runs as
that WHERE clause plus LIMIT 1 and no ORDER BY: SQLite then walks the table (or an
index over these columns, whose equal entries are in rowid order too) in rowid order,
so the row it serves is the one with the lowest id. That row is imported; the others
are named, and --use-row picks one of them instead.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from zfs_unlock_common import protocol, validate
from zfs_unlock_server.admin import Admin, Change
from zfs_unlock_server.errors import Conflict, DataError
from zfs_unlock_server.sealing import KeyContext
from zfs_unlock_server.service import new_key_id
from zfs_unlock_server.store import KeyRecord


@dataclass(frozen=True)
class SimpleZfsRow:
    row_id: int  # the table's id (RedBean's INTEGER PRIMARY KEY, so the rowid)
    name: str
    machine: str
    pool: str
    keyvalue: bytes
    keyformat: str
    active: bool

    @property
    def lookup(self) -> tuple[str, str, str]:
        """What the proof of concept finds a key by."""
        return self.machine, self.pool, self.name


@dataclass(frozen=True)
class LeftOut:
    """A row not imported because another row has its (machine, pool, name)."""

    row: SimpleZfsRow
    imported: SimpleZfsRow  # the row imported in its place
    chosen: bool  # by --use-row, not because the proof of concept serves it

    def explain(self) -> str:
        machine, pool, name = self.row.lookup
        same = f"machine {machine}, pool {pool}, name {name}"
        if self.chosen:
            return (
                f"row {self.row.row_id} not imported: --use-row {self.imported.row_id}"
                f" imports row {self.imported.row_id} for {same}"
            )
        return (
            f"row {self.row.row_id} not imported: row {self.imported.row_id} has the same"
            f" {same} and is the one SimpleZFSKeySystem serves (the lowest id);"
            f" --use-row {self.row.row_id} imports row {self.row.row_id} instead"
        )


@dataclass(frozen=True)
class Selection:
    imported: tuple[SimpleZfsRow, ...]
    left_out: tuple[LeftOut, ...]


@dataclass(frozen=True)
class ImportResult:
    keys: int
    left_out: tuple[LeftOut, ...]


def select_rows(rows: Iterable[SimpleZfsRow], use_rows: Sequence[int] = ()) -> Selection:
    """One row per (machine, pool, name): the proof of concept's (the lowest id), or the
    one USE_ROWS names. A USE_ROWS id with no row, or two for one key, is a DataError."""
    by_lookup: dict[tuple[str, str, str], list[SimpleZfsRow]] = {}
    for row in sorted(rows, key=lambda r: r.row_id):
        by_lookup.setdefault(row.lookup, []).append(row)
    by_id = {row.row_id: row for group in by_lookup.values() for row in group}
    picked: dict[tuple[str, str, str], SimpleZfsRow] = {}
    for row_id in use_rows:
        if row_id not in by_id:
            raise DataError(f"--use-row {row_id}: the file has no row {row_id}")
        row = by_id[row_id]
        other = picked.setdefault(row.lookup, row)
        if other.row_id != row_id:
            raise DataError(
                f"--use-row: row {other.row_id} and row {row_id} are the same key"
                f" (machine {row.machine}, pool {row.pool}, name {row.name}); choose one"
            )
    imported: list[SimpleZfsRow] = []
    left_out: list[LeftOut] = []
    for lookup, group in by_lookup.items():
        winner = picked.get(lookup, group[0])
        imported.append(winner)
        chosen = winner is not group[0]
        left_out += [LeftOut(row, winner, chosen) for row in group if row is not winner]
    return Selection(tuple(imported), tuple(sorted(left_out, key=lambda x: x.row.row_id)))


def import_simplezfs(
    ops: Admin,
    path: Path,
    rows: Sequence[SimpleZfsRow] | None = None,
    use_rows: Sequence[int] = (),
) -> ImportResult:
    """Import one key per (machine, pool, name) of a SimpleZFSKeySystem database, all or
    nothing (select_rows says which row). ROWS, when given, were read from PATH already
    (with the rights of the admin who named it)."""
    rows = read_simplezfs(path) if rows is None else rows
    selection = select_rows(rows, use_rows)
    sealer = ops.sealer()
    now = int(time.time())
    missing = sorted({r.machine for r in rows} - {h.machine_id for h in ops.store.hosts()})
    if missing:
        raise DataError(
            "no host is enrolled for machine-id(s) "
            + ", ".join(missing)
            + "; add them first with 'zfs-unlock-server host add'"
        )
    imports: list[tuple[SimpleZfsRow, KeyRecord]] = []
    for row in selection.imported:
        host = ops.store.host_by_machine_id(row.machine)
        if host is None:  # removed since the check above
            raise DataError(f"no host is enrolled for machine-id {row.machine}")
        if ops.store.key_for_legacy_name(host.id, row.pool, row.name) is not None:
            raise Conflict(
                f"row {row.row_id}: key {row.name!r} of pool {row.pool} was imported before"
            )
        key_id = new_key_id()
        context = KeyContext(host.name, row.pool, "", row.name, key_id, row.keyformat)
        record = KeyRecord(
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
        imports.append((row, record))
    records = [record for _, record in imports]
    changes = [key_imported(row, record) for row, record in imports]
    left_out = ",".join(str(x.row.row_id) for x in selection.left_out) or None
    summary = {"keys": len(records), "rows_left_out": left_out, "file": str(path)}
    # Recorded first, like every change that grants access; the keys go in in one
    # transaction, and if it fails every record is marked failed.
    with ops.granting_all([*changes, Change("import_simplezfs", summary)]):
        ops.store.insert_keys(records)
    return ImportResult(len(records), selection.left_out)


def key_imported(row: SimpleZfsRow, record: KeyRecord) -> Change:
    return Change(
        "key_imported",
        {
            "host": record.host,
            "pool": record.pool_guid,
            "legacy_name": record.legacy_name,
            "key_id": record.key_id,
            "keyformat": record.keyformat,
            "origin": "simplezfs",
            "state": record.state,
            "row": row.row_id,
        },
    )


def read_simplezfs(path: Path) -> list[SimpleZfsRow]:
    """Check the file with PRAGMA integrity_check, then read and validate the RedBean
    table `key` (id, name, machine, pool, keyvalue, active), in id order."""
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    uri = path.resolve().as_uri() + "?mode=ro"
    try:
        db = sqlite3.connect(uri, uri=True)
        try:
            check_integrity(db, path)
            cursor = db.execute(
                "SELECT rowid, name, machine, pool, keyvalue, active FROM key ORDER BY rowid"
            )
            raw_rows = cursor.fetchall()
        finally:
            db.close()
    except sqlite3.DatabaseError as exc:
        if exc.sqlite_errorcode == sqlite3.SQLITE_CORRUPT:
            raise damaged(path, str(exc)) from None
        raise DataError(f"{path}: not a SimpleZFSKeySystem database ({exc})") from None
    except sqlite3.Error as exc:
        raise DataError(f"{path}: not a SimpleZFSKeySystem database ({exc})") from None
    rows = []
    for row_id, name, machine, pool, keyvalue, active in raw_rows:
        where = f"{path}: row {row_id}"
        try:
            material = keyvalue.encode("utf-8") if isinstance(keyvalue, str) else bytes(keyvalue)
            keyformat = classify_key(material)
            rows.append(
                SimpleZfsRow(
                    row_id=int(row_id),
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


def check_integrity(db: sqlite3.Connection, path: Path) -> None:
    """Refuse a damaged file: pages of the proof of concept's other tables (acl, machine,
    pool) can be destroyed while the key table still reads, and an import would then
    report success from a file nobody should trust."""
    report = [str(line) for (line,) in db.execute("PRAGMA integrity_check")]
    if report != ["ok"]:
        problems = [
            text
            for line in report
            for text in line.splitlines()
            if text.strip() and not text.startswith("*** in database")
        ]
        raise damaged(path, f"{problems[0]}; {len(problems)} problem(s)" if problems else "")


def damaged(path: Path, detail: str) -> DataError:
    return DataError(
        f"{path}: the database is damaged (PRAGMA integrity_check: {detail}); nothing was"
        " imported. Import from a backup of it, or from a copy that sqlite3's .recover made"
    )


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
