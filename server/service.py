"""Release decisions: who may have which key, and the audit record of every answer.

Transport-free: app.py turns these results into HTTP. Every check that can
refuse a key lives here, in one order, and every refusal names its reason in
the audit log only; callers learn nothing but "denied".
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

from zfs_unlock_common import protocol
from zfs_unlock_common.protocol import DatasetRef
from zfs_unlock_server import approval, masterring, tlspins
from zfs_unlock_server.approvalgate import ApprovalGate, Gated
from zfs_unlock_server.approvalrows import Approval
from zfs_unlock_server.audit import AuditError, AuditRecord, AuditSink
from zfs_unlock_server.deadman import (
    TOUCH_INTERVAL,
    deadman_expired,
    deadman_timeout,
    disable_silent_host,
)
from zfs_unlock_server.errors import Conflict, IntegrityError, StaleMasterKey
from zfs_unlock_server.pki import certificate_fingerprint, pem_to_der
from zfs_unlock_server.pki import not_after as not_after_of
from zfs_unlock_server.ratelimit import Charge
from zfs_unlock_server.sealing import KeyContext, Sealer, UnknownMasterKey
from zfs_unlock_server.store import DatasetKeys, Host, KeyRecord, Store

log = logging.getLogger("zfs_unlock_server")

LIVE_STATES = ("pending", "active")
# Seconds a key replaced by a rotation stays sealed (for recovery) before a check-in of
# its host deletes it.
RETIRED_KEY_GRACE = 30 * 86400


class Denied(Exception):
    """The request is refused; `reason` goes to the audit log, never to the client."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class Caller:
    fingerprint: str
    source_ip: str
    request_id: str

    def audit_fields(self) -> dict[str, str]:
        """What names this caller in each audit record of its request."""
        return {
            "cert_fp": self.fingerprint,
            "source_ip": self.source_ip,
            "request_id": self.request_id,
        }


@dataclass(frozen=True)
class Released:
    record: KeyRecord
    material: bytes


@dataclass(frozen=True)
class HostStatus:
    """What `zfs-unlock-agent check` learns about its own enrollment: enough to say why
    its keys would be refused, nothing about other hosts, never a key."""

    host: Host
    certificate_not_after: int
    machine_id_matches: bool
    address_allowed: bool
    deadman_timeout: int
    server_time: float


@dataclass(frozen=True)
class Waiting:
    """Keys kept back until a person approves REQUEST; the agent asks again after
    RETRY_AFTER seconds, with the same nonce."""

    request: Approval
    refs: list[DatasetRef]
    retry_after: int


@dataclass
class BatchResult:
    released: list[Released]
    denied: list[DatasetRef]
    # The next keys of released datasets whose rotation has begun.
    upcoming: list[Released] = field(default_factory=list)
    waiting: Waiting | None = None


def new_key_id() -> str:
    return "k-" + os.urandom(12).hex()


def context_of(record: KeyRecord) -> KeyContext:
    return KeyContext(
        host=record.host,
        pool_guid=record.pool_guid,
        dataset_guid=record.dataset_guid,
        legacy_name=record.legacy_name,
        key_id=record.key_id,
        keyformat=record.keyformat,
    )


def address_allowed(source_ip: str, networks: Sequence[str]) -> bool:
    return not networks or approval.in_networks(source_ip, networks)


def pool_allowed(host: Host, pool_guid: str) -> bool:
    """A host enrolled with pools (--pool) may touch keys on those pools only."""
    return not host.pools or pool_guid in host.pools


