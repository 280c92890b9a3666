"""Releases that wait for a person: policies, the pending request, its binding to one
certificate, one nonce and its datasets, approve and deny, expiry, the cap, what takes
pending requests away, and the notification hook. Real server, real mutual TLS on
127.0.0.1, each test on SQLite and on PostgreSQL."""

from __future__ import annotations

import base64
import datetime
import itertools
import json
import os
import time
from pathlib import Path
from typing import Any

import pytest

from tests.keyserver import HostCreds, KeyServer, activated_key, release, wait_for

BOTH_STORES = True

POOL = "2222222222222222222"
EX_DATAERR = 65
_guids = itertools.count(5000)


def new_guid() -> str:
    return str(next(_guids))


def nonce() -> str:
    return os.urandom(16).hex()


def ask(
    server: KeyServer,
    host: HostCreds,
    guids: list[str],
    with_nonce: str | None,
    as_host: HostCreds | None = None,
) -> dict[str, Any]:
    """One release batch for GUIDS, as HOST's agent (or with AS_HOST's certificate)."""
    body: dict[str, Any] = {
        "machine_id": host.machine_id,
        "datasets": [{"pool_guid": POOL, "dataset_guid": g} for g in guids],
    }
    if with_nonce is not None:
        body["nonce"] = with_nonce
    with server.session(as_host or host) as session:
        response = session.post(server.url("/v1/keys/release"), json=body, timeout=10)
    assert response.status_code == 200, response.text
    answer: dict[str, Any] = response.json()
    return answer


def released(answer: dict[str, Any]) -> dict[str, bytes]:
    return {k["dataset_guid"]: base64.b64decode(k["key"]) for k in answer["keys"]}


def denied(answer: dict[str, Any]) -> list[str]:
    return [d["dataset_guid"] for d in answer["denied"]]


def requests_listed(server: KeyServer, *options: str) -> list[dict[str, Any]]:
    listed: list[dict[str, Any]] = json.loads(server.must("approval", "list", "--json", *options))
    earlier = server.earlier_requests if isinstance(server, OneTestsView) else set()
    return [r for r in listed if r["id"] not in earlier]


def records(server: KeyServer, event: str) -> list[dict[str, Any]]:
    return [r for r in server.audit_records() if r.get("event") == event]


def last_release(server: KeyServer) -> dict[str, Any]:
    return records(server, "release")[-1]


def host_with_key(
    server: KeyServer, name: str, *policy: str, dataset: str = "tank/held"
) -> tuple[HostCreds, str, bytes]:
    """A host with one active key, its host-wide approval policy set to POLICY."""
    host = server.add_host(name)
    guid = new_guid()
    _, key = activated_key(server, host, POOL, guid, dataset)
    if policy:
        server.must("host", "set", name, *policy)
    return host, guid, key


class OneTestsView(KeyServer):
    """The module's shared server, as one test sees it: the audit records and approval
    requests made before the test are left out (its hosts' names are its own)."""

    audit_from = 0
    earlier_requests: frozenset[str] = frozenset()

    def audit_records(self) -> list[dict[str, Any]]:
        return super().audit_records()[self.audit_from :]


@pytest.fixture
def server(shared_keyserver: KeyServer) -> KeyServer:
    """A running server with the default [approval] settings, shared by the module's
    tests (a server of its own each would cost a start, and a database, per test)."""
    own = object.__new__(OneTestsView)
    own.__dict__.update(shared_keyserver.__dict__)
    own.audit_from = len(shared_keyserver.audit_records())
    listed = json.loads(shared_keyserver.must("approval", "list", "--all", "--json"))
    own.earlier_requests = frozenset(r["id"] for r in listed)
    return own


# The whole round: held, approved, released once


