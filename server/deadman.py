"""The dead-man switch: a host unseen for longer than its timeout is disabled until an
admin enables it again. Requests apply it to their own host, admin listings to all."""

from __future__ import annotations

import time

from zfs_unlock_server.approvalgate import deny_open
from zfs_unlock_server.audit import AuditRecord, AuditSink
from zfs_unlock_server.store import Host, Store

# Writing last_seen on every request would cost a disk sync each; the dead-man
# timeout is measured in minutes or more, so this much staleness is harmless.
TOUCH_INTERVAL = 10


def deadman_timeout(host: Host, default: int) -> int:
    """Seconds HOST may stay unseen; 0 means never disabled."""
    return default if host.deadman_timeout is None else host.deadman_timeout


def deadman_expired(host: Host, default: int, now: int) -> bool:
    timeout = deadman_timeout(host, default)
    return bool(host.enabled and timeout and now - host.last_seen > timeout)


def disable_silent_host(
    store: Store, audit: AuditSink, host: Host, default: int, request: AuditRecord | None = None
) -> None:
    """The dead-man switch fires: disable HOST until an admin enables it, and deny what it
    asked approval for. Audited, with REQUEST's fields (certificate, address, request id)
    when a request fired it."""
    store.set_host_enabled(host.id, False, "deadman")
    record: AuditRecord = {
        "event": "host_disabled",
        "decision": "allow",
        "reason": "deadman",
        "host": host.name,
        "last_seen": host.last_seen,
        "timeout": deadman_timeout(host, default),
        "actor": "deadman-switch",
        **(request or {}),
    }
    audit.write(record)
    deny_open(store, audit, host, None, "deadman-switch", "deadman", int(time.time()))


def expire_silent_hosts(store: Store, audit: AuditSink, default: int, now: int) -> list[str]:
    """Apply the dead-man switch to every host at once (admin commands do, before listing)."""
    expired = [h for h in store.hosts() if deadman_expired(h, default, now)]
    for host in expired:
        disable_silent_host(store, audit, host, default)
    return [h.name for h in expired]
