"""Rate limits: the token bucket arithmetic, and a flood against a real server on 127.0.0.1."""

from __future__ import annotations

import base64
import math
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import requests
from cryptography import x509
from cryptography.hazmat.primitives import hashes

from tests.keyserver import HostCreds, KeyServer, enroll, release
from zfs_unlock_server.pgstore import PgStore
from zfs_unlock_server.ratelimit import (
    Bucket,
    BucketPolicy,
    Buckets,
    RateLimiter,
    SqliteBuckets,
    retry_after_header,
    take,
)
from zfs_unlock_server.sqlitestore import SqliteStore
from zfs_unlock_server.store import Arrival, NewHost

POOL = "1111111111111111111"

# Binary fractions only, so that every expected value below is exact.
POLICY = BucketPolicy(burst=4.0, rate=0.5)


class FakeClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


# take(): the pure arithmetic


def test_a_new_bucket_starts_full() -> None:
    bucket, wait = take(None, POLICY, 100.0)
    assert (bucket, wait) == (Bucket(3.0, 100.0), 0.0)


def test_burst_then_the_exact_wait() -> None:
    bucket: Bucket | None = None
    for _ in range(4):
        bucket, wait = take(bucket, POLICY, 100.0)
        assert wait == 0.0
    assert bucket == Bucket(0.0, 100.0)
    refused, wait = take(bucket, POLICY, 100.0)
    assert wait == 2.0  # one token at 0.5 per second
    assert refused == Bucket(0.0, 100.0)  # a refusal spends nothing


def test_bucket_refills_at_rate() -> None:
    empty = Bucket(0.0, 100.0)
    half, wait = take(empty, POLICY, 101.0)
    assert (half, wait) == (Bucket(0.5, 101.0), 1.0)
    # Asking again while waiting does not push the wait further out.
    _, wait = take(half, POLICY, 101.5)
    assert wait == 0.5
    spent, wait = take(half, POLICY, 102.0)
    assert (spent, wait) == (Bucket(0.0, 102.0), 0.0)


@pytest.mark.parametrize(
    ("tokens", "expected_wait"),
    [(0.0, 2.0), (0.25, 1.5), (0.5, 1.0), (0.75, 0.5), (0.875, 0.25)],
)
def test_wait_is_exactly_the_time_to_one_token(tokens: float, expected_wait: float) -> None:
    bucket, wait = take(Bucket(tokens, 50.0), POLICY, 50.0)
    assert wait == expected_wait
    # Waiting exactly that long is enough.
    _, again = take(bucket, POLICY, 50.0 + wait)
    assert again == 0.0


def test_bucket_caps_at_burst() -> None:
    bucket, wait = take(Bucket(0.0, 0.0), POLICY, 1_000_000.0)
    assert (bucket, wait) == (Bucket(3.0, 1_000_000.0), 0.0)
    bucket, _ = take(Bucket(3.5, 0.0), POLICY, 10.0)
    assert bucket.tokens == 3.0


def test_take_never_refills_from_negative_elapsed_time() -> None:
    bucket, wait = take(Bucket(0.5, 100.0), POLICY, 40.0)
    assert (bucket, wait) == (Bucket(0.5, 40.0), 1.0)


def test_zero_rate_never_refills() -> None:
    policy = BucketPolicy(burst=1.0, rate=0.0)
    bucket, wait = take(None, policy, 0.0)
    assert wait == 0.0
    _, wait = take(bucket, policy, 1e9)
    assert wait == math.inf


@pytest.mark.parametrize(
    ("wait", "header"),
    [
        (0.0, "1"),
        (1e-9, "1"),
        (0.5, "1"),
        (1.0, "1"),
        (1.000001, "2"),
        (1.5, "2"),
        (2.0, "2"),
        (59.01, "60"),
        (86400.0, "86400"),
        (math.inf, "3600"),
    ],
)
def test_retry_after_rounds_up_to_whole_seconds_at_least_one(wait: float, header: str) -> None:
    assert retry_after_header(wait) == header


# RateLimiter: the same buckets, shared through SQLite or through PostgreSQL

