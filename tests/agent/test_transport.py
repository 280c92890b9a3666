"""The agent's transport, end to end: pinning, redirects, retries, failover, proxies, bad answers.

Every test runs the real `zfs-unlock-agent` console script against the real key
server or a scripted stub (tests/fakes/stub_https.py), all on 127.0.0.1, and
checks the exit code, the message and what the fake zfs was asked to do.

Host names must differ within their first 16 characters: the harness derives
each host's machine-id from them (tests.keyserver.machine_id_for).
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import subprocess
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from bench.common import free_port
from tests.agent.harness import AgentHost
from tests.fakes.stub_https import (
    Reply,
    StubHTTPS,
    TlsFiles,
    issue_server_cert,
    json_reply,
    make_ca,
    self_signed_cert,
)
from tests.keyserver import KeyServer

EX_OK, EX_DATAERR, EX_TEMPFAIL, EX_NOPERM = 0, 65, 75, 77
KEY_ID = "k-" + "0123456789abcdef01234567"
CONNECT_TIMEOUT = 2.0  # the harness's default network.connect_timeout
STARTUP_SLACK = 2.5  # interpreter start, imports and the fake zfs inventory, on a slow machine

StubFactory = Callable[..., StubHTTPS]


# Fixtures and helpers


@pytest.fixture
def stub_tls(tmp_path: Path) -> TlsFiles:
    """The certificate of a stub that plays the key server (tests pin it when they mean to)."""
    return self_signed_cert(tmp_path / "tls", "stub")


@pytest.fixture
def stubs(shared_keyserver: KeyServer, stub_tls: TlsFiles) -> Iterator[Callable[..., StubHTTPS]]:
    """Start stubs that demand a client certificate from the key server's host CA; stop them."""
    started: list[StubHTTPS] = []

    def start(
        replies: Sequence[Reply] | Callable[..., Reply],
        tls: TlsFiles | None = None,
        client_certificate: bool = True,
        trickle: float = 0.0,
    ) -> StubHTTPS:
        client_ca = shared_keyserver.data_dir / "ca.crt" if client_certificate else None
        stub = StubHTTPS(tls or stub_tls, replies, client_ca=client_ca, trickle=trickle)
        started.append(stub)
        return stub

    yield start
    for stub in started:
        stub.stop()


@dataclass
class Locked:
    """A host with one locked encryption root, tank/secret."""

    host: AgentHost
    pool: str
    guid: str
    key: bytes
    keyformat: str = "raw"
    name: str = "tank/secret"


def locked_on_server(tmp_path: Path, server: KeyServer, host_name: str) -> Locked:
    """The server holds the key: the unlock succeeds if the agent reaches the server."""
    host = AgentHost.create(tmp_path, server, host_name)
    pool = host.zfs.add_pool("tank")
    key = host.encrypted_dataset("tank/secret", pool)
    guid = host.zfs.dataset("tank/secret")["guid"]
    return Locked(host, pool, guid, key)


def locked_local(
    tmp_path: Path, server: KeyServer, host_name: str, keyformat: str = "raw"
) -> Locked:
    """The key exists only in the test: a stub has to hand it out."""
    host = AgentHost.create(tmp_path, server, host_name)
    pool = host.zfs.add_pool("tank")
    key = os.urandom(32) if keyformat == "raw" else os.urandom(32).hex().encode()
    guid = host.zfs.add_encrypted("tank/secret", key, keyformat)
    return Locked(host, pool, guid, key, keyformat)


def key_entry(
    pool: str,
    guid: str,
    key: bytes | str,
    keyformat: str = "raw",
    dataset: str = "tank/secret",
    state: str = "active",
) -> dict[str, Any]:
    """One item of a release answer, shaped like the server's key_json()."""
    encoded = key if isinstance(key, str) else base64.b64encode(key).decode()
    return {
        "pool_guid": pool,
        "dataset_guid": guid,
        "dataset": dataset,
        "keyformat": keyformat,
        "state": state,
        "key_id": KEY_ID,
        "key": encoded,
    }


def good_answer(target: Locked) -> Reply:
    return json_reply(
        {
            "keys": [key_entry(target.pool, target.guid, target.key, target.keyformat)],
            "denied": [],
        }
    )


