"""Admin changes and the audit log: granting needs a record first; taking away never waits."""

from __future__ import annotations

import time

import pytest

from tests.keyserver import KeyServer, enroll, release
from zfs_unlock_common.csr import new_key_and_csr

# Every test here runs on SQLite and on PostgreSQL (tests/conftest.py), but for those
# marked sqlite_only.
BOTH_STORES = True

POOL = "4444444444444444444"
EX_DATAERR, EX_IOERR = 65, 74


def events(server: KeyServer) -> list[str]:
    return [str(r.get("event")) for r in server.audit_records()]


def test_unwritable_audit_log_stops_granting_changes_but_not_revoking(
    keyserver: KeyServer,
) -> None:
    keyserver.add_host("before")
    keyserver.must(
        "key",
        "create",
        "--host",
        "before",
        "--pool-guid",
        POOL,
        "--dataset-guid",
        "5",
        "--dataset",
        "tank/five",
    )
    key_id = keyserver.must("key", "list", "--json").split('"key_id": "')[1].split('"')[0]
    keyserver.break_audit()

    code, _, err = keyserver.admin(
        "host",
        "add",
        "after",
        "--machine-id",
        "a" * 32,
        "--issue-key",
        str(keyserver.root / "after"),
    )
    assert code == EX_IOERR and "audit" in err
    assert "after" not in keyserver.must("host", "list")
    assert not list((keyserver.root / "after").glob("client.*"))

    code, _, _ = keyserver.admin(
        "key",
        "create",
        "--host",
        "before",
        "--pool-guid",
        POOL,
        "--dataset-guid",
        "6",
        "--dataset",
        "tank/six",
    )
    assert code == EX_IOERR
    assert "tank/six" not in keyserver.must("key", "list")

    # Taking access away happens even though it cannot be recorded.
    code, _, _ = keyserver.admin("key", "revoke", key_id)
    assert code == EX_IOERR
    assert '"state": "revoked"' in keyserver.must("key", "list", "--json")
    code, _, _ = keyserver.admin("host", "disable", "before")
    assert code == EX_IOERR
    assert '"enabled": false' in keyserver.must("host", "show", "before", "--json")
    # ...and re-enabling, which grants, does not.
    assert keyserver.admin("host", "enable", "before")[0] == EX_IOERR
    assert '"enabled": false' in keyserver.must("host", "show", "before", "--json")


def test_removed_certificate_stops_working_and_the_other_one_keeps_working(
    keyserver: KeyServer,
) -> None:
    first = keyserver.add_host("renewed")
    key_pem, csr_pem = new_key_and_csr("renewed")
    (keyserver.root / "second.key").write_bytes(key_pem)
    (keyserver.root / "second.csr").write_bytes(csr_pem)
    keyserver.must(
        "host",
        "cert",
        "renewed",
        "--csr",
        str(keyserver.root / "second.csr"),
        "--cert-out",
        str(keyserver.root / "second.crt"),
    )
    second = type(first)(
        first.name, first.machine_id, keyserver.root / "second.crt", keyserver.root / "second.key"
    )
    keyserver.start()
    with keyserver.session(first) as session:
        assert enroll(session, keyserver, first, POOL, "77").status_code == 201
    fingerprints = [
        line.split('"sha256": "')[1].split('"')[0]
        for line in keyserver.must("host", "show", "renewed", "--json").splitlines()
        if '"sha256"' in line
    ]
    assert len(fingerprints) == 2
    keyserver.must("host", "cert-remove", "renewed", fingerprints[0])
    with keyserver.session(first) as session:
        assert release(session, keyserver, first, POOL, "77").status_code == 403
    assert keyserver.audit_records()[-1]["reason"] == "unknown_certificate"
    with keyserver.session(second) as session:
        assert release(session, keyserver, second, POOL, "77").status_code == 200
    assert keyserver.admin("host", "cert-remove", "renewed", fingerprints[0])[0] == EX_DATAERR
    assert "certificate_removed" in events(keyserver)