def test_a_required_release_waits_is_approved_and_goes_out_once(server: KeyServer) -> None:
    host, guid, key = host_with_key(server, "night", "--approval", "required")
    mine = nonce()
    first = ask(server, host, [guid], mine)
    assert first["keys"] == [] and first["denied"] == []
    pending = first["pending"]
    assert pending["datasets"] == [{"pool_guid": POOL, "dataset_guid": guid}]
    assert pending["retry_after"] == 5 and 590 <= pending["expires_in"] <= 600
    record = last_release(server)
    assert (record["decision"], record["reason"], record["approval"]) == (
        "pending",
        "approval_pending",
        pending["id"],
    )
    [requested] = records(server, "approval_requested")
    assert requested["approval"] == pending["id"] and requested["reasons"] == "required"
    assert requested["datasets"] == "tank/held" and requested["cert_fp"] == record["cert_fp"]

    # Asking again (the agent polls) finds the same request, not a new one.
    assert ask(server, host, [guid], mine)["pending"]["id"] == pending["id"]
    [listed] = requests_listed(server)
    assert listed["id"] == pending["id"] and listed["state"] == "pending"
    assert listed["host"] == "night" and listed["reasons"] == ["required"]
    assert listed["datasets"] == [{"pool_guid": POOL, "dataset_guid": guid, "dataset": "tank/held"}]
    table = server.must("approval", "list")
    assert pending["id"] in table and "tank/held" in table

    code, _, err = server.admin("approval", "approve", pending["id"], "--reason", "planned")
    assert code == 0, err
    assert f"approval {pending['id']} approved: host night, tank/held" in err
    [approved] = records(server, "approval_approved")
    assert approved["actor"].startswith("admin:") and approved["note"] == "planned"

    answer = ask(server, host, [guid], mine)
    assert released(answer) == {guid: key} and "pending" not in answer
    record = last_release(server)
    assert (record["decision"], record["reason"], record["approval"]) == (
        "allow",
        "approved",
        pending["id"],
    )
    assert record["approved_by"] == approved["actor"]
    # Once: the same certificate and nonce again get nothing.
    again = ask(server, host, [guid], mine)
    assert again["keys"] == [] and denied(again) == [guid] and "pending" not in again
    assert last_release(server)["reason"] == "approval_used"
    assert requests_listed(server) == []  # nothing open
    [closed] = requests_listed(server, "--all")
    assert closed["state"] == "released" and closed["decided_by"] == approved["actor"]
    # Approving it again is refused, and says why.
    code, _, err = server.admin("approval", "approve", pending["id"])
    assert code == EX_DATAERR and "is released, not pending" in err


def test_a_denied_request_releases_nothing(server: KeyServer) -> None:
    host, guid, _ = host_with_key(server, "denied", "--approval", "required")
    mine = nonce()
    request_id = ask(server, host, [guid], mine)["pending"]["id"]
    code, _, err = server.admin("approval", "deny", request_id, "--reason", "not\nplanned")
    assert code == 0, err
    answer = ask(server, host, [guid], mine)
    assert answer["keys"] == [] and denied(answer) == [guid]
    assert last_release(server)["reason"] == "approval_denied"
    [record] = records(server, "approval_denied")
    assert record["note"] == "not planned" and record["actor"].startswith("admin:")
    [closed] = requests_listed(server, "--all")
    assert closed["state"] == "denied" and closed["note"] == "not planned"
    code, _, err = server.admin("approval", "approve", request_id)
    assert code == EX_DATAERR and "is denied, not pending" in err


# Bound to one certificate, one nonce, its datasets


def test_an_approval_serves_only_its_certificate_its_nonce_and_its_datasets(
    server: KeyServer, tmp_path: Path
) -> None:
    host, guid, key = host_with_key(server, "bound", "--approval", "required")
    other_guid = new_guid()
    activated_key(server, host, POOL, other_guid, "tank/other")
    mine = nonce()
    request_id = ask(server, host, [guid], mine)["pending"]["id"]
    server.must("approval", "approve", request_id)

    # Another nonce: a request of its own, which waits.
    elsewhere = ask(server, host, [guid], nonce())
    assert elsewhere["keys"] == [] and elsewhere["pending"]["id"] != request_id
    # Another certificate of the same host, with the same nonce: a request of its own.
    second = second_certificate(server, host, tmp_path)
    replayed = ask(server, host, [guid], mine, as_host=second)
    assert replayed["keys"] == [] and replayed["pending"]["id"] not in (request_id,)
    # The same certificate and nonce for a dataset the request did not name: refused.
    widened = ask(server, host, [other_guid], mine)
    assert widened["keys"] == [] and denied(widened) == [other_guid]
    assert last_release(server)["reason"] == "approval_not_covered"
    # The approved request still serves what it named, once.
    assert released(ask(server, host, [guid], mine)) == {guid: key}


