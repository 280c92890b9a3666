"""What the server keeps in its database, and the narrow interface every backend offers.

Two backends implement `Store`: SQLite (sqlitestore.py, one server, the default) and
PostgreSQL (pgstore.py, several stateless nodes on one database). The rest of the server
uses this interface only, so a decision reads the same whichever holds the rows.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any, Protocol

from zfs_unlock_server.approvalrows import Approval
from zfs_unlock_server.ratelimit import Charge
from zfs_unlock_server.sealing import Ring


@dataclass(frozen=True)
class Host:
    id: int
    name: str
    machine_id: str
    allowed_networks: tuple[str, ...]
    pools: tuple[str, ...]
    enabled: bool
    disabled_reason: str
    deadman_timeout: int | None
    created_at: int
    last_seen: int
    # Found through a certificate that renewed this one (its SHA-256 fingerprint), which
    # is still valid: the first request with the new certificate retires it.
    replaces_certificate: str = ""


@dataclass(frozen=True)
class KeyRecord:
    key_id: str
    host_id: int
    host: str
    pool_guid: str
    dataset_guid: str
    legacy_name: str
    dataset: str
    keyformat: str
    state: str
    origin: str
    sealed: bytes
    created_at: int
    updated_at: int


# A dataset's current key is in one of these; beside it, a rotation's 'next' key, and the
# 'retired' keys that rotations replaced, kept for a grace period.
CURRENT_STATES = ("pending", "active", "revoked")


@dataclass(frozen=True)
class DatasetKeys:
    """A dataset's current key and, while a rotation runs, its next one."""

    current: KeyRecord | None
    next: KeyRecord | None = None


def dataset_keys(records: Sequence[KeyRecord]) -> DatasetKeys:
    """One dataset's non-retired rows, sorted into its current key and its next one."""
    current = next((r for r in records if r.state in CURRENT_STATES), None)
    return DatasetKeys(current, next((r for r in records if r.state == "next"), None))


@dataclass(frozen=True)
class NewHost:
    name: str
    machine_id: str
    allowed_networks: tuple[str, ...]
    pools: tuple[str, ...]
    deadman_timeout: int | None


@dataclass(frozen=True)
class Certificate:
    fingerprint: str
    host_id: int
    not_after: int
    created_at: int
    replaces: str = ""  # a renewal not used yet: the certificate it replaces
    retire_at: int = 0  # a renewed certificate: when it stops working; 0: never


@dataclass(frozen=True)
class Snapshot:
    """Every row a store holds but the audit trail, read at one moment: what
    migrate-store copies from SQLite to PostgreSQL, and compares afterwards."""

    hosts: list[Host]
    certificates: list[Certificate]
    keys: list[KeyRecord]  # oldest first
    meta: dict[str, bytes]
    # (host id, pool GUID, dataset GUID, policy text); the requests waiting for approval
    # are working state and stay behind.
    approval_policies: list[tuple[int, str, str, str]] = field(default_factory=list)
    admins: list[tuple[str, str, int]] = field(default_factory=list)  # the approval page's
    silence_trips: list[tuple[int, int]] = field(default_factory=list)  # (host id, seconds)


# The columns an insert into keys writes, and a record's values for them, in that order.
KEY_INSERT_COLUMNS = (
    "key_id, host_id, pool_guid, dataset_guid, legacy_name, dataset, keyformat, state, origin,"
    " sealed, created_at, updated_at"
)


def key_values(r: KeyRecord) -> tuple[str | int | bytes, ...]:
    return (
        r.key_id,
        r.host_id,
        r.pool_guid,
        r.dataset_guid,
        r.legacy_name,
        r.dataset,
        r.keyformat,
        r.state,
        r.origin,
        r.sealed,
        r.created_at,
        r.updated_at,
    )


# The columns of a KeyRecord, in its order, from keys k joined with hosts h.
KEY_COLUMNS = """k.key_id, k.host_id, h.name, k.pool_guid, k.dataset_guid, k.legacy_name,
    k.dataset, k.keyformat, k.state, k.origin, k.sealed, k.created_at, k.updated_at"""


