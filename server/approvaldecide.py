"""A person's decision on a release that waits: approve or deny, from the command line
(`zfs-unlock-server approval`) or the approval page, with the same checks and records.

An approval is checked against what holds now: the request is still pending and not
expired, its host is enabled (the dead-man switch applied first), and every key it
names is still live. It is recorded before it is made, as every change that can lead
to a release; a denial is made first and recorded after.
"""

from __future__ import annotations

from zfs_unlock_server.approvalrows import Approval
from zfs_unlock_server.audit import AuditSink
from zfs_unlock_server.deadman import deadman_expired, disable_silent_host
from zfs_unlock_server.errors import Conflict
from zfs_unlock_server.store import Store

MAX_NOTE = 200  # characters of a decision's reason that are kept


def _note(text: str) -> str:
    """A reason as it is recorded: one line, printable, at most MAX_NOTE characters."""
    return "".join(c if c.isprintable() else " " for c in " ".join(text.split()))[:MAX_NOTE]


def approve(
    store: Store,
    audit: AuditSink,
    approval_id: str,
    actor: str,
    note: str,
    now: int,
    deadman_default: int,
) -> Approval:
    """Approve a pending request; Conflict (saying why) when it cannot be."""
    request = store.approval(approval_id)
    status = request.status(now)
    if status != "pending":
        raise Conflict(f"approval {approval_id} is {status}, not pending")
    host = store.host_by_name(request.host)
    if deadman_expired(host, deadman_default, now):
        disable_silent_host(store, audit, host, deadman_default)
        raise Conflict(f"host {host.name}: its dead-man switch fired; nothing is approved")
    if not host.enabled:
        raise Conflict(f"host {host.name} is disabled; nothing is approved")
    live = {
        (k.pool_guid, k.dataset_guid)
        for k in store.keys(host.id)
        if k.state in ("pending", "active")
    }
    if not request.refs <= live:
        raise Conflict(f"approval {approval_id} names a key that is no longer live")
    record = {
        "event": "approval_approved",
        "decision": "allow",
        "host": host.name,
        "approval": approval_id,
        "datasets": ",".join(d.dataset for d in request.datasets),
        "actor": actor,
        "note": _note(note) or None,
    }
    audit.write(record)
    # A fresh window from now: an approval given late still reaches an agent that waits
    # between asks (the daemon's pauses grow up to its retry_max).
    until = now + (request.expires_at - request.created_at)
    if not store.decide_approval(
        approval_id, ("pending",), "approved", actor, _note(note), now, until
    ):
        audit.write({**record, "decision": "failed", "reason": "decided_or_expired_meanwhile"})
        raise Conflict(f"approval {approval_id} was decided, or expired, meanwhile")
    return store.approval(approval_id)


def deny(
    store: Store, audit: AuditSink, approval_id: str, actor: str, note: str, now: int
) -> Approval:
    """Deny an open request (pending, or approved and not yet used)."""
    request = store.approval(approval_id)
    status = request.status(now)
    if status not in ("pending", "approved"):
        raise Conflict(f"approval {approval_id} is {status}; there is nothing to deny")
    if not store.decide_approval(
        approval_id, ("pending", "approved"), "denied", actor, _note(note), now
    ):
        raise Conflict(f"approval {approval_id} was decided, used or expired meanwhile")
    audit.write(
        {
            "event": "approval_denied",
            "decision": "allow",
            "host": request.host,
            "approval": approval_id,
            "actor": actor,
            "reason": "denied",
            "note": _note(note) or None,
        }
    )
    return store.approval(approval_id)