class KeyService:
    def __init__(
        self,
        store: Store,
        sealer: Sealer,
        audit: AuditSink,
        default_deadman_timeout: int,
        clock: Callable[[], float] = time.time,
        retired_key_grace: int = RETIRED_KEY_GRACE,
        max_key_age: int = 0,
        served_pin: Callable[[], str] = lambda: "",
        sign: Callable[[str, bytes], bytes] | None = None,
        renewed_certificate_grace: int = 7 * 86400,
        next_ca_key_id: Callable[[], str] = lambda: "",
        max_pending_approvals: int = 4,
        approval_poll: int = 5,
        notify: Callable[[Approval], None] = lambda request: None,
    ) -> None:
        self.store = store
        self.sealer = sealer
        self.audit = audit
        self.default_deadman_timeout = default_deadman_timeout
        self.clock = clock
        self.retired_key_grace = retired_key_grace
        self.max_key_age = max_key_age  # seconds; 0: keys are rotated only when asked
        self.served_pin = served_pin  # the pin of the certificate this node serves now
        self.sign = sign  # (host name, CSR PEM) -> certificate PEM, for renewals
        self.renewed_certificate_grace = renewed_certificate_grace
        self.next_ca_key_id = next_ca_key_id  # "" unless a CA rollover runs (ca next)
        self._looked_up: tuple[str, Host | None] | None = None  # (request id, its host)
        self.approvals = ApprovalGate(store, audit, clock, max_pending_approvals)
        self.approval_poll = approval_poll  # seconds an agent waits between asks
        self.notify = notify  # told of each new request for approval (after its commit)

    # The host-level gate, shared by every route.

    def _record(self, caller: Caller, event: str, **fields: str | int | None) -> AuditRecord:
        return {"event": event, **caller.audit_fields(), **fields}

    def deny(self, caller: Caller, event: str, reason: str, **fields: str | int | None) -> Denied:
        """Audit a refusal and return the exception to raise. Audit errors propagate."""
        self.audit.write(self._record(caller, event, decision="deny", reason=reason, **fields))
        return Denied(reason)

    def arrive(self, caller: Caller, charge: Charge) -> float:
        """Spend the caller's certificate bucket CHARGE and read its host, in one statement
        where the store keeps the buckets; return the wait the bucket asks (0: go on)."""
        arrival = self.store.arrive(caller.fingerprint, charge)
        if not arrival.wait:
            self._looked_up = (caller.request_id, arrival.host)
        return arrival.wait

    def known_host(self, caller: Caller) -> Host | None:
        """The caller's host, read once per request: arrive() reads it with the rate limit,
        the route's checks use the same answer (a shared database costs a round trip per
        read)."""
        if self._looked_up is not None and self._looked_up[0] == caller.request_id:
            return self._looked_up[1]
        host = self.store.host_by_fingerprint(caller.fingerprint)
        self._looked_up = (caller.request_id, host)
        return host

    def deadman_timeout(self, host: Host) -> int:
        return deadman_timeout(host, self.default_deadman_timeout)

    def authenticate(self, caller: Caller, machine_id: str, event: str) -> Host:
        """Return the caller's host if every host-level check passes, else raise Denied."""
        host = self.known_host(caller)
        if host is None:
            raise self.deny(caller, event, "unknown_certificate", machine_id=machine_id)
        named = {"host": host.name, "machine_id": machine_id}
        if not host.enabled:
            raise self.deny(caller, event, "host_disabled", **named)
        now = int(self.clock())
        # Before the dead-man switch: a host it disables must still ask a person once an
        # admin enables it again (which restarts its last_seen).
        self.approvals.check_silence(caller.audit_fields(), host, now)
        if deadman_expired(host, self.default_deadman_timeout, now):
            disable_silent_host(
                self.store, self.audit, host, self.default_deadman_timeout, caller.audit_fields()
            )
            raise self.deny(caller, event, "deadman_expired", **named)
        if not address_allowed(caller.source_ip, host.allowed_networks):
            raise self.deny(caller, event, "source_address_not_allowed", **named)
        if machine_id != host.machine_id:
            raise self.deny(caller, event, "machine_id_mismatch", **named)
        if host.replaces_certificate:
            self._retire_replaced(caller, host)
        return host

    def _retire_replaced(self, caller: Caller, host: Host) -> None:
        """The first request with a renewed certificate ends the one it replaced (taken
        away first, recorded after, as every change that takes access away)."""
        old = self.store.retire_replaced(caller.fingerprint)
        if old:
            self.audit.write(
                self._record(
                    caller, "certificate_replaced", decision="allow", host=host.name, replaced=old
                )
            )

    def renew(self, caller: Caller, machine_id: str, csr_pem: bytes) -> bytes:
        """A new certificate for the caller's host over the CSR's key. The caller's stays
        valid until the new one is first used, or for renewed_certificate_grace."""
        if self.sign is None:
            raise RuntimeError("this service cannot sign certificates")
        with self.serving(caller, machine_id, "renew") as host:
            cert_pem = self.sign(host.name, csr_pem)
            new = certificate_fingerprint(pem_to_der(cert_pem))
            not_after = not_after_of(cert_pem)
            self.audit.write(
                self._record(
                    caller,
                    "certificate_renewed",
                    decision="allow",
                    host=host.name,
                    new_cert_fp=new,
                    not_after=not_after,
                )
            )
            now = int(self.clock())
            self.store.renew_certificate(
                host.id, caller.fingerprint, new, not_after, now + self.renewed_certificate_grace
            )
        return cert_pem

    @contextlib.contextmanager
    def serving(
        self, caller: Caller, machine_id: str, event: str, seen: bool = True
    ) -> Iterator[Host]:
        """Authenticate, run a route, then count the host as seen for the dead-man switch
        (unless SEEN is False: the route does it itself, with its record).

        Seen means: it passed the host checks and its request was recorded. A
        request the audit log could not record (AuditError) does not count.
        """
        host = self.authenticate(caller, machine_id, event)
        try:
            yield host
        except (Denied, Conflict):
            if seen:
                self._seen(host)
            raise
        if seen:
            self._seen(host)

    def _seen(self, host: Host) -> None:
        now = int(self.clock())
        if now - host.last_seen >= TOUCH_INTERVAL:
            self.store.touch_host(host.id, now)

    # Routes

    def checkin(
        self, caller: Caller, machine_id: str, pins: Sequence[str] | None = None, issuer: str = ""
    ) -> Host:
        """A host says it is alive, and which server pins it holds (PINS, from agents that
        take part in TLS key rollovers); ISSUER is the key id of its certificate's CA."""
        host = self.authenticate(caller, machine_id, "checkin")
        # Recorded first: a check-in that cannot be audited does not reset the dead-man clock.
        self.audit.write(self._record(caller, "checkin", decision="allow", host=host.name))
        now = int(self.clock())
        self.store.touch_host(host.id, now)
        self.store.record_report(host.id, pins, issuer, now)
        for key_id in self.store.delete_retired(host.id, now - self.retired_key_grace):
            self.audit.write(
                self._record(
                    caller,
                    "key_deleted",
                    decision="allow",
                    reason="retired_grace_ended",
                    host=host.name,
                    key_id=key_id,
                )
            )
        return host

    def renewal_wanted(self, issuer: str) -> bool:
        """During a CA rollover: whether a certificate issued by ISSUER is to be renewed
        (under the next CA) by its host's daemon now."""
        upcoming = self.next_ca_key_id()
        return bool(upcoming) and issuer != upcoming

    def announced_pins(self) -> tuple[list[str], list[str]]:
        """The pins hosts are to trust: (those the nodes serve now, the next ones)."""
        served = {self.served_pin(), *tlspins.served_pins(self.store)} - {""}
        return sorted(served), tlspins.next_pins(self.store)

    def rotations_due(self, host: Host) -> list[DatasetRef]:
        """The datasets whose key the host's daemon should rotate now: asked for by an
        admin (key rotate), or older than max_key_age."""
        before = int(self.clock()) - self.max_key_age if self.max_key_age else 0
        due = self.store.due_for_rotation(host.id, before)
        return [DatasetRef(r.pool_guid, r.dataset_guid) for r in due]

    def host_status(self, caller: Caller, machine_id: str) -> HostStatus:
        """The caller's own enrollment, as the release checks would see it now; an unknown
        certificate is refused like everywhere else. Changes nothing but what the dead-man
        switch would change, and does not count as being seen."""
        host = self.store.host_by_fingerprint(caller.fingerprint)
        if host is None:
            raise self.deny(caller, "host_status", "unknown_certificate", machine_id=machine_id)
        now = self.clock()
        if deadman_expired(host, self.default_deadman_timeout, int(now)):
            disable_silent_host(
                self.store, self.audit, host, self.default_deadman_timeout, caller.audit_fields()
            )
            host = self.store.host_by_name(host.name)
        self.audit.write(
            self._record(caller, "host_status", decision="allow", host=host.name),
            durable=False,  # a question, not a decision: no sync
        )
        not_after = dict(self.store.certificates(host.id))[caller.fingerprint]
        return HostStatus(
            host=host,
            certificate_not_after=not_after,
            machine_id_matches=machine_id == host.machine_id,
            address_allowed=address_allowed(caller.source_ip, host.allowed_networks),
            deadman_timeout=self.deadman_timeout(host),
            server_time=now,
        )

    def _releasable(
        self, caller: Caller, host: Host, ref: DatasetRef, record: KeyRecord | None
    ) -> tuple[Released | None, AuditRecord]:
        """Decide one dataset, whose current key is RECORD. Returns the key (or None) and
        the audit record to write."""
        base = self._record(
            caller, "release", host=host.name, pool=ref.pool_guid, dataset_guid=ref.dataset_guid
        )
        if not pool_allowed(host, ref.pool_guid):
            return None, {**base, "decision": "deny", "reason": "pool_not_allowed"}
        return self._open_for_release(record, base)

    def _open_for_release(
        self, record: KeyRecord | None, base: AuditRecord
    ) -> tuple[Released | None, AuditRecord]:
        if record is None:
            return None, {**base, "decision": "deny", "reason": "no_such_key"}
        named = {**base, "dataset": record.dataset, "key_id": record.key_id}
        if record.state not in (*LIVE_STATES, "next"):
            return None, {**named, "decision": "deny", "reason": f"key_{record.state}"}
        try:
            material = self.open_sealed(record)
        except IntegrityError:
            return None, {**named, "decision": "deny", "reason": "integrity_failure"}
        return Released(record, material), {**named, "decision": "allow", "reason": "ok"}

    def release(
        self,
        caller: Caller,
        machine_id: str,
        refs: Sequence[DatasetRef],
        with_next: bool = True,
        nonce: str = "",
    ) -> BatchResult:
        """Release each requested key the host may have and, WITH_NEXT, the next key of each
        released dataset whose rotation has begun (the dataset may already be wrapped with
        it). Keys whose approval policy asks for a person wait for one (NONCE binds the
        request to this agent; without one they are refused). Audited before anything is
        returned."""
        with self.serving(caller, machine_id, "release", seen=False) as host:
            result = BatchResult([], [])
            records: list[AuditRecord] = []
            # The key reads, their records and the host's last_seen commit together (in a
            # shared database), and before anything is returned: one durable write for the
            # whole batch; if it fails nothing is released.
            with self.store.transaction():
                keys = self.store.keys_for_datasets(
                    host.id, [(r.pool_guid, r.dataset_guid) for r in refs]
                )
                decided: list[tuple[DatasetRef, Released | None, AuditRecord, DatasetKeys]] = []
                for ref in refs:
                    found = keys.get((ref.pool_guid, ref.dataset_guid), DatasetKeys(None))
                    released, audit_record = self._releasable(caller, host, ref, found.current)
                    decided.append((ref, released, audit_record, found))
                gated = self.approvals.gate(
                    caller.audit_fields(),
                    host,
                    nonce,
                    {
                        (r.pool_guid, r.dataset_guid): k.record.dataset
                        for r, k, _, _ in decided
                        if k is not None
                    },
                )
                for ref, released, first, found in decided:  # in request order
                    record = first if released is None else _gated_record(gated, ref, first)
                    records.append(record)
                    if released is None or record["decision"] != "allow":
                        if record["decision"] == "deny":
                            result.denied.append(ref)
                        continue
                    result.released.append(released)
                    if with_next and found.next is not None:
                        base = {k: v for k, v in record.items() if k != "reason"}
                        upcoming, next_record = self._open_for_release(found.next, base)
                        if upcoming is not None:
                            next_record = {**next_record, "reason": "next_key"}
                            result.upcoming.append(upcoming)
                        records.append(next_record)
                if gated.waiting is not None:
                    result.waiting = Waiting(
                        gated.waiting, [DatasetRef(*r) for r in gated.held], self.approval_poll
                    )
                self.audit.write(*records)
                self._use_approval(caller, host, gated, result, records)
                self._seen(host)
        if gated.created is not None:
            self.notify(gated.created)
        return result

    def _use_approval(
        self,
        caller: Caller,
        host: Host,
        gated: Gated,
        result: BatchResult,
        records: list[AuditRecord],
    ) -> None:
        """After the release's records: use its approval up. Should another request have
        used it first, its keys do not go out after all, and the log says so."""
        if not gated.approved:
            return
        request = next(iter(gated.approved.values()))
        if self.approvals.consume(host, request):
            return
        lost = {DatasetRef(*ref) for ref in gated.approved}
        result.released = [r for r in result.released if _ref_of(r) not in lost]
        result.upcoming = [r for r in result.upcoming if _ref_of(r) not in lost]
        result.denied += sorted(lost)
        self.audit.write(
            *(
                {**r, "decision": "failed", "reason": "approval_used"}
                for r in records
                if r.get("approval") == request.id and r.get("decision") == "allow"
            )
        )

    def release_legacy(
        self, caller: Caller, machine_id: str, pool_guid: str, name: str
    ) -> Released:
        """The SimpleZFSKeySystem route: imported keys by (machine, pool, name). It cannot
        wait: a key whose policy asks for approval is refused here."""
        with self.serving(caller, machine_id, "release") as host:
            base = self._record(caller, "release", host=host.name, pool=pool_guid, legacy_name=name)
            with self.store.transaction():  # as release()
                if not pool_allowed(host, pool_guid):
                    result: Released | None = None
                    audit_record: AuditRecord = {
                        **base,
                        "decision": "deny",
                        "reason": "pool_not_allowed",
                    }
                else:
                    record = self.store.key_for_legacy_name(host.id, pool_guid, name)
                    result, audit_record = self._open_for_release(record, base)
                if result is not None:
                    ref = (pool_guid, result.record.dataset_guid)
                    gated = self.approvals.gate(
                        caller.audit_fields(), host, "", {ref: result.record.dataset}
                    )
                    audit_record = _gated_record(gated, DatasetRef(*ref), audit_record)
                self.audit.write(audit_record)
            if result is None or audit_record["decision"] != "allow":
                raise Denied(str(audit_record["reason"]))
        return result

    def enroll(
        self,
        caller: Caller,
        machine_id: str,
        ref: DatasetRef,
        dataset: str,
        keyformat: str,
        imported: bytes | None,
    ) -> tuple[Released, bool]:
        """Create a pending key for a dataset of the caller's host.

        Returns (key, created). Repeating the request for a dataset whose key is
        still pending returns that same key, so a lost response can be retried;
        a dataset whose key is active or revoked is a Conflict: never a second key.
        """
        with self.serving(caller, machine_id, "enroll") as host:
            return self._enroll(caller, host, ref, dataset, keyformat, imported)

    def _enroll(
        self,
        caller: Caller,
        host: Host,
        ref: DatasetRef,
        dataset: str,
        keyformat: str,
        imported: bytes | None,
    ) -> tuple[Released, bool]:
        fields = {
            "host": host.name,
            "pool": ref.pool_guid,
            "dataset_guid": ref.dataset_guid,
            "dataset": dataset,
        }
        if not pool_allowed(host, ref.pool_guid):
            raise self.deny(caller, "enroll", "pool_not_allowed", **fields)
        existing = self.store.key_for_dataset(host.id, ref.pool_guid, ref.dataset_guid)
        if existing is not None:
            self._no_approval_needed(caller, host, ref, "enroll", fields)
            return self._repeat_enrolment(caller, existing, keyformat, imported, fields)
        # Recorded before the key exists: an enrollment that cannot be audited creates nothing.
        key_id = new_key_id()
        created = self._record(
            caller,
            "enroll",
            decision="allow",
            reason="created",
            key_id=key_id,
            keyformat=keyformat,
            origin="generated" if imported is None else "imported",
            **fields,
        )
        with self._recorded_first(created):
            record, material = self.create_key(
                host, ref, dataset, keyformat, imported, "pending", key_id
            )
        return Released(record, material), True

    def _no_approval_needed(
        self, caller: Caller, host: Host, ref: DatasetRef, event: str, fields: dict[str, str]
    ) -> None:
        """A route that would hand out a key made before (a repeated enrollment), or one
        that the host will protect data with (a rotation's next key), cannot wait for
        approval: where the dataset's policy asks for it now, it is refused."""
        if self.approvals.asked(caller.audit_fields(), host, [(ref.pool_guid, ref.dataset_guid)]):
            raise self.deny(caller, event, "approval_required", **fields)

    @contextlib.contextmanager
    def _recorded_first(self, record: AuditRecord) -> Iterator[None]:
        """Write RECORD, then make the change; a change that fails is recorded as failed."""
        self.audit.write(record)
        try:
            yield
        except BaseException as exc:
            with contextlib.suppress(AuditError):
                self.audit.write({**record, "decision": "failed", "reason": type(exc).__name__})
            raise

    def _repeat_enrolment(
        self,
        caller: Caller,
        existing: KeyRecord,
        keyformat: str,
        imported: bytes | None,
        fields: dict[str, str],
    ) -> tuple[Released, bool]:
        if existing.state != "pending" or existing.keyformat != keyformat:
            self.audit.write(
                self._record(
                    caller,
                    "enroll",
                    decision="deny",
                    reason="key_exists",
                    key_id=existing.key_id,
                    **fields,
                )
            )
            raise Conflict("that dataset already has a key")
        try:
            material = self.open_sealed(existing)
        except IntegrityError:
            raise self.deny(
                caller, "enroll", "integrity_failure", key_id=existing.key_id, **fields
            ) from None
        if imported is not None and imported != material:
            self.audit.write(
                self._record(
                    caller,
                    "enroll",
                    decision="deny",
                    reason="key_exists",
                    key_id=existing.key_id,
                    **fields,
                )
            )
            raise Conflict("that dataset already has a different pending key")
        self.audit.write(
            self._record(
                caller,
                "enroll",
                decision="allow",
                reason="repeated",
                key_id=existing.key_id,
                **fields,
            )
        )
        return Released(existing, material), False

    def create_key(
        self,
        host: Host,
        ref: DatasetRef,
        dataset: str,
        keyformat: str,
        imported: bytes | None,
        state: str,
        key_id: str | None = None,
    ) -> tuple[KeyRecord, bytes]:
        """Generate (or take) key material, seal it and store it. Not audited: callers do."""
        if imported is None:
            material = generate_material(keyformat)
            origin = "generated"
        else:
            protocol.check_key_material(imported, keyformat)
            material, origin = imported, "imported"
        now = int(self.clock())
        key_id = key_id or new_key_id()
        masterring.refresh(self.sealer, self.store)  # seal under the ring's key of the moment
        context = KeyContext(host.name, ref.pool_guid, ref.dataset_guid, "", key_id, keyformat)
        record = KeyRecord(
            key_id=key_id,
            host_id=host.id,
            host=host.name,
            pool_guid=ref.pool_guid,
            dataset_guid=ref.dataset_guid,
            legacy_name="",
            dataset=dataset,
            keyformat=keyformat,
            state=state,
            origin=origin,
            sealed=self._seal(material, context),
            created_at=now,
            updated_at=now,
        )
        self.store.insert_key(record)
        return record, material

    def open_sealed(self, record: KeyRecord) -> bytes:
        """RECORD's key material. Under a master key not held yet (a rotation's new one),
        the ring is read once; a key still not held is StaleMasterKey (503): this process
        started before a rotation it did not follow, and a restart gives it the new key."""
        try:
            return self.sealer.open(record.sealed, context_of(record))
        except UnknownMasterKey:
            masterring.refresh(self.sealer, self.store)
        try:
            return self.sealer.open(record.sealed, context_of(record))
        except UnknownMasterKey as exc:
            log.error("%s; restart this server: it reads its master key at start", exc)
            raise StaleMasterKey(str(exc)) from None

    def _seal(self, material: bytes | bytearray, context: KeyContext) -> bytes:
        try:
            return self.sealer.seal(material, context)
        except UnknownMasterKey as exc:
            log.error("%s; restart this server: it reads its master key at start", exc)
            raise StaleMasterKey(str(exc)) from None

    def next_key(self, caller: Caller, machine_id: str, ref: DatasetRef) -> tuple[Released, bool]:
        """Begin rotating a dataset's active key: its next key, made now or (a request
        repeated after a lost answer) the one made before. Returns (key, created)."""
        with self.serving(caller, machine_id, "rotate") as host:
            fields = {"host": host.name, "pool": ref.pool_guid, "dataset_guid": ref.dataset_guid}
            if not pool_allowed(host, ref.pool_guid):
                raise self.deny(caller, "rotate", "pool_not_allowed", **fields)
            current = self.store.key_for_dataset(host.id, ref.pool_guid, ref.dataset_guid)
            if current is None:
                raise self.deny(caller, "rotate", "no_such_key", **fields)
            fields["dataset"] = current.dataset
            if current.state != "active":
                self.audit.write(
                    self._record(
                        caller, "rotate", decision="deny", reason=f"key_{current.state}", **fields
                    )
                )
                raise Conflict(f"the dataset's key is {current.state}; only an active key rotates")
            # A next key made now would be the one the host re-wraps its data with later:
            # made for a caller the policy holds back (a copied certificate, elsewhere),
            # it would hand that caller the future key. So neither made nor repeated.
            self._no_approval_needed(caller, host, ref, "rotate", fields)
            existing = self.store.next_key_for_dataset(host.id, ref.pool_guid, ref.dataset_guid)
            if existing is not None:
                try:
                    material = self.open_sealed(existing)
                except IntegrityError:
                    raise self.deny(
                        caller, "rotate", "integrity_failure", key_id=existing.key_id, **fields
                    ) from None
                self.audit.write(
                    self._record(
                        caller,
                        "rotate",
                        decision="allow",
                        reason="repeated",
                        key_id=existing.key_id,
                        **fields,
                    )
                )
                return Released(existing, material), False
            key_id = new_key_id()
            created = self._record(
                caller,
                "rotate",
                decision="allow",
                reason="next_key_created",
                key_id=key_id,
                replaces=current.key_id,
                **fields,
            )
            with self._recorded_first(created):
                record, material = self.create_key(
                    host, ref, current.dataset, current.keyformat, None, "next", key_id
                )
            return Released(record, material), True

    def activate(self, caller: Caller, machine_id: str, ref: DatasetRef, key_id: str) -> KeyRecord:
        """Mark a pending key active once the host proved it opens the dataset; or, a
        rotation's next key once the dataset is wrapped with it, retiring the key before."""
        with self.serving(caller, machine_id, "activate") as host:
            fields = {
                "host": host.name,
                "pool": ref.pool_guid,
                "dataset_guid": ref.dataset_guid,
                "key_id": key_id,
            }
            if not pool_allowed(host, ref.pool_guid):
                raise self.deny(caller, "activate", "pool_not_allowed", **fields)
            record = self.store.key_for_dataset(host.id, ref.pool_guid, ref.dataset_guid)
            if record is not None and record.key_id != key_id:
                upcoming = self.store.next_key_for_dataset(host.id, ref.pool_guid, ref.dataset_guid)
                if upcoming is not None and upcoming.key_id == key_id:
                    return self._finish_rotation(caller, record, upcoming, fields)
            if record is None or record.key_id != key_id:
                raise self.deny(caller, "activate", "no_such_key", **fields)
            if record.state not in LIVE_STATES:
                raise self.deny(caller, "activate", f"key_{record.state}", **fields)
            allowed = self._record(caller, "activate", decision="allow", reason="ok", **fields)
            with self._recorded_first(allowed):
                if record.state == "pending":
                    self.store.set_key_state(key_id, "active", ("pending",), int(self.clock()))
            return self.store.key_by_id(key_id)

    def _finish_rotation(
        self, caller: Caller, current: KeyRecord, upcoming: KeyRecord, fields: dict[str, str]
    ) -> KeyRecord:
        if current.state != "active":
            raise self.deny(caller, "activate", f"key_{current.state}", **fields)
        allowed = self._record(
            caller, "activate", decision="allow", reason="rotated", retired=current.key_id, **fields
        )
        with self._recorded_first(allowed):
            self.store.promote_next(current.key_id, upcoming.key_id, int(self.clock()))
        return self.store.key_by_id(upcoming.key_id)


def generate_material(keyformat: str) -> bytes:
    """32 bytes from the OS CSPRNG, as raw bytes or as 64 hex digits (hex, passphrase)."""
    secret = os.urandom(protocol.RAW_KEY_BYTES)
    if keyformat == "raw":
        return secret
    # A rotation's passphrase: 64 hex digits are a valid one, and as strong as a raw key.
    return secret.hex().encode("ascii")


def _ref_of(released: Released) -> DatasetRef:
    return DatasetRef(released.record.pool_guid, released.record.dataset_guid)


def _gated_record(gated: Gated, ref: DatasetRef, record: AuditRecord) -> AuditRecord:
    """The audit record of a key the release would send, as the approval gate decided."""
    key = (ref.pool_guid, ref.dataset_guid)
    if key in gated.refused:
        return {**record, "decision": "deny", "reason": gated.refused[key]}
    if key not in gated.passed:
        waiting = gated.waiting.id if gated.waiting is not None else None
        return {**record, "decision": "pending", "reason": "approval_pending", "approval": waiting}
    if key in gated.approved:
        given = gated.approved[key]
        return {
            **record,
            "reason": "approved",
            "approval": given.id,
            "approved_by": given.decided_by,
        }
    return record