def release_records(server: KeyServer, host_name: str) -> list[dict[str, Any]]:
    return [
        r
        for r in server.audit_records()
        if r.get("event") == "release" and r.get("host") == host_name
    ]


def unlock(target: Locked, env: dict[str, str] | None = None) -> tuple[int, str, str, float]:
    start = time.monotonic()
    result = target.host.run("unlock", "--all", timeout=30, env=env)
    return result.returncode, result.stdout, result.stderr, time.monotonic() - start


def load_key_calls(target: Locked) -> list[dict[str, Any]]:
    return target.host.zfs.calls("zfs", "load-key")


def assert_unlocked_with(target: Locked) -> None:
    calls = load_key_calls(target)
    assert [c["argv"] for c in calls] == [["load-key", "-L", "prompt", target.name]]
    assert calls[0]["stdin_sha256"] == hashlib.sha256(target.key).hexdigest()
    assert target.host.zfs.keystatus(target.name) == "available"


def encodings(secret: bytes) -> list[bytes]:
    """The ways a key could turn up in text."""
    return [
        secret,
        secret.hex().encode(),
        secret.hex().upper().encode(),
        base64.b64encode(secret),
        base64.b64encode(secret).rstrip(b"="),
        base64.urlsafe_b64encode(secret).rstrip(b"="),
    ]


def assert_absent(haystack: bytes, secrets: Sequence[bytes], where: str) -> None:
    for secret in secrets:
        for form in encodings(secret):
            assert form not in haystack, f"key material found in {where}"


# 1. Pinning: a certificate that chains to a trusted CA gains nothing


