"""Which database a data directory uses, opened for a command or a worker: SQLite's
keys.db in the data directory, or the PostgreSQL database server.toml names. The one
place that chooses; everything above uses the Store, audit and bucket interfaces."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from zfs_unlock_server import audit
from zfs_unlock_server.audit import AuditLog, AuditSink, AuditValue, SharedSync, TableAuditLog
from zfs_unlock_server.config import Layout, ServerConfig, audit_path
from zfs_unlock_server.errors import ConfigError
from zfs_unlock_server.ratelimit import Buckets, SqliteBuckets
from zfs_unlock_server.sqlitestore import SqliteStore
from zfs_unlock_server.store import Store

if TYPE_CHECKING:  # imported when used: psycopg is needed only with a [database] url
    from zfs_unlock_server.pgstore import PgStore


def _pgstore() -> type[PgStore]:
    try:
        from zfs_unlock_server.pgstore import PgStore  # noqa: PLC0415
    except ImportError as exc:
        raise ConfigError(
            f"[database] url names PostgreSQL, but {exc.name} is not installed"
            " (Debian: apt install python3-psycopg; pip: pip install psycopg)"
        ) from None
    return PgStore


def open_store(layout: Layout, config: ServerConfig, migrate: bool = False) -> Store:
    """The data directory's database at this server's schema (MIGRATE: brought to it)."""
    if config.database.shared:
        return _pgstore()(config.database.url, str(layout.config), migrate=migrate)
    return SqliteStore(layout.database, migrate=migrate)


def _shared(store: Store) -> PgStore:
    pg_store = _pgstore()
    if not isinstance(store, pg_store):
        raise TypeError("a [database] url, but not a PostgreSQL store")
    return store


def open_shared_store(layout: Layout, config: ServerConfig) -> PgStore:
    """The PostgreSQL store of a data directory whose server.toml names one."""
    return _shared(open_store(layout, config))


def describe(layout: Layout, config: ServerConfig) -> str:
    if config.database.shared:
        from zfs_unlock_server.pgstore import describe as describe_url  # noqa: PLC0415

        return describe_url(config.database.url)
    return str(layout.database)


def open_audit(
    layout: Layout, config: ServerConfig, store: Store, shared: SharedSync | None = None
) -> AuditSink:
    """The audit trail: in the shared database with PostgreSQL, else the audit log file."""
    if config.database.shared:
        return TableAuditLog(_shared(store))
    return AuditLog(audit_path(layout, config), shared)


@dataclass(frozen=True)
class BucketPlace:
    buckets: Buckets
    clock: Callable[[], float]


def open_buckets(layout: Layout, config: ServerConfig, store: Store) -> BucketPlace:
    """Rate-limit buckets: a file of this server's own, on its monotonic clock; in the
    shared database, on the wall clock that every node reads alike."""
    if config.database.shared:
        return BucketPlace(_shared(store), time.time)
    return BucketPlace(SqliteBuckets(layout.ratelimit), time.monotonic)


def read_audit(layout: Layout, config: ServerConfig) -> Iterable[dict[str, AuditValue]]:
    """Every audit record: from the shared database, or from the audit log file."""
    if not config.database.shared:
        return audit.read(audit_path(layout, config))
    store = open_shared_store(layout, config)
    try:
        return list(audit.parse(store.audit_lines()))
    finally:
        store.close()