def host_of(row: Any) -> Host:
    """A Host from a row of hosts that can be read by column name."""
    return Host(
        id=row["id"],
        name=row["name"],
        machine_id=row["machine_id"],
        allowed_networks=tuple(json.loads(row["allowed_networks"])),
        pools=tuple(json.loads(row["pools"])),
        enabled=bool(row["enabled"]),
        disabled_reason=row["disabled_reason"],
        deadman_timeout=row["deadman_timeout"],
        created_at=row["created_at"],
        last_seen=row["last_seen"],
        # Only the lookups by certificate read it. keys(): "in" on a sqlite3.Row looks at
        # its values.
        replaces_certificate=(
            row["replaces_certificate"]
            if "replaces_certificate" in row.keys()  # noqa: SIM118
            else ""
        ),
    )


@dataclass(frozen=True)
class HostReport:
    """What a host's last check-in said (Store.record_report)."""

    pins: tuple[str, ...]
    issuer: str  # key id (hex) of the CA that issued the certificate it checked in with


@dataclass(frozen=True)
class Arrival:
    """What a request learns before anything else: the wait its certificate's bucket asks
    (0: go on) and, when it may go on, the caller's host (None: an unknown certificate)."""

    wait: float
    host: Host | None


def arrive_apart(store: Store, fingerprint: str, charge: Charge) -> Arrival:
    """Store.arrive as two steps: the charge where its buckets are, then the host."""
    wait = charge.spend()
    return Arrival(wait, None if wait else store.host_by_fingerprint(fingerprint))