def second_certificate(server: KeyServer, host: HostCreds, tmp_path: Path) -> HostCreds:
    from zfs_unlock_common.csr import new_key_and_csr

    key_pem, csr_pem = new_key_and_csr(host.name)
    directory = tmp_path / "second"
    directory.mkdir()
    (directory / "client.key").write_bytes(key_pem)
    (directory / "client.csr").write_bytes(csr_pem)
    cert = directory / "client.crt"
    server.must(
        "host", "cert", host.name, "--csr", str(directory / "client.csr"), "--cert-out", str(cert)
    )
    return HostCreds(host.name, host.machine_id, cert, directory / "client.key")


def test_an_unanswered_request_expires_and_is_a_denial(server: KeyServer) -> None:
    host, guid, _ = host_with_key(server, "late", "--approval", "required")
    mine = nonce()
    request_id = ask(server, host, [guid], mine)["pending"]["id"]
    age(server, request_id, 600)  # its 600 s have passed
    answer = ask(server, host, [guid], mine)
    assert answer["keys"] == [] and denied(answer) == [guid]
    assert last_release(server)["reason"] == "approval_expired"
    code, _, err = server.admin("approval", "approve", request_id)
    assert code == EX_DATAERR and "is expired, not pending" in err
    assert [r["state"] for r in requests_listed(server, "--all")] == ["expired"]


def age(server: KeyServer, request_id: str, seconds: int) -> None:
    """Move a request SECONDS into its past, behind the server's back."""
    server.sql(
        "UPDATE approvals SET created_at = created_at - ?, expires_at = expires_at - ?"
        " WHERE id = ?",
        (seconds, seconds, request_id),
    )


def test_a_host_has_a_small_cap_on_waiting_requests(keyserver: KeyServer) -> None:
    keyserver.configure(approval={"max_pending": 2})
    keyserver.start(workers=1)
    host, guid, _ = host_with_key(keyserver, "flood", "--approval", "required")
    ids = [ask(keyserver, host, [guid], nonce())["pending"]["id"] for _ in range(2)]
    third = ask(keyserver, host, [guid], nonce())
    assert "pending" not in third and denied(third) == [guid]
    assert last_release(keyserver)["reason"] == "approval_cap"
    # Denying one makes room.
    keyserver.must("approval", "deny", ids[0])
    assert "pending" in ask(keyserver, host, [guid], nonce())


# What takes pending requests away


def test_disabling_the_host_denies_what_it_waits_for(server: KeyServer) -> None:
    host, guid, _ = host_with_key(server, "stolen", "--approval", "required")
    request_id = ask(server, host, [guid], nonce())["pending"]["id"]
    server.must("host", "disable", "stolen")
    [closed] = requests_listed(server, "--all")
    assert closed["state"] == "denied" and closed["note"] == "host_disabled"
    code, _, err = server.admin("approval", "approve", request_id)
    assert code == EX_DATAERR and "is denied" in err
    server.must("host", "enable", "stolen")
    code, _, err = server.admin("approval", "approve", request_id)
    assert code == EX_DATAERR  # enabling again brings nothing back


def test_revoking_a_key_denies_the_requests_that_name_it(server: KeyServer) -> None:
    host, guid, _ = host_with_key(server, "revoker", "--approval", "required")
    other = new_guid()
    activated_key(server, host, POOL, other, "tank/other")
    naming = ask(server, host, [guid], nonce())["pending"]["id"]
    not_naming = ask(server, host, [other], nonce())["pending"]["id"]
    [key_id] = [k["key_id"] for k in keys_of(server, "revoker") if k["dataset_guid"] == guid]
    server.must("key", "revoke", key_id)
    states = {r["id"]: (r["state"], r["note"]) for r in requests_listed(server, "--all")}
    assert states == {naming: ("denied", "key_revoked"), not_naming: ("pending", "")}


def keys_of(server: KeyServer, host: str) -> list[dict[str, Any]]:
    listed: list[dict[str, Any]] = json.loads(server.must("key", "list", "--json", "--host", host))
    return listed


