"""What `serve` checks before it binds: everything a worker will need, so that a bad data
directory fails once, with a clear message and exit code, and not in every worker."""

from __future__ import annotations

import logging
from pathlib import Path

from zfs_unlock_server import audit, tlsctx
from zfs_unlock_server import config as server_config
from zfs_unlock_server.admin import actor
from zfs_unlock_server.config import Layout, ServerConfig
from zfs_unlock_server.masterkey import check_master_key
from zfs_unlock_server.sealing import load_master_key
from zfs_unlock_server.store import SqliteStore

log = logging.getLogger("zfs_unlock_server")


def check_data_dir(layout: Layout, config: ServerConfig) -> None:
    """Master key, TLS context, database, and that the master key is the database's; raise
    ServerError (or OSError) on the first that a worker could not use. Then record the
    start in the audit log, if it can."""
    sealer = load_master_key(layout.master_key)
    tlsctx.server_context(layout)
    store = SqliteStore(layout.database)
    try:
        check_master_key(sealer, store, layout)
    finally:
        store.close()
    record_start(server_config.audit_path(layout, config))


def record_start(path: Path) -> None:
    audit_log = audit.AuditLog(path)
    try:
        audit_log.write(
            {"event": "server_start", "decision": "allow", "actor": actor()}, durable=False
        )
    except audit.AuditError as exc:
        # Serve anyway: every request checks the log, so none is answered (503)
        # until it is writable again, and then none needs a restart.
        log.warning("%s; refusing every request until fixed", exc)
    finally:
        audit_log.close()  # the workers open their own