# Run on SQLite's file and on PostgreSQL's table (tests/conftest.py).
BOTH_STORES = True

Opener = Callable[[], Buckets]


@pytest.fixture
def buckets(tmp_path: Path, store_url: str) -> Iterator[Opener]:
    """Opens the same buckets anew for each caller, as each worker (or node) does."""
    opened: list[SqliteBuckets | PgStore] = []

    def open_buckets() -> Buckets:
        place = PgStore(store_url, migrate=True) if store_url else SqliteBuckets(tmp_path / "r.db")
        opened.append(place)
        return place

    yield open_buckets
    for place in opened:
        place.close()


def limiter(open_buckets: Opener, clock: FakeClock) -> RateLimiter:
    return RateLimiter(
        open_buckets(),
        {"cert": BucketPolicy(3.0, 1.0), "addr": BucketPolicy(2.0, 0.25)},
        clock=clock,
    )


def test_limiter_allows_a_burst_then_gives_the_exact_wait(buckets: Opener) -> None:
    clock = FakeClock()
    limits = limiter(buckets, clock)
    assert [limits.charge("cert", "a") for _ in range(3)] == [0.0, 0.0, 0.0]
    assert limits.charge("cert", "a") == 1.0
    clock.now += 0.25
    assert limits.charge("cert", "a") == 0.75
    clock.now += 0.75
    assert limits.charge("cert", "a") == 0.0
    assert limits.charge("cert", "a") == 1.0


def test_limiter_caps_at_burst_after_a_long_quiet(buckets: Opener) -> None:
    clock = FakeClock()
    limits = limiter(buckets, clock)
    limits.charge("addr", "10.0.0.1")
    clock.now += 3600
    assert [limits.charge("addr", "10.0.0.1") for _ in range(3)] == [0.0, 0.0, 4.0]


def test_limiter_buckets_are_per_kind_and_name(buckets: Opener) -> None:
    clock = FakeClock()
    limits = limiter(buckets, clock)
    for _ in range(3):
        limits.charge("cert", "a")
    assert limits.charge("cert", "a") > 0
    assert limits.charge("cert", "b") == 0.0
    # The same name under another kind is another bucket, with its own policy.
    assert [limits.charge("addr", "a") for _ in range(3)] == [0.0, 0.0, 4.0]


def test_limiter_is_shared_by_every_worker(buckets: Opener) -> None:
    """Two limiters on one place (two gunicorn workers, or two nodes) spend from the same
    buckets."""
    clock = FakeClock()
    first, second = limiter(buckets, clock), limiter(buckets, clock)
    assert first.charge("cert", "a") == 0.0
    assert second.charge("cert", "a") == 0.0
    assert first.charge("cert", "a") == 0.0
    assert second.charge("cert", "a") == 1.0


def test_a_clock_that_went_backwards_starts_afresh(buckets: Opener) -> None:
    """A reboot resets the monotonic clock; a bucket stamped in the 'future' is discarded."""
    clock = FakeClock(1000.0)
    limits = limiter(buckets, clock)
    for _ in range(3):
        limits.charge("cert", "a")
    assert limits.charge("cert", "a") == 1.0
    clock.now = 5.0
    # A full bucket again: the burst, and then the normal wait.
    assert [limits.charge("cert", "a") for _ in range(4)] == [0.0, 0.0, 0.0, 1.0]


def test_limiter_state_outlives_the_process_that_wrote_it(buckets: Opener) -> None:
    clock = FakeClock()
    limits = limiter(buckets, clock)
    for _ in range(3):
        limits.charge("cert", "a")
    reopened = limiter(buckets, clock)
    assert reopened.charge("cert", "a") == 1.0


# Against the running server


def fingerprint(host: HostCreds) -> str:
    certificate = x509.load_pem_x509_certificate(host.cert.read_bytes())
    return certificate.fingerprint(hashes.SHA256()).hex()