def test_rogue_server_with_ca_signed_certificate_gets_no_request(
    shared_keyserver: KeyServer, tmp_path: Path, stubs: StubFactory
) -> None:
    ca = make_ca(tmp_path / "rogue-ca", "rogue CA")
    leaf = issue_server_cert(tmp_path / "rogue-ca", ca, "rogue")
    # The premise: to an ordinary TLS client that trusts the CA, the rogue is 127.0.0.1.
    premise = subprocess.run(
        ["openssl", "verify", "-CAfile", str(ca.cert), "-verify_ip", "127.0.0.1", str(leaf.cert)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert premise.returncode == 0, premise.stdout + premise.stderr

    target = locked_local(tmp_path, shared_keyserver, "rogue-ca")
    # It would hand out the right key, and it accepts any client.
    rogue = stubs([good_answer(target)], tls=leaf, client_certificate=False)
    target.host.write_config(urls=[rogue.url], pins=[shared_keyserver.pin])
    trust_rogue = {
        "SSL_CERT_FILE": str(ca.cert),
        "REQUESTS_CA_BUNDLE": str(ca.cert),
        "CURL_CA_BUNDLE": str(ca.cert),
    }

    code, _, stderr, elapsed = unlock(target, env=trust_rogue)

    assert code == EX_NOPERM, stderr
    assert "presented an unpinned public key" in stderr
    assert "tank/secret" in stderr
    rogue.wait_idle()
    assert rogue.connections == 1  # the agent did get as far as the handshake, once
    assert rogue.requests == []
    assert rogue.app_bytes == 0  # not one byte of a request
    assert load_key_calls(target) == []
    assert elapsed < 6  # no retries against an unpinned key


def test_self_signed_unpinned_server_is_refused(
    shared_keyserver: KeyServer, tmp_path: Path, stubs: StubFactory
) -> None:
    target = locked_local(tmp_path, shared_keyserver, "rogue-self-signed")
    rogue = stubs([good_answer(target)], tls=self_signed_cert(tmp_path / "tls", "rogue"))
    target.host.write_config(urls=[rogue.url], pins=[shared_keyserver.pin])

    code, _, stderr, _ = unlock(target)

    assert code == EX_NOPERM, stderr
    assert "presented an unpinned public key" in stderr
    rogue.wait_idle()
    assert rogue.connections == 1
    assert rogue.requests == []
    assert rogue.app_bytes == 0
    assert load_key_calls(target) == []


# 2. Pin rollover


def random_pin() -> str:
    return "sha256//" + base64.b64encode(os.urandom(32)).decode()


def test_pin_rollover_old_and_new_pin_accepted(shared_keyserver: KeyServer, tmp_path: Path) -> None:
    target = locked_on_server(tmp_path, shared_keyserver, "rollover-both")
    target.host.write_config(pins=[random_pin(), shared_keyserver.pin])

    code, _, stderr, _ = unlock(target)

    assert code == EX_OK, stderr
    assert_unlocked_with(target)


def test_only_another_pin_is_refused(shared_keyserver: KeyServer, tmp_path: Path) -> None:
    target = locked_on_server(tmp_path, shared_keyserver, "rollover-other")
    target.host.write_config(pins=[random_pin()])

    code, _, stderr, _ = unlock(target)

    assert code == EX_NOPERM, stderr
    assert "presented an unpinned public key" in stderr
    assert load_key_calls(target) == []
    assert release_records(shared_keyserver, "rollover-other") == []


# 3. Redirects are refused, not followed


@pytest.mark.parametrize("status", [301, 302, 307])
def test_redirect_is_refused(
    status: int,
    shared_keyserver: KeyServer,
    tmp_path: Path,
    stubs: StubFactory,
    stub_tls: TlsFiles,
) -> None:
    name = f"redirect-{status}"
    target = locked_on_server(tmp_path, shared_keyserver, name)
    # Following the redirect would work: the real server is pinned and holds the key.
    location = shared_keyserver.url("/v1/keys/release")
    stub = stubs([Reply(status, [("Location", location)])])
    target.host.write_config(urls=[stub.url], pins=[stub_tls.pin, shared_keyserver.pin])

    code, _, stderr, _ = unlock(target)

    assert code == EX_NOPERM, stderr
    assert f"answered with a redirect ({status}); refused" in stderr
    stub.wait_idle()
    assert len(stub.requests) == 1
    assert stub.requests[0].path == "/v1/keys/release"
    assert release_records(shared_keyserver, name) == []
    assert load_key_calls(target) == []


# 4. Server down: retries until the deadline, then "try again later"


def attempts_in(stderr: str) -> int:
    match = re.search(r"\((\d+) failed attempt\(s\)", stderr)
    assert match, stderr
    return int(match.group(1))


def assert_gave_up_truthfully(stderr: str, deadline: float, elapsed: float) -> None:
    """The time the message gives is the time the attempts took (the run took longer: it
    started the interpreter and listed the pools too), and the deadline is named as one."""
    match = re.search(r"no key server answered in (\d+(?:\.\d+)?) s", stderr)
    assert match, stderr
    assert float(match.group(1)) <= elapsed
    assert f"the {deadline:g} s deadline" in stderr


@pytest.mark.slow  # real waits of several seconds: left out of make unit
def test_server_down_retries_until_deadline(shared_keyserver: KeyServer, tmp_path: Path) -> None:
    target = locked_local(tmp_path, shared_keyserver, "server-down")
    deadline, backoff_max = 3.0, 0.5
    target.host.write_config(
        urls=[f"https://127.0.0.1:{free_port()}"],
        network={"deadline": deadline, "backoff_initial": 0.1, "backoff_max": backoff_max},
    )

    code, _, stderr, elapsed = unlock(target)

    assert code == EX_TEMPFAIL, stderr
    assert_gave_up_truthfully(stderr, deadline, elapsed)
    assert "cannot connect" in stderr
    assert attempts_in(stderr) >= 3
    # The client stops when its next backoff would cross the deadline, so it may end
    # up to one backoff step (backoff_max) early; never later than one connect timeout.
    assert deadline - backoff_max <= elapsed <= deadline + CONNECT_TIMEOUT + STARTUP_SLACK
    assert load_key_calls(target) == []


@pytest.mark.slow  # real waits of several seconds: left out of make unit
def test_a_trickling_pinned_server_cannot_hold_the_agent_past_its_deadline(
    shared_keyserver: KeyServer, tmp_path: Path, stubs: StubFactory, stub_tls: TlsFiles
) -> None:
    """The pinned server does answer, with the key, but one byte every 0.25 s: the 3 s read
    timeout never fires and the whole answer would take minutes. At boot the agent must
    give up at its deadline so that the passphrase prompt comes."""
    target = locked_local(tmp_path, shared_keyserver, "trickle")
    stub = stubs([good_answer(target)], trickle=0.25)
    deadline = 4.0
    target.host.write_config(
        urls=[stub.url],
        pins=[stub_tls.pin],
        network={"deadline": deadline, "connect_timeout": 2, "read_timeout": 3},
    )

    code, _, stderr, elapsed = unlock(target)

    assert code == EX_TEMPFAIL, stderr
    assert_gave_up_truthfully(stderr, deadline, elapsed)
    assert "when the 4 s deadline ran out" in stderr
    assert "timed out" in stderr
    assert elapsed < deadline + STARTUP_SLACK
    assert load_key_calls(target) == []


# 5. 429 and 5xx are retried; Retry-After is honoured


def test_429_retry_after_is_honoured(
    shared_keyserver: KeyServer, tmp_path: Path, stubs: StubFactory, stub_tls: TlsFiles
) -> None:
    target = locked_local(tmp_path, shared_keyserver, "retry-429")
    stub = stubs([Reply(429, [("Retry-After", "2")]), good_answer(target)])
    target.host.write_config(urls=[stub.url], pins=[stub_tls.pin])

    code, _, stderr, _ = unlock(target)

    assert code == EX_OK, stderr
    first, second = stub.requests
    assert second.at - first.at >= 2.0
    assert_unlocked_with(target)


def test_503_is_retried(
    shared_keyserver: KeyServer, tmp_path: Path, stubs: StubFactory, stub_tls: TlsFiles
) -> None:
    target = locked_local(tmp_path, shared_keyserver, "retry-503")
    stub = stubs([Reply(503), good_answer(target)])
    target.host.write_config(urls=[stub.url], pins=[stub_tls.pin])

    code, _, stderr, _ = unlock(target)

    assert code == EX_OK, stderr
    assert len(stub.requests) == 2
    assert_unlocked_with(target)


@pytest.mark.slow  # real waits of several seconds: left out of make unit
def test_500_forever_gives_up_at_the_deadline(
    shared_keyserver: KeyServer, tmp_path: Path, stubs: StubFactory, stub_tls: TlsFiles
) -> None:
    target = locked_local(tmp_path, shared_keyserver, "retry-500")
    stub = stubs([Reply(500)])
    deadline, backoff_max = 3.0, 0.5
    target.host.write_config(
        urls=[stub.url],
        pins=[stub_tls.pin],
        network={"deadline": deadline, "backoff_initial": 0.1, "backoff_max": backoff_max},
    )

    code, _, stderr, elapsed = unlock(target)

    assert code == EX_TEMPFAIL, stderr
    assert_gave_up_truthfully(stderr, deadline, elapsed)
    assert "HTTP 500" in stderr
    assert len(stub.requests) >= 3
    assert attempts_in(stderr) == len(stub.requests)
    assert deadline - backoff_max <= elapsed <= deadline + CONNECT_TIMEOUT + STARTUP_SLACK
    assert load_key_calls(target) == []


# 6. Malformed key material never reaches zfs


MALFORMED = [
    "raw-31-bytes",
    "raw-33-bytes",
    "hex-63-digits",
    "key-not-base64",
    "wrong-content-type",
    "invalid-json",
    "key-not-asked-for",
    "keyformat-differs",
]


@pytest.mark.parametrize("case", MALFORMED)
def test_malformed_answer_is_rejected_before_zfs(
    case: str,
    shared_keyserver: KeyServer,
    tmp_path: Path,
    stubs: StubFactory,
    stub_tls: TlsFiles,
) -> None:
    keyformat = "hex" if case == "hex-63-digits" else "raw"
    target = locked_local(tmp_path, shared_keyserver, f"bad-{case}", keyformat)
    pool, guid = target.pool, target.guid
    right = key_entry(pool, guid, target.key, keyformat)
    sent: list[bytes] = [target.key]  # key bytes the answer carries, to look for in stderr
    reply: Reply
    if case in ("raw-31-bytes", "raw-33-bytes"):
        material = os.urandom(31 if case == "raw-31-bytes" else 33)
        sent.append(material)
        reply = json_reply({"keys": [key_entry(pool, guid, material)], "denied": []})
        message = f"raw key must be exactly 32 bytes, got {len(material)}"
    elif case == "hex-63-digits":
        material = target.key[:63]
        reply = json_reply({"keys": [key_entry(pool, guid, material, "hex")], "denied": []})
        message = "hex key must be exactly 64 hexadecimal digits"
    elif case == "key-not-base64":
        garbage = "not*base64*" + os.urandom(8).hex()
        sent.append(garbage.encode())
        reply = json_reply({"keys": [key_entry(pool, guid, garbage)], "denied": []})
        message = "malformed key_id or key"
    elif case == "wrong-content-type":
        # The right key, but not labelled as JSON.
        reply = json_reply({"keys": [right], "denied": []}, content_type="text/plain")
        message = "answer is not JSON"
    elif case == "invalid-json":
        body = json.dumps({"keys": [right], "denied": []}).encode()
        reply = Reply(200, [("Content-Type", "application/json")], body[:-3])
        message = "answer is not valid JSON"
    elif case == "key-not-asked-for":
        # The right key, plus one for a dataset this host never asked about.
        other = os.urandom(32)
        sent.append(other)
        extra = key_entry(pool, str(int(guid) + 123456789), other, dataset="tank/other")
        reply = json_reply({"keys": [right, extra], "denied": []})
        message = "server sent a key that was not asked for"
    else:  # keyformat-differs: a well-formed hex key for a raw dataset
        material = os.urandom(32).hex().encode()
        sent.append(material)
        reply = json_reply({"keys": [key_entry(pool, guid, material, "hex")], "denied": []})
        message = "the server's key is hex but the dataset's keyformat is raw"
    stub = stubs([reply])
    target.host.write_config(urls=[stub.url], pins=[stub_tls.pin])

    code, stdout, stderr, _ = unlock(target)

    assert code == EX_DATAERR, stderr
    assert message in stderr
    assert "tank/secret" in stderr
    assert len(stub.requests) == 1  # bad data is final: no retries
    assert load_key_calls(target) == []
    assert target.host.zfs.keystatus("tank/secret") == "unavailable"
    assert_absent((stdout + stderr).encode("utf-8", "surrogateescape"), sent, "agent output")


# 7. 403 and 404 are final


@pytest.mark.parametrize(
    ("status", "message"),
    [
        (403, "the key server refused (403); the reason is in its audit log"),
        (404, "not found (404)"),
    ],
)
def test_refusal_is_final(
    status: int,
    message: str,
    shared_keyserver: KeyServer,
    tmp_path: Path,
    stubs: StubFactory,
    stub_tls: TlsFiles,
) -> None:
    target = locked_local(tmp_path, shared_keyserver, f"refused-{status}")
    stub = stubs([json_reply({"error": "no"}, status=status)])
    target.host.write_config(urls=[stub.url], pins=[stub_tls.pin])

    code, _, stderr, elapsed = unlock(target)

    assert code == EX_NOPERM, stderr
    assert message in stderr
    assert len(stub.requests) == 1
    assert load_key_calls(target) == []
    assert elapsed < 6  # well inside the deadline: nothing was retried


# 8. Failover


def test_failover_to_the_second_server(shared_keyserver: KeyServer, tmp_path: Path) -> None:
    target = locked_on_server(tmp_path, shared_keyserver, "failover")
    dead = f"https://127.0.0.1:{free_port()}"
    target.host.write_config(urls=[dead, shared_keyserver.url("")])

    code, _, stderr, elapsed = unlock(target)

    assert code == EX_OK, stderr
    assert_unlocked_with(target)
    assert [r["decision"] for r in release_records(shared_keyserver, "failover")] == ["allow"]
    assert elapsed < 6


def test_a_server_named_by_host_name(shared_keyserver: KeyServer, tmp_path: Path) -> None:
    """A name, not an address: resolved by getaddrinfo and sent as the TLS server name."""
    target = locked_on_server(tmp_path, shared_keyserver, "by-name")
    target.host.write_config(urls=[f"https://localhost:{shared_keyserver.port}"])

    code, _, stderr, _ = unlock(target)

    assert code == EX_OK, stderr
    assert_unlocked_with(target)


# 9. Proxy settings from the environment are ignored


def test_proxy_environment_is_ignored(
    shared_keyserver: KeyServer, tmp_path: Path, stubs: StubFactory
) -> None:
    target = locked_on_server(tmp_path, shared_keyserver, "proxy-env")
    proxy = stubs([Reply(502)], client_certificate=False)
    proxy_url = f"http://127.0.0.1:{proxy.port}"
    env = {
        name: proxy_url
        for name in (
            "HTTPS_PROXY",
            "https_proxy",
            "HTTP_PROXY",
            "http_proxy",
            "ALL_PROXY",
            "all_proxy",
        )
    }
    env |= {"NO_PROXY": "", "no_proxy": ""}  # nothing exempts 127.0.0.1

    code, _, stderr, _ = unlock(target, env=env)

    assert code == EX_OK, stderr
    assert_unlocked_with(target)
    assert proxy.connections == 0


# 10. One request (one TLS handshake) for all roots


def test_five_roots_one_release_request(shared_keyserver: KeyServer, tmp_path: Path) -> None:
    host = AgentHost.create(tmp_path, shared_keyserver, "five-roots")
    pool = host.zfs.add_pool("tank")
    keys = {f"tank/r{i}": host.encrypted_dataset(f"tank/r{i}", pool) for i in range(5)}

    result = host.run("unlock", "--all", timeout=30)

    assert result.returncode == EX_OK, result.stderr
    records = release_records(shared_keyserver, "five-roots")
    assert len(records) == 5
    assert {r["decision"] for r in records} == {"allow"}
    assert len({r["request_id"] for r in records}) == 1
    calls = host.zfs.calls("zfs", "load-key")
    assert sorted(c["argv"][-1] for c in calls) == sorted(keys)
    for call in calls:
        assert call["stdin_sha256"] == hashlib.sha256(keys[call["argv"][-1]]).hexdigest()


def test_five_roots_one_tls_handshake(
    shared_keyserver: KeyServer, tmp_path: Path, stubs: StubFactory, stub_tls: TlsFiles
) -> None:
    host = AgentHost.create(tmp_path, shared_keyserver, "five-roots-stub")
    pool = host.zfs.add_pool("tank")
    entries, keys = [], {}
    for i in range(5):
        name = f"tank/r{i}"
        keys[name] = os.urandom(32)
        entries.append(key_entry(pool, host.zfs.add_encrypted(name, keys[name]), keys[name]))
    stub = stubs([json_reply({"keys": entries, "denied": []})])
    host.write_config(urls=[stub.url], pins=[stub_tls.pin])

    result = host.run("unlock", "--all", timeout=30)

    assert result.returncode == EX_OK, result.stderr
    stub.wait_idle()
    assert (stub.connections, stub.handshakes, len(stub.requests)) == (1, 1, 1)
    assert len(json.loads(stub.requests[0].body)["datasets"]) == 5
    assert len(host.zfs.calls("zfs", "load-key")) == 5


# 11. The sentinel: the key appears nowhere but on zfs's stdin


def test_key_never_leaks(shared_keyserver: KeyServer, tmp_path: Path) -> None:
    target = locked_on_server(tmp_path, shared_keyserver, "sentinel")

    result = target.host.run("-v", "unlock", "--all", timeout=30)

    assert result.returncode == EX_OK, result.stderr
    assert_unlocked_with(target)
    calls = target.host.zfs.calls()
    assert calls, "the fake zfs recorded nothing"
    for call in calls:
        assert_absent(json.dumps(call["argv"]).encode(), [target.key], "a zfs argv")
        assert_absent(json.dumps(call["env"]).encode(), [target.key], "a zfs environment")
    load = load_key_calls(target)[0]
    assert load["stdin_len"] == len(target.key)
    output = (result.stdout + result.stderr).encode("utf-8", "surrogateescape")
    assert_absent(output, [target.key], "agent output")
    scanned = 0
    for path in sorted(tmp_path.rglob("*")):
        if path.is_file() and not path.is_symlink():
            assert_absent(path.read_bytes(), [target.key], str(path))
            scanned += 1
    assert scanned >= 4  # config, machine-id, fake zfs state and call log at least
    for path in (shared_keyserver.log_path, shared_keyserver.data_dir / "audit.log"):
        assert_absent(path.read_bytes(), [target.key], str(path))