def test_only_a_revoked_key_can_be_deleted_and_then_the_dataset_may_enroll_again(
    keyserver: KeyServer,
) -> None:
    host = keyserver.add_host("deleter")
    keyserver.start()
    with keyserver.session(host) as session:
        key_id = enroll(session, keyserver, host, POOL, "88").json()["key_id"]
        assert keyserver.admin("key", "delete", key_id)[0] == EX_DATAERR  # still live
        keyserver.must("key", "revoke", key_id)
        assert enroll(session, keyserver, host, POOL, "88").status_code == 409
        keyserver.must("key", "delete", key_id)
        again = enroll(session, keyserver, host, POOL, "88")
    assert again.status_code == 201 and again.json()["key_id"] != key_id
    assert "key_deleted" in events(keyserver)


def test_listing_hosts_applies_the_deadman_switch(keyserver: KeyServer) -> None:
    keyserver.add_host("quiet", "--deadman-timeout", "1")
    keyserver.add_host("unwatched")
    time.sleep(2.2)
    code, out, err = keyserver.admin("host", "list")
    assert code == 0
    assert "host quiet: disabled now by the dead-man switch" in err
    assert "DISABLED (deadman)" in out and "unwatched" in out
    assert '"enabled": true' in keyserver.must("host", "show", "unwatched", "--json")
    disabled = [r for r in keyserver.audit_records() if r.get("event") == "host_disabled"]
    assert [(r["host"], r["actor"]) for r in disabled] == [("quiet", "deadman-switch")]


def test_activation_outside_the_host_pools_is_refused(keyserver: KeyServer) -> None:
    host = keyserver.add_host("pinned-pool", "--pool", POOL)
    keyserver.start()
    with keyserver.session(host) as session:
        response = session.post(
            keyserver.url("/v1/keys/activate"),
            json={
                "machine_id": host.machine_id,
                "pool_guid": "99",
                "dataset_guid": "1",
                "key_id": "k-" + "0" * 24,
            },
            timeout=10,
        )
    assert response.status_code == 403
    assert keyserver.audit_records()[-1]["reason"] == "pool_not_allowed"


def test_a_tampered_pending_key_is_not_handed_out_again(keyserver: KeyServer) -> None:
    host = keyserver.add_host("tampered")
    keyserver.start()
    with keyserver.session(host) as session:
        assert enroll(session, keyserver, host, POOL, "1").status_code == 201
        assert enroll(session, keyserver, host, POOL, "2").status_code == 201
        rows = dict(keyserver.sql("SELECT dataset_guid, sealed FROM keys"))
        keyserver.sql("UPDATE keys SET sealed = ? WHERE dataset_guid = '1'", (rows["2"],))
        repeated = enroll(session, keyserver, host, POOL, "1")
    assert repeated.status_code == 403 and "key" not in repeated.json()
    assert keyserver.audit_records()[-1]["reason"] == "integrity_failure"


def test_enrolment_and_checkin_that_cannot_be_audited_change_nothing(
    keyserver: KeyServer,
) -> None:
    host = keyserver.add_host("unrecorded", "--deadman-timeout", "3600")
    seen_before = keyserver.must("host", "show", "unrecorded", "--json")
    keyserver.break_audit()
    time.sleep(1.1)  # so a touched last_seen would differ
    keyserver.start()
    with keyserver.session(host) as session:
        assert enroll(session, keyserver, host, POOL, "31").status_code == 503
        checkin = session.post(
            keyserver.url("/v1/checkin"), json={"machine_id": host.machine_id}, timeout=10
        )
        assert checkin.status_code == 503
    keyserver.stop()
    assert "unrecorded" not in keyserver.must("key", "list")
    assert keyserver.must("host", "show", "unrecorded", "--json") == seen_before


@pytest.mark.sqlite_only  # files of the data directory
def test_rate_limit_state_is_private(keyserver: KeyServer) -> None:
    host = keyserver.add_host("private")
    keyserver.start()
    with keyserver.session(host) as session:
        release(session, keyserver, host, POOL, "1")
    for name in ("ratelimit.db", "keys.db"):
        assert (keyserver.data_dir / name).stat().st_mode & 0o077 == 0, name
