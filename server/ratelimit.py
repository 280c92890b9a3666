"""Token buckets shared by every worker process: in a small SQLite file of the server's
own, or in the database that several nodes share.

Each client certificate has a bucket; so has each source address, charged only
for requests that do not come from an enrolled host, so a flood from a shared
address cannot starve a well-behaved host behind it. The bucket arithmetic is a
pure function of an injected clock; durability is not needed (a lost bucket is
merely a full one), so the file runs with synchronous=OFF and the table is UNLOGGED.
"""

from __future__ import annotations

import math
import os
import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

PRUNE_EVERY = 1024  # charges between sweeps of idle buckets


@dataclass(frozen=True)
class BucketPolicy:
    burst: float  # tokens a full bucket holds
    rate: float  # tokens added per second


@dataclass(frozen=True)
class Bucket:
    tokens: float
    stamp: float


def take(bucket: Bucket | None, policy: BucketPolicy, now: float) -> tuple[Bucket, float]:
    """Spend one token. Returns the new bucket and 0, or the seconds until a token exists."""
    if bucket is None:
        bucket = Bucket(policy.burst, now)
    elapsed = max(0.0, now - bucket.stamp)
    tokens = min(policy.burst, bucket.tokens + elapsed * policy.rate)
    if tokens >= 1.0:
        return Bucket(tokens - 1.0, now), 0.0
    wait = (1.0 - tokens) / policy.rate if policy.rate > 0 else math.inf
    return Bucket(tokens, now), wait


def retry_after_header(wait: float) -> str:
    """Whole seconds, rounded up, at least 1 (RFC 9110 delay-seconds)."""
    return str(max(1, math.ceil(wait))) if math.isfinite(wait) else "3600"


class Buckets(Protocol):
    """Where buckets live: a file of each server's own (SqliteBuckets), or the shared
    database (pgstore.PgStore, in one SQL statement that does what take() does), so that
    every node charges the same bucket."""

    def charge(self, name: str, policy: BucketPolicy, now: float) -> float:
        """Spend a token of bucket NAME at NOW; return 0, or the seconds until one exists.
        A bucket stamped after NOW (a clock that went back) starts afresh."""
        ...

    def prune(self, before: float) -> None:
        """Forget buckets untouched since BEFORE: they are full again."""
        ...


@dataclass(frozen=True)
class Charge:
    """One token to spend from one bucket at one moment. spend() spends it; a store that
    keeps the buckets itself spends it in the statement that finds the caller's host
    (store.Store.arrive), one round trip instead of two."""

    buckets: Buckets
    name: str
    policy: BucketPolicy
    now: float

    def spend(self) -> float:
        """Spend the token; return 0, or the seconds until one exists."""
        return self.buckets.charge(self.name, self.policy, self.now)


class SqliteBuckets:
    def __init__(self, path: Path) -> None:
        # Created private (it lists client fingerprints and addresses); -wal/-shm inherit the mode.
        os.close(os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600))
        self._db = sqlite3.connect(path, isolation_level=None, timeout=5)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=OFF")
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS buckets"
            " (name TEXT PRIMARY KEY, tokens REAL NOT NULL, stamp REAL NOT NULL)"
        )

    def charge(self, name: str, policy: BucketPolicy, now: float) -> float:
        self._db.execute("BEGIN IMMEDIATE")
        try:
            row = self._db.execute(
                "SELECT tokens, stamp FROM buckets WHERE name = ?", (name,)
            ).fetchone()
            bucket = None if row is None else Bucket(row[0], row[1])
            if bucket is not None and bucket.stamp > now:
                bucket = None
            new, wait = take(bucket, policy, now)
            self._db.execute(
                "INSERT INTO buckets (name, tokens, stamp) VALUES (?, ?, ?)"
                " ON CONFLICT(name) DO UPDATE SET tokens = excluded.tokens, stamp = excluded.stamp",
                (name, new.tokens, new.stamp),
            )
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")
        return wait

    def prune(self, before: float) -> None:
        self._db.execute("DELETE FROM buckets WHERE stamp < ?", (before,))

    def close(self) -> None:
        self._db.close()


class RateLimiter:
    def __init__(
        self,
        buckets: Buckets,
        policies: dict[str, BucketPolicy],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """CLOCK must mean the same to everyone sharing BUCKETS: one machine's monotonic
        clock for its own file, the wall clock for buckets in a shared database."""
        self._buckets = buckets
        self._policies = policies
        self._clock = clock
        self._charges = 0
        # A bucket untouched this long is full again, so its row can go.
        self._idle_after = max(p.burst / p.rate for p in policies.values())

    def charge(self, kind: str, name: str) -> float:
        """Spend a token from bucket KIND:NAME; return 0, or the wait before retrying."""
        return self.charge_of(kind, name).spend()

    def charge_of(self, kind: str, name: str) -> Charge:
        """The charge of bucket KIND:NAME now, for the caller to spend at once."""
        now = self._clock()
        self._charges += 1
        if self._charges % PRUNE_EVERY == 0:
            self._buckets.prune(now - self._idle_after)
        return Charge(self._buckets, f"{kind}:{name}", self._policies[kind], now)
