"""Take a backup of a data directory while it serves, and open one's keys to verify it.

The database is copied with SQLite's online backup API, in one step: one read
transaction, so the copy is a consistent snapshot even while workers release keys and
admins enroll, and no writer waits for it (WAL). The master key is never part of a
backup; the sealed keys in it open only under it.
"""

from __future__ import annotations

import contextlib
import datetime
import sqlite3
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509

from zfs_unlock_server import atomicfile, backupformat, masterring, pki, secretfile
from zfs_unlock_server import config as server_config
from zfs_unlock_server.admin import actor, server_pin
from zfs_unlock_server.audit import AuditLog, AuditRecord
from zfs_unlock_server.backupformat import Archive
from zfs_unlock_server.config import Layout
from zfs_unlock_server.errors import (
    CannotCreate,
    ConfigError,
    DataError,
    IntegrityError,
    NotYet,
    UsageError,
    WrongMasterKey,
)
from zfs_unlock_server.masterkey import CHECK, CHECK_VALUE
from zfs_unlock_server.sealing import KeyContext, Ring, Sealer


@dataclass(frozen=True)
class Written:
    path: Path
    archive: Archive
    size: int


def database_image(path: Path) -> bytes:
    """A consistent copy of the SQLite database PATH, as the bytes of a database file."""
    if not path.is_file():
        raise ConfigError(f"{path}: missing; is {path.parent} a data directory?")
    # mode=rw: never create an empty database where the real one is missing.
    source = sqlite3.connect(f"{path.resolve().as_uri()}?mode=rw", uri=True, timeout=10)
    copy = sqlite3.connect(":memory:")
    try:
        source.backup(copy)  # all pages in one step: one snapshot
        return copy.serialize()
    finally:
        copy.close()
        source.close()


@contextlib.contextmanager
def opened_image(image: bytes) -> Iterator[sqlite3.Connection]:
    """IMAGE as a database in memory, read-only."""
    # Bytes 18 and 19 of the header say WAL (2) for a copy of a WAL database; a database
    # in memory has no WAL file, so it reads the copy as a rollback-journal one (1).
    if image[18:20] == b"\x02\x02":
        image = image[:18] + b"\x01\x01" + image[20:]
    db = sqlite3.connect(":memory:")
    try:
        db.deserialize(image)
        db.execute("PRAGMA query_only=ON")
        yield db
    finally:
        db.close()


def counts(db: sqlite3.Connection) -> tuple[int, int]:
    """(hosts, keys)."""
    hosts = db.execute("SELECT count(*) FROM hosts").fetchone()[0]
    keys = db.execute("SELECT count(*) FROM keys").fetchone()[0]
    return int(hosts), int(keys)


def check_image(image: bytes, where: str) -> None:
    """Refuse a database that SQLite finds damaged (DataError, 65)."""
    try:
        with opened_image(image) as db:
            result = db.execute("PRAGMA quick_check").fetchone()[0]
            counts(db)
    except sqlite3.Error as exc:
        raise DataError(f"{where}: keys.db is not a usable database: {exc}") from None
    if result != "ok":
        raise DataError(f"{where}: keys.db is damaged: {result}")


def _server_name(cert_pem: bytes) -> str:
    cert = x509.load_pem_x509_certificate(cert_pem)
    try:
        names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        return ", ".join(str(getattr(n, "value", n)) for n in names)
    except x509.ExtensionNotFound:
        return cert.subject.rfc4514_string()


def snapshot(layout: Layout, created: int) -> tuple[Archive, bytes]:
    """The backup archive of the data directory LAYOUT, and its bytes."""
    if layout.next_ca_cert.exists():
        # The format holds one CA. Restored, it would refuse every host that renewed under
        # the next one (their old certificates end at the renewal's first use).
        raise NotYet(
            f"{layout.next_ca_cert} exists: a CA rollover is under way; finish it ('ca"
            " activate') and back up then: a backup without the next CA would lock out the"
            " hosts that renewed under it"
        )
    image = database_image(layout.database)
    members = {
        "keys.db": image,
        "ca.key": secretfile.read_private(layout.ca_key),
        "ca.crt": layout.ca_cert.read_bytes(),
        "server.key": secretfile.read_private(layout.server_key),
        "server.crt": layout.server_cert.read_bytes(),
        "server.toml": layout.config.read_bytes(),
    }
    pki.check_key_pair(members["server.crt"], members["server.key"])
    with opened_image(image) as db:
        hosts, keys = counts(db)
        schema = db.execute("PRAGMA user_version").fetchone()[0]
    facts = {
        "created": datetime.datetime.fromtimestamp(created, datetime.UTC).isoformat(),
        "server_name": _server_name(members["server.crt"]),
        "server_pin": server_pin(layout),
        "schema_version": schema,
        "hosts": hosts,
        "keys": keys,
    }
    return backupformat.build(facts, members, created)