def test_the_dead_man_switch_denies_what_the_host_waits_for(server: KeyServer) -> None:
    host, guid, _ = host_with_key(server, "silent", "--approval", "required")
    request_id = ask(server, host, [guid], nonce())["pending"]["id"]
    server.sql(
        "UPDATE hosts SET deadman_timeout = 60, last_seen = last_seen - 120 WHERE name = ?",
        ("silent",),
    )
    code, _, err = server.admin("approval", "approve", request_id)
    assert code == EX_DATAERR and "is denied, not pending" in err  # the switch fired first
    [closed] = requests_listed(server, "--all")
    assert (closed["state"], closed["decided_by"], closed["note"]) == (
        "denied",
        "deadman-switch",
        "deadman",
    )


# Policies


def test_a_dataset_policy_wins_over_its_hosts(server: KeyServer) -> None:
    host, free, free_key = host_with_key(server, "mixed")
    held = new_guid()
    held_id, held_key = activated_key(server, host, POOL, held, "tank/vault")
    server.must("key", "set", held_id, "--approval", "required")
    answer = ask(server, host, [free, held], nonce())
    assert released(answer) == {free: free_key}
    assert answer["pending"]["datasets"] == [{"pool_guid": POOL, "dataset_guid": held}]
    listed = {k["dataset_guid"]: k["approval"] for k in keys_of(server, "mixed")}
    assert listed == {free: "none (the host's)", held: "required (timeout 600 s)"}
    # A host that requires approval, and a dataset that says none: released.
    server.must("host", "set", "mixed", "--approval", "required")
    server.must("key", "set", held_id, "--approval", "none")
    answer = ask(server, host, [free, held], nonce())
    assert released(answer) == {held: held_key} and answer["pending"]["datasets"] == [
        {"pool_guid": POOL, "dataset_guid": free}
    ]
    server.must("key", "set", held_id, "--approval", "inherit")
    assert "required" in json.loads(server.must("host", "show", "mixed", "--json"))["approval"]
    assert ask(server, host, [held], nonce())["keys"] == []


def test_conditional_on_the_source_network(server: KeyServer) -> None:
    host, guid, key = host_with_key(
        server, "office", "--approval", "conditional", "--approval-unless-from", "127.0.0.0/8"
    )
    assert released(ask(server, host, [guid], nonce())) == {guid: key}
    assert last_release(server)["reason"] == "ok"
    server.must(
        "host", "set", "office", "--approval", "conditional", "--approval-unless-from", "10.0.0.0/8"
    )
    answer = ask(server, host, [guid], nonce())
    assert answer["keys"] == []
    [listed] = requests_listed(server, "--host", "office")
    assert listed["reasons"] == ["source_outside_networks"] and listed["source_ip"] == "127.0.0.1"


def test_conditional_on_the_time_of_day(server: KeyServer) -> None:
    now = datetime.datetime.now().astimezone()  # the server's local time
    inside = window(now - datetime.timedelta(hours=1), now + datetime.timedelta(hours=1))
    outside = window(now + datetime.timedelta(hours=2), now + datetime.timedelta(hours=3))
    host, guid, key = host_with_key(
        server, "daytime", "--approval", "conditional", "--approval-hours", inside
    )
    assert released(ask(server, host, [guid], nonce())) == {guid: key}
    server.must("host", "set", "daytime", "--approval", "conditional", "--approval-hours", outside)
    assert ask(server, host, [guid], nonce())["keys"] == []
    [listed] = requests_listed(server, "--host", "daytime")
    assert listed["reasons"] == ["outside_hours"]


def window(start: datetime.datetime, end: datetime.datetime) -> str:
    return f"{start:%H:%M}-{end:%H:%M}"


def test_a_silent_host_waits_until_an_approved_release_even_after_a_check_in(
    server: KeyServer,
) -> None:
    host, guid, key = host_with_key(
        server, "away", "--approval", "conditional", "--approval-silent", "3600"
    )
    assert released(ask(server, host, [guid], nonce())) == {guid: key}  # seen just now
    server.sql("UPDATE hosts SET last_seen = last_seen - 7200 WHERE name = ?", ("away",))
    with server.session(host) as session:  # a check-in first: it must not reset the trip
        response = session.post(
            server.url("/v1/checkin"), json={"machine_id": host.machine_id}, timeout=10
        )
        assert response.status_code == 200
    [tripped] = records(server, "approval_silence_tripped")
    assert tripped["silent_for"] >= 7200
    mine = nonce()
    request_id = ask(server, host, [guid], mine)["pending"]["id"]
    [listed] = requests_listed(server)
    assert listed["reasons"] == ["host_was_silent"]
    server.must("approval", "approve", request_id)
    assert released(ask(server, host, [guid], mine)) == {guid: key}
    # The approved release reset it: the next release goes out at once.
    assert released(ask(server, host, [guid], nonce())) == {guid: key}


