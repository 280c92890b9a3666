"""Who gets a key: every gate of the release decision, over real mutual TLS on 127.0.0.1."""

from __future__ import annotations

import base64
import datetime
import itertools
import socket
import ssl
import time
import warnings
from pathlib import Path

import pytest
import requests
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from tests.certs import not_after, spki
from tests.keyserver import HostCreds, KeyServer, activated_key, enroll, release
from zfs_unlock_common.csr import new_key_and_csr
from zfs_unlock_server import pki
from zfs_unlock_server.config import Layout
from zfs_unlock_server.tlsctx import server_context

# Every test here runs on SQLite and on PostgreSQL (tests/conftest.py).
BOTH_STORES = True

POOL = "1111111111111111111"
_guids = itertools.count(1000)


def new_guid() -> str:
    return str(next(_guids))


def enrolled_key(server: KeyServer, host: HostCreds, pool: str = POOL) -> tuple[str, str, bytes]:
    """Enroll and activate a key; return (dataset_guid, key_id, key bytes)."""
    dataset_guid = new_guid()
    return (dataset_guid, *activated_key(server, host, pool, dataset_guid))


def last_decision(server: KeyServer, event: str = "release") -> dict[str, object]:
    return [r for r in server.audit_records() if r.get("event") == event][-1]


def assert_forbidden(response: requests.Response) -> None:
    assert response.status_code == 403
    # No hint of which check failed.
    assert response.json() == {"error": "forbidden"}


def test_enrolled_host_gets_its_key(shared_keyserver: KeyServer) -> None:
    host = shared_keyserver.add_host("owner")
    dataset_guid, key_id, key = enrolled_key(shared_keyserver, host)
    assert len(key) == 32
    with shared_keyserver.session(host) as session:
        response = release(session, shared_keyserver, host, POOL, dataset_guid)
    assert response.status_code == 200
    body = response.json()
    assert base64.b64decode(body["key"]) == key
    assert body["key_id"] == key_id and body["keyformat"] == "raw" and body["state"] == "active"
    assert response.headers["Cache-Control"] == "no-store"
    record = last_decision(shared_keyserver)
    assert record["decision"] == "allow" and record["host"] == "owner"
    assert record["source_ip"] == "127.0.0.1" and record["dataset_guid"] == dataset_guid


def test_batch_returns_every_key_in_one_round_trip(shared_keyserver: KeyServer) -> None:
    host = shared_keyserver.add_host("batcher")
    owned = [enrolled_key(shared_keyserver, host) for _ in range(5)]
    unknown = new_guid()
    items = [{"pool_guid": POOL, "dataset_guid": d} for d, _, _ in owned]
    items.append({"pool_guid": POOL, "dataset_guid": unknown})
    with shared_keyserver.session(host) as session:
        response = session.post(
            shared_keyserver.url("/v1/keys/release"),
            json={"machine_id": host.machine_id, "datasets": items},
            timeout=10,
        )
    assert response.status_code == 200
    body = response.json()
    got = {k["dataset_guid"]: base64.b64decode(k["key"]) for k in body["keys"]}
    assert got == {d: key for d, _, key in owned}
    assert body["denied"] == [{"pool_guid": POOL, "dataset_guid": unknown}]


def test_keys_are_never_created_by_a_get(shared_keyserver: KeyServer) -> None:
    host = shared_keyserver.add_host("getter")
    dataset_guid = new_guid()
    with shared_keyserver.session(host) as session:
        assert_forbidden(release(session, shared_keyserver, host, POOL, dataset_guid))
    assert last_decision(shared_keyserver)["reason"] == "no_such_key"
    assert "getter" not in shared_keyserver.must("key", "list")