class Store(Protocol):
    # (from, to) when opening with migrate=True changed the schema; None otherwise.
    migrated: tuple[int, int] | None

    def schema_version(self) -> int: ...
    def add_host(self, host: NewHost, fingerprint: str, cert_not_after: int) -> Host: ...
    def add_certificate(self, host_id: int, fingerprint: str, not_after: int) -> None: ...
    def renew_certificate(
        self, host_id: int, old: str, new: str, not_after: int, retire_at: int
    ) -> None:
        """Add NEW (replacing OLD), drop any earlier renewal of OLD that was never used,
        and keep OLD valid until NEW's first use or RETIRE_AT (this renewal's), whichever
        comes first."""
        ...

    def retire_replaced(self, new: str) -> str:
        """NEW was used: delete the certificate it replaced; returns its fingerprint
        ("" when another request did it first)."""
        ...

    def remove_certificate(self, host_id: int, fingerprint: str) -> None: ...
    def host_by_name(self, name: str) -> Host: ...
    def host_by_fingerprint(self, fingerprint: str) -> Host | None: ...
    def arrive(self, fingerprint: str, charge: Charge) -> Arrival:
        """Spend CHARGE (the caller's certificate bucket) and find the host of FINGERPRINT:
        every request's first read, in one statement where the buckets are this store's."""
        ...

    def host_by_machine_id(self, machine_id: str) -> Host | None: ...
    def hosts(self) -> list[Host]: ...
    def certificates(self, host_id: int) -> list[tuple[str, int]]: ...
    def set_host_enabled(self, host_id: int, enabled: bool, reason: str) -> None: ...
    def remove_host(self, host_id: int, delete_keys: bool) -> int: ...
    def touch_host(self, host_id: int, now: int) -> None: ...
    def record_report(
        self, host_id: int, pins: Sequence[str] | None, issuer: str, now: int
    ) -> None:
        """Remember what a check-in said: the server pins the host holds (None: it said
        nothing of them, the last ones stand) and the key id of its certificate's CA.
        Written only when it changed; like touch_host, not waited for on disk."""
        ...

    def host_reports(self) -> dict[int, HostReport]: ...
    def insert_key(self, record: KeyRecord) -> None: ...
    def insert_keys(self, records: Sequence[KeyRecord]) -> None:
        """Insert every record or none; StaleMasterKey when one is sealed under a master
        key that the ring (sealing.Ring) no longer holds."""
        ...

    def key_for_dataset(
        self, host_id: int, pool_guid: str, dataset_guid: str
    ) -> KeyRecord | None: ...
    def key_for_legacy_name(self, host_id: int, pool_guid: str, name: str) -> KeyRecord | None: ...
    def keys_for_datasets(
        self, host_id: int, refs: Sequence[tuple[str, str]]
    ) -> dict[tuple[str, str], DatasetKeys]:
        """The host's current and next keys of the datasets REFS ((pool GUID, dataset GUID)
        pairs), in one read: a release batch's lookup. Datasets with neither are absent."""
        ...

    def next_key_for_dataset(
        self, host_id: int, pool_guid: str, dataset_guid: str
    ) -> KeyRecord | None: ...
    def promote_next(self, current_id: str, next_id: str, now: int) -> None:
        """In one transaction: the active key CURRENT_ID becomes retired, the next key
        NEXT_ID active; Conflict if either is no longer in that state."""
        ...

    def delete_retired(self, host_id: int, before: int) -> list[str]:
        """Delete the host's keys retired before BEFORE; their ids."""
        ...

    def request_rotation(self, host_id: int, dataset_guid: str | None) -> list[KeyRecord]:
        """Mark the host's active keys (or the one of DATASET_GUID) for rotation by its
        daemon; the keys marked."""
        ...

    def due_for_rotation(self, host_id: int, created_before: int) -> list[KeyRecord]:
        """The host's active keys marked for rotation or made before CREATED_BEFORE."""
        ...

    def key_by_id(self, key_id: str) -> KeyRecord: ...
    def keys(self, host_id: int | None = None) -> list[KeyRecord]: ...
    def delete_key(self, key_id: str, expected: tuple[str, ...]) -> None: ...
    def set_key_state(
        self, key_id: str, state: str, expected: tuple[str, ...], now: int
    ) -> None: ...
    def replace_sealed(self, updates: Sequence[tuple[str, bytes, bytes]]) -> int:
        """Write each (key id, old sealed value, new) where the row still holds the old
        value, in one transaction; how many were written."""
        ...

    def first_sealed_key(self) -> KeyRecord | None: ...
    def meta(self, name: str) -> bytes | None: ...
    def swap_meta(self, name: str, expected: bytes | None, value: bytes) -> bool:
        """Set meta NAME to VALUE if it holds EXPECTED (None: absent); False if not."""
        ...

    def retire_master_keys(self, expected: bytes, ring: Ring) -> bool:
        """Replace the ring EXPECTED by RING, in one transaction that first finds no sealed
        value (key or check value) under any key but RING's sealing one; False if it did
        (or the ring changed), and nothing was written."""
        ...

    def master_key_check(self) -> bytes | None: ...
    def set_master_key_check(self, sealed: bytes) -> None: ...
    def host_states(self) -> dict[str, int]:
        """Hosts by state: 'enabled', or 'disabled_' and who disabled it (admin, deadman)."""
        ...

    def counts(self) -> tuple[int, int]:
        """(hosts, keys)."""
        ...

    def snapshot(self) -> Snapshot: ...

    # Approval of releases (approvalrows.py, one implementation for both backends)
    def approval_policies(self, host_id: int) -> dict[tuple[str, str], str]: ...
    def all_approval_policies(self) -> list[tuple[int, str, str, str]]: ...
    def set_approval_policy(
        self, host_id: int, ref: tuple[str, str], policy: str | None
    ) -> None: ...
    def silence_tripped(self, host_id: int) -> int: ...
    def trip_silence(self, host_id: int, silent_for: int) -> bool: ...
    def clear_silence(self, host_id: int) -> None: ...
    def all_silence_trips(self) -> list[tuple[int, int]]: ...
    def add_approval(self, approval: Approval, keep_closed_after: int) -> None: ...
    def approval_for(self, host_id: int, cert_fp: str, nonce: str) -> Approval | None: ...
    def approval(self, approval_id: str) -> Approval: ...
    def approvals(self, host_id: int | None = None) -> list[Approval]: ...
    def open_approvals(self, host_id: int, now: int) -> int: ...
    def decide_approval(
        self,
        approval_id: str,
        expected: tuple[str, ...],
        state: str,
        by: str,
        note: str,
        now: int,
        expires_at: int = 0,
    ) -> bool: ...
    def mark_released(self, approval_id: str, now: int) -> bool: ...
    def add_admin(self, name: str, fingerprint: str, not_after: int, now: int) -> None: ...
    def admins(self) -> list[tuple[str, str, int]]: ...
    def admin_by_fingerprint(self, fingerprint: str) -> str | None: ...
    def remove_admin(self, name: str) -> bool: ...

    def transaction(self) -> AbstractContextManager[None]:
        """The calls made inside run as one transaction where the backend can (PostgreSQL:
        a release's key reads and its audit records commit together); SQLite commits each
        call on its own, as its audit records go to a file."""
        ...

    def close(self) -> None: ...
