"""The approval tables, in SQL that SQLite and PostgreSQL both speak.

Both stores take this mixin and give it one primitive, `_rows` (a statement with `?`
placeholders, run in its own transaction, its rows as dicts, a broken constraint
raised as Conflict), so that the rules of a pending request are written once.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from zfs_unlock_server.errors import NotFound

# An approval that is still open is one of these until it expires; then it is expired,
# whatever its row says (nothing has to run at the moment it expires).
OPEN_STATES = ("pending", "approved")
# A host-wide policy row has no dataset.
HOST_WIDE = ("", "")


@dataclass(frozen=True)
class ApprovalDataset:
    pool_guid: str
    dataset_guid: str
    dataset: str  # the name the server knows it by, for people; never compared

    @property
    def ref(self) -> tuple[str, str]:
        return (self.pool_guid, self.dataset_guid)


@dataclass(frozen=True)
class Approval:
    """One release waiting for (or given, or refused) a person's approval. It is bound to
    the certificate that asked, the nonce its agent chose and the datasets it named."""

    id: str
    host_id: int
    host: str
    cert_fp: str
    nonce: str
    datasets: tuple[ApprovalDataset, ...]
    source_ip: str
    reasons: tuple[str, ...]
    state: str  # pending, approved, denied, released
    created_at: int
    expires_at: int
    decided_by: str = ""
    decided_at: int = 0
    note: str = ""

    def status(self, now: int) -> str:
        """The state as of NOW: an open request past its time is 'expired'."""
        return "expired" if self.state in OPEN_STATES and now >= self.expires_at else self.state

    @property
    def refs(self) -> frozenset[tuple[str, str]]:
        return frozenset(d.ref for d in self.datasets)

    def as_json(self, now: int) -> dict[str, Any]:
        """What `approval list --json`, the web page and the notification hook see."""
        return {
            "id": self.id,
            "host": self.host,
            "state": self.status(now),
            "datasets": [
                {"pool_guid": d.pool_guid, "dataset_guid": d.dataset_guid, "dataset": d.dataset}
                for d in self.datasets
            ],
            "reasons": list(self.reasons),
            "source_ip": self.source_ip,
            "cert_fp": self.cert_fp,
            "created_at": self.created_at,
            "expires_at": self.expires_at,
            "decided_by": self.decided_by,
            "decided_at": self.decided_at,
            "note": self.note,
        }


_SELECT = (
    "SELECT a.id, a.host_id, h.name AS host, a.cert_fp, a.nonce, a.datasets, a.source_ip,"
    " a.reasons, a.state, a.created_at, a.expires_at, a.decided_by, a.decided_at, a.note"
    " FROM approvals a JOIN hosts h ON h.id = a.host_id"
)


def _approval(row: dict[str, Any]) -> Approval:
    return Approval(
        id=str(row["id"]),
        host_id=int(row["host_id"]),
        host=str(row["host"]),
        cert_fp=str(row["cert_fp"]),
        nonce=str(row["nonce"]),
        datasets=tuple(ApprovalDataset(*d) for d in json.loads(row["datasets"])),
        source_ip=str(row["source_ip"]),
        reasons=tuple(json.loads(row["reasons"])),
        state=str(row["state"]),
        created_at=int(row["created_at"]),
        expires_at=int(row["expires_at"]),
        decided_by=str(row["decided_by"]),
        decided_at=int(row["decided_at"]),
        note=str(row["note"]),
    )


class ApprovalRows:
    def _rows(
        self, sql: str, params: Sequence[object] = (), write: bool = False
    ) -> list[dict[str, Any]]:
        raise NotImplementedError

    # Policies

    def approval_policies(self, host_id: int) -> dict[tuple[str, str], str]:
        """The host's policies, by (pool GUID, dataset GUID); HOST_WIDE is its own."""
        rows = self._rows(
            "SELECT pool_guid, dataset_guid, policy FROM approval_policies WHERE host_id = ?",
            (host_id,),
        )
        return {(str(r["pool_guid"]), str(r["dataset_guid"])): str(r["policy"]) for r in rows}

    def all_approval_policies(self) -> list[tuple[int, str, str, str]]:
        """Every policy as (host id, pool GUID, dataset GUID, policy text)."""
        rows = self._rows(
            "SELECT host_id, pool_guid, dataset_guid, policy FROM approval_policies"
            " ORDER BY host_id, pool_guid, dataset_guid"
        )
        return [
            (int(r["host_id"]), str(r["pool_guid"]), str(r["dataset_guid"]), str(r["policy"]))
            for r in rows
        ]

    def set_approval_policy(self, host_id: int, ref: tuple[str, str], policy: str | None) -> None:
        """Set the policy of the host (REF = HOST_WIDE) or of one of its datasets; None
        removes it (a dataset then follows its host's)."""
        if policy is None:
            self._rows(
                "DELETE FROM approval_policies"
                " WHERE host_id = ? AND pool_guid = ? AND dataset_guid = ?",
                (host_id, *ref),
                write=True,
            )
            return
        self._rows(
            "INSERT INTO approval_policies (host_id, pool_guid, dataset_guid, policy)"
            " VALUES (?, ?, ?, ?) ON CONFLICT (host_id, pool_guid, dataset_guid)"
            " DO UPDATE SET policy = excluded.policy",
            (host_id, *ref, policy),
            write=True,
        )

    # The silence condition

    def silence_tripped(self, host_id: int) -> int:
        """How long the host had been silent when its silence condition tripped (seconds;
        0: it is not tripped)."""
        rows = self._rows("SELECT silent_for FROM silence_trips WHERE host_id = ?", (host_id,))
        return int(rows[0]["silent_for"]) if rows else 0

    def trip_silence(self, host_id: int, silent_for: int) -> bool:
        """Trip it; False when it already was."""
        rows = self._rows(
            "INSERT INTO silence_trips (host_id, silent_for) VALUES (?, ?)"
            " ON CONFLICT (host_id) DO NOTHING RETURNING host_id",
            (host_id, silent_for),
            write=True,
        )
        return bool(rows)

    def all_silence_trips(self) -> list[tuple[int, int]]:
        """(host id, seconds silent) of every host whose silence condition is tripped."""
        rows = self._rows("SELECT host_id, silent_for FROM silence_trips ORDER BY host_id")
        return [(int(r["host_id"]), int(r["silent_for"])) for r in rows]

    def clear_silence(self, host_id: int) -> None:
        self._rows("DELETE FROM silence_trips WHERE host_id = ?", (host_id,), write=True)

    # Requests

    def add_approval(self, approval: Approval, keep_closed_after: int) -> None:
        """Store a new pending request (Conflict: that certificate already used that
        nonce), and forget closed ones that ended before KEEP_CLOSED_AFTER."""
        self._rows(
            "DELETE FROM approvals WHERE expires_at < ? OR (state IN ('denied', 'released')"
            " AND decided_at < ?)",
            (keep_closed_after, keep_closed_after),
            write=True,
        )
        self._rows(
            "INSERT INTO approvals (id, host_id, cert_fp, nonce, datasets, source_ip, reasons,"
            " state, created_at, expires_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                approval.id,
                approval.host_id,
                approval.cert_fp,
                approval.nonce,
                json.dumps([[d.pool_guid, d.dataset_guid, d.dataset] for d in approval.datasets]),
                approval.source_ip,
                json.dumps(list(approval.reasons)),
                approval.state,
                approval.created_at,
                approval.expires_at,
            ),
            write=True,
        )

    def approval_for(self, host_id: int, cert_fp: str, nonce: str) -> Approval | None:
        rows = self._rows(
            f"{_SELECT} WHERE a.host_id = ? AND a.cert_fp = ? AND a.nonce = ?",
            (host_id, cert_fp, nonce),
        )
        return _approval(rows[0]) if rows else None

    def approval(self, approval_id: str) -> Approval:
        rows = self._rows(f"{_SELECT} WHERE a.id = ?", (approval_id,))
        if not rows:
            raise NotFound(f"no approval request {approval_id}")
        return _approval(rows[0])

    def approvals(self, host_id: int | None = None) -> list[Approval]:
        """The requests kept (open ones, and closed ones for a while), oldest first."""
        where, params = ("WHERE a.host_id = ?", (host_id,)) if host_id is not None else ("", ())
        return [
            _approval(r)
            for r in self._rows(f"{_SELECT} {where} ORDER BY a.created_at, a.id", params)
        ]

    def open_approvals(self, host_id: int, now: int) -> int:
        """How many of the host's requests are still open."""
        rows = self._rows(
            "SELECT count(*) AS n FROM approvals"
            " WHERE host_id = ? AND state IN ('pending', 'approved') AND expires_at > ?",
            (host_id, now),
        )
        return int(rows[0]["n"])

    def decide_approval(
        self,
        approval_id: str,
        expected: tuple[str, ...],
        state: str,
        by: str,
        note: str,
        now: int,
        expires_at: int = 0,
    ) -> bool:
        """Move an open request from one of EXPECTED to STATE (and, EXPIRES_AT, give it a new
        end), unless it expired or another decision came first (then False, and nothing
        changed)."""
        marks = ", ".join("?" for _ in expected)
        rows = self._rows(
            "UPDATE approvals SET state = ?, decided_by = ?, decided_at = ?, note = ?,"  # noqa: S608
            " expires_at = CASE WHEN ? > 0 THEN ? ELSE expires_at END"
            f" WHERE id = ? AND state IN ({marks}) AND expires_at > ? RETURNING id",
            (state, by, now, note, expires_at, expires_at, approval_id, *expected, now),
            write=True,
        )
        return bool(rows)

    def mark_released(self, approval_id: str, now: int) -> bool:
        """The approved request's keys go out now, once: False when they already went (or
        it expired, or was denied since)."""
        rows = self._rows(
            "UPDATE approvals SET state = 'released' WHERE id = ? AND state = 'approved'"
            " AND expires_at > ? RETURNING id",
            (approval_id, now),
            write=True,
        )
        return bool(rows)

    # The approval page's admins: the certificates (SHA-256 of the DER) it accepts

    def add_admin(self, name: str, fingerprint: str, not_after: int, now: int) -> None:
        """Conflict when an admin of that name exists."""
        self._rows(
            "INSERT INTO admins (name, fingerprint, not_after, created_at) VALUES (?, ?, ?, ?)",
            (name, fingerprint, not_after, now),
            write=True,
        )

    def admins(self) -> list[tuple[str, str, int]]:
        """(name, certificate fingerprint, not_after) of each admin, by name."""
        rows = self._rows("SELECT name, fingerprint, not_after FROM admins ORDER BY name")
        return [(str(r["name"]), str(r["fingerprint"]), int(r["not_after"])) for r in rows]

    def admin_by_fingerprint(self, fingerprint: str) -> str | None:
        rows = self._rows("SELECT name FROM admins WHERE fingerprint = ?", (fingerprint,))
        return str(rows[0]["name"]) if rows else None

    def remove_admin(self, name: str) -> bool:
        return bool(
            self._rows("DELETE FROM admins WHERE name = ? RETURNING name", (name,), write=True)
        )
