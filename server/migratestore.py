"""Moving a key server from SQLite to PostgreSQL: `zfs-unlock-server migrate-store`.

One moment of keys.db (a read transaction) and the audit log are copied into an empty
PostgreSQL database in one transaction; then the copy is read back and checked: the
same number of hosts, certificates, keys and audit records, and every sealed key opens
under the master key where it now lives (each is bound to its host, pool, dataset and
key id). Only then does server.toml name the database. keys.db and audit.log stay as
they were: removing the [database] table goes back to them.
"""

from __future__ import annotations

import contextlib
import datetime
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from zfs_unlock_server import atomicfile, database
from zfs_unlock_server import config as server_config
from zfs_unlock_server.admin import actor
from zfs_unlock_server.audit import TableAuditLog
from zfs_unlock_server.config import Layout, ServerConfig
from zfs_unlock_server.errors import CannotCreate, IntegrityError, UsageError
from zfs_unlock_server.pgstore import PgStore, describe
from zfs_unlock_server.sealing import Sealer
from zfs_unlock_server.service import context_of
from zfs_unlock_server.store import KeyRecord


@dataclass(frozen=True)
class Report:
    counts: list[tuple[str, int, int]]  # what, in SQLite, in PostgreSQL
    keys_opened: int  # of the keys read back, those that open under the master key
    where: str

    @property
    def matches(self) -> bool:
        keys = next(copied for what, _, copied in self.counts if what == "keys")
        return all(a == b for _, a, b in self.counts) and self.keys_opened == keys


def audit_rows(path: Path) -> Iterator[tuple[str, str]]:
    """(time, line) for each line of the audit log; a line without a readable time takes
    the time of the line before it."""
    if not path.exists():
        return
    when = "1970-01-01T00:00:00+00:00"
    with path.open("rb") as handle:
        for raw in handle:
            line = raw.rstrip(b"\n").decode("utf-8", "replace")
            with contextlib.suppress(ValueError, AttributeError):  # not JSON, or not a record
                when = str(json.loads(line).get("ts") or when)
            yield when, line


def migrate(layout: Layout, config: ServerConfig, url: str, sealer: Sealer) -> Report:
    if config.database.shared:
        raise UsageError(f"{layout.config} already names a PostgreSQL database")
    source = database.open_store(layout, config)
    try:
        snapshot = source.snapshot()
    finally:
        source.close()
    target = PgStore(url, where="--to", migrate=True)
    try:
        if not target.is_empty():
            raise CannotCreate(
                f"{target.where} already holds hosts, keys or a master key; migrate-store"
                " copies into an empty database only"
            )
        log = server_config.audit_path(layout, config)
        copied_lines = 0

        def counted() -> Iterator[tuple[str, str]]:
            nonlocal copied_lines
            for row in audit_rows(log):
                copied_lines += 1
                yield row

        target.load(snapshot, counted())
        copied = target.snapshot()
        opened = sum(1 for record in copied.keys if _opens(sealer, record))
        report = Report(
            [
                ("hosts", len(snapshot.hosts), len(copied.hosts)),
                ("certificates", len(snapshot.certificates), len(copied.certificates)),
                ("keys", len(snapshot.keys), len(copied.keys)),
                (
                    "approval policies",
                    len(snapshot.approval_policies),
                    len(copied.approval_policies),
                ),
                ("approval page admins", len(snapshot.admins), len(copied.admins)),
                (
                    "tripped silence conditions",
                    len(snapshot.silence_trips),
                    len(copied.silence_trips),
                ),
                ("audit records", copied_lines, target.audit_count()),
            ],
            opened,
            target.where,
        )
        if report.matches:
            TableAuditLog(target).write(
                {
                    "event": "store_migrated",
                    "decision": "allow",
                    "actor": actor(),
                    "from": str(layout.database),
                    "to": describe(url),
                    "hosts": len(copied.hosts),
                    "keys": len(copied.keys),
                }
            )
            _name_the_database(layout, url)
        return report
    finally:
        target.close()


def _opens(sealer: Sealer, record: KeyRecord) -> bool:
    try:
        sealer.open(record.sealed, context_of(record))
    except IntegrityError:
        return False
    return True


def _name_the_database(layout: Layout, url: str) -> None:
    """Add the [database] table to server.toml, checked before it replaces the file."""
    text = layout.config.read_text(encoding="utf-8").rstrip("\n")
    when = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d")
    text += (
        f"\n\n# Moved from keys.db by 'zfs-unlock-server migrate-store' on {when}; without"
        f" this table\n# the server uses keys.db and audit.log again, as they were then.\n"
        f"[database]\nurl = {json.dumps(url)}\n"
    )
    server_config.parse(text, str(layout.config))
    atomicfile.write_whole(layout.config, text.encode("utf-8"), 0o644, replace=True)
