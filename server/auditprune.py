"""Audit retention in the shared database: records older than [database]
audit_retention_days go to a gzip-compressed file of JSON lines (the audit log's own
format), then out of the table, in one transaction with the record of the export.

The file is written and synced before anything is deleted; a failure at any step
deletes nothing, and the next run exports the same records again, to a file of its own.
SQLite's audit.log is not pruned here: it is a file, rotated by logrotate.
"""

from __future__ import annotations

import datetime
import hashlib
import itertools
import json
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from zfs_unlock_server import atomicfile, database
from zfs_unlock_server.admin import actor
from zfs_unlock_server.config import Layout, ServerConfig

DAY = 86400
GZIP_WINDOW = 16 + zlib.MAX_WBITS  # zlib's gzip container


@dataclass(frozen=True)
class Pruned:
    records: int
    file: Path | None  # None: nothing was exported
    why_not: str = ""  # when nothing was: why


def _stamp(when: float) -> str:
    return datetime.datetime.fromtimestamp(when, datetime.UTC).strftime("%Y%m%dT%H%M%SZ")


def _ts(line: str) -> str:
    try:
        value = json.loads(line).get("ts", "")
    except ValueError:
        return ""
    return str(value)


class Export:
    """What went into an export, counted as it is written: a day of a large fleet is a
    million records, so they are compressed and written as they are read, never held."""

    def __init__(self, first: str) -> None:
        self.first = self.last = first
        self.records = 0
        self.digest = hashlib.sha256()

    def gzipped(self, lines: Iterable[str]) -> Iterator[bytes]:
        """LINES as a gzip member (no name, time 0), in chunks, counted and digested."""
        packer = zlib.compressobj(9, zlib.DEFLATED, GZIP_WINDOW)
        for line in lines:
            self.records += 1
            self.last = line
            chunk = packer.compress(line.encode("ascii") + b"\n")
            if chunk:
                self.digest.update(chunk)
                yield chunk
        tail = packer.flush()
        self.digest.update(tail)
        yield tail


def prune(layout: Layout, config: ServerConfig, export_dir: Path, now: float) -> Pruned:
    """Export and delete what is older than the retention; Pruned(0, None) when it is off."""
    if not config.database.shared:
        return Pruned(
            0,
            None,
            "the audit trail is a file here, not a database table; logrotate rotates it"
            " (/etc/logrotate.d/zfs-unlock-server); nothing to do",
        )
    days = config.database.audit_retention_days
    if not days:
        return Pruned(0, None, "audit_retention_days is 0 (keep every record); nothing to do")
    store = database.open_shared_store(layout, config)
    try:
        audit = database.open_audit(layout, config, store)
        with store.expiring_audit(now - days * DAY) as records:
            if records is None:
                return Pruned(0, None, "another node is pruning the audit table now; nothing done")
            lines = iter(records)
            first = next(lines, None)
            if first is None:
                return Pruned(
                    0, None, f"no audit record is older than {days} day(s); nothing to do"
                )
            export = Export(first)
            path = export_dir / f"audit-{_stamp(now - days * DAY)}-exported-{_stamp(now)}.jsonl.gz"
            atomicfile.write_whole(path, export.gzipped(itertools.chain([first], lines)), 0o600)
            # In the transaction that deletes: recorded if, and only if, they are gone.
            audit.write(
                {
                    "event": "audit_exported",
                    "decision": "allow",
                    "actor": actor(),
                    "file": str(path),
                    "records": export.records,
                    "first": _ts(export.first),
                    "last": _ts(export.last),
                    "sha256": export.digest.hexdigest(),
                    "retention_days": days,
                }
            )
        return Pruned(export.records, path)
    finally:
        store.close()
