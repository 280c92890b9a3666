"""Rebuild a data directory from a backup file, as init would have made it.

Everything is checked before anything is written: the file (every byte), its database,
its server.toml, the server key against its certificate, and a master key when one is
given. A restore that fails half-way removes what it wrote.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from zfs_unlock_server import backupformat, pki, secretfile
from zfs_unlock_server import config as server_config
from zfs_unlock_server.admin import actor
from zfs_unlock_server.audit import AuditLog
from zfs_unlock_server.backup import check_image, opened_image
from zfs_unlock_server.backup import check_sealer as check_master_key
from zfs_unlock_server.backupformat import Archive
from zfs_unlock_server.config import Layout
from zfs_unlock_server.errors import CannotCreate
from zfs_unlock_server.sealing import Sealer
from zfs_unlock_server.sqlitestore import SqliteStore


@dataclass(frozen=True)
class MasterKey:
    """A master key given to restore: checked against the backup, and placed as
    master.key when PLACE."""

    sealer: Sealer
    material: bytes | None  # what to write as master.key; None: leave it where it is


def read_checked(file: Path, master: MasterKey | None) -> Archive:
    """FILE's archive, every check passed (DataError 65, WrongMasterKey 78)."""
    where = str(file)
    archive = backupformat.parse(file.read_bytes(), where)
    check_image(archive.members["keys.db"], where)
    server_config.parse(archive.members["server.toml"].decode("utf-8", "replace"), where)
    pki.check_key_pair(archive.members["server.crt"], archive.members["server.key"])
    if master is not None:
        with opened_image(archive.members["keys.db"]) as db:
            check_master_key(db, master.sealer, where)
    return archive


def restore(
    file: Path,
    root: Path,
    master: MasterKey | None = None,
    enter: Callable[[], object] = lambda: None,
) -> Archive:
    """Make the data directory ROOT (missing or empty) from the backup FILE. ENTER runs
    once everything is read and checked, before ROOT is touched (the CLI becomes its
    owner there, as for init)."""
    if root.exists() and any(root.iterdir()):
        raise CannotCreate(f"{root} exists and is not empty; refusing to overwrite it")
    archive = read_checked(file, master)
    enter()
    made = not root.exists()
    layout = Layout(root)
    written: list[Path] = []
    try:
        root.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(root, 0o700)
        for name, mode in backupformat.MEMBERS.items():
            written.append(root / name)
            secretfile.write_new(root / name, archive.members[name], mode)
        if master is not None and master.material is not None:
            written.append(layout.master_key)
            secretfile.write_new(layout.master_key, master.material, 0o400)
        written += [layout.database.with_name(layout.database.name + s) for s in ("-wal", "-shm")]
        # WAL mode, and the schema serve expects (a backup may be of an older server)
        SqliteStore(layout.database, migrate=True).close()
        config = server_config.load(layout)
        audit = AuditLog(server_config.audit_path(layout, config))
        try:
            audit.write(
                {
                    "event": "restore",
                    "decision": "allow",
                    "actor": actor(),
                    "file": str(file),
                    "hosts": archive.manifest["hosts"],
                    "keys": archive.manifest["keys"],
                    "checksum": archive.checksum,
                }
            )
        finally:
            audit.close()
    except BaseException:
        for path in [*written, layout.default_audit_log]:
            with contextlib.suppress(OSError):
                path.unlink()
        if made:
            with contextlib.suppress(OSError):
                root.rmdir()
        raise
    return archive
