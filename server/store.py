"""The only module that touches the database: hosts, their certificates, sealed keys.

SQLite in WAL mode with synchronous=FULL: a commit that returned is on disk, so
an acknowledged enrollment survives a crash or power loss. Every method is one
transaction. The `Store` protocol is what the rest of the server uses, narrow
enough for another backend (PostgreSQL) to implement.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from zfs_unlock_server.errors import ConfigError, Conflict, NotFound

SCHEMA_VERSION = 3

# Each entry migrates from version N-1 to N; never edit a released step.
MIGRATIONS: tuple[str, ...] = (
    """
    CREATE TABLE hosts (
        id               INTEGER PRIMARY KEY,
        name             TEXT NOT NULL UNIQUE,
        machine_id       TEXT NOT NULL UNIQUE,
        allowed_networks TEXT NOT NULL DEFAULT '[]',
        pools            TEXT NOT NULL DEFAULT '[]',
        enabled          INTEGER NOT NULL DEFAULT 1 CHECK (enabled IN (0, 1)),
        disabled_reason  TEXT NOT NULL DEFAULT '',
        deadman_timeout  INTEGER CHECK (deadman_timeout IS NULL OR deadman_timeout >= 0),
        created_at       INTEGER NOT NULL,
        last_seen        INTEGER NOT NULL
    ) STRICT;
    CREATE TABLE certificates (
        fingerprint TEXT PRIMARY KEY,
        host_id     INTEGER NOT NULL REFERENCES hosts(id) ON DELETE CASCADE,
        not_after   INTEGER NOT NULL,
        created_at  INTEGER NOT NULL
    ) STRICT;
    CREATE INDEX certificates_host ON certificates(host_id);
    CREATE TABLE keys (
        key_id       TEXT PRIMARY KEY,
        host_id      INTEGER NOT NULL REFERENCES hosts(id) ON DELETE RESTRICT,
        pool_guid    TEXT NOT NULL,
        dataset_guid TEXT NOT NULL DEFAULT '',
        legacy_name  TEXT NOT NULL DEFAULT '',
        dataset      TEXT NOT NULL,
        keyformat    TEXT NOT NULL CHECK (keyformat IN ('raw', 'hex', 'passphrase')),
        state        TEXT NOT NULL CHECK (state IN ('pending', 'active', 'revoked')),
        origin       TEXT NOT NULL CHECK (origin IN ('generated', 'imported')),
        sealed       BLOB NOT NULL,
        created_at   INTEGER NOT NULL,
        updated_at   INTEGER NOT NULL,
        CHECK ((dataset_guid = '') <> (legacy_name = ''))
    ) STRICT;
    -- One key per dataset, whatever its state: a revoked key is kept, never replaced.
    CREATE UNIQUE INDEX keys_dataset ON keys(host_id, pool_guid, dataset_guid)
        WHERE dataset_guid <> '';
    CREATE UNIQUE INDEX keys_legacy ON keys(host_id, pool_guid, legacy_name)
        WHERE legacy_name <> '';
    """,
    # A host's keys (key list --host, host remove and its foreign-key check) were found by
    # scanning every key: the unique indexes above are partial, so no query by host alone
    # can use them.
    """
    CREATE INDEX keys_host ON keys(host_id);
    """,
    # Facts about the data directory itself: init seals a check value under the master
    # key here, so that serve and the commands that seal can refuse a wrong master key.
    """
    CREATE TABLE meta (
        name  TEXT PRIMARY KEY,
        value BLOB NOT NULL
    ) STRICT;
    """,
)


@dataclass(frozen=True)
class Host:
    id: int
    name: str
    machine_id: str
    allowed_networks: tuple[str, ...]
    pools: tuple[str, ...]
    enabled: bool
    disabled_reason: str
    deadman_timeout: int | None
    created_at: int
    last_seen: int


@dataclass(frozen=True)
class KeyRecord:
    key_id: str
    host_id: int
    host: str
    pool_guid: str
    dataset_guid: str
    legacy_name: str
    dataset: str
    keyformat: str
    state: str
    origin: str
    sealed: bytes
    created_at: int
    updated_at: int


@dataclass(frozen=True)
class NewHost:
    name: str
    machine_id: str
    allowed_networks: tuple[str, ...]
    pools: tuple[str, ...]
    deadman_timeout: int | None


class Store(Protocol):
    def add_host(self, host: NewHost, fingerprint: str, cert_not_after: int) -> Host: ...
    def add_certificate(self, host_id: int, fingerprint: str, not_after: int) -> None: ...
    def remove_certificate(self, host_id: int, fingerprint: str) -> None: ...
    def host_by_name(self, name: str) -> Host: ...
    def host_by_fingerprint(self, fingerprint: str) -> Host | None: ...
    def host_by_machine_id(self, machine_id: str) -> Host | None: ...
    def hosts(self) -> list[Host]: ...
    def certificates(self, host_id: int) -> list[tuple[str, int]]: ...
    def set_host_enabled(self, host_id: int, enabled: bool, reason: str) -> None: ...
    def remove_host(self, host_id: int, delete_keys: bool) -> int: ...
    def touch_host(self, host_id: int, now: int) -> None: ...
    def insert_key(self, record: KeyRecord) -> None: ...
    def insert_keys(self, records: Sequence[KeyRecord]) -> None: ...
    def key_for_dataset(
        self, host_id: int, pool_guid: str, dataset_guid: str
    ) -> KeyRecord | None: ...
    def key_for_legacy_name(self, host_id: int, pool_guid: str, name: str) -> KeyRecord | None: ...
    def key_by_id(self, key_id: str) -> KeyRecord: ...
    def keys(self, host_id: int | None = None) -> list[KeyRecord]: ...
    def set_key_state(
        self, key_id: str, state: str, expected: tuple[str, ...], now: int
    ) -> None: ...
    def first_sealed_key(self) -> KeyRecord | None: ...
    def master_key_check(self) -> bytes | None: ...
    def set_master_key_check(self, sealed: bytes) -> None: ...
    def close(self) -> None: ...


_KEY_COLUMNS = """k.key_id, k.host_id, h.name, k.pool_guid, k.dataset_guid, k.legacy_name,
    k.dataset, k.keyformat, k.state, k.origin, k.sealed, k.created_at, k.updated_at"""


def _host(row: sqlite3.Row) -> Host:
    return Host(
        id=row["id"],
        name=row["name"],
        machine_id=row["machine_id"],
        allowed_networks=tuple(json.loads(row["allowed_networks"])),
        pools=tuple(json.loads(row["pools"])),
        enabled=bool(row["enabled"]),
        disabled_reason=row["disabled_reason"],
        deadman_timeout=row["deadman_timeout"],
        created_at=row["created_at"],
        last_seen=row["last_seen"],
    )


def _key(row: sqlite3.Row) -> KeyRecord:
    return KeyRecord(*tuple(row))


class SqliteStore:
    """Store on one SQLite file. Open one per process (connections do not survive fork)."""

    def __init__(self, path: Path, busy_timeout_ms: int = 5000) -> None:
        self.path = path
        self._db = sqlite3.connect(path, isolation_level=None, timeout=busy_timeout_ms / 1000)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute("PRAGMA foreign_keys=ON")
        self._db.execute("PRAGMA trusted_schema=OFF")
        try:
            self._migrate()
        except BaseException:
            self._db.close()
            raise

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        # BEGIN IMMEDIATE takes the write lock up front, so two workers never
        # both read-then-write the same row.
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield self._db
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    def _migrate(self) -> None:
        with self._write() as db:
            version = db.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise ConfigError(
                    f"{self.path}: database schema {version} is newer than this server"
                    f" ({SCHEMA_VERSION}); run the newer server or restore a backup"
                )
            for step in range(version, SCHEMA_VERSION):
                for statement in MIGRATIONS[step].split(";"):
                    if statement.strip():
                        db.execute(statement)
                db.execute(f"PRAGMA user_version={step + 1}")

    def pragma(self, name: str) -> object:
        if not name.isidentifier():
            raise ValueError("not a pragma name")
        return self._db.execute(f"PRAGMA {name}").fetchone()[0]

    def close(self) -> None:
        self._db.close()

    # Hosts

    def add_host(self, host: NewHost, fingerprint: str, cert_not_after: int) -> Host:
        now = int(time.time())
        with self._write() as db:
            try:
                cursor = db.execute(
                    "INSERT INTO hosts (name, machine_id, allowed_networks, pools,"
                    " deadman_timeout, created_at, last_seen) VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (
                        host.name,
                        host.machine_id,
                        json.dumps(list(host.allowed_networks)),
                        json.dumps(list(host.pools)),
                        host.deadman_timeout,
                        now,
                        now,
                    ),
                )
            except sqlite3.IntegrityError:
                raise Conflict(
                    f"a host named {host.name!r} or with that machine-id already exists"
                ) from None
            host_id = cursor.lastrowid
            db.execute(
                "INSERT INTO certificates (fingerprint, host_id, not_after, created_at)"
                " VALUES (?, ?, ?, ?)",
                (fingerprint, host_id, cert_not_after, now),
            )
        return self.host_by_name(host.name)

    def add_certificate(self, host_id: int, fingerprint: str, not_after: int) -> None:
        with self._write() as db:
            db.execute(
                "INSERT INTO certificates (fingerprint, host_id, not_after, created_at)"
                " VALUES (?, ?, ?, ?)",
                (fingerprint, host_id, not_after, int(time.time())),
            )

    def remove_certificate(self, host_id: int, fingerprint: str) -> None:
        with self._write() as db:
            cursor = db.execute(
                "DELETE FROM certificates WHERE host_id = ? AND fingerprint = ?",
                (host_id, fingerprint),
            )
            if cursor.rowcount == 0:
                raise NotFound("the host has no certificate with that SHA-256 fingerprint")

    def host_by_name(self, name: str) -> Host:
        row = self._db.execute("SELECT * FROM hosts WHERE name = ?", (name,)).fetchone()
        if row is None:
            raise NotFound(f"no host named {name!r}")
        return _host(row)

    def host_by_fingerprint(self, fingerprint: str) -> Host | None:
        row = self._db.execute(
            "SELECT h.* FROM hosts h JOIN certificates c ON c.host_id = h.id"
            " WHERE c.fingerprint = ?",
            (fingerprint,),
        ).fetchone()
        return None if row is None else _host(row)

    def host_by_machine_id(self, machine_id: str) -> Host | None:
        row = self._db.execute("SELECT * FROM hosts WHERE machine_id = ?", (machine_id,)).fetchone()
        return None if row is None else _host(row)

    def hosts(self) -> list[Host]:
        return [_host(r) for r in self._db.execute("SELECT * FROM hosts ORDER BY name")]

    def certificates(self, host_id: int) -> list[tuple[str, int]]:
        rows = self._db.execute(
            "SELECT fingerprint, not_after FROM certificates WHERE host_id = ? ORDER BY created_at",
            (host_id,),
        )
        return [(r["fingerprint"], r["not_after"]) for r in rows]

    def set_host_enabled(self, host_id: int, enabled: bool, reason: str) -> None:
        with self._write() as db:
            db.execute(
                "UPDATE hosts SET enabled = ?, disabled_reason = ?,"
                " last_seen = CASE WHEN ? THEN ? ELSE last_seen END WHERE id = ?",
                # Re-enabling restarts the dead-man clock, or the host would be
                # disabled again on its very next request.
                (int(enabled), "" if enabled else reason, enabled, int(time.time()), host_id),
            )

    def remove_host(self, host_id: int, delete_keys: bool) -> int:
        with self._write() as db:
            count = db.execute("SELECT count(*) FROM keys WHERE host_id = ?", (host_id,))
            key_count = int(count.fetchone()[0])
            if key_count and not delete_keys:
                raise Conflict(
                    f"the host owns {key_count} key(s); removing it would lose them"
                    " (pass --delete-keys if that is intended)"
                )
            db.execute("DELETE FROM keys WHERE host_id = ?", (host_id,))
            db.execute("DELETE FROM hosts WHERE id = ?", (host_id,))
        return key_count

    def touch_host(self, host_id: int, now: int) -> None:
        # Not synced on its own: in WAL mode a synchronous=NORMAL commit becomes durable
        # with the next synced commit or checkpoint. A crash can only make the host look
        # a few moments staler to the dead-man switch, and a reboot storm of new hosts
        # does not pay a disk sync per host for it.
        self._db.execute("PRAGMA synchronous=NORMAL")
        try:
            with self._write() as db:
                db.execute(
                    "UPDATE hosts SET last_seen = max(last_seen, ?) WHERE id = ?", (now, host_id)
                )
        finally:
            self._db.execute("PRAGMA synchronous=FULL")

    # Keys

    def insert_key(self, record: KeyRecord) -> None:
        self.insert_keys([record])

    def insert_keys(self, records: Sequence[KeyRecord]) -> None:
        """Insert every record or none (one transaction)."""
        with self._write() as db:
            try:
                db.executemany(
                    "INSERT INTO keys (key_id, host_id, pool_guid, dataset_guid, legacy_name,"
                    " dataset, keyformat, state, origin, sealed, created_at, updated_at)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    [
                        (
                            r.key_id,
                            r.host_id,
                            r.pool_guid,
                            r.dataset_guid,
                            r.legacy_name,
                            r.dataset,
                            r.keyformat,
                            r.state,
                            r.origin,
                            r.sealed,
                            r.created_at,
                            r.updated_at,
                        )
                        for r in records
                    ],
                )
            except sqlite3.IntegrityError:
                raise Conflict("that dataset already has a key") from None

    def key_for_dataset(self, host_id: int, pool_guid: str, dataset_guid: str) -> KeyRecord | None:
        row = self._db.execute(
            f"SELECT {_KEY_COLUMNS} FROM keys k JOIN hosts h ON h.id = k.host_id"  # noqa: S608
            " WHERE k.host_id = ? AND k.pool_guid = ? AND k.dataset_guid = ?"
            # Repeats the partial index's condition: without it SQLite cannot use
            # keys_dataset and scans every key (found by the reboot-storm benchmark).
            " AND k.dataset_guid <> ''",
            (host_id, pool_guid, dataset_guid),
        ).fetchone()
        return None if row is None else _key(row)

    def key_for_legacy_name(self, host_id: int, pool_guid: str, name: str) -> KeyRecord | None:
        row = self._db.execute(
            f"SELECT {_KEY_COLUMNS} FROM keys k JOIN hosts h ON h.id = k.host_id"  # noqa: S608
            " WHERE k.host_id = ? AND k.pool_guid = ? AND k.legacy_name = ?"
            " AND k.legacy_name <> ''",  # so that keys_legacy is used, as above
            (host_id, pool_guid, name),
        ).fetchone()
        return None if row is None else _key(row)

    def key_by_id(self, key_id: str) -> KeyRecord:
        row = self._db.execute(
            f"SELECT {_KEY_COLUMNS} FROM keys k JOIN hosts h ON h.id = k.host_id"  # noqa: S608
            " WHERE k.key_id = ?",
            (key_id,),
        ).fetchone()
        if row is None:
            raise NotFound(f"no key {key_id}")
        return _key(row)

    def keys(self, host_id: int | None = None) -> list[KeyRecord]:
        query = f"SELECT {_KEY_COLUMNS} FROM keys k JOIN hosts h ON h.id = k.host_id"  # noqa: S608
        if host_id is None:
            rows = self._db.execute(query + " ORDER BY h.name, k.dataset")
        else:
            rows = self._db.execute(query + " WHERE k.host_id = ? ORDER BY k.dataset", (host_id,))
        return [_key(r) for r in rows]

    def delete_key(self, key_id: str, expected: tuple[str, ...]) -> None:
        with self._write() as db:
            row = db.execute("SELECT state FROM keys WHERE key_id = ?", (key_id,)).fetchone()
            if row is None:
                raise NotFound(f"no key {key_id}")
            if row["state"] not in expected:
                raise Conflict(f"key {key_id} is {row['state']}; revoke it first")
            db.execute("DELETE FROM keys WHERE key_id = ?", (key_id,))

    def set_key_state(self, key_id: str, state: str, expected: tuple[str, ...], now: int) -> None:
        """Move a key to STATE if it is in one of EXPECTED; NotFound/Conflict otherwise."""
        with self._write() as db:
            row = db.execute("SELECT state FROM keys WHERE key_id = ?", (key_id,)).fetchone()
            if row is None:
                raise NotFound(f"no key {key_id}")
            if row["state"] not in expected:
                raise Conflict(f"key {key_id} is {row['state']}, not {' or '.join(expected)}")
            db.execute(
                "UPDATE keys SET state = ?, updated_at = ? WHERE key_id = ?",
                (state, now, key_id),
            )

    def first_sealed_key(self) -> KeyRecord | None:
        """The oldest row of keys (by rowid), or None when there is no key."""
        row = self._db.execute(
            f"SELECT {_KEY_COLUMNS} FROM keys k JOIN hosts h ON h.id = k.host_id"  # noqa: S608
            " ORDER BY k.rowid LIMIT 1"
        ).fetchone()
        return None if row is None else _key(row)

    # The data directory

    def master_key_check(self) -> bytes | None:
        row = self._db.execute("SELECT value FROM meta WHERE name = 'master_key_check'").fetchone()
        return None if row is None else bytes(row["value"])

    def set_master_key_check(self, sealed: bytes) -> None:
        """Store the check value, unless one is there already: it is never replaced."""
        with self._write() as db:
            db.execute(
                "INSERT OR IGNORE INTO meta (name, value) VALUES ('master_key_check', ?)",
                (sealed,),
            )