def test_repeated_enrolment_returns_the_pending_key_and_never_a_second(
    shared_keyserver: KeyServer,
) -> None:
    host = shared_keyserver.add_host("retrier")
    dataset_guid = new_guid()
    with shared_keyserver.session(host) as session:
        first = enroll(session, shared_keyserver, host, POOL, dataset_guid)
        again = enroll(session, shared_keyserver, host, POOL, dataset_guid)
        assert (first.status_code, again.status_code) == (201, 200)
        assert first.json() == again.json()
        session.post(
            shared_keyserver.url("/v1/keys/activate"),
            json={
                "machine_id": host.machine_id,
                "pool_guid": POOL,
                "dataset_guid": dataset_guid,
                "key_id": first.json()["key_id"],
            },
            timeout=10,
        ).raise_for_status()
        assert enroll(session, shared_keyserver, host, POOL, dataset_guid).status_code == 409


def test_another_hosts_certificate_is_refused(shared_keyserver: KeyServer) -> None:
    owner = shared_keyserver.add_host("victim")
    thief = shared_keyserver.add_host("thief")
    dataset_guid, _, _ = enrolled_key(shared_keyserver, owner)
    with shared_keyserver.session(thief) as session:
        # With its own machine-id: the key is not its own.
        assert_forbidden(release(session, shared_keyserver, thief, POOL, dataset_guid))
        assert last_decision(shared_keyserver)["reason"] == "no_such_key"
        # Claiming the owner's machine-id does not help either.
        response = release(
            session, shared_keyserver, thief, POOL, dataset_guid, machine_id=owner.machine_id
        )
    assert_forbidden(response)
    record = last_decision(shared_keyserver)
    assert record["reason"] == "machine_id_mismatch" and record["host"] == "thief"


def test_wrong_machine_id_is_refused(shared_keyserver: KeyServer) -> None:
    host = shared_keyserver.add_host("mid")
    dataset_guid, _, _ = enrolled_key(shared_keyserver, host)
    with shared_keyserver.session(host) as session:
        response = release(session, shared_keyserver, host, POOL, dataset_guid, machine_id="f" * 32)
    assert_forbidden(response)
    assert last_decision(shared_keyserver)["reason"] == "machine_id_mismatch"


def test_pool_outside_the_enrolment_is_refused(shared_keyserver: KeyServer) -> None:
    host = shared_keyserver.add_host("pooled", "--pool", POOL)
    other_pool = "2222222222222222222"
    with shared_keyserver.session(host) as session:
        assert_forbidden(enroll(session, shared_keyserver, host, other_pool, new_guid()))
        assert last_decision(shared_keyserver, "enroll")["reason"] == "pool_not_allowed"
    # An admin-made key on another pool is still not released.
    dataset_guid = new_guid()
    shared_keyserver.must(
        "key",
        "create",
        "--host",
        "pooled",
        "--pool-guid",
        other_pool,
        "--dataset-guid",
        dataset_guid,
        "--dataset",
        "other/ds",
    )
    with shared_keyserver.session(host) as session:
        assert_forbidden(release(session, shared_keyserver, host, other_pool, dataset_guid))
    assert last_decision(shared_keyserver)["reason"] == "pool_not_allowed"


def test_source_address_outside_allowed_networks_is_refused(shared_keyserver: KeyServer) -> None:
    host = shared_keyserver.add_host("fenced", "--allow-ip", "127.0.0.1/32")
    dataset_guid, _, _ = enrolled_key(shared_keyserver, host)
    # 127.0.0.2 is another loopback address: same machine, different source.
    with shared_keyserver.session(host, source_address="127.0.0.2") as session:
        response = release(session, shared_keyserver, host, POOL, dataset_guid)
    assert_forbidden(response)
    record = last_decision(shared_keyserver)
    assert record["reason"] == "source_address_not_allowed" and record["source_ip"] == "127.0.0.2"


