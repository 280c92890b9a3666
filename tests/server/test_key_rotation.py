"""A dataset key's rotation as the real server sees it, on both stores: the next key
beside the active one, released beside it, made active by the host, and the key before
retired, kept for the grace period and then deleted at a check-in (the clock moved with
libfaketime)."""

from __future__ import annotations

import base64
import json
from typing import Any

import requests

from tests.faketime import faketime_env
from tests.keyserver import HostCreds, KeyServer, enroll, release

BOTH_STORES = True
POOL = "4444444444444444444"


def post(server: KeyServer, host: HostCreds, path: str, **fields: Any) -> requests.Response:
    with server.session(host) as session:
        return session.post(
            server.url(path), json={"machine_id": host.machine_id, **fields}, timeout=10
        )


def next_key(server: KeyServer, host: HostCreds, guid: str) -> requests.Response:
    return post(server, host, "/v1/keys/next", pool_guid=POOL, dataset_guid=guid)


def activate(server: KeyServer, host: HostCreds, guid: str, key_id: str) -> requests.Response:
    return post(server, host, "/v1/keys/activate", pool_guid=POOL, dataset_guid=guid, key_id=key_id)


def release_batch(server: KeyServer, host: HostCreds, guid: str) -> dict[str, Any]:
    answer = post(
        server,
        host,
        "/v1/keys/release",
        datasets=[{"pool_guid": POOL, "dataset_guid": guid}],
    )
    assert answer.status_code == 200, answer.text
    body: dict[str, Any] = answer.json()
    return body


def enrolled(server: KeyServer, host: HostCreds, guid: str) -> dict[str, Any]:
    with server.session(host) as session:
        answer = enroll(session, server, host, POOL, guid)
    assert answer.status_code == 201, answer.text
    body: dict[str, Any] = answer.json()
    return body


def states(server: KeyServer, host: HostCreds) -> dict[str, str]:

    listed = json.loads(server.must("key", "list", "--host", host.name, "--json"))
    return {k["key_id"]: k["state"] for k in listed}


def test_next_key_release_and_activation(keyserver: KeyServer) -> None:
    keyserver.configure(deadman_timeout=0)
    keyserver.start(workers=1)
    host = keyserver.add_host("web1")
    pending = enrolled(keyserver, host, "11")
    # Only an active key rotates.
    assert next_key(keyserver, host, "11").status_code == 409
    assert next_key(keyserver, host, "12").status_code == 403  # no key at all
    assert activate(keyserver, host, "11", pending["key_id"]).status_code == 200

    first = next_key(keyserver, host, "11")
    assert first.status_code == 201, first.text
    upcoming = first.json()
    assert (upcoming["state"], upcoming["keyformat"]) == ("next", "raw")
    assert upcoming["key_id"] != pending["key_id"]
    again = next_key(keyserver, host, "11")
    assert again.status_code == 200 and again.json() == upcoming  # a lost answer, asked again

    batch = release_batch(keyserver, host, "11")
    assert [(k["key_id"], k["key"]) for k in batch["keys"]] == [(pending["key_id"], pending["key"])]
    assert [(k["key_id"], k["key"], k["state"]) for k in batch["next_keys"]] == [
        (upcoming["key_id"], upcoming["key"], "next")
    ]
    with keyserver.session(host) as session:
        one = release(session, keyserver, host, POOL, "11").json()
    assert one["key_id"] == pending["key_id"]  # the single-key route releases no next key

    done = activate(keyserver, host, "11", upcoming["key_id"])
    assert done.status_code == 200 and done.json()["state"] == "active"
    assert states(keyserver, host) == {pending["key_id"]: "retired", upcoming["key_id"]: "active"}
    assert activate(keyserver, host, "11", upcoming["key_id"]).status_code == 200  # repeatable
    # The retired key is released no more; the active one is the former next key.
    batch = release_batch(keyserver, host, "11")
    assert [k["key"] for k in batch["keys"]] == [upcoming["key"]] and batch["next_keys"] == []
    assert activate(keyserver, host, "11", pending["key_id"]).status_code == 403
    audit = [
        (r["event"], r.get("reason"))
        for r in keyserver.audit_records()
        if upcoming["key_id"] in (r.get("key_id"), r.get("replaces"))
    ]
    assert audit[:2] == [("rotate", "next_key_created"), ("rotate", "repeated")]
    assert ("release", "next_key") in audit and ("activate", "rotated") in audit


