"""The approval gate: which of a release's keys wait for a person, and what became of
an earlier request with the same certificate and nonce.

The release runs every other check first; the gate then sees only keys that would go
out. A key whose policy (approval.py) asks for approval now goes out only through an
approved request that names it, was made by the same certificate with the same nonce,
and has not been used or expired. Anything else keeps it back.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from zfs_unlock_server import approval
from zfs_unlock_server.approval import Policy
from zfs_unlock_server.approvalrows import HOST_WIDE, Approval, ApprovalDataset
from zfs_unlock_server.audit import AuditError, AuditRecord, AuditSink
from zfs_unlock_server.errors import Conflict, DatabaseUnavailable
from zfs_unlock_server.store import Host, Store

Ref = tuple[str, str]  # (pool GUID, dataset GUID)
# Closed requests stay listed this long (the audit log keeps them for good).
KEEP_CLOSED = 7 * 86400


def new_approval_id() -> str:
    return "a-" + os.urandom(6).hex()


@dataclass
class Gated:
    """What the gate made of the keys a release would send."""

    # Keys that go out: none of them needed approval, or their approval was given.
    passed: set[Ref] = field(default_factory=set)
    # Of those, the ones that go out through an approval, and which. The release records
    # them, then uses the approval up (consume); if another request used it first, they
    # do not go out.
    approved: dict[Ref, Approval] = field(default_factory=dict)
    # Keys that wait for WAITING, the open request that names them.
    waiting: Approval | None = None
    held: list[Ref] = field(default_factory=list)
    # Keys kept back for good, with the audit reason.
    refused: dict[Ref, str] = field(default_factory=dict)
    # A request made by this release (for the notification hook).
    created: Approval | None = None


class ApprovalGate:
    def __init__(
        self,
        store: Store,
        audit: AuditSink,
        clock: Callable[[], float],
        max_pending: int,
        local_time: Callable[[float], datetime.datetime] = datetime.datetime.fromtimestamp,
    ) -> None:
        self.store = store
        self.audit = audit
        self.clock = clock
        self.max_pending = max_pending
        self.local_time = local_time  # the policies' --approval-hours are local time
        self._policies: tuple[str, int, dict[Ref, Policy]] | None = None

    def policies(self, request_id: str, host: Host) -> dict[Ref, Policy]:
        """HOST's policies, read once per request."""
        if self._policies is None or self._policies[:2] != (request_id, host.id):
            stored = self.store.approval_policies(host.id)
            parsed = {ref: approval.from_text(text) for ref, text in stored.items()}
            self._policies = (request_id, host.id, parsed)
        return self._policies[2]

    def check_silence(self, request: AuditRecord, host: Host, now: int) -> None:
        """Before a request counts as seen: trip the host's silence condition when it was
        silent longer than a policy allows. It stays tripped until an approved release."""
        silent_for = now - host.last_seen
        if silent_for <= approval.MIN_SILENCE:
            return
        limits = [p.silent for p in self.policies(str(request.get("request_id")), host).values()]
        if any(limit and silent_for > limit for limit in limits) and self.store.trip_silence(
            host.id, silent_for
        ):
            self.audit.write(
                {
                    "event": "approval_silence_tripped",
                    "decision": "allow",
                    "host": host.name,
                    "last_seen": host.last_seen,
                    "silent_for": silent_for,
                    **request,
                }
            )

    def asked(
        self, request: AuditRecord, host: Host, refs: Sequence[Ref]
    ) -> dict[Ref, tuple[list[str], int]]:
        """Of REFS, those whose policy asks for approval now: why, and its timeout."""
        policies = self.policies(str(request.get("request_id")), host)
        if not policies:
            return {}
        now = int(self.clock())
        silent_for = max(now - host.last_seen, self.store.silence_tripped(host.id))
        local = self.local_time(now)
        source_ip = str(request.get("source_ip", ""))
        found: dict[Ref, tuple[list[str], int]] = {}
        for ref in refs:
            policy = policies.get(ref) or policies.get(HOST_WIDE) or approval.NONE
            reasons = policy.reasons(source_ip, silent_for, local)
            if reasons:
                found[ref] = (reasons, policy.timeout)
        return found

    def gate(
        self,
        request: AuditRecord,
        host: Host,
        nonce: str,
        candidates: Mapping[Ref, str],
    ) -> Gated:
        """Decide CANDIDATES (the keys the release would send, with their datasets' names)
        for the request REQUEST (its audit fields: certificate, address, request id)."""
        result = Gated()
        asked = self.asked(request, host, list(candidates))
        result.passed = {ref for ref in candidates if ref not in asked}
        now = int(self.clock())
        if not asked:
            return result
        if not nonce:  # an agent that cannot wait: its keys are kept back
            result.refused = dict.fromkeys(asked, "approval_needs_nonce")
            return result
        cert_fp = str(request.get("cert_fp"))
        existing = self.store.approval_for(host.id, cert_fp, nonce)
        if existing is None:
            self._request(request, host, cert_fp, nonce, candidates, asked, now, result)
            return result
        for ref in asked:
            if ref not in existing.refs:
                result.refused[ref] = "approval_not_covered"
        covered = [ref for ref in asked if ref in existing.refs]
        if not covered:
            return result
        status = existing.status(now)
        if status == "pending":
            result.waiting, result.held = existing, covered
        elif status == "approved":
            result.passed.update(covered)
            result.approved = dict.fromkeys(covered, existing)
        else:
            reason = {"denied": "approval_denied", "expired": "approval_expired"}
            result.refused |= dict.fromkeys(covered, reason.get(status, "approval_used"))
        return result

    def _request(
        self,
        request: AuditRecord,
        host: Host,
        cert_fp: str,
        nonce: str,
        names: Mapping[Ref, str],
        asked: Mapping[Ref, tuple[Sequence[str], int]],
        now: int,
        result: Gated,
    ) -> None:
        """A new pending request for the keys ASKED, within the host's cap."""
        if self.store.open_approvals(host.id, now) >= self.max_pending:
            result.refused = dict.fromkeys(asked, "approval_cap")
            return
        reasons = sorted({r for why, _ in asked.values() for r in why})
        pending = Approval(
            id=new_approval_id(),
            host_id=host.id,
            host=host.name,
            cert_fp=cert_fp,
            nonce=nonce,
            datasets=tuple(ApprovalDataset(p, d, names[(p, d)]) for p, d in asked),
            source_ip=str(request.get("source_ip", "")),
            reasons=tuple(reasons),
            state="pending",
            created_at=now,
            expires_at=now + min(timeout for _, timeout in asked.values()),
        )
        # Recorded first, as every change that can lead to a release.
        self.audit.write(
            {
                "event": "approval_requested",
                "decision": "pending",
                "host": host.name,
                "approval": pending.id,
                "datasets": ",".join(d.dataset for d in pending.datasets),
                "reasons": ",".join(reasons),
                "expires_at": pending.expires_at,
                **request,
            }
        )
        try:
            self.store.add_approval(pending, keep_closed_after=now - KEEP_CLOSED)
        except Conflict:
            # The same certificate and nonce stored a request meanwhile (an agent's retry
            # that crossed its first try): answered 503, and the next ask finds it.
            failed: AuditRecord = {
                "event": "approval_requested",
                "decision": "failed",
                "reason": "Conflict",
                "host": host.name,
                "approval": pending.id,
                **request,
            }
            with contextlib.suppress(AuditError):
                self.audit.write(failed)
            raise DatabaseUnavailable(
                "an approval request with this nonce was stored meanwhile"
            ) from None
        result.waiting, result.held, result.created = pending, list(asked), pending

    def consume(self, host: Host, approved: Approval) -> bool:
        """Use an approved request up, once its release is recorded: False when another
        request did first (or it was denied or expired since). The host's silence
        condition, if tripped, is reset by the release it allowed."""
        if not self.store.mark_released(approved.id, int(self.clock())):
            return False
        self.store.clear_silence(host.id)
        return True


def deny_open(
    store: Store,
    audit: AuditSink,
    host: Host,
    refs: Sequence[Ref] | None,
    actor: str,
    reason: str,
    now: int,
) -> list[str]:
    """Deny every open request of HOST (or those naming one of REFS): its host was
    disabled, or a key it names was revoked. Made first and recorded after, as every
    change that takes access away. The ids denied."""
    denied = []
    for request in store.approvals(host.id):
        if request.status(now) not in ("pending", "approved"):
            continue
        if refs is not None and not request.refs & set(refs):
            continue
        if store.decide_approval(request.id, ("pending", "approved"), "denied", actor, reason, now):
            denied.append(request.id)
    if denied:
        audit.write(
            *(
                {
                    "event": "approval_denied",
                    "decision": "allow",
                    "host": host.name,
                    "approval": approval_id,
                    "actor": actor,
                    "reason": reason,
                }
                for approval_id in denied
            )
        )
    return denied