def assert_limited(response: requests.Response, max_wait: float) -> int:
    """A well-formed 429; returns its Retry-After in seconds."""
    assert response.status_code == 429, response.text
    assert response.json() == {"error": "rate_limited"}
    assert response.headers["Cache-Control"] == "no-store"
    retry_after = response.headers["Retry-After"]
    assert retry_after.isascii() and retry_after.isdigit(), retry_after
    seconds = int(retry_after)
    assert 1 <= seconds <= math.ceil(max_wait)
    return seconds


def enroll_and_activate(session: requests.Session, server: KeyServer, host: HostCreds) -> bytes:
    """Two requests: enroll a raw key for dataset 5000 and activate it. Returns the key."""
    enrolled = enroll(session, server, host, POOL, "5000")
    assert enrolled.status_code == 201, enrolled.text
    body = enrolled.json()
    activated = session.post(
        server.url("/v1/keys/activate"),
        json={
            "machine_id": host.machine_id,
            "pool_guid": POOL,
            "dataset_guid": "5000",
            "key_id": body["key_id"],
        },
        timeout=10,
    )
    assert activated.status_code == 200, activated.text
    return base64.b64decode(body["key"])


def test_a_flooding_host_is_limited_and_its_neighbour_is_not(keyserver: KeyServer) -> None:
    burst, rate = 6, 0.05  # a token every 20 s: none comes back while this test runs
    keyserver.configure(
        rate_limits={
            "per_certificate_burst": burst,
            "per_certificate_rate": rate,
            "per_address_burst": 2,
            "per_address_rate": rate,
        }
    )
    flooder = keyserver.add_host("flooder")
    neighbour = keyserver.add_host("neighbour")
    keyserver.start()

    with keyserver.session(flooder) as session:
        key = enroll_and_activate(session, keyserver, flooder)
        statuses = []
        for _ in range(burst + 2):
            response = release(session, keyserver, flooder, POOL, "5000")
            statuses.append(response.status_code)
            if response.status_code == 429:
                break
            assert base64.b64decode(response.json()["key"]) == key
        # Exactly the burst (two went on enrollment), then refused.
        assert statuses == [200] * (burst - 2) + [429]
        assert_limited(response, 1 / rate)

    fp = fingerprint(flooder)
    limited = [r for r in keyserver.audit_records() if r["event"] == "rate_limited"]
    assert len(limited) == 1
    assert limited[0]["cert_fp"] == fp and limited[0]["source_ip"] == "127.0.0.1"
    assert limited[0]["decision"] == "deny" and limited[0]["reason"] == "rate_limited"
    # The refused request never reached the release decision.
    releases = [r for r in keyserver.audit_records() if r["event"] == "release"]
    assert len(releases) == burst - 2 and {r["cert_fp"] for r in releases} == {fp}

    # The neighbour, same address and same server, is served while the flooder is not.
    with keyserver.session(neighbour) as session:
        own_key = enroll_and_activate(session, keyserver, neighbour)
        response = release(session, keyserver, neighbour, POOL, "5000")
        assert response.status_code == 200, response.text
        assert base64.b64decode(response.json()["key"]) == own_key != key
    with keyserver.session(flooder) as session:
        assert_limited(release(session, keyserver, flooder, POOL, "5000"), 1 / rate)