def take(root: Path, out: Path, replace: bool = False) -> Written:
    """Write a backup of the data directory ROOT to OUT, recorded in its audit log
    before the file appears (a backup holds the CA key: who took one is on record)."""
    if not replace and (out.exists() or out.is_symlink()):
        raise CannotCreate(f"{out} exists; refusing to overwrite it (--force replaces it)")
    layout = Layout(root)
    config = server_config.load(layout)
    if config.database.shared:
        raise UsageError(
            f"{layout.config} keeps hosts, keys and the audit trail in PostgreSQL; back that up"
            " with PostgreSQL's own tools (pg_dump, or pg_basebackup with WAL archiving) and"
            " the data directory's files apart (docs/high-availability.md)"
        )
    archive, data = snapshot(layout, int(time.time()))
    audit = AuditLog(server_config.audit_path(layout, config))
    record: AuditRecord = {
        "event": "backup",
        "actor": actor(),
        "file": str(out),
        "hosts": archive.manifest["hosts"],
        "keys": archive.manifest["keys"],
        "checksum": archive.checksum,
    }
    try:
        audit.write({**record, "decision": "allow"})
        try:
            atomicfile.write_whole(out, data, 0o600, replace)
        except BaseException as exc:
            with contextlib.suppress(Exception):
                audit.write({**record, "decision": "failed", "reason": type(exc).__name__})
            raise
    finally:
        audit.close()
    return Written(out, archive, len(data))


def open_keys(archive: Archive, sealer: Sealer, where: str) -> dict[str, int]:
    """Open every sealed key of ARCHIVE in memory; the number opened per host. A master key
    that is not the backup's: WrongMasterKey (78); a key that does not open: DataError."""
    opened: dict[str, int] = {}
    with opened_image(archive.members["keys.db"]) as db:
        check_sealer(db, sealer, where)
        rows = db.execute(
            "SELECT h.name, k.pool_guid, k.dataset_guid, k.legacy_name, k.key_id,"
            " k.keyformat, k.sealed FROM keys k JOIN hosts h ON h.id = k.host_id"
            " ORDER BY h.name, k.rowid"
        )
        for host, pool, dataset_guid, legacy, key_id, keyformat, sealed in rows:
            context = KeyContext(host, pool, dataset_guid, legacy, key_id, keyformat)
            try:
                material = bytearray(sealer.open(bytes(sealed), context))
            except IntegrityError:
                raise DataError(f"{where}: key {key_id} of host {host} does not open") from None
            material[:] = bytes(len(material))  # counted, not kept
            opened[host] = opened.get(host, 0) + 1
        for (host,) in db.execute("SELECT name FROM hosts ORDER BY name"):
            opened.setdefault(host, 0)
    return dict(sorted(opened.items()))


def check_sealer(db: sqlite3.Connection, sealer: Sealer, where: str) -> None:
    """As masterkey.check_master_key, on a backup's database: its check value, else its
    oldest key; one with neither has nothing sealed, so any master key is its. A backup
    made during a master key rotation opens under either key: SEALER learns the other."""
    ring = db.execute("SELECT value FROM meta WHERE name = ?", (Ring.META_NAME,)).fetchone()
    if ring is not None:
        masterring.learn(sealer, Ring.decode(bytes(ring[0])))
    row = db.execute("SELECT value FROM meta WHERE name = 'master_key_check'").fetchone()
    if row is not None:
        try:
            ok = sealer.open(bytes(row[0]), CHECK) == CHECK_VALUE
        except IntegrityError:
            ok = False
        if not ok:
            raise _wrong(sealer, where, "the check value that init sealed into its database")
        return
    oldest = db.execute(
        "SELECT h.name, k.pool_guid, k.dataset_guid, k.legacy_name, k.key_id, k.keyformat,"
        " k.sealed FROM keys k JOIN hosts h ON h.id = k.host_id ORDER BY k.rowid LIMIT 1"
    ).fetchone()
    if oldest is not None:
        try:
            sealer.open(bytes(oldest[6]), KeyContext(*oldest[:6]))
        except IntegrityError:
            raise _wrong(sealer, where, f"key {oldest[4]}, its oldest") from None


def _wrong(sealer: Sealer, where: str, tried: str) -> WrongMasterKey:
    return WrongMasterKey(
        f"{sealer.source} is not the master key of {where}: it does not open {tried}"
    )


def manifest_summary(manifest: Mapping[str, object]) -> str:
    return (
        f"server {manifest.get('server_name')} ({manifest.get('server_pin')}),"
        f" {manifest.get('hosts')} host(s), {manifest.get('keys')} key(s),"
        f" taken {manifest.get('created')}"
    )
