"""A rollover of the hosts' CA as the real server runs it, on both stores: `ca next`
makes the servers trust both CAs and sign with the next one, check-ins ask old-CA hosts
to renew, `ca status` lists them, and `ca activate` refuses to lock them out (unless
--force), then the old CA's certificates are refused by the running servers' TLS."""

from __future__ import annotations

import json
import os
from typing import Any

import requests
from cryptography import x509

from tests.keyserver import HostCreds, KeyServer
from tests.pinned_requests import pinned_session
from zfs_unlock_common import pinning
from zfs_unlock_server.errors import EX_CANTCREAT, EX_CONFIG, EX_TEMPFAIL

BOTH_STORES = True


def checkin(server: KeyServer, host: HostCreds) -> dict[str, Any]:
    with pinned_session([pinning.parse_pin(server.pin)], host.cert, host.key) as session:
        answer = session.post(
            server.url("/v1/checkin"), json={"machine_id": host.machine_id}, timeout=10
        )
    assert answer.status_code == 200, answer.text
    found: dict[str, Any] = answer.json()
    return found


def refused_by_tls(server: KeyServer, host: HostCreds) -> bool:
    try:
        checkin(server, host)
    except requests.exceptions.RequestException:  # the TLS alert, or the reset after it
        return True
    return False


def issuer(host: HostCreds) -> str:
    return x509.load_pem_x509_certificate(host.cert.read_bytes()).issuer.rfc4514_string()


def status(server: KeyServer) -> dict[str, Any]:
    found: dict[str, Any] = json.loads(server.must("ca", "status", "--json"))
    return found


def records(server: KeyServer, event: str) -> list[dict[str, Any]]:
    return [r for r in server.audit_records() if r.get("event") == event]


def test_next_signs_new_hosts_and_check_ins_ask_old_ca_hosts_to_renew(
    keyserver: KeyServer,
) -> None:
    old = keyserver.add_host("veteran")
    silent = keyserver.add_host("silent")
    keyserver.start()
    assert checkin(keyserver, old)["renew"] is False  # no rollover: nothing to do
    next_id = keyserver.must("ca", "next").strip()
    assert (keyserver.data_dir / "ca-next.key").stat().st_mode & 0o777 == 0o400
    assert [r["ca"] for r in records(keyserver, "ca_next_created")] == [next_id]

    young = keyserver.add_host("newcomer")  # signed by the next CA already
    assert issuer(young) != issuer(old)
    assert checkin(keyserver, young)["renew"] is False  # the running workers trust it
    assert checkin(keyserver, old)["renew"] is True
    assert status(keyserver)["waiting"] == ["silent", "veteran"]  # silent never checked in
    keyserver.must("host", "disable", "silent")
    assert status(keyserver)["waiting"] == ["veteran"]
    assert silent.name == "silent"

    code, _, err = keyserver.admin("ca", "next")
    assert code == EX_CANTCREAT and "under way" in err, err


def test_activate_waits_then_the_old_cas_certificates_are_refused(keyserver: KeyServer) -> None:
    old = keyserver.add_host("stays-old")
    keyserver.start()
    next_id = keyserver.must("ca", "next").strip()
    checkin(keyserver, old)
    code, out, err = keyserver.admin("ca", "activate")
    assert code == EX_TEMPFAIL and "stays-old" in err and out == "", err
    assert not refused_by_tls(keyserver, old)

    code, out, err = keyserver.admin("ca", "activate", "--force")
    assert code == 0 and out.strip() == next_id, err
    assert "1 host(s) still holding its certificates" in err
    [done] = records(keyserver, "ca_activated")
    assert (done["ca"], done["forced"], done["unconfirmed"]) == (next_id, 1, 1)
    assert not (keyserver.data_dir / "ca-next.crt").exists()
    young = keyserver.add_host("after")
    assert checkin(keyserver, young)["renew"] is False
    assert refused_by_tls(keyserver, old)
    assert status(keyserver) == {"current": next_id, "next": "", "waiting": []}


def test_an_activate_killed_between_its_renames_signs_and_trusts_right_and_finishes(
    keyserver: KeyServer,
) -> None:
    old = keyserver.add_host("before")
    keyserver.start()
    next_id = keyserver.must("ca", "next").strip()
    data = keyserver.data_dir
    os.replace(data / "ca-next.key", data / "ca.key")  # what a kill -9 there leaves
    middle = keyserver.add_host("middle")  # signed by the next CA, with its key in ca.key
    assert issuer(middle) != issuer(old)
    assert checkin(keyserver, middle)["renew"] is False
    assert checkin(keyserver, old)["renew"] is True  # both CAs still trusted
    # No --force, though "before" still holds an old-CA certificate: half moved, it
    # finishes rather than waits.
    assert keyserver.must("ca", "activate").strip() == next_id
    assert checkin(keyserver, middle)["renew"] is False
    assert refused_by_tls(keyserver, old)


def test_status_and_activate_without_a_rollover(keyserver: KeyServer) -> None:
    code, out, err = keyserver.admin("ca", "status")
    assert code == 0 and "next:      (none)" in out and "ca next" in err, err
    code, _, err = keyserver.admin("ca", "activate")
    assert code == EX_CONFIG and "ca next" in err, err
