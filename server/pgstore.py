"""The Store on PostgreSQL: several stateless key-server nodes on one database.

Every piece of state a decision reads is here, so any node answers any host and an
admin command run on one node holds on every node from the next request: hosts,
certificates, keys, the dead-man clock, the rate-limit buckets and the audit trail.
psycopg 3, one connection per worker process, autocommit except inside `transaction()`.

Fail closed: a connection that breaks, a server that refuses to write (a standby, a
failover) or one that cannot be reached raises DatabaseUnavailable, which the HTTP side
answers with 503 and no key; the next call connects again, so a node serves again as
soon as the database does, without a restart.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import select
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import psycopg
from psycopg import conninfo as pg_conninfo
from psycopg.rows import dict_row

from zfs_unlock_server import schema
from zfs_unlock_server.approvalrows import ApprovalRows
from zfs_unlock_server.errors import (
    ConfigError,
    Conflict,
    DatabaseRefused,
    DatabaseUnavailable,
    NotFound,
    StaleMasterKey,
)
from zfs_unlock_server.ratelimit import BucketPolicy, Charge
from zfs_unlock_server.sealing import FORMAT_V2, Ring
from zfs_unlock_server.store import (
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

# libpq's password file as a systemd credential: $CREDENTIALS_DIRECTORY/pgpass.
PASSFILE_CREDENTIAL = "pgpass"
# One number for every node's migrate: the second waits, then finds nothing to do.
MIGRATION_LOCK = 0x7A75_6173_6368_656D
PRUNE_LOCK = MIGRATION_LOCK + 1  # one node at a time exports and deletes old audit records
EXPORT_BATCH = 10_000  # audit rows fetched at a time while they are exported
# What a node waits for a database that does not answer, before it says 503.
CONNECT_DEFAULTS = {
    "connect_timeout": "5",
    "tcp_user_timeout": "10000",  # ms: a primary that vanished mid-request
    "keepalives_idle": "10",
    "keepalives_interval": "5",
    "keepalives_count": "3",
    "application_name": "zfs-unlock-server",
}
_REFUSED = re.compile(
    r"password authentication failed|no password supplied|pg_hba\.conf rejects"
    r"|role \".*\" does not exist|permission denied"
)


def checked_url(url: str, where: str) -> str:
    """The conninfo a node connects with: URL as given, refused if it carries a password
    (the password belongs in a passfile, a service file or the pgpass credential), with
    the credential's passfile and our timeouts added where the URL names none."""
    if not re.match(r"postgres(ql)?://", url):
        raise ConfigError(f"{where}: [database] url must start with postgresql://")
    try:
        params = pg_conninfo.conninfo_to_dict(url)
    except psycopg.ProgrammingError as exc:
        raise ConfigError(f"{where}: [database] url: {exc}") from None
    if params.get("password"):
        raise ConfigError(
            f"{where}: [database] url has a password in it; put it in a libpq password"
            f" file instead (passfile=, PGPASSFILE, or the systemd credential"
            f" {PASSFILE_CREDENTIAL}), or in a service file (service=)"
        )
    extra = {k: v for k, v in CONNECT_DEFAULTS.items() if k not in params}
    credential = _passfile_credential()
    if credential is not None and "passfile" not in params and "PGPASSFILE" not in os.environ:
        extra["passfile"] = str(credential)
    return pg_conninfo.make_conninfo(url, **extra)


def _passfile_credential() -> Path | None:
    directory = os.environ.get("CREDENTIALS_DIRECTORY")
    if directory and (Path(directory) / PASSFILE_CREDENTIAL).is_file():
        return Path(directory) / PASSFILE_CREDENTIAL
    return None


def describe(url: str) -> str:
    """The database a URL names, for messages: no user, no options."""
    params = pg_conninfo.conninfo_to_dict(url)
    host = params.get("host") or params.get("hostaddr") or "localhost"
    return f"postgresql://{host}:{params.get('port') or 5432}/{params.get('dbname') or ''}"


def _hung_up(conn: psycopg.Connection[Any]) -> bool:
    """Has the server closed this idle connection (a restart, a failover, an admin's
    pg_terminate_backend)? Then its farewell or its EOF waits to be read, and the next
    request should not be the one to find out: a zero-timeout poll, no round trip."""
    try:
        readable, _, _ = select.select([conn.fileno()], [], [], 0)
    except (OSError, ValueError, psycopg.Error):
        return True
    return bool(readable)


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


