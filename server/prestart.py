"""What `serve` checks before it binds: everything a worker will need, so that a bad data
directory fails once, with a clear message and exit code, and not in every worker."""

from __future__ import annotations

import logging

from zfs_unlock_server import audit, database, tlsctx, tlspins
from zfs_unlock_server.admin import actor
from zfs_unlock_server.config import Layout, ServerConfig
from zfs_unlock_server.masterkey import check_master_key
from zfs_unlock_server.sealing import load_master_key

log = logging.getLogger("zfs_unlock_server")


def check_data_dir(layout: Layout, config: ServerConfig) -> None:
    """Master key, TLS context, database, and that the master key is the database's; raise
    ServerError (or OSError) on the first that a worker could not use. Then record the
    start in the audit log, if it can."""
    sealer = load_master_key(layout.master_key)
    tlsctx.server_context(layout)
    # A database that cannot be reached at start is an error (exit 69), not a node that
    # would answer 503 to everyone: its configuration is more likely wrong than the
    # database down. Once serving, a database that goes away only pauses it.
    store = database.open_store(layout, config)
    try:
        check_master_key(sealer, store, layout)
        # Announced by every node from now on (tlspins.py): hosts hear each node's pin.
        tlspins.change_pins(
            store, tlspins.SERVED_META, add=tlspins.pin_of_pem(layout.server_cert.read_bytes())
        )
        record_start(database.open_audit(layout, config, store))
    finally:
        store.close()


def record_start(audit_log: audit.AuditSink) -> None:
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