def test_a_revoked_key_takes_its_next_key_with_it(keyserver: KeyServer) -> None:
    keyserver.start(workers=1)
    host = keyserver.add_host("web2")
    key = enrolled(keyserver, host, "21")
    assert activate(keyserver, host, "21", key["key_id"]).status_code == 200
    upcoming = next_key(keyserver, host, "21").json()
    keyserver.must("key", "revoke", key["key_id"])
    batch = release_batch(keyserver, host, "21")
    assert batch["keys"] == [] and batch["next_keys"] == []
    assert activate(keyserver, host, "21", upcoming["key_id"]).status_code == 403
    assert states(keyserver, host)[upcoming["key_id"]] == "next"


def test_a_retired_key_is_deleted_at_a_check_in_once_its_grace_ends(keyserver: KeyServer) -> None:
    keyserver.configure(deadman_timeout=0, retired_key_grace_days=30)
    keyserver.start(workers=1)
    host = keyserver.add_host("web3")
    key = enrolled(keyserver, host, "31")
    activate(keyserver, host, "31", key["key_id"])
    upcoming = next_key(keyserver, host, "31").json()
    activate(keyserver, host, "31", upcoming["key_id"])
    keyserver.stop()

    for offset, kept in (("+29d", True), ("+31d", False)):
        keyserver.start(workers=1, env=faketime_env(offset, sleeps=True))
        assert post(keyserver, host, "/v1/checkin").status_code == 200
        keyserver.stop()
        assert (key["key_id"] in states(keyserver, host)) is kept, offset
    assert states(keyserver, host) == {upcoming["key_id"]: "active"}
    [deleted] = [r for r in keyserver.audit_records() if r["event"] == "key_deleted"]
    assert (deleted["key_id"], deleted["reason"]) == (key["key_id"], "retired_grace_ended")
    # What was kept still opens: the active key is the rotation's.
    keyserver.start(workers=1)
    batch = release_batch(keyserver, host, "31")
    assert base64.b64decode(batch["keys"][0]["key"]) == base64.b64decode(upcoming["key"])


def due(server: KeyServer, host: HostCreds) -> list[str]:
    answer = post(server, host, "/v1/checkin")
    assert answer.status_code == 200, answer.text
    return [item["dataset_guid"] for item in answer.json()["rotate"]]


def test_key_rotate_asks_the_host_at_its_check_in_until_done(keyserver: KeyServer) -> None:
    keyserver.start(workers=1)
    host = keyserver.add_host("web4")
    keys = {}
    for guid in ("41", "42"):
        keys[guid] = enrolled(keyserver, host, guid)
        activate(keyserver, host, guid, keys[guid]["key_id"])
    pending = enrolled(keyserver, host, "43")  # not active: never asked for
    assert due(keyserver, host) == []

    code, _, err = keyserver.admin("key", "rotate", "--host", "web4", "--dataset", "49")
    assert code == 65 and "no active key for dataset 49" in err
    code, _, err = keyserver.admin("key", "rotate", "--host", "nobody", "--all")
    assert code == 65
    out = keyserver.must("key", "rotate", "--host", "web4", "--all")
    assert sorted(out.split()) == sorted(keys[g]["key_id"] for g in keys)
    assert pending["key_id"] not in out
    assert due(keyserver, host) == ["41", "42"]
    asked = [r for r in keyserver.audit_records() if r["event"] == "key_rotation_requested"]
    assert sorted(r["key_id"] for r in asked) == sorted(out.split())

    upcoming = next_key(keyserver, host, "41").json()
    assert due(keyserver, host) == ["41", "42"]  # begun is not done
    activate(keyserver, host, "41", upcoming["key_id"])
    assert due(keyserver, host) == ["42"]


def test_max_key_age_has_the_daemon_rotate_old_keys(keyserver: KeyServer) -> None:
    keyserver.configure(deadman_timeout=0, max_key_age_days=30)
    keyserver.start(workers=1)
    host = keyserver.add_host("web5")
    key = enrolled(keyserver, host, "51")
    activate(keyserver, host, "51", key["key_id"])
    assert due(keyserver, host) == []
    keyserver.stop()
    for offset, expected in (("+29d", []), ("+31d", ["51"])):
        keyserver.start(workers=1, env=faketime_env(offset, sleeps=True))
        assert due(keyserver, host) == expected, offset
        keyserver.stop()
