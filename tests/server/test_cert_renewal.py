"""A host renews its own client certificate over mutual TLS, as the real server answers
it, on both stores: a new certificate for the same key, signed for the enrolled name; the
old one works until the new one is first used, or until renewed_certificate_grace_days
end (the server's clock moved with libfaketime); refusals change nothing."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import requests
from cryptography import x509

from tests.faketime import faketime_env
from tests.keyserver import HostCreds, KeyServer
from zfs_unlock_common.csr import csr_for_key, new_key_and_csr

BOTH_STORES = True


def post(server: KeyServer, host: HostCreds, path: str, **fields: Any) -> requests.Response:
    with server.session(host) as session:
        return session.post(
            server.url(path), json={"machine_id": host.machine_id, **fields}, timeout=10
        )


def renew(server: KeyServer, host: HostCreds, csr: bytes | None = None) -> requests.Response:
    csr = csr or csr_for_key(host.key.read_bytes(), host.name)
    return post(server, host, "/v1/certificate", csr=csr.decode())


def renewed(server: KeyServer, host: HostCreds, tmp_path: Path, label: str) -> HostCreds:
    """The host as it is after installing its renewed certificate (a copy beside it)."""
    answer = renew(server, host)
    assert answer.status_code == 200, answer.text
    cert = tmp_path / f"{host.name}-{label}.crt"
    cert.write_text(answer.json()["certificate"])
    return dataclasses.replace(host, cert=cert)


def checks_in(server: KeyServer, host: HostCreds) -> int:
    return post(server, host, "/v1/checkin").status_code


def events(server: KeyServer, name: str) -> list[dict[str, Any]]:
    return [r for r in server.audit_records() if r.get("event") == name]


def certificates(server: KeyServer, host: HostCreds) -> list[str]:
    shown = json.loads(server.must("host", "show", host.name, "--json"))
    return sorted(c["sha256"] for c in shown["certificates"])


def test_the_new_certificate_has_the_same_key_and_name_and_ends_the_old_at_first_use(
    keyserver: KeyServer, tmp_path: Path
) -> None:
    old = keyserver.add_host("renewer")
    keyserver.start()
    new = renewed(keyserver, old, tmp_path, "new")
    cert = x509.load_pem_x509_certificate(new.cert.read_bytes())
    previous = x509.load_pem_x509_certificate(old.cert.read_bytes())
    assert cert.subject == previous.subject and cert.serial_number != previous.serial_number
    assert cert.public_key().public_numbers() == previous.public_key().public_numbers()  # type: ignore[union-attr]
    [record] = events(keyserver, "certificate_renewed")
    assert record["host"] == "renewer" and record["decision"] == "allow"

    assert checks_in(keyserver, old) == 200  # both work until the new one is used
    assert checks_in(keyserver, new) == 200
    assert checks_in(keyserver, old) == 403
    [ended] = events(keyserver, "certificate_replaced")
    assert ended["replaced"] == record["cert_fp"] and ended["cert_fp"] == record["new_cert_fp"]
    assert certificates(keyserver, old) == [record["new_cert_fp"]]
    assert checks_in(keyserver, new) == 200


def test_a_renewal_lost_on_its_way_is_replaced_by_the_next_one(
    keyserver: KeyServer, tmp_path: Path
) -> None:
    old = keyserver.add_host("forgetful")
    keyserver.start()
    lost = renewed(keyserver, old, tmp_path, "lost")
    kept = renewed(keyserver, old, tmp_path, "kept")  # asked again with the old certificate
    assert checks_in(keyserver, lost) == 403  # the first one was never used: dropped
    assert checks_in(keyserver, kept) == 200
    assert checks_in(keyserver, old) == 403


def test_the_old_certificate_ends_with_the_grace_period_even_unused(
    keyserver: KeyServer, tmp_path: Path
) -> None:
    keyserver.configure(renewed_certificate_grace_days=7)
    old = keyserver.add_host("away")
    keyserver.start()
    new = renewed(keyserver, old, tmp_path, "new")
    keyserver.stop()
    keyserver.start(env=faketime_env("+6d", sleeps=True))
    assert checks_in(keyserver, old) == 200  # day 6: still inside the grace
    keyserver.stop()
    keyserver.start(env=faketime_env("+8d", sleeps=True))
    assert checks_in(keyserver, old) == 403
    assert checks_in(keyserver, new) == 200


def test_refused_renewals_change_nothing(keyserver: KeyServer, tmp_path: Path) -> None:
    host = keyserver.add_host("careful")
    other = keyserver.add_host("stranger")
    keyserver.start()
    before = certificates(keyserver, host)
    _, foreign_csr = new_key_and_csr("careful")
    bad = [
        renew(keyserver, host, b"-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n"),
        post(keyserver, host, "/v1/certificate", csr="x" * 9000),
        post(keyserver, host, "/v1/certificate"),
    ]
    assert [r.status_code for r in bad] == [400, 400, 400]
    wrong_machine = dataclasses.replace(host, machine_id=other.machine_id)
    assert renew(keyserver, wrong_machine).status_code == 403
    keyserver.must("host", "disable", "careful")
    assert renew(keyserver, host).status_code == 403
    assert certificates(keyserver, host) == before
    assert events(keyserver, "certificate_renewed") == []
    keyserver.must("host", "enable", "careful")
    # Another key in the CSR is the host's choice (a new key pair); the name is the server's.
    answer = renew(keyserver, host, foreign_csr)
    assert answer.status_code == 200
    cert = x509.load_pem_x509_certificate(answer.json()["certificate"].encode())
    assert cert.subject.rfc4514_string() == "CN=careful"


def test_removing_a_certificate_removes_the_renewals_made_through_it(
    keyserver: KeyServer, tmp_path: Path
) -> None:
    """A copy of a certificate in a thief's hands renews itself; the admin removes the
    stolen certificate: the renewal made through it goes with it."""
    stolen = keyserver.add_host("robbed")
    keyserver.start()
    thiefs = renewed(keyserver, stolen, tmp_path, "thief")
    [record] = events(keyserver, "certificate_renewed")
    keyserver.must("host", "cert-remove", "robbed", record["cert_fp"])
    assert checks_in(keyserver, thiefs) == 403
    assert certificates(keyserver, stolen) == []


def test_each_renewal_starts_the_grace_again(keyserver: KeyServer, tmp_path: Path) -> None:
    """A host whose initramfs cannot take its new certificate puts the old one back and
    asks again later: the old one stays valid for the grace after the last request."""
    keyserver.configure(renewed_certificate_grace_days=7)
    old = keyserver.add_host("retrying")
    keyserver.start()
    renewed(keyserver, old, tmp_path, "first")  # undone on the host
    keyserver.stop()
    keyserver.start(env=faketime_env("+6d", sleeps=True))
    renewed(keyserver, old, tmp_path, "second")  # asked again six days later
    keyserver.stop()
    keyserver.start(env=faketime_env("+10d", sleeps=True))
    assert checks_in(keyserver, old) == 200  # seven days from the second request