def test_disable_and_enable_take_effect_on_the_next_request(shared_keyserver: KeyServer) -> None:
    host = shared_keyserver.add_host("toggled")
    dataset_guid, _, _ = enrolled_key(shared_keyserver, host)
    shared_keyserver.must("host", "disable", "toggled")
    with shared_keyserver.session(host) as session:
        assert_forbidden(release(session, shared_keyserver, host, POOL, dataset_guid))
        assert last_decision(shared_keyserver)["reason"] == "host_disabled"
        shared_keyserver.must("host", "enable", "toggled")
        assert release(session, shared_keyserver, host, POOL, dataset_guid).status_code == 200


def test_revoked_key_is_refused_at_once_and_restore_brings_it_back(
    shared_keyserver: KeyServer,
) -> None:
    host = shared_keyserver.add_host("revoked")
    dataset_guid, key_id, key = enrolled_key(shared_keyserver, host)
    shared_keyserver.must("key", "revoke", key_id)
    with shared_keyserver.session(host) as session:
        assert_forbidden(release(session, shared_keyserver, host, POOL, dataset_guid))
        assert last_decision(shared_keyserver)["reason"] == "key_revoked"
        # Revoked is not gone: the host cannot mint a replacement either.
        assert enroll(session, shared_keyserver, host, POOL, dataset_guid).status_code == 409
        shared_keyserver.must("key", "restore", key_id)
        response = release(session, shared_keyserver, host, POOL, dataset_guid)
    assert base64.b64decode(response.json()["key"]) == key
    events = [r["event"] for r in shared_keyserver.audit_records() if r.get("key_id") == key_id]
    assert "key_revoked" in events and "key_restored" in events


@pytest.mark.slow  # real waits of several seconds: left out of make unit
def test_deadman_switch_disables_a_silent_host_until_an_admin_enables_it(
    shared_keyserver: KeyServer,
) -> None:
    host = shared_keyserver.add_host("silent", "--deadman-timeout", "2")
    dataset_guid, _, _ = enrolled_key(shared_keyserver, host)
    with shared_keyserver.session(host) as session:
        checkin = session.post(
            shared_keyserver.url("/v1/checkin"), json={"machine_id": host.machine_id}, timeout=10
        )
        assert checkin.json() == {
            "host": "silent",
            "deadman_timeout": 2,
            "rotate": [],
            "pins": {"current": [shared_keyserver.pin], "next": []},
            "renew": False,
        }
        time.sleep(3.2)
        assert_forbidden(release(session, shared_keyserver, host, POOL, dataset_guid))
        assert last_decision(shared_keyserver)["reason"] == "deadman_expired"
        # Checking in now does not bring it back: only an admin does.
        late = session.post(
            shared_keyserver.url("/v1/checkin"), json={"machine_id": host.machine_id}, timeout=10
        )
        assert_forbidden(late)
        shown = shared_keyserver.must("host", "show", "silent", "--json")
        assert '"disabled_reason": "deadman"' in shown
        shared_keyserver.must("host", "enable", "silent")
        assert release(session, shared_keyserver, host, POOL, dataset_guid).status_code == 200


@pytest.mark.slow  # real waits of several seconds: left out of make unit
def test_checkin_keeps_a_host_alive(shared_keyserver: KeyServer) -> None:
    host = shared_keyserver.add_host("alive", "--deadman-timeout", "2")
    dataset_guid, _, _ = enrolled_key(shared_keyserver, host)
    with shared_keyserver.session(host) as session:
        for _ in range(3):
            time.sleep(1.2)
            response = session.post(
                shared_keyserver.url("/v1/checkin"),
                json={"machine_id": host.machine_id},
                timeout=10,
            )
            assert response.status_code == 200
        assert release(session, shared_keyserver, host, POOL, dataset_guid).status_code == 200