def test_an_agent_that_sends_no_nonce_cannot_wait_and_gets_nothing(server: KeyServer) -> None:
    host, guid, _ = host_with_key(server, "old-agent", "--approval", "required")
    answer = ask(server, host, [guid], None)
    assert answer["keys"] == [] and denied(answer) == [guid] and "pending" not in answer
    assert last_release(server)["reason"] == "approval_needs_nonce"
    with server.session(host) as session:
        response = release(session, server, host, POOL, guid)
    assert response.status_code == 403 and response.json() == {"error": "forbidden"}
    assert last_release(server)["reason"] == "approval_needs_nonce"
    assert requests_listed(server, "--all") == []


@pytest.mark.parametrize(
    "bad",
    ["", "A" * 32, "0" * 31, "0" * 33, 12, None],
    ids=["empty", "upper", "31", "33", "int", "null"],
)
def test_a_malformed_nonce_is_a_400(shared_keyserver: KeyServer, bad: object) -> None:
    host = shared_keyserver.add_host(f"nonce-{len(str(bad))}-{type(bad).__name__}")
    with shared_keyserver.session(host) as session:
        response = session.post(
            shared_keyserver.url("/v1/keys/release"),
            json={
                "machine_id": host.machine_id,
                "datasets": [{"pool_guid": POOL, "dataset_guid": "1"}],
                "nonce": bad,
            },
            timeout=10,
        )
    assert response.status_code == 400
    assert response.json() == {
        "error": "bad_request",
        "detail": "nonce must be 32 lowercase hex digits",
    }


@pytest.mark.parametrize(
    ("options", "said"),
    [
        (["--approval", "conditional"], "needs a condition"),
        (["--approval", "required", "--approval-hours", "08:00-18:00"], "conditional only"),
        (["--approval", "conditional", "--approval-silent", "59"], "at least 60"),
        (["--approval", "conditional", "--approval-hours", "8-18"], "HH:MM-HH:MM"),
        (["--approval", "conditional", "--approval-hours", "08:00-08:00"], "a window"),
        (["--approval", "conditional", "--approval-unless-from", "10.0.0.1/8"], "CIDR"),
        (["--approval", "required", "--approval-timeout", "0"], "1 to 604800"),
    ],
)
def test_a_policy_that_cannot_be_is_refused_and_changes_nothing(
    shared_keyserver: KeyServer, options: list[str], said: str
) -> None:
    name = f"policy-{abs(hash(tuple(options))) % 10**8}"
    shared_keyserver.add_host(name)
    code, _, err = shared_keyserver.admin("host", "set", name, *options)
    assert code == EX_DATAERR and said in err, err
    shown = json.loads(shared_keyserver.must("host", "show", name, "--json"))
    assert shown["approval"] == "none"
    assert not [r for r in records(shared_keyserver, "approval_policy_set") if r["host"] == name]


# The notification hook


def hook(tmp_path: Path, body: str) -> Path:
    script = tmp_path / "notify"
    script.write_text(f"#!/bin/sh\n{body}\n")
    script.chmod(0o755)
    return script


def outcome_of(server: KeyServer, host: HostCreds, guid: str, mine: str) -> dict[str, Any]:
    """The hook's audit record; asking again lets the worker write it (between requests)."""
    found: list[dict[str, Any]] = []

    def audited() -> bool:
        ask(server, host, [guid], mine)
        found[:] = [
            r
            for r in server.audit_records()
            if r.get("event") in ("approval_notified", "approval_notify_failed")
        ]
        return bool(found)

    wait_for(audited, timeout=20)
    return found[0]