class PgStore(ApprovalRows):
    """Store on a PostgreSQL database. Open one per process (a connection does not
    survive fork); it reconnects by itself after the database came back."""

    def __init__(self, url: str, where: str = "server.toml", migrate: bool = False) -> None:
        self._conninfo = checked_url(url, where)
        self.where = describe(url)
        self.migrated: tuple[int, int] | None = None
        self._conn: psycopg.Connection[dict[str, Any]] | None = None
        self._depth = 0  # > 0 inside a transaction: calls join it
        try:
            if migrate:
                self._migrate()
            else:
                schema.check_version(self.schema_version(), schema.POSTGRESQL, self.where)
        except BaseException:
            self._drop()
            raise

    # Connection and transactions

    def _connection(self) -> psycopg.Connection[dict[str, Any]]:
        if self._conn is None or self._conn.closed or self._conn.broken or _hung_up(self._conn):
            self._drop()
            try:
                self._conn = psycopg.connect(self._conninfo, autocommit=True, row_factory=dict_row)
            except psycopg.Error as exc:
                message = _one_line(exc)
                if _REFUSED.search(message):
                    raise DatabaseRefused(f"{self.where}: refused: {message}") from None
                raise DatabaseUnavailable(f"{self.where}: {message}") from None
        return self._conn

    def _drop(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(psycopg.Error):
                self._conn.close()
            self._conn = None

    @contextlib.contextmanager
    def _session(self, write: bool = False) -> Iterator[psycopg.Connection[dict[str, Any]]]:
        """The connection, inside a transaction when WRITE; inside transaction(), the
        transaction's. Any database error but a broken constraint (a lost connection, a
        server that cannot write now, a full disk, a failover) becomes DatabaseUnavailable,
        and the next call connects afresh."""
        if self._depth and self._conn is not None:
            try:
                yield self._conn
            except psycopg.IntegrityError:
                raise
            except psycopg.Error as exc:  # the transaction's owner rolls back, or drops
                raise DatabaseUnavailable(f"{self.where}: {_one_line(exc)}") from None
            return
        try:
            conn = self._connection()
            if not write:
                yield conn
                return
            self._depth += 1
            try:
                with conn.transaction():
                    yield conn
            finally:
                self._depth -= 1
        except psycopg.IntegrityError:
            raise  # a constraint: each caller says what it means (a Conflict)
        except psycopg.Error as exc:
            self._drop()
            raise DatabaseUnavailable(f"{self.where}: {_one_line(exc)}") from None

    @contextlib.contextmanager
    def transaction(self) -> Iterator[None]:
        with self._session(write=True):
            yield

    def close(self) -> None:
        self._drop()

    def _rows(
        self, sql: str, params: Sequence[object] = (), write: bool = False
    ) -> list[dict[str, Any]]:
        try:
            with self._session(write) as conn:
                cursor = conn.execute(sql.replace("?", "%s"), tuple(params))
                return list(cursor.fetchall()) if cursor.description is not None else []
        except psycopg.IntegrityError as exc:
            raise Conflict(_one_line(exc)) from None

    # Schema

    def schema_version(self) -> int:
        with self._session() as conn:
            try:
                with conn.transaction():
                    row = conn.execute("SELECT version FROM schema_version").fetchone()
            except psycopg.errors.UndefinedTable:
                return 0
        return 0 if row is None else int(row["version"])

    def _migrate(self) -> None:
        steps = schema.POSTGRESQL
        with self._session(write=True) as conn:
            # PostgreSQL changes its schema in transactions: a step applies whole or not.
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK,))
            conn.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
            row = conn.execute("SELECT version FROM schema_version").fetchone()
            if row is None:
                conn.execute("INSERT INTO schema_version (version) VALUES (0)")
            version = 0 if row is None else int(row["version"])
            if version > len(steps):
                schema.check_version(version, steps, self.where)
            for step in range(version, len(steps)):
                for statement in schema.statements(steps[step]):
                    conn.execute(statement.encode())
                conn.execute("UPDATE schema_version SET version = %s", (step + 1,))
        if version < len(steps):
            self.migrated = (version, len(steps))

    def host_states(self) -> dict[str, int]:
        with self._session() as conn:
            rows = conn.execute(
                "SELECT CASE WHEN enabled THEN 'enabled' ELSE 'disabled_' || disabled_reason END"
                " AS state, count(*) AS n FROM hosts GROUP BY 1"
            ).fetchall()
        return {str(r["state"]): int(r["n"]) for r in rows}

    def snapshot(self) -> Snapshot:
        with self._session(write=True) as conn:  # one transaction: one moment
            conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
            hosts = [host_of(r) for r in conn.execute("SELECT * FROM hosts ORDER BY id")]
            certificates = [
                Certificate(
                    r["fingerprint"],
                    int(r["host_id"]),
                    int(r["not_after"]),
                    int(r["created_at"]),
                    str(r["replaces"]),
                    int(r["retire_at"]),
                )
                for r in conn.execute(
                    "SELECT fingerprint, host_id, not_after, created_at, replaces, retire_at"
                    " FROM certificates ORDER BY seq"
                )
            ]
            keys = [
                _key(r)
                for r in conn.execute(
                    f"SELECT {KEY_COLUMNS} FROM keys k JOIN hosts h ON h.id = k.host_id"  # noqa: S608
                    " ORDER BY k.seq"
                )
            ]
            meta = {
                str(r["name"]): bytes(r["value"])
                for r in conn.execute("SELECT name, value FROM meta")
            }
            policies = self.all_approval_policies()
            admins = self.admins()
            trips = self.all_silence_trips()
        return Snapshot(hosts, certificates, keys, meta, policies, admins, trips)

    def load(self, snapshot: Snapshot, audit: Iterable[tuple[str, str]]) -> None:
        """Fill an empty database with SNAPSHOT and the audit records AUDIT ((time, line)
        pairs, oldest first), in one transaction; the hosts keep their ids."""
        with self._session(write=True) as conn, conn.cursor() as cursor:
            with cursor.copy(
                "COPY hosts (id, name, machine_id, allowed_networks, pools, enabled,"
                " disabled_reason, deadman_timeout, created_at, last_seen) FROM STDIN"
            ) as copy:
                for h in snapshot.hosts:
                    copy.write_row(
                        (
                            h.id, h.name, h.machine_id, _json(h.allowed_networks), _json(h.pools),
                            h.enabled, h.disabled_reason, h.deadman_timeout, h.created_at,
                            h.last_seen,
                        )
                    )  # fmt: skip
            # The ids came along; the next host added gets the next one.
            cursor.execute(
                "SELECT setval(pg_get_serial_sequence('hosts', 'id'),"
                " greatest((SELECT max(id) FROM hosts), 1), (SELECT count(*) > 0 FROM hosts))"
            )
            with cursor.copy(
                "COPY certificates"
                " (fingerprint, host_id, not_after, created_at, replaces, retire_at) FROM STDIN"
            ) as copy:
                for c in snapshot.certificates:
                    copy.write_row(
                        (
                            c.fingerprint,
                            c.host_id,
                            c.not_after,
                            c.created_at,
                            c.replaces,
                            c.retire_at,
                        )
                    )
            with cursor.copy(f"COPY keys ({KEY_INSERT_COLUMNS}) FROM STDIN") as copy:
                for k in snapshot.keys:
                    copy.write_row(key_values(k))
            cursor.executemany(
                "INSERT INTO meta (name, value) VALUES (%s, %s)", list(snapshot.meta.items())
            )
            cursor.executemany(
                "INSERT INTO approval_policies (host_id, pool_guid, dataset_guid, policy)"
                " VALUES (%s, %s, %s, %s)",
                snapshot.approval_policies,
            )
            cursor.executemany(
                "INSERT INTO admins (name, fingerprint, not_after, created_at)"
                " VALUES (%s, %s, %s, %s)",
                [(*admin, int(time.time())) for admin in snapshot.admins],
            )
            cursor.executemany(
                "INSERT INTO silence_trips (host_id, silent_for) VALUES (%s, %s)",
                snapshot.silence_trips,
            )
            with cursor.copy("COPY audit (ts, record) FROM STDIN") as copy:
                for when, line in audit:
                    copy.write_row((when, line))
            # Statistics now, not when autovacuum next comes by: the first requests after
            # the switch are planned on what the tables hold.
            cursor.execute("ANALYZE hosts, certificates, keys, meta, audit, approval_policies")

    def audit_count(self) -> int:
        with self._session() as conn:
            row = conn.execute("SELECT count(*) AS n FROM audit").fetchone()
        return 0 if row is None else int(row["n"])

    def counts(self) -> tuple[int, int]:
        with self._session() as conn:
            row = conn.execute(
                "SELECT (SELECT count(*) FROM hosts) AS hosts, (SELECT count(*) FROM keys) AS keys"
            ).fetchone()
        return (0, 0) if row is None else (int(row["hosts"]), int(row["keys"]))

    def is_empty(self) -> bool:
        """No host, no key, no master-key check: a target migrate-store may fill."""
        with self._session() as conn:
            row = conn.execute(
                "SELECT EXISTS (SELECT 1 FROM hosts) OR EXISTS (SELECT 1 FROM keys)"
                " OR EXISTS (SELECT 1 FROM meta) AS used"
            ).fetchone()
        return row is not None and not row["used"]

    # Hosts

    def add_host(self, host: NewHost, fingerprint: str, cert_not_after: int) -> Host:
        now = int(time.time())
        try:
            with self._session(write=True) as conn:
                row = conn.execute(
                    "INSERT INTO hosts (name, machine_id, allowed_networks, pools,"
                    " deadman_timeout, created_at, last_seen)"
                    " VALUES (%s, %s, %s, %s, %s, %s, %s) RETURNING *",
                    (
                        host.name,
                        host.machine_id,
                        _json(host.allowed_networks),
                        _json(host.pools),
                        host.deadman_timeout,
                        now,
                        now,
                    ),
                ).fetchone()
                if row is None:
                    raise DatabaseUnavailable(f"{self.where}: INSERT returned no row")
                conn.execute(
                    "INSERT INTO certificates (fingerprint, host_id, not_after, created_at)"
                    " VALUES (%s, %s, %s, %s)",
                    (fingerprint, row["id"], cert_not_after, now),
                )
        except psycopg.errors.UniqueViolation:
            raise Conflict(
                f"a host named {host.name!r} or with that machine-id (or certificate) already"
                " exists"
            ) from None
        return host_of(row)

    def add_certificate(self, host_id: int, fingerprint: str, not_after: int) -> None:
        try:
            with self._session(write=True) as conn:
                conn.execute(
                    "INSERT INTO certificates (fingerprint, host_id, not_after, created_at)"
                    " VALUES (%s, %s, %s, %s)",
                    (fingerprint, host_id, not_after, int(time.time())),
                )
        except psycopg.errors.UniqueViolation:
            raise Conflict("that certificate is already enrolled") from None

    def renew_certificate(
        self, host_id: int, old: str, new: str, not_after: int, retire_at: int
    ) -> None:
        with self._session(write=True) as conn:
            conn.execute("DELETE FROM certificates WHERE replaces = %s", (old,))
            conn.execute(
                "INSERT INTO certificates (fingerprint, host_id, not_after, created_at, replaces)"
                " VALUES (%s, %s, %s, %s, %s)",
                (new, host_id, not_after, int(time.time()), old),
            )
            conn.execute(
                # From the last renewal: one lost on its way (or undone by its host, whose
                # initramfs could not take it) does not shorten the grace.
                "UPDATE certificates SET retire_at = %s WHERE fingerprint = %s",
                (retire_at, old),
            )

    def retire_replaced(self, new: str) -> str:
        with self._session(write=True) as conn:
            row = conn.execute(
                "UPDATE certificates n SET replaces = '' FROM certificates o"
                " WHERE n.fingerprint = %s AND n.replaces <> '' AND o.fingerprint = n.replaces"
                " RETURNING o.fingerprint",
                (new,),
            ).fetchone()
            if row is None:
                conn.execute("UPDATE certificates SET replaces = '' WHERE fingerprint = %s", (new,))
                return ""
            conn.execute("DELETE FROM certificates WHERE fingerprint = %s", (row["fingerprint"],))
            return str(row["fingerprint"])

    def remove_certificate(self, host_id: int, fingerprint: str) -> None:
        with self._session(write=True) as conn:
            cursor = conn.execute(
                "DELETE FROM certificates WHERE host_id = %s AND fingerprint = %s",
                (host_id, fingerprint),
            )
            if cursor.rowcount == 0:
                raise NotFound("the host has no certificate with that SHA-256 fingerprint")
            # And its renewals not used yet: they came through the certificate removed.
            conn.execute(
                "DELETE FROM certificates WHERE host_id = %s AND replaces = %s",
                (host_id, fingerprint),
            )

    def host_by_name(self, name: str) -> Host:
        with self._session() as conn:
            row = conn.execute("SELECT * FROM hosts WHERE name = %s", (name,)).fetchone()
        if row is None:
            raise NotFound(f"no host named {name!r}")
        return host_of(row)

    def host_by_fingerprint(self, fingerprint: str) -> Host | None:
        with self._session() as conn:
            row = conn.execute(
                "SELECT h.*, c.replaces AS replaces_certificate"
                " FROM hosts h JOIN certificates c ON c.host_id = h.id"
                " WHERE c.fingerprint = %s AND (c.retire_at = 0 OR c.retire_at > %s)",
                (fingerprint, int(time.time())),
            ).fetchone()
        return None if row is None else host_of(row)

    def arrive(self, fingerprint: str, charge: Charge) -> Arrival:
        if charge.buckets is not self:
            return arrive_apart(self, fingerprint, charge)
        with self._session() as conn:
            row = conn.execute(
                _ARRIVE,
                {
                    "name": charge.name,
                    "burst": charge.policy.burst,
                    "rate": charge.policy.rate,
                    "now": charge.now,
                    "wall": int(time.time()),
                    "fingerprint": fingerprint,
                },
            ).fetchone()
        if row is None:
            raise DatabaseUnavailable(f"{self.where}: the bucket charge returned no row")
        wait = _wait(row, charge.policy)
        return Arrival(wait, None if wait or row["id"] is None else host_of(row))

    def host_by_machine_id(self, machine_id: str) -> Host | None:
        with self._session() as conn:
            row = conn.execute(
                "SELECT * FROM hosts WHERE machine_id = %s", (machine_id,)
            ).fetchone()
        return None if row is None else host_of(row)

    def hosts(self) -> list[Host]:
        with self._session() as conn:
            rows = conn.execute("SELECT * FROM hosts ORDER BY name").fetchall()
        return [host_of(r) for r in rows]

    def certificates(self, host_id: int) -> list[tuple[str, int]]:
        with self._session() as conn:
            rows = conn.execute(
                "SELECT fingerprint, not_after FROM certificates WHERE host_id = %s"
                " ORDER BY seq",  # the order they were added in, as SQLite's rowid
                (host_id,),
            ).fetchall()
        return [(r["fingerprint"], int(r["not_after"])) for r in rows]

    def set_host_enabled(self, host_id: int, enabled: bool, reason: str) -> None:
        with self._session(write=True) as conn:
            conn.execute(
                "UPDATE hosts SET enabled = %s, disabled_reason = %s,"
                " last_seen = CASE WHEN %s THEN %s ELSE last_seen END WHERE id = %s",
                # Re-enabling restarts the dead-man clock, or the host would be
                # disabled again on its very next request.
                (enabled, "" if enabled else reason, enabled, int(time.time()), host_id),
            )

    def remove_host(self, host_id: int, delete_keys: bool) -> int:
        with self._session(write=True) as conn:
            row = conn.execute(
                "SELECT count(*) AS n FROM keys WHERE host_id = %s", (host_id,)
            ).fetchone()
            key_count = 0 if row is None else int(row["n"])
            if key_count and not delete_keys:
                raise Conflict(
                    f"the host owns {key_count} key(s); removing it would lose them"
                    " (pass --delete-keys if that is intended)"
                )
            conn.execute("DELETE FROM keys WHERE host_id = %s", (host_id,))
            conn.execute("DELETE FROM hosts WHERE id = %s", (host_id,))
        return key_count

    def touch_host(self, host_id: int, now: int) -> None:
        # On its own, not waited for on disk (nor on a synchronous standby): a crash can
        # only make the host look a few moments staler to the dead-man switch. Inside a
        # release's transaction it commits with the release, durably.
        joined = self._depth > 0
        with self._session(write=True) as conn:
            if not joined:
                conn.execute("SET LOCAL synchronous_commit TO off")
            conn.execute(
                "UPDATE hosts SET last_seen = greatest(last_seen, %s) WHERE id = %s",
                (now, host_id),
            )

    def record_report(
        self, host_id: int, pins: Sequence[str] | None, issuer: str, now: int
    ) -> None:
        with self._session(write=True) as conn:
            conn.execute("SET LOCAL synchronous_commit TO off")  # as touch_host's
            conn.execute(
                "INSERT INTO host_reports (host_id, pins, issuer, reported_at)"
                " VALUES (%s, %s, %s, %s) ON CONFLICT (host_id) DO UPDATE"
                " SET pins = coalesce(excluded.pins, host_reports.pins),"
                " issuer = excluded.issuer, reported_at = excluded.reported_at"
                " WHERE coalesce(excluded.pins, host_reports.pins)"
                " IS DISTINCT FROM host_reports.pins OR host_reports.issuer <> excluded.issuer",
                (host_id, None if pins is None else " ".join(pins), issuer, now),
            )

    def host_reports(self) -> dict[int, HostReport]:
        with self._session() as conn:
            rows = conn.execute("SELECT host_id, pins, issuer FROM host_reports").fetchall()
        return {
            int(r["host_id"]): HostReport(tuple((r["pins"] or "").split()), str(r["issuer"]))
            for r in rows
        }

    # Keys

    def insert_key(self, record: KeyRecord) -> None:
        self.insert_keys([record])

    def insert_keys(self, records: Sequence[KeyRecord]) -> None:
        """Insert every record or none (one transaction)."""
        try:
            with self._session(write=True) as conn, conn.cursor() as cursor:
                # Shared with other inserts, waited for by a rotation's retirement: a value
                # sealed under a key being retired is either seen by it or refused here.
                raw = _meta_in(conn, Ring.META_NAME, "FOR SHARE")
                if raw is not None and not all(Ring.decode(raw).admits(r.sealed) for r in records):
                    raise StaleMasterKey(
                        "sealed under a master key that was just retired; try again"
                    )
                cursor.executemany(
                    f"INSERT INTO keys ({KEY_INSERT_COLUMNS})"  # noqa: S608 (constants)
                    " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)",
                    [key_values(r) for r in records],
                )
        except psycopg.errors.UniqueViolation:
            raise Conflict("that dataset already has a key") from None

    def _one_key(self, where: str, params: tuple[object, ...]) -> KeyRecord | None:
        with self._session() as conn:
            row = conn.execute(
                f"SELECT {KEY_COLUMNS} FROM keys k JOIN hosts h ON h.id = k.host_id"  # noqa: S608
                f" WHERE {where}",
                params,
            ).fetchone()
        return None if row is None else _key(row)

    def key_for_dataset(self, host_id: int, pool_guid: str, dataset_guid: str) -> KeyRecord | None:
        return self._one_key(
            "k.host_id = %s AND k.pool_guid = %s AND k.dataset_guid = %s"
            # the partial index's condition, so it is used
            " AND k.dataset_guid <> '' AND k.state IN ('pending', 'active', 'revoked')",
            (host_id, pool_guid, dataset_guid),
        )

    def next_key_for_dataset(
        self, host_id: int, pool_guid: str, dataset_guid: str
    ) -> KeyRecord | None:
        return self._one_key(
            "k.host_id = %s AND k.pool_guid = %s AND k.dataset_guid = %s"
            " AND k.dataset_guid <> '' AND k.state = 'next'",
            (host_id, pool_guid, dataset_guid),
        )

    def keys_for_datasets(
        self, host_id: int, refs: Sequence[tuple[str, str]]
    ) -> dict[tuple[str, str], DatasetKeys]:
        if not refs:
            return {}
        # One (%s, %s) pair per dataset: plain text parameters cost the client library
        # less than two arrays, and a batch has a handful (one statement per size).
        pairs = ", ".join(["(%s, %s)"] * len(refs))
        with self._session() as conn:
            rows = conn.execute(
                f"SELECT {KEY_COLUMNS} FROM keys k JOIN hosts h ON h.id = k.host_id"  # noqa: S608
                " WHERE k.host_id = %s AND k.dataset_guid <> '' AND k.state <> 'retired'"
                f" AND (k.pool_guid, k.dataset_guid) IN ({pairs})",
                (host_id, *(part for ref in refs for part in ref)),
            ).fetchall()
        by_ref: dict[tuple[str, str], list[KeyRecord]] = {}
        for row in rows:
            by_ref.setdefault((row["pool_guid"], row["dataset_guid"]), []).append(_key(row))
        return {ref: dataset_keys(records) for ref, records in by_ref.items()}

    def key_for_legacy_name(self, host_id: int, pool_guid: str, name: str) -> KeyRecord | None:
        return self._one_key(
            "k.host_id = %s AND k.pool_guid = %s AND k.legacy_name = %s AND k.legacy_name <> ''",
            (host_id, pool_guid, name),
        )

    def key_by_id(self, key_id: str) -> KeyRecord:
        record = self._one_key("k.key_id = %s", (key_id,))
        if record is None:
            raise NotFound(f"no key {key_id}")
        return record

    def keys(self, host_id: int | None = None) -> list[KeyRecord]:
        query = f"SELECT {KEY_COLUMNS} FROM keys k JOIN hosts h ON h.id = k.host_id"  # noqa: S608
        with self._session() as conn:
            if host_id is None:
                rows = conn.execute(query + " ORDER BY h.name, k.dataset").fetchall()
            else:
                rows = conn.execute(
                    query + " WHERE k.host_id = %s ORDER BY k.dataset", (host_id,)
                ).fetchall()
        return [_key(r) for r in rows]

    def _key_state(self, conn: psycopg.Connection[dict[str, Any]], key_id: str) -> str:
        row = conn.execute(
            "SELECT state FROM keys WHERE key_id = %s FOR UPDATE", (key_id,)
        ).fetchone()
        if row is None:
            raise NotFound(f"no key {key_id}")
        return str(row["state"])

    def delete_key(self, key_id: str, expected: tuple[str, ...]) -> None:
        with self._session(write=True) as conn:
            state = self._key_state(conn, key_id)
            if state not in expected:
                raise Conflict(f"key {key_id} is {state}; revoke it first")
            conn.execute("DELETE FROM keys WHERE key_id = %s", (key_id,))

    def set_key_state(self, key_id: str, state: str, expected: tuple[str, ...], now: int) -> None:
        """Move a key to STATE if it is in one of EXPECTED; NotFound/Conflict otherwise."""
        with self._session(write=True) as conn:
            current = self._key_state(conn, key_id)
            if current not in expected:
                raise Conflict(f"key {key_id} is {current}, not {' or '.join(expected)}")
            conn.execute(
                "UPDATE keys SET state = %s, updated_at = %s WHERE key_id = %s",
                (state, now, key_id),
            )

    def promote_next(self, current_id: str, next_id: str, now: int) -> None:
        with self._session(write=True) as conn:
            for key_id, state in ((current_id, "active"), (next_id, "next")):
                if self._key_state(conn, key_id) != state:
                    raise Conflict(f"key {key_id} is no longer {state}")
            conn.execute(
                "UPDATE keys SET state = 'retired', updated_at = %s, rotate_requested = false"
                " WHERE key_id = %s",
                (now, current_id),
            )
            conn.execute(
                "UPDATE keys SET state = 'active', updated_at = %s WHERE key_id = %s",
                (now, next_id),
            )

    def delete_retired(self, host_id: int, before: int) -> list[str]:
        with self._session(write=True) as conn:
            rows = conn.execute(
                "DELETE FROM keys WHERE host_id = %s AND state = 'retired' AND updated_at < %s"
                " RETURNING key_id",
                (host_id, before),
            ).fetchall()
        return sorted(str(r["key_id"]) for r in rows)

    def request_rotation(self, host_id: int, dataset_guid: str | None) -> list[KeyRecord]:
        with self._session(write=True) as conn:
            rows = conn.execute(
                "UPDATE keys SET rotate_requested = true WHERE host_id = %s AND state = 'active'"
                " AND dataset_guid <> '' AND (%s::text IS NULL OR dataset_guid = %s)"
                " RETURNING key_id",
                (host_id, dataset_guid, dataset_guid),
            ).fetchall()
        return [self.key_by_id(str(r["key_id"])) for r in rows]

    def due_for_rotation(self, host_id: int, created_before: int) -> list[KeyRecord]:
        with self._session() as conn:
            rows = conn.execute(
                f"SELECT {KEY_COLUMNS} FROM keys k JOIN hosts h ON h.id = k.host_id"  # noqa: S608
                " WHERE k.host_id = %s AND k.state = 'active' AND k.dataset_guid <> ''"
                " AND (k.rotate_requested OR k.created_at < %s) ORDER BY k.dataset",
                (host_id, created_before),
            ).fetchall()
        return [_key(r) for r in rows]

    def replace_sealed(self, updates: Sequence[tuple[str, bytes, bytes]]) -> int:
        """Re-seal: each (key id, old value, new value) is written only where the row still
        holds the old value. Returns how many were."""
        written = 0
        with self._session(write=True) as conn:
            for key_id, old, new in updates:
                written += conn.execute(
                    "UPDATE keys SET sealed = %s WHERE key_id = %s AND sealed = %s",
                    (new, key_id, old),
                ).rowcount
        return written

    def first_sealed_key(self) -> KeyRecord | None:
        """The oldest key (by insertion), or None when there is none."""
        return self._one_key("true ORDER BY k.seq LIMIT 1", ())

    # The deployment's own facts

    def master_key_check(self) -> bytes | None:
        return self.meta("master_key_check")

    def meta(self, name: str) -> bytes | None:
        with self._session() as conn:
            return _meta_in(conn, name)

    def swap_meta(self, name: str, expected: bytes | None, value: bytes) -> bool:
        """Set NAME to VALUE if it holds EXPECTED (None: is absent); False if it did not."""
        with self._session(write=True) as conn:
            if expected is None:
                return bool(
                    conn.execute(
                        "INSERT INTO meta (name, value) VALUES (%s, %s) ON CONFLICT DO NOTHING",
                        (name, value),
                    ).rowcount
                )
            if _meta_in(conn, name, "FOR UPDATE") != expected:
                return False
            conn.execute("UPDATE meta SET value = %s WHERE name = %s", (value, name))
            return True

    def retire_master_keys(self, expected: bytes, ring: Ring) -> bool:
        """Write RING over EXPECTED, unless a sealed value still needs a key it drops."""
        with self._session(write=True) as conn:
            # The row lock waits for every insert that read the ring before it (FOR SHARE);
            # the counts below, each a fresh snapshot, then see what they wrote.
            if _meta_in(conn, Ring.META_NAME, "FOR UPDATE") != expected:
                return False
            header = FORMAT_V2 + bytes.fromhex(ring.sealing)
            row = conn.execute(
                "SELECT (SELECT count(*) FROM keys WHERE substring(sealed from 1 for 9) <> %s)"
                " + (SELECT count(*) FROM meta WHERE name = 'master_key_check'"
                " AND substring(value from 1 for 9) <> %s) AS left",
                (header, header),
            ).fetchone()
            if row is None or row["left"]:
                return False
            conn.execute(
                "UPDATE meta SET value = %s WHERE name = %s", (ring.encode(), Ring.META_NAME)
            )
            return True

    def set_master_key_check(self, sealed: bytes) -> None:
        """Store the check value, unless one is there already: it is never replaced."""
        with self._session(write=True) as conn:
            conn.execute(
                "INSERT INTO meta (name, value) VALUES ('master_key_check', %s)"
                " ON CONFLICT (name) DO NOTHING",
                (sealed,),
            )

    # The audit trail (dbaudit.py writes through these)

    def append_audit(self, lines: Sequence[str], durable: bool) -> None:
        """Insert audit records, in one statement; inside transaction() they commit with
        it (durably, whatever DURABLE says)."""
        values: tuple[object, ...]
        if len(lines) == 1:
            insert, values = "INSERT INTO audit (record) VALUES (%s)", (lines[0],)
        else:
            insert, values = "INSERT INTO audit (record) SELECT unnest(%s::text[])", (list(lines),)
        if durable or self._depth > 0:
            with self._session() as conn:
                conn.execute(insert, values)
            return
        with self._session(write=True) as conn:
            conn.execute("SET LOCAL synchronous_commit TO off")
            conn.execute(insert, values)

    def audit_lines(self, last: int = 0) -> list[str]:
        """Every audit record in order, or the LAST ones."""
        with self._session() as conn:
            if last:
                rows = conn.execute(
                    "SELECT record FROM (SELECT id, record FROM audit ORDER BY id DESC LIMIT %s)"
                    " newest ORDER BY id",
                    (last,),
                ).fetchall()
            else:
                rows = conn.execute("SELECT record FROM audit ORDER BY id").fetchall()
        return [str(r["record"]) for r in rows]

    @contextlib.contextmanager
    def expiring_audit(self, before: float) -> Iterator[ExpiringAudit | None]:
        """The audit records older than BEFORE (Unix time), oldest first, read as the
        block iterates them; those it iterated are deleted when it ends without an error,
        in its transaction: what the block writes through the audit table commits with the
        deletion. None when another node is pruning now."""
        with self._session(write=True) as conn:
            row = conn.execute(
                "SELECT pg_try_advisory_xact_lock(%s) AS mine", (PRUNE_LOCK,)
            ).fetchone()
            if row is None or not row["mine"]:
                yield None
                return
            with conn.cursor(name="expiring_audit") as cursor:
                cursor.itersize = EXPORT_BATCH
                cursor.execute(
                    "SELECT id, record FROM audit WHERE ts < to_timestamp(%s) ORDER BY id",
                    (before,),
                )
                records = ExpiringAudit(cursor)
                yield records
            if records.last_id is not None:
                conn.execute(
                    "DELETE FROM audit WHERE ts < to_timestamp(%s) AND id <= %s",
                    (before, records.last_id),
                )

    # Rate-limit buckets (ratelimit.py)

    def charge(self, name: str, policy: BucketPolicy, now: float) -> float:
        """ratelimit.take() in one statement, so that nodes charging one bucket take turns
        on its row: the same arithmetic, in the same order (test_ratelimit.py holds both
        to the same exact waits). UNLOGGED: its commit waits for no disk and no standby."""
        with self._session() as conn:
            row = conn.execute(
                _CHARGE, {"name": name, "burst": policy.burst, "rate": policy.rate, "now": now}
            ).fetchone()
        return 0.0 if row is None else _wait(row, policy)

    def prune(self, before: float) -> None:
        with self._session() as conn:
            conn.execute("DELETE FROM rate_buckets WHERE stamp < %s", (before,))


