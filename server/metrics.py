"""What a serving key server counts, for Prometheus, in prometheus_client's multi-process
mode: each gunicorn worker writes its own samples into a directory the master made, and
the master's listener (metricsserver.py) adds them up when scraped.

Imported only when [metrics] listen is set, and only after serve has set
PROMETHEUS_MULTIPROC_DIR (prometheus_client picks its storage when first imported). The
decisions are counted from the audit records that every decision writes anyway, so a
count and its record never disagree.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, cast

from prometheus_client import Counter, Histogram

from zfs_unlock_server.audit import AuditError, AuditRecord, AuditSink
from zfs_unlock_server.errors import DatabaseUnavailable
from zfs_unlock_server.store import Store

RELEASES = Counter(
    "zfs_unlock_releases",
    "Key release decisions (one per dataset asked for), by decision and reason",
    ["decision", "reason"],
)
ENROLMENTS = Counter(
    "zfs_unlock_enrolments", "Enrolment decisions, by decision and reason", ["decision", "reason"]
)
TLS_FAILURES = Counter(
    "zfs_unlock_tls_handshake_failures", "TLS handshakes that failed, by reason", ["reason"]
)
AUDIT_RECORDS = Counter(
    "zfs_unlock_audit_records",
    "Audit records written, by event and decision",
    ["event", "decision"],
)
AUDIT_FAILURES = Counter(
    "zfs_unlock_audit_write_failures",
    "Audit writes that failed; the request they belonged to released nothing",
)
REQUEST_SECONDS = Histogram(
    "zfs_unlock_request_seconds",
    "Time from a request read to its answer ready (the TLS handshake not included), by route",
    ["route"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
)
RESPONSES = Counter("zfs_unlock_responses", "Answers, by HTTP status", ["status"])
DATABASE_SECONDS = Histogram(
    "zfs_unlock_database_seconds",
    "Time of each database call, failed ones included",
    buckets=(0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 2.5, 10.0),
)
DATABASE_ERRORS = Counter(
    "zfs_unlock_database_errors",
    "Database calls that failed: unreachable, read-only, failing over (answered 503)",
)


class CountingAudit:
    """An AuditSink that counts each record once it is written, and each failed write."""

    def __init__(self, sink: AuditSink) -> None:
        self._sink = sink

    def write(self, *records: AuditRecord, durable: bool = True) -> None:
        try:
            self._sink.write(*records, durable=durable)
        except AuditError:
            AUDIT_FAILURES.inc()
            raise
        for record in records:
            count(record)

    def close(self) -> None:
        self._sink.close()


def count(record: AuditRecord) -> None:
    event, decision = str(record.get("event", "")), str(record.get("decision", ""))
    reason = str(record.get("reason", ""))
    AUDIT_RECORDS.labels(event, decision).inc()
    if event == "release":
        RELEASES.labels(decision, reason).inc()
    elif event == "enroll":
        ENROLMENTS.labels(decision, reason).inc()
    elif event == "tls_handshake_failed":
        TLS_FAILURES.labels(reason).inc()


class _TimedStore:
    """Times every call of the store it wraps, and counts those that found the database
    unavailable. Attributes that are not calls (and transaction(), a context) pass through."""

    def __init__(self, store: Store) -> None:
        self._store = store

    def __getattr__(self, name: str) -> Any:
        attribute = getattr(self._store, name)
        if not callable(attribute) or name == "transaction":
            return attribute
        return _timed(attribute)


def _timed(call: Callable[..., Any]) -> Callable[..., Any]:
    def timed(*args: Any, **kwargs: Any) -> Any:
        started = time.perf_counter()
        try:
            return call(*args, **kwargs)
        except DatabaseUnavailable:
            DATABASE_ERRORS.inc()
            raise
        finally:
            DATABASE_SECONDS.observe(time.perf_counter() - started)

    return timed


def timed_store(store: Store) -> Store:
    return cast(Store, _TimedStore(store))


def observe_request(route: str, status: int, seconds: float) -> None:
    REQUEST_SECONDS.labels(route).observe(seconds)
    RESPONSES.labels(str(status)).inc()