def test_the_hook_gets_the_request_as_json_on_stdin(keyserver: KeyServer, tmp_path: Path) -> None:
    told = tmp_path / "told.json"
    script = hook(tmp_path, f'echo "$1" > {told}.argv\ncat > {told}')
    keyserver.configure(approval={"notify": [str(script), "--from key server"]})
    keyserver.start(workers=1)
    host, guid, _ = host_with_key(keyserver, "paged", "--approval", "required")
    mine = nonce()
    request_id = ask(keyserver, host, [guid], mine)["pending"]["id"]
    record = outcome_of(keyserver, host, guid, mine)
    assert record["event"] == "approval_notified" and record["approval"] == request_id
    sent = json.loads(told.read_text())
    assert sent["id"] == request_id and sent["host"] == "paged" and sent["state"] == "pending"
    assert sent["datasets"] == [{"pool_guid": POOL, "dataset_guid": guid, "dataset": "tank/held"}]
    assert sent["reasons"] == ["required"] and sent["source_ip"] == "127.0.0.1"
    assert Path(f"{told}.argv").read_text() == "--from key server\n"  # one argument, no shell
    # Asking again does not page again.
    assert len(records(keyserver, "approval_notified")) == 1


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        ("echo 'mail server down' >&2; exit 3", "exit status 3: mail server down"),
        ("sleep 30", "still running after 1 s; killed"),
    ],
    ids=["fails", "hangs"],
)
def test_a_failing_hook_is_audited_and_releases_nothing(
    keyserver: KeyServer, tmp_path: Path, body: str, reason: str
) -> None:
    keyserver.configure(approval={"notify": [str(hook(tmp_path, body))], "notify_timeout": 1})
    keyserver.start(workers=1)
    host, guid, _ = host_with_key(keyserver, "unpaged", "--approval", "required")
    mine = nonce()
    ask(keyserver, host, [guid], mine)
    record = outcome_of(keyserver, host, guid, mine)
    assert (record["event"], record["decision"], record["reason"]) == (
        "approval_notify_failed",
        "failed",
        reason,
    )
    assert ask(keyserver, host, [guid], mine)["keys"] == []
    assert [r["state"] for r in requests_listed(keyserver)] == ["pending"]


def test_a_key_made_before_is_not_handed_out_again_without_approval(server: KeyServer) -> None:
    """A repeated enrollment and a rotation's next key cannot wait: under a policy that asks
    for approval they are refused."""
    host = server.add_host("repeats")
    pending_guid, active_guid = new_guid(), new_guid()
    body = {"machine_id": host.machine_id, "pool_guid": POOL}
    with server.session(host) as session:
        first = session.post(
            server.url("/v1/keys"),
            json={**body, "dataset_guid": pending_guid, "dataset": "tank/new", "keyformat": "raw"},
            timeout=10,
        )
        assert first.status_code == 201
    activated_key(server, host, POOL, active_guid, "tank/old")
    server.must("host", "set", "repeats", "--approval", "required")
    with server.session(host) as session:
        again = session.post(
            server.url("/v1/keys"),
            json={**body, "dataset_guid": pending_guid, "dataset": "tank/new", "keyformat": "raw"},
            timeout=10,
        )
        assert again.status_code == 403 and "key" not in again.json()
        assert records(server, "enroll")[-1]["reason"] == "approval_required"
        # A next key is the one the host will protect its data with: made for a caller
        # the policy holds back (a copied certificate), it would hand that caller the
        # future key. So it is neither made nor given again.
        made = session.post(
            server.url("/v1/keys/next"), json={**body, "dataset_guid": active_guid}, timeout=10
        )
        assert made.status_code == 403 and "key" not in made.json()
        assert records(server, "rotate")[-1]["reason"] == "approval_required"
    assert [k["state"] for k in keys_of(server, "repeats") if k["dataset_guid"] == active_guid] == [
        "active"
    ]


def test_an_approval_starts_the_requests_time_afresh(server: KeyServer) -> None:
    host, guid, key = host_with_key(server, "late-ok", "--approval", "required")
    mine = nonce()
    request_id = ask(server, host, [guid], mine)["pending"]["id"]
    age(server, request_id, 590)  # 10 s of its 600 left
    server.must("approval", "approve", request_id)
    [listed] = requests_listed(server)
    assert listed["expires_at"] - time.time() > 590, "600 s again, from the approval"
    age(server, request_id, 30)  # past the first span, within the one the approval started
    assert released(ask(server, host, [guid], mine)) == {guid: key}