# What the bucket holds at %(now)s before the charge: full for a clock that went back.
_AVAILABLE = (
    "(CASE WHEN b.stamp > %(now)s THEN %(burst)s"
    " ELSE least(%(burst)s, b.tokens + greatest(0, %(now)s - b.stamp) * %(rate)s) END)"
)
# Constants only; the values are parameters.
_CHARGE = (
    "INSERT INTO rate_buckets AS b (name, tokens, stamp, granted)"  # noqa: S608
    " VALUES (%(name)s, %(burst)s - 1, %(now)s, true)"
    " ON CONFLICT (name) DO UPDATE SET"
    f" tokens = CASE WHEN {_AVAILABLE} >= 1 THEN {_AVAILABLE} - 1 ELSE {_AVAILABLE} END,"
    f" granted = {_AVAILABLE} >= 1, stamp = %(now)s"
    " RETURNING tokens, granted"
)


# A request's first read: its certificate's bucket charged and its host found, in one
# statement (a round trip costs both sides more than either query does).
_ARRIVE = (
    f"WITH bucket AS ({_CHARGE})"  # noqa: S608 (constants)
    " SELECT bucket.tokens, bucket.granted, h.*, c.replaces AS replaces_certificate"
    " FROM bucket LEFT JOIN (certificates c JOIN hosts h ON h.id = c.host_id)"
    " ON c.fingerprint = %(fingerprint)s AND (c.retire_at = 0 OR c.retire_at > %(wall)s)"
)