def _raw_tls(server: KeyServer, cert: Path | None = None, key: Path | None = None) -> bytes:
    """Speak HTTP over TLS by hand, with or without a client certificate."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    if cert and key:
        context.load_cert_chain(str(cert), str(key))
    with (
        socket.create_connection(("127.0.0.1", server.port), timeout=10) as raw,
        context.wrap_socket(raw) as tls,
    ):
        tls.sendall(b"GET /v1/hosts/" + b"0" * 32 + b"/keys/1/2 HTTP/1.1\r\nHost: x\r\n\r\n")
        return tls.recv(4096)


def test_no_client_certificate_gets_no_tls_session(shared_keyserver: KeyServer) -> None:
    with pytest.raises((ssl.SSLError, ConnectionError)):
        reply = _raw_tls(shared_keyserver)
        # TLS 1.3 reports the server's refusal on the first read at the latest.
        assert reply == b""
        raise ConnectionError("closed without a reply")
    audited = [r for r in shared_keyserver.audit_records() if r["event"] == "tls_handshake_failed"]
    assert audited and audited[-1]["source_ip"] == "127.0.0.1"


def test_certificate_from_another_ca_gets_no_tls_session(
    shared_keyserver: KeyServer, tmp_path: Path
) -> None:
    rogue_ca = pki.create_ca("rogue CA")
    key_pem, csr_pem = new_key_and_csr("rogue")
    cert_pem = pki.sign_host_certificate(rogue_ca, pki.load_csr(csr_pem), "owner")
    (tmp_path / "c.crt").write_bytes(cert_pem)
    (tmp_path / "c.key").write_bytes(key_pem)
    with pytest.raises((ssl.SSLError, ConnectionError)):
        reply = _raw_tls(shared_keyserver, tmp_path / "c.crt", tmp_path / "c.key")
        assert reply == b""
        raise ConnectionError("closed without a reply")


def test_ca_signed_but_unenrolled_certificate_is_refused(
    shared_keyserver: KeyServer, tmp_path: Path
) -> None:
    """Our own CA signed it, but no host owns it (say, one issued and then removed)."""
    host = shared_keyserver.add_host("removed")
    shared_keyserver.must("host", "remove", "removed")
    with shared_keyserver.session(host) as session:
        assert_forbidden(release(session, shared_keyserver, host, POOL, new_guid()))
    assert last_decision(shared_keyserver)["reason"] == "unknown_certificate"


def test_tls_is_1_2_or_newer_with_forward_secret_suites(shared_keyserver: KeyServer) -> None:
    host = shared_keyserver.add_host("tlsver")
    assert (
        server_context(Layout(shared_keyserver.data_dir)).minimum_version == ssl.TLSVersion.TLSv1_2
    )

    def handshake(maximum: ssl.TLSVersion) -> tuple[str | None, str]:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        context.load_cert_chain(str(host.cert), str(host.key))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            context.minimum_version = ssl.TLSVersion.MINIMUM_SUPPORTED
            context.maximum_version = maximum
        with (
            socket.create_connection(("127.0.0.1", shared_keyserver.port), timeout=10) as raw,
            context.wrap_socket(raw) as tls,
        ):
            cipher = tls.cipher()
            return tls.version(), cipher[0] if cipher else ""

    assert handshake(ssl.TLSVersion.MAXIMUM_SUPPORTED)[0] == "TLSv1.3"
    version, cipher = handshake(ssl.TLSVersion.TLSv1_2)
    assert version == "TLSv1.2" and cipher.startswith("ECDHE-")
    with pytest.raises(ssl.SSLError):
        handshake(ssl.TLSVersion.TLSv1_1)


def test_host_certificate_names_the_host_not_what_the_csr_asked(keyserver: KeyServer) -> None:
    host = keyserver.add_host("realname")
    cert = x509.load_pem_x509_certificate(host.cert.read_bytes())
    assert cert.subject.rfc4514_string() == "CN=realname"
    assert not_after(cert) > datetime.datetime.now(datetime.UTC)
    private = serialization.load_pem_private_key(host.key.read_bytes(), None)
    assert spki(cert.public_key()) == spki(private.public_key())
