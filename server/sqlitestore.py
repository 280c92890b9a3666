"""The Store on one SQLite file: the embedded default, for one key server.

WAL mode with synchronous=FULL: a commit that returned is on disk, so an acknowledged
enrollment survives a crash or power loss. Every method is one transaction.
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from zfs_unlock_server import schema
from zfs_unlock_server.approvalrows import ApprovalRows
from zfs_unlock_server.errors import ConfigError, Conflict, NotFound, StaleMasterKey
from zfs_unlock_server.ratelimit import Charge
from zfs_unlock_server.sealing import FORMAT_V2, Ring
from zfs_unlock_server.store import (
    CURRENT_STATES,
    KEY_COLUMNS,
    KEY_INSERT_COLUMNS,
    Arrival,
    Certificate,
    DatasetKeys,
    Host,
    HostReport,
    KeyRecord,
    NewHost,
    Snapshot,
    arrive_apart,
    dataset_keys,
    host_of,
    key_values,
)


def _key(row: sqlite3.Row) -> KeyRecord:
    return KeyRecord(*tuple(row))


def _meta_in(db: sqlite3.Connection, name: str) -> bytes | None:
    row = db.execute("SELECT value FROM meta WHERE name = ?", (name,)).fetchone()
    return None if row is None else bytes(row[0])


def _admit(db: sqlite3.Connection, records: Sequence[KeyRecord]) -> None:
    """Refuse values sealed under a master key the ring no longer holds (inside the write
    transaction, so a rotation's retirement cannot slip between the check and the insert)."""
    raw = _meta_in(db, Ring.META_NAME)
    if raw is not None and not all(Ring.decode(raw).admits(r.sealed) for r in records):
        raise StaleMasterKey("sealed under a master key that was just retired; try again")


class SqliteStore(ApprovalRows):
    """Store on one SQLite file. Open one per process (connections do not survive fork)."""

    def __init__(self, path: Path, busy_timeout_ms: int = 5000, migrate: bool = False) -> None:
        """Open PATH at this server's schema version. MIGRATE creates the file if missing and
        brings an older schema up to date (`migrate`, `init`); without it a missing file or
        another version is refused (ConfigError)."""
        self.path = path
        self.migrated: tuple[int, int] | None = None  # (from, to) when MIGRATE changed it
        mode = "rwc" if migrate else "rw"
        try:
            self._db = sqlite3.connect(
                f"{path.resolve().as_uri()}?mode={mode}",
                uri=True,
                isolation_level=None,
                timeout=busy_timeout_ms / 1000,
            )
        except sqlite3.OperationalError as exc:
            raise ConfigError(f"{path}: cannot open the database: {exc}") from None
        self._db.row_factory = sqlite3.Row
        try:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.execute("PRAGMA foreign_keys=ON")
            self._db.execute("PRAGMA trusted_schema=OFF")
            if migrate:
                self._migrate()
            else:
                schema.check_version(self.schema_version(), schema.SQLITE, str(path))
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

    def schema_version(self) -> int:
        return int(self._db.execute("PRAGMA user_version").fetchone()[0])

    def _migrate(self) -> None:
        # The write lock is the migration lock: a second migrate waits, then finds
        # nothing left to do.
        with self._write() as db:
            version = self.schema_version()
            if version > len(schema.SQLITE):
                schema.check_version(version, schema.SQLITE, str(self.path))
            for step in range(version, len(schema.SQLITE)):
                for statement in schema.statements(schema.SQLITE[step]):
                    db.execute(statement)
                db.execute(f"PRAGMA user_version={step + 1}")
        if version < len(schema.SQLITE):
            self.migrated = (version, len(schema.SQLITE))

    @contextlib.contextmanager
    def transaction(self) -> Iterator[None]:
        yield

    def _rows(
        self, sql: str, params: Sequence[object] = (), write: bool = False
    ) -> list[dict[str, Any]]:
        try:
            if not write:
                return [dict(r) for r in self._db.execute(sql, tuple(params))]
            with self._write() as db:
                return [dict(r) for r in db.execute(sql, tuple(params)).fetchall()]
        except sqlite3.IntegrityError as exc:
            raise Conflict(str(exc)) from None

    def host_states(self) -> dict[str, int]:
        rows = self._db.execute(
            "SELECT CASE WHEN enabled THEN 'enabled' ELSE 'disabled_' || disabled_reason END,"
            " count(*) FROM hosts GROUP BY 1"
        )
        return {str(state): int(n) for state, n in rows}

    def snapshot(self) -> Snapshot:
        self._db.execute("BEGIN")  # one read transaction: one moment
        try:
            hosts = [host_of(r) for r in self._db.execute("SELECT * FROM hosts ORDER BY id")]
            certificates = [
                Certificate(*tuple(r))
                for r in self._db.execute(
                    "SELECT fingerprint, host_id, not_after, created_at, replaces, retire_at"
                    " FROM certificates ORDER BY rowid"
                )
            ]
            keys = [
                _key(r)
                for r in self._db.execute(
                    f"SELECT {KEY_COLUMNS} FROM keys k JOIN hosts h ON h.id = k.host_id"  # noqa: S608
                    " ORDER BY k.rowid"
                )
            ]
            meta = {r[0]: bytes(r[1]) for r in self._db.execute("SELECT name, value FROM meta")}
            policies = self.all_approval_policies()
            admins = self.admins()
            trips = self.all_silence_trips()
        finally:
            self._db.execute("COMMIT")
        return Snapshot(hosts, certificates, keys, meta, policies, admins, trips)

    def counts(self) -> tuple[int, int]:
        hosts = self._db.execute("SELECT count(*) FROM hosts").fetchone()[0]
        keys = self._db.execute("SELECT count(*) FROM keys").fetchone()[0]
        return int(hosts), int(keys)

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

    def renew_certificate(
        self, host_id: int, old: str, new: str, not_after: int, retire_at: int
    ) -> None:
        with self._write() as db:
            db.execute("DELETE FROM certificates WHERE replaces = ?", (old,))
            db.execute(
                "INSERT INTO certificates (fingerprint, host_id, not_after, created_at, replaces)"
                " VALUES (?, ?, ?, ?, ?)",
                (new, host_id, not_after, int(time.time()), old),
            )
            db.execute(
                # From the last renewal: one lost on its way (or undone by its host, whose
                # initramfs could not take it) does not shorten the grace.
                "UPDATE certificates SET retire_at = ? WHERE fingerprint = ?",
                (retire_at, old),
            )

    def retire_replaced(self, new: str) -> str:
        with self._write() as db:
            row = db.execute(
                "SELECT replaces FROM certificates WHERE fingerprint = ?", (new,)
            ).fetchone()
            if row is None or not row["replaces"]:
                return ""
            db.execute("UPDATE certificates SET replaces = '' WHERE fingerprint = ?", (new,))
            db.execute("DELETE FROM certificates WHERE fingerprint = ?", (row["replaces"],))
            return str(row["replaces"])

    def remove_certificate(self, host_id: int, fingerprint: str) -> None:
        with self._write() as db:
            cursor = db.execute(
                "DELETE FROM certificates WHERE host_id = ? AND fingerprint = ?",
                (host_id, fingerprint),
            )
            if cursor.rowcount == 0:
                raise NotFound("the host has no certificate with that SHA-256 fingerprint")
            # And its renewals not used yet: they came through the certificate removed.
            db.execute(
                "DELETE FROM certificates WHERE host_id = ? AND replaces = ?",
                (host_id, fingerprint),
            )

    def host_by_name(self, name: str) -> Host:
        row = self._db.execute("SELECT * FROM hosts WHERE name = ?", (name,)).fetchone()
        if row is None:
            raise NotFound(f"no host named {name!r}")
        return host_of(row)

    def host_by_fingerprint(self, fingerprint: str) -> Host | None:
        row = self._db.execute(
            "SELECT h.*, c.replaces AS replaces_certificate"
            " FROM hosts h JOIN certificates c ON c.host_id = h.id"
            " WHERE c.fingerprint = ? AND (c.retire_at = 0 OR c.retire_at > ?)",
            (fingerprint, int(time.time())),
        ).fetchone()
        return None if row is None else host_of(row)

    def arrive(self, fingerprint: str, charge: Charge) -> Arrival:
        return arrive_apart(self, fingerprint, charge)  # the buckets are a file of their own

    def host_by_machine_id(self, machine_id: str) -> Host | None:
        row = self._db.execute("SELECT * FROM hosts WHERE machine_id = ?", (machine_id,)).fetchone()
        return None if row is None else host_of(row)

    def hosts(self) -> list[Host]:
        return [host_of(r) for r in self._db.execute("SELECT * FROM hosts ORDER BY name")]

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

    def record_report(
        self, host_id: int, pins: Sequence[str] | None, issuer: str, now: int
    ) -> None:
        self._db.execute("PRAGMA synchronous=NORMAL")  # as touch_host: reported again soon
        try:
            with self._write() as db:
                db.execute(
                    "INSERT INTO host_reports (host_id, pins, issuer, reported_at)"
                    " VALUES (?, ?, ?, ?) ON CONFLICT (host_id) DO UPDATE"
                    " SET pins = coalesce(excluded.pins, pins), issuer = excluded.issuer,"
                    " reported_at = excluded.reported_at"
                    " WHERE coalesce(excluded.pins, pins) IS NOT pins OR issuer <> excluded.issuer",
                    (host_id, None if pins is None else " ".join(pins), issuer, now),
                )
        finally:
            self._db.execute("PRAGMA synchronous=FULL")

    def host_reports(self) -> dict[int, HostReport]:
        rows = self._db.execute("SELECT host_id, pins, issuer FROM host_reports")
        return {
            int(r["host_id"]): HostReport(tuple((r["pins"] or "").split()), str(r["issuer"]))
            for r in rows
        }

    # Keys

    def insert_key(self, record: KeyRecord) -> None:
        self.insert_keys([record])

    def insert_keys(self, records: Sequence[KeyRecord]) -> None:
        """Insert every record or none (one transaction)."""
        with self._write() as db:
            _admit(db, records)
            try:
                db.executemany(
                    f"INSERT INTO keys ({KEY_INSERT_COLUMNS})"  # noqa: S608 (constants)
                    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    [key_values(r) for r in records],
                )
            except sqlite3.IntegrityError:
                raise Conflict("that dataset already has a key") from None

    def key_for_dataset(self, host_id: int, pool_guid: str, dataset_guid: str) -> KeyRecord | None:
        return self._dataset_key(host_id, pool_guid, dataset_guid, CURRENT_STATES)

    def next_key_for_dataset(
        self, host_id: int, pool_guid: str, dataset_guid: str
    ) -> KeyRecord | None:
        return self._dataset_key(host_id, pool_guid, dataset_guid, ("next",))

    def _dataset_key(
        self, host_id: int, pool_guid: str, dataset_guid: str, states: tuple[str, ...]
    ) -> KeyRecord | None:
        marks = ", ".join("?" * len(states))
        row = self._db.execute(
            f"SELECT {KEY_COLUMNS} FROM keys k JOIN hosts h ON h.id = k.host_id"  # noqa: S608
            " WHERE k.host_id = ? AND k.pool_guid = ? AND k.dataset_guid = ?"
            # Repeats the partial indexes' condition: without it SQLite cannot use them
            # and scans every key (found by the reboot-storm benchmark).
            f" AND k.dataset_guid <> '' AND k.state IN ({marks})",
            (host_id, pool_guid, dataset_guid, *states),
        ).fetchone()
        return None if row is None else _key(row)

    def keys_for_datasets(
        self, host_id: int, refs: Sequence[tuple[str, str]]
    ) -> dict[tuple[str, str], DatasetKeys]:
        found = {}
        for pool_guid, dataset_guid in dict.fromkeys(refs):
            rows = self._db.execute(
                f"SELECT {KEY_COLUMNS} FROM keys k JOIN hosts h ON h.id = k.host_id"  # noqa: S608
                " WHERE k.host_id = ? AND k.pool_guid = ? AND k.dataset_guid = ?"
                " AND k.state <> 'retired'",
                (host_id, pool_guid, dataset_guid),
            ).fetchall()
            if rows:
                found[(pool_guid, dataset_guid)] = dataset_keys([_key(r) for r in rows])
        return found

    def key_for_legacy_name(self, host_id: int, pool_guid: str, name: str) -> KeyRecord | None:
        row = self._db.execute(
            f"SELECT {KEY_COLUMNS} FROM keys k JOIN hosts h ON h.id = k.host_id"  # noqa: S608
            " WHERE k.host_id = ? AND k.pool_guid = ? AND k.legacy_name = ?"
            " AND k.legacy_name <> ''",  # so that keys_legacy is used, as above
            (host_id, pool_guid, name),
        ).fetchone()
        return None if row is None else _key(row)

    def key_by_id(self, key_id: str) -> KeyRecord:
        row = self._db.execute(
            f"SELECT {KEY_COLUMNS} FROM keys k JOIN hosts h ON h.id = k.host_id"  # noqa: S608
            " WHERE k.key_id = ?",
            (key_id,),
        ).fetchone()
        if row is None:
            raise NotFound(f"no key {key_id}")
        return _key(row)

    def keys(self, host_id: int | None = None) -> list[KeyRecord]:
        query = f"SELECT {KEY_COLUMNS} FROM keys k JOIN hosts h ON h.id = k.host_id"  # noqa: S608
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

    def replace_sealed(self, updates: Sequence[tuple[str, bytes, bytes]]) -> int:
        """Re-seal: each (key id, old value, new value) is written only where the row still
        holds the old value. Returns how many were."""
        with self._write() as db:
            return sum(
                db.execute(
                    "UPDATE keys SET sealed = ? WHERE key_id = ? AND sealed = ?",
                    (new, key_id, old),
                ).rowcount
                for key_id, old, new in updates
            )

    def promote_next(self, current_id: str, next_id: str, now: int) -> None:
        with self._write() as db:
            for key_id, state in ((current_id, "active"), (next_id, "next")):
                row = db.execute("SELECT state FROM keys WHERE key_id = ?", (key_id,)).fetchone()
                if row is None or row["state"] != state:
                    raise Conflict(f"key {key_id} is no longer {state}")
            db.execute(
                "UPDATE keys SET state = 'retired', updated_at = ?, rotate_requested = 0"
                " WHERE key_id = ?",
                (now, current_id),
            )
            db.execute(
                "UPDATE keys SET state = 'active', updated_at = ? WHERE key_id = ?", (now, next_id)
            )

    def delete_retired(self, host_id: int, before: int) -> list[str]:
        with self._write() as db:
            rows = db.execute(
                "DELETE FROM keys WHERE host_id = ? AND state = 'retired' AND updated_at < ?"
                " RETURNING key_id",
                (host_id, before),
            ).fetchall()
        return sorted(str(r[0]) for r in rows)

    def request_rotation(self, host_id: int, dataset_guid: str | None) -> list[KeyRecord]:
        with self._write() as db:
            rows = db.execute(
                "UPDATE keys SET rotate_requested = 1 WHERE host_id = ? AND state = 'active'"
                " AND dataset_guid <> '' AND (? IS NULL OR dataset_guid = ?) RETURNING key_id",
                (host_id, dataset_guid, dataset_guid),
            ).fetchall()
        return [self.key_by_id(str(r[0])) for r in rows]

    def due_for_rotation(self, host_id: int, created_before: int) -> list[KeyRecord]:
        rows = self._db.execute(
            f"SELECT {KEY_COLUMNS} FROM keys k JOIN hosts h ON h.id = k.host_id"  # noqa: S608
            " WHERE k.host_id = ? AND k.state = 'active' AND k.dataset_guid <> ''"
            " AND (k.rotate_requested = 1 OR k.created_at < ?) ORDER BY k.dataset",
            (host_id, created_before),
        )
        return [_key(r) for r in rows]

    def first_sealed_key(self) -> KeyRecord | None:
        """The oldest row of keys (by rowid), or None when there is no key."""
        row = self._db.execute(
            f"SELECT {KEY_COLUMNS} FROM keys k JOIN hosts h ON h.id = k.host_id"  # noqa: S608
            " ORDER BY k.rowid LIMIT 1"
        ).fetchone()
        return None if row is None else _key(row)

    # The data directory

    def master_key_check(self) -> bytes | None:
        return self.meta("master_key_check")

    def meta(self, name: str) -> bytes | None:
        row = self._db.execute("SELECT value FROM meta WHERE name = ?", (name,)).fetchone()
        return None if row is None else bytes(row["value"])

    def swap_meta(self, name: str, expected: bytes | None, value: bytes) -> bool:
        """Set NAME to VALUE if it holds EXPECTED (None: is absent); False if it did not."""
        with self._write() as db:
            if _meta_in(db, name) != expected:
                return False
            db.execute("INSERT OR REPLACE INTO meta (name, value) VALUES (?, ?)", (name, value))
            return True

    def retire_master_keys(self, expected: bytes, ring: Ring) -> bool:
        """Write RING over EXPECTED, unless a sealed value still needs a key it drops."""
        with self._write() as db:
            if _meta_in(db, Ring.META_NAME) != expected:
                return False
            header = FORMAT_V2 + bytes.fromhex(ring.sealing)
            left = db.execute(
                "SELECT (SELECT count(*) FROM keys WHERE substr(sealed, 1, 9) <> ?)"
                " + (SELECT count(*) FROM meta WHERE name = 'master_key_check'"
                " AND substr(value, 1, 9) <> ?)",
                (header, header),
            ).fetchone()[0]
            if left:
                return False
            db.execute("UPDATE meta SET value = ? WHERE name = ?", (ring.encode(), Ring.META_NAME))
            return True

    def set_master_key_check(self, sealed: bytes) -> None:
        """Store the check value, unless one is there already: it is never replaced."""
        with self._write() as db:
            db.execute(
                "INSERT OR IGNORE INTO meta (name, value) VALUES ('master_key_check', ?)",
                (sealed,),
            )