def test_unenrolled_certificates_are_limited_per_address_not_the_hosts_behind_it(
    keyserver: KeyServer,
) -> None:
    address_burst, rate = 3, 0.05
    keyserver.configure(
        rate_limits={
            "per_certificate_burst": 10,  # more than the address allows
            "per_certificate_rate": rate,
            "per_address_burst": address_burst,
            "per_address_rate": rate,
        }
    )
    # Certificates our CA signed for hosts that were then removed.
    ghosts = [keyserver.add_host(name) for name in ("ghost1", "ghost2")]
    for ghost in ghosts:
        keyserver.must("host", "remove", ghost.name)
    resident = keyserver.add_host("resident")
    keyserver.start()

    with keyserver.session(ghosts[0]) as session:
        statuses = [
            release(session, keyserver, ghosts[0], POOL, "5000").status_code
            for _ in range(address_burst)
        ]
        assert statuses == [403] * address_burst
        assert_limited(release(session, keyserver, ghosts[0], POOL, "5000"), 1 / rate)
    # Another unknown certificate from the same address: its own certificate bucket is
    # full, but the address is spent.
    with keyserver.session(ghosts[1]) as session:
        assert_limited(release(session, keyserver, ghosts[1], POOL, "5000"), 1 / rate)
    # From another address it is merely refused (403), not limited.
    with keyserver.session(ghosts[1], source_address="127.0.0.2") as session:
        assert release(session, keyserver, ghosts[1], POOL, "5000").status_code == 403

    # An enrolled host at the spent address is not charged to it: more requests
    # than the address burst, all served.
    with keyserver.session(resident) as session:
        checkin = session.post(
            keyserver.url("/v1/checkin"), json={"machine_id": resident.machine_id}, timeout=10
        )
        assert checkin.status_code == 200, checkin.text
        key = enroll_and_activate(session, keyserver, resident)
        for _ in range(2):
            response = release(session, keyserver, resident, POOL, "5000")
            assert response.status_code == 200, response.text
            assert base64.b64decode(response.json()["key"]) == key
    # And the address is still limited for the unknown certificates.
    with keyserver.session(ghosts[0]) as session:
        assert_limited(release(session, keyserver, ghosts[0], POOL, "5000"), 1 / rate)

    limited = [r for r in keyserver.audit_records() if r["event"] == "rate_limited"]
    ghost_fps = {fingerprint(g) for g in ghosts}
    assert len(limited) == 3 and {r["cert_fp"] for r in limited} == ghost_fps
    assert {r["source_ip"] for r in limited} == {"127.0.0.1"}
    refused = [r for r in keyserver.audit_records() if r.get("reason") == "unknown_certificate"]
    assert len(refused) == address_burst + 1  # three at 127.0.0.1, one at 127.0.0.2


def test_the_limit_lifts_after_retry_after(keyserver: KeyServer) -> None:
    keyserver.configure(
        rate_limits={
            "per_certificate_burst": 2,
            "per_certificate_rate": 1.0,
            "per_address_burst": 2,
            "per_address_rate": 1.0,
        }
    )
    host = keyserver.add_host("patient")
    keyserver.start()
    with keyserver.session(host) as session:

        def checkin() -> requests.Response:
            return session.post(
                keyserver.url("/v1/checkin"), json={"machine_id": host.machine_id}, timeout=10
            )

        assert [checkin().status_code for _ in range(2)] == [200, 200]
        wait = assert_limited(checkin(), 1.0)
        assert wait == 1
        time.sleep(wait + 0.1)
        assert checkin().status_code == 200


def test_arriving_spends_the_charge_and_finds_the_host(tmp_path: Path, store_url: str) -> None:
    """A request's first read: on PostgreSQL the bucket and the host in one statement, on
    SQLite the bucket file and then the database; the same answers either way."""
    store: SqliteStore | PgStore
    if store_url:
        store = PgStore(store_url, migrate=True)
        place: Buckets = store
    else:
        store = SqliteStore(tmp_path / "keys.db", migrate=True)
        place = SqliteBuckets(tmp_path / "r.db")
    try:
        host = store.add_host(NewHost("web1", "m" * 32, (), (), None), "fp-web1", 2**31)
        clock = FakeClock()
        limits = RateLimiter(place, {"cert": BucketPolicy(2.0, 1.0)}, clock=clock)
        assert store.arrive("fp-web1", limits.charge_of("cert", "fp-web1")) == Arrival(0.0, host)
        assert store.arrive("fp-other", limits.charge_of("cert", "fp-other")) == Arrival(0.0, None)
        # The second token of web1's bucket, then a refusal that names the wait and no host.
        assert store.arrive("fp-web1", limits.charge_of("cert", "fp-web1")).wait == 0.0
        assert store.arrive("fp-web1", limits.charge_of("cert", "fp-web1")) == Arrival(1.0, None)
        clock.now += 1.0
        assert store.arrive("fp-web1", limits.charge_of("cert", "fp-web1")) == Arrival(0.0, host)
    finally:
        store.close()