def _wait(charged: dict[str, Any], policy: BucketPolicy) -> float:
    """The seconds a charge's row asks to wait: 0 when it was granted."""
    if charged["granted"]:
        return 0.0
    return (1.0 - float(charged["tokens"])) / policy.rate


class ExpiringAudit:
    """Audit records read through a server-side cursor, EXPORT_BATCH rows at a time: a
    day of a large fleet is about a million of them. Remembers the last one iterated,
    which is as far as expiring_audit deletes."""

    def __init__(self, cursor: psycopg.Cursor[dict[str, Any]]) -> None:
        self._cursor = cursor
        self.last_id: int | None = None

    def __iter__(self) -> Iterator[str]:
        for row in self._cursor:
            self.last_id = int(row["id"])
            yield str(row["record"])


def _json(values: Sequence[str]) -> str:
    return json.dumps(list(values))


def _meta_in(conn: psycopg.Connection[dict[str, Any]], name: str, lock: str = "") -> bytes | None:
    row = conn.execute(
        f"SELECT value FROM meta WHERE name = %s {lock}",  # noqa: S608 (a constant)
        (name,),
    ).fetchone()
    return None if row is None else bytes(row["value"])


def _key(row: dict[str, Any]) -> KeyRecord:
    return KeyRecord(
        key_id=row["key_id"],
        host_id=int(row["host_id"]),
        host=row["name"],
        pool_guid=row["pool_guid"],
        dataset_guid=row["dataset_guid"],
        legacy_name=row["legacy_name"],
        dataset=row["dataset"],
        keyformat=row["keyformat"],
        state=row["state"],
        origin=row["origin"],
        sealed=bytes(row["sealed"]),
        created_at=int(row["created_at"]),
        updated_at=int(row["updated_at"]),
    )
