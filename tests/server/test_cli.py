"""The admin command line: what each command prints, changes and exits with (sysexits.h)."""

from __future__ import annotations

import argparse
import base64
import datetime
import hashlib
import json
import os
import re
import shlex
import socket
import stat
import subprocess
import tomllib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from bench.common import machine_id_for
from tests.certs import not_after, spki, verify_issued_by
from tests.faketime import faketime_env
from tests.keyserver import (
    ROOT_ONLY,
    SERVER_BIN,
    HostCreds,
    KeyServer,
    release,
    running,
    wait_for,
)
from tests.server.parsers import every_parser
from zfs_unlock_common import pinning
from zfs_unlock_common.csr import new_key_and_csr
from zfs_unlock_server import __version__, pki, serve
from zfs_unlock_server import config as server_config
from zfs_unlock_server.cli import build_parser
from zfs_unlock_server.config import DATA_DIR_ENV, Layout
from zfs_unlock_server.tlsctx import server_context

EX_USAGE = 64
EX_DATAERR = 65
EX_UNAVAILABLE = 69
EX_CANTCREAT = 73
EX_CONFIG = 78

POOL = "9876543210987654321"
PIN = re.compile(r"sha256//[A-Za-z0-9+/]{43}=")
KEY_ID = re.compile(r"k-[0-9a-f]{24}")
KEY_FIELDS = {
    "approval",
    "key_id",
    "host",
    "pool_guid",
    "dataset_guid",
    "legacy_name",
    "dataset",
    "keyformat",
    "state",
    "origin",
    "created_at",
    "updated_at",
}
HOST_FIELDS = {
    "approval",
    "name",
    "machine_id",
    "enabled",
    "disabled_reason",
    "allowed_networks",
    "pools",
    "deadman_timeout",
    "created_at",
    "last_seen",
    "certificates",
}


def run(
    *args: str, stdin: bytes = b"", env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """The installed console script, as an operator runs it."""
    environment = {k: v for k, v in os.environ.items() if k != DATA_DIR_ENV}
    result = subprocess.run(
        [str(SERVER_BIN), *args],
        input=stdin,
        capture_output=True,
        env={**environment, **(env or {})},
        timeout=60,
        check=False,
    )
    return subprocess.CompletedProcess(
        result.args, result.returncode, result.stdout.decode(), result.stderr.decode()
    )


def spki_pin(cert_pem: bytes) -> str:
    """The pin computed from scratch, not with the code under test."""
    public = x509.load_pem_x509_certificate(cert_pem).public_key()
    spki = public.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return "sha256//" + base64.b64encode(hashlib.sha256(spki).digest()).decode()


def self_signed(directory: Path, name: str = "keys.example.net") -> tuple[Path, Path]:
    """An operator's own server certificate (P-384, unlike the generated P-256 one)."""
    key = ec.generate_private_key(ec.SECP384R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
        .sign(key, hashes.SHA256())
    )
    directory.mkdir(parents=True, exist_ok=True)
    cert_path, key_path = directory / "server.crt", directory / "server.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    key_path.chmod(0o600)
    return cert_path, key_path


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def new_csr(directory: Path, name: str) -> tuple[Path, Path]:
    """A host's key pair and CSR, made on the host; returns (key, csr)."""
    directory.mkdir(parents=True, exist_ok=True)
    key_pem, csr_pem = new_key_and_csr(name)
    key, csr = directory / f"{name}.key", directory / f"{name}.csr"
    key.write_bytes(key_pem)
    key.chmod(0o400)
    csr.write_bytes(csr_pem)
    return key, csr


def hosts_json(server: KeyServer) -> list[dict[str, Any]]:
    hosts: list[dict[str, Any]] = json.loads(server.must("host", "list", "--json"))
    return hosts


def keys_json(server: KeyServer, *options: str) -> list[dict[str, Any]]:
    keys: list[dict[str, Any]] = json.loads(server.must("key", "list", "--json", *options))
    return keys


def create_key(
    server: KeyServer, host: str, dataset_guid: str, *options: str, stdin: bytes = b""
) -> str:
    out = server.must(
        "key",
        "create",
        "--host",
        host,
        "--pool-guid",
        POOL,
        "--dataset-guid",
        dataset_guid,
        "--dataset",
        f"tank/{host}/{dataset_guid}",
        *options,
        stdin=stdin,
    )
    return out.strip()


def released_key(server: KeyServer, host: HostCreds, dataset_guid: str) -> bytes:
    with server.session(host) as session:
        response = release(session, server, host, POOL, dataset_guid)
    assert response.status_code == 200, response.text
    return base64.b64decode(response.json()["key"])


# init


def test_init_prints_the_pin_of_its_server_certificate(tmp_path: Path) -> None:
    data = tmp_path / "data"
    result = run("--data-dir", str(data), "init", "--server-name", "keys.example.net")
    assert result.returncode == 0, result.stderr
    pin = result.stdout.strip()
    assert result.stdout == pin + "\n"  # stdout is the pin and nothing else
    assert PIN.fullmatch(pin)
    assert len(pinning.parse_pin(pin)) == 32
    assert pin in result.stderr  # the operator sees it too

    server_cert = (data / "server.crt").read_bytes()
    assert pin == spki_pin(server_cert)
    assert pin == pinning.pin_of_certificate(pki.pem_to_der(server_cert))
    again = run("--data-dir", str(data), "pin")
    assert again.returncode == 0 and again.stdout == pin + "\n"

    names = x509.load_pem_x509_certificate(server_cert).extensions.get_extension_for_class(
        x509.SubjectAlternativeName
    )
    assert names.value.get_values_for_type(x509.DNSName) == ["keys.example.net"]
    assert mode(data) == 0o700
    for secret in ("master.key", "ca.key", "server.key"):
        assert mode(data / secret) == 0o400, secret
    assert mode(data / "keys.db") == 0o600


def test_init_takes_an_existing_certificate_and_key(tmp_path: Path) -> None:
    cert, key = self_signed(tmp_path / "own")
    data = tmp_path / "data"
    result = run(
        "--data-dir", str(data), "init", "--server-cert", str(cert), "--server-key", str(key)
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == spki_pin(cert.read_bytes())
    assert (data / "server.crt").read_bytes() == cert.read_bytes()
    assert (data / "server.key").read_bytes() == key.read_bytes()
    assert mode(data / "server.key") == 0o400
    # The pair is usable for serving: the TLS context loads it.
    server_context(Layout(data))


def test_init_refuses_a_certificate_without_its_own_key(tmp_path: Path) -> None:
    cert, _ = self_signed(tmp_path / "one")
    _, other_key = self_signed(tmp_path / "two")
    data = tmp_path / "data"
    result = run(
        "--data-dir", str(data), "init", "--server-cert", str(cert), "--server-key", str(other_key)
    )
    assert result.returncode == EX_DATAERR, result.stderr
    assert result.stdout == ""
    assert not data.exists() or not any(data.iterdir())


def test_init_refuses_a_file_that_is_not_a_certificate(tmp_path: Path) -> None:
    _, key = self_signed(tmp_path / "own")
    data = tmp_path / "data"
    result = run(
        "--data-dir", str(data), "init", "--server-cert", str(key), "--server-key", str(key)
    )
    assert result.returncode == EX_DATAERR, result.stderr
    assert "Traceback" not in result.stderr
    assert "PRIVATE KEY" not in result.stderr
    assert not data.exists() or not any(data.iterdir())


def test_init_refusing_a_readable_key_leaves_nothing_behind(tmp_path: Path) -> None:
    cert, key = self_signed(tmp_path / "own")
    key.chmod(0o644)
    data = tmp_path / "data"
    args = ("--data-dir", str(data), "init", "--server-cert", str(cert), "--server-key", str(key))
    result = run(*args)
    assert result.returncode == EX_CONFIG, result.stderr
    assert "0644" in result.stderr
    # Fixing the permissions is all it takes to try again.
    key.chmod(0o600)
    again = run(*args)
    assert again.returncode == 0, again.stderr
    assert again.stdout.strip() == spki_pin(cert.read_bytes())


def test_init_needs_both_certificate_and_key(tmp_path: Path) -> None:
    cert, _ = self_signed(tmp_path / "own")
    result = run("--data-dir", str(tmp_path / "data"), "init", "--server-cert", str(cert))
    assert result.returncode == EX_DATAERR
    assert not (tmp_path / "data").exists()


def test_init_never_overwrites(tmp_path: Path) -> None:
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "precious").write_text("keep me")
    result = run("--data-dir", str(occupied), "init")
    assert result.returncode == EX_CANTCREAT
    assert result.stdout == ""
    assert [p.name for p in occupied.iterdir()] == ["precious"]

    data = tmp_path / "data"
    assert run("--data-dir", str(data), "init").returncode == 0
    master = (data / "master.key").read_bytes()
    pin = run("--data-dir", str(data), "pin").stdout
    assert run("--data-dir", str(data), "init").returncode == EX_CANTCREAT
    assert (data / "master.key").read_bytes() == master
    assert run("--data-dir", str(data), "pin").stdout == pin


# Exit codes and the data directory


@pytest.mark.parametrize(
    "args",
    [
        (),
        ("host",),
        ("key",),
        ("--no-such-option", "pin"),
        ("host", "frobnicate"),
        ("key", "list", "--json", "surplus"),
        ("host", "add", "web1", "--machine-id", "0" * 32),  # neither --csr nor --issue-key
        ("serve", "--workers", "-1"),
        ("audit", "--last", "-2"),  # once meant: all but the first two records
        ("audit", "--last", "two"),
    ],
)
def test_usage_errors_exit_64(tmp_path: Path, args: Sequence[str]) -> None:
    result = run("--data-dir", str(tmp_path), *args)
    assert result.returncode == EX_USAGE, result.stderr
    assert "usage:" in result.stderr
    assert result.stdout == ""


def test_help_exits_0() -> None:
    result = run("--help")
    assert result.returncode == 0
    assert "import-simplezfs" in result.stdout


@pytest.mark.parametrize(
    "args",
    [
        ("pin",),
        ("host", "list"),
        ("host", "show", "web1"),
        ("host", "disable", "web1"),
        ("key", "list"),
        ("key", "revoke", "k-" + "0" * 24),
        ("audit",),
        ("import-simplezfs", "/nonexistent/keys.db"),
        ("serve", *ROOT_ONLY),
    ],
)
def test_missing_data_dir_exits_78(tmp_path: Path, args: Sequence[str]) -> None:
    missing = tmp_path / "nowhere"
    result = run("--data-dir", str(missing), *args)
    assert result.returncode == EX_CONFIG, result.stderr
    assert str(missing) in result.stderr
    assert "Traceback" not in result.stderr
    assert not missing.exists()


def test_data_dir_comes_from_the_option_or_the_environment(tmp_path: Path) -> None:
    data = tmp_path / "data"
    pin = run("--data-dir", str(data), "init").stdout
    assert run("pin", "--data-dir", str(data)).stdout == pin  # after the command, too
    assert run("pin", env={DATA_DIR_ENV: str(data)}).stdout == pin
    missing = run("pin", env={DATA_DIR_ENV: str(tmp_path / "nowhere")})
    assert missing.returncode == EX_CONFIG and str(tmp_path / "nowhere") in missing.stderr


# host


def test_host_add_with_a_csr_leaves_the_private_key_on_the_host(
    keyserver: KeyServer, tmp_path: Path
) -> None:
    key, csr = new_csr(tmp_path / "web1", "whatever-the-host-asked")
    machine_id = machine_id_for("web1")
    result = run(
        "--data-dir",
        str(keyserver.data_dir),
        "host",
        "add",
        "web1",
        "--machine-id",
        machine_id,
        "--csr",
        str(csr),
    )
    assert result.returncode == 0, result.stderr
    assert "PRIVATE KEY" not in result.stdout + result.stderr
    cert = x509.load_pem_x509_certificate(result.stdout.encode())
    private = serialization.load_pem_private_key(key.read_bytes(), None)
    assert spki(cert.public_key()) == spki(private.public_key())
    assert cert.subject.rfc4514_string() == "CN=web1"
    ca = x509.load_pem_x509_certificate((keyserver.data_dir / "ca.crt").read_bytes())
    verify_issued_by(cert, ca)
    # The server never had the private key, so it has none of it anywhere.
    secret = private.private_bytes(
        serialization.Encoding.DER,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    for path in keyserver.data_dir.rglob("*"):
        if path.is_file():
            stored = path.read_bytes()
            assert secret not in stored and key.read_bytes() not in stored, path

    # A CSR on stdin, the certificate to a file.
    _, csr2 = new_csr(tmp_path / "web2", "web2")
    out = tmp_path / "web2.crt"
    code, stdout, err = keyserver.admin(
        "host",
        "add",
        "web2",
        "--machine-id",
        machine_id_for("web2"),
        "--csr",
        "-",
        "--cert-out",
        str(out),
        stdin=csr2.read_bytes(),
    )
    assert code == 0, err
    assert stdout == ""
    assert x509.load_pem_x509_certificate(out.read_bytes()).subject.rfc4514_string() == "CN=web2"
    assert [h["name"] for h in hosts_json(keyserver)] == ["web1", "web2"]


def test_host_add_issue_key_writes_a_private_key_0400(keyserver: KeyServer, tmp_path: Path) -> None:
    bundle = tmp_path / "bundle"
    code, out, err = keyserver.admin(
        "host", "add", "db1", "--machine-id", machine_id_for("db1"), "--issue-key", str(bundle)
    )
    assert code == 0, err
    assert "PRIVATE KEY" not in out + err
    assert mode(bundle / "client.key") == 0o400
    assert mode(bundle) == 0o700
    cert = x509.load_pem_x509_certificate((bundle / "client.crt").read_bytes())
    private = serialization.load_pem_private_key((bundle / "client.key").read_bytes(), None)
    assert spki(cert.public_key()) == spki(private.public_key())
    assert cert.subject.rfc4514_string() == "CN=db1"
    fingerprint = hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()
    shown = json.loads(keyserver.must("host", "show", "db1", "--json"))
    assert [c["sha256"] for c in shown["certificates"]] == [fingerprint]

    # Never into a directory that holds something already.
    code, _, _ = keyserver.admin(
        "host", "add", "db2", "--machine-id", machine_id_for("db2"), "--issue-key", str(bundle)
    )
    assert code == EX_CANTCREAT
    assert [h["name"] for h in hosts_json(keyserver)] == ["db1"]


@pytest.mark.parametrize(
    "options",
    [
        pytest.param(("first", "--machine-id", "1" * 32), id="duplicate-name"),
        pytest.param(("second", "--machine-id", machine_id_for("first")), id="duplicate-id"),
        pytest.param(("second", "--machine-id", "A" * 32), id="uppercase-id"),
        pytest.param(("second", "--machine-id", "1" * 31), id="short-id"),
        pytest.param(("second", "--machine-id", "g" * 32), id="non-hex-id"),
        pytest.param(("sec/ond", "--machine-id", "1" * 32), id="bad-name"),
        pytest.param(
            ("second", "--machine-id", "1" * 32, "--allow-ip", "10.0.0.1/8"), id="host-bits"
        ),
        pytest.param(
            ("second", "--machine-id", "1" * 32, "--allow-ip", "300.1.2.0/24"), id="bad-ip"
        ),
        pytest.param(("second", "--machine-id", "1" * 32, "--allow-ip", "lan"), id="no-cidr"),
        pytest.param(("second", "--machine-id", "1" * 32, "--pool", "0"), id="bad-pool"),
        pytest.param(("second", "--machine-id", "1" * 32, "--deadman-timeout", "-1"), id="deadman"),
    ],
)
def test_host_add_refuses_bad_or_duplicate_input(
    keyserver: KeyServer, tmp_path: Path, options: Sequence[str]
) -> None:
    keyserver.add_host("first")
    before = hosts_json(keyserver)
    _, csr = new_csr(tmp_path, "candidate")
    code, out, err = keyserver.admin("host", "add", *options, "--csr", str(csr))
    assert code == EX_DATAERR, err
    assert out == ""
    assert hosts_json(keyserver) == before


def test_host_list_warns_of_a_certificate_that_expires_within_30_days_or_did(
    keyserver: KeyServer,
) -> None:
    """The day the host's certificate expires, flagged when the agent's `check` would fail
    on it: `host list` run with its clock moved by libfaketime (the certificate lasts
    1,825 days)."""
    keyserver.configure(deadman_timeout=0)  # years on, the switch would disable it first
    keyserver.add_host("web1")
    (certificate,) = json.loads(keyserver.must("host", "show", "web1", "--json"))["certificates"]
    day = certificate["not_after"][:10]

    def listed(offset: str) -> str:
        run = subprocess.run(
            [str(SERVER_BIN), "--data-dir", str(keyserver.data_dir), "host", "list"],
            env={**os.environ, **faketime_env(offset)},
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
        header, row = run.stdout.splitlines()
        return row[header.index("CERT EXPIRES") :].split("  ")[0]

    # Half days: never the whole-second boundary where exactly 11 days are left.
    assert listed("+0d") == day
    assert listed("+42840h") == day  # 1785 days on: 40 days left, no warning yet
    assert listed("+43548h") == f"{day} (in 10d)"  # 10.5 days left
    assert listed("+43812h") == f"{day} (expired)"  # half a day ago


def test_host_list_and_show(keyserver: KeyServer) -> None:
    keyserver.configure(deadman_timeout=3600)
    plain = keyserver.add_host("plain")
    fenced = keyserver.add_host(
        "fenced",
        "--allow-ip",
        "192.0.2.0/24",
        "--allow-ip",
        "2001:db8::/32",
        "--pool",
        POOL,
        "--deadman-timeout",
        "600",
    )
    text = keyserver.must("host", "list")
    header, *lines = text.splitlines()
    assert header.split() == [
        "NAME", "STATE", "MACHINE-ID", "LAST", "SEEN", "CERT", "EXPIRES", "ALLOWED", "POOLS"
    ]  # fmt: skip
    assert len(lines) == 2
    assert lines[0].split()[:3] == ["fenced", "enabled", fenced.machine_id]
    # The certificate the host was enrolled with: five years ahead, no warning.
    expires = datetime.date.fromisoformat(lines[0].split()[4])
    assert 5 * 365 <= (expires - datetime.datetime.now(datetime.UTC).date()).days <= 5 * 366
    assert lines[0].split()[-2:] == ["192.0.2.0/24,2001:db8::/32", POOL]
    assert lines[1].split()[:3] == ["plain", "enabled", plain.machine_id]
    assert lines[1].split()[-2:] == ["any-address", "any-pool"]  # what an admin should notice
    # Aligned: every column starts at the header's offset.
    for column in ("STATE", "MACHINE-ID", "LAST SEEN", "CERT EXPIRES", "ALLOWED", "POOLS"):
        offset = header.index(column)
        assert all(line[offset - 2 : offset] == "  " and line[offset] != " " for line in lines)

    listed = hosts_json(keyserver)
    assert [h["name"] for h in listed] == ["fenced", "plain"]
    assert all(set(h) == HOST_FIELDS for h in listed)

    shown = json.loads(keyserver.must("host", "show", "fenced", "--json"))
    assert shown == listed[0]
    assert shown["machine_id"] == fenced.machine_id
    assert shown["enabled"] is True and shown["disabled_reason"] is None
    assert shown["allowed_networks"] == ["192.0.2.0/24", "2001:db8::/32"]
    assert shown["pools"] == [POOL]
    assert shown["deadman_timeout"] == 600
    assert listed[1]["deadman_timeout"] == 3600  # the server.toml default
    assert listed[1]["allowed_networks"] == [] and listed[1]["pools"] == []
    cert = x509.load_pem_x509_certificate(fenced.cert.read_bytes())
    (only,) = shown["certificates"]
    assert (
        only["sha256"] == hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()
    )
    assert datetime.datetime.fromisoformat(only["not_after"]) == not_after(cert)
    for stamp in (shown["created_at"], shown["last_seen"]):
        age = datetime.datetime.now(datetime.UTC) - datetime.datetime.fromisoformat(stamp)
        assert datetime.timedelta(0) <= age < datetime.timedelta(minutes=5)

    keyserver.must("host", "disable", "plain")
    shown = json.loads(keyserver.must("host", "show", "plain", "--json"))
    assert shown["enabled"] is False and shown["disabled_reason"] == "admin"
    assert "DISABLED (admin)" in keyserver.must("host", "list")

    assert keyserver.admin("host", "show", "nobody")[0] == EX_DATAERR
    assert keyserver.admin("host", "disable", "nobody")[0] == EX_DATAERR


def fields_of(text: str) -> dict[str, str]:
    """'host show''s 'label: value' lines, every value in one column; a line without a
    label continues the value above it."""
    lines = text.splitlines()
    label = lines[0].split(":", 1)[0]
    column = len(lines[0]) - len(lines[0][len(label) + 1 :].lstrip())
    shown: dict[str, str] = {}
    last = ""
    for line in lines:
        head, value = line[:column], line[column:]
        assert value and not value[0].isspace(), f"not aligned: {line!r}"
        if head.strip():
            assert head.rstrip().endswith(":"), line
            last = head.strip()[:-1]
            shown[last] = value
        else:
            shown[last] += "\n" + value
    return shown


def test_host_show_is_readable(keyserver: KeyServer, tmp_path: Path) -> None:
    keyserver.add_host(
        "fenced", "--allow-ip", "192.0.2.0/24", "--allow-ip", "2001:db8::/32", "--pool", POOL
    )
    keyserver.add_host("plain", "--deadman-timeout", "0")
    _, csr = new_csr(tmp_path, "fenced-2")
    keyserver.must("host", "cert", "fenced", "--csr", str(csr))
    create_key(keyserver, "fenced", "11")
    revoked = create_key(keyserver, "fenced", "12")
    keyserver.must("key", "revoke", revoked)
    as_json = json.loads(keyserver.must("host", "show", "fenced", "--json"))

    shown = fields_of(keyserver.must("host", "show", "fenced"))
    assert list(shown) == [
        "name",
        "enabled",
        "machine-id",
        "allowed networks",
        "pools",
        "dead-man timeout",
        "last seen",
        "created",
        "certificates",
        "keys",
        "approval",
    ]
    assert shown["name"] == "fenced" and shown["enabled"] == "yes"
    assert shown["approval"] == as_json["approval"] == "none"
    assert shown["machine-id"] == as_json["machine_id"]
    assert shown["allowed networks"] == "192.0.2.0/24, 2001:db8::/32"
    assert shown["pools"] == POOL
    # init's 30 days, which server.toml sets and the host does not override
    assert shown["dead-man timeout"] == "2592000 s (30 days), server.toml's deadman_timeout"
    assert shown["last seen"] == as_json["last_seen"]
    certificates = shown["certificates"].splitlines()
    assert certificates == [
        f"{c['sha256']}  expires {c['not_after']}" for c in as_json["certificates"]
    ]
    assert len(certificates) == 2
    assert shown["keys"] == "2 (1 active, 1 revoked)"

    plain = fields_of(keyserver.must("host", "show", "plain"))
    assert plain["allowed networks"] == "any address" and plain["pools"] == "any pool"
    assert plain["dead-man timeout"] == "off" and plain["keys"] == "0"
    keyserver.must("host", "disable", "plain")
    assert fields_of(keyserver.must("host", "show", "plain"))["enabled"] == (
        "no, disabled by an admin"
    )


def test_host_remove_keeps_a_host_that_owns_keys(keyserver: KeyServer) -> None:
    keyserver.add_host("owner")
    keyserver.add_host("empty")
    create_key(keyserver, "owner", "11")
    create_key(keyserver, "owner", "12")

    code, _, err = keyserver.admin("host", "remove", "owner")
    assert code == EX_DATAERR
    assert "2 key(s)" in err
    assert {h["name"] for h in hosts_json(keyserver)} == {"owner", "empty"}
    assert len(keys_json(keyserver)) == 2

    keyserver.must("host", "remove", "empty")
    keyserver.must("host", "remove", "owner", "--delete-keys")
    assert hosts_json(keyserver) == []
    assert keys_json(keyserver) == []
    removed = [r for r in keyserver.audit_records() if r["event"] == "host_removed"]
    assert [(r["host"], r["keys_deleted"]) for r in removed] == [("empty", 0), ("owner", 2)]
    assert keyserver.admin("host", "remove", "owner")[0] == EX_DATAERR


def test_host_cert_adds_a_second_certificate_and_keeps_the_first(
    shared_keyserver: KeyServer, tmp_path: Path
) -> None:
    server = shared_keyserver
    first = server.add_host("renewed")
    create_key(server, "renewed", "21")
    key, csr = new_csr(tmp_path, "renewed-2")
    cert = tmp_path / "second.crt"
    server.must("host", "cert", "renewed", "--csr", str(csr), "--cert-out", str(cert))
    second = HostCreds("renewed", first.machine_id, cert, key)

    shown = json.loads(server.must("host", "show", "renewed", "--json"))
    assert len(shown["certificates"]) == 2
    assert released_key(server, second, "21") == released_key(server, first, "21")

    code, out, _ = server.admin("host", "cert", "nobody", "--csr", str(csr))
    assert code == EX_DATAERR and out == ""
    garbage = tmp_path / "garbage.csr"
    garbage.write_text("not a CSR\n")
    assert server.admin("host", "cert", "renewed", "--csr", str(garbage))[0] == EX_DATAERR
    assert len(json.loads(server.must("host", "show", "renewed", "--json"))["certificates"]) == 2


# key


def test_key_create_generates_raw_and_hex_keys(shared_keyserver: KeyServer) -> None:
    server = shared_keyserver
    host = server.add_host("generated")
    raw_id = create_key(server, "generated", "31")
    hex_id = create_key(server, "generated", "32", "--keyformat", "hex")
    # stdout is the key id and nothing else: the key is never printed.
    assert KEY_ID.fullmatch(raw_id) and KEY_ID.fullmatch(hex_id)

    raw = released_key(server, host, "31")
    hexed = released_key(server, host, "32")
    assert len(raw) == 32
    assert re.fullmatch(rb"[0-9a-f]{64}", hexed)
    assert raw != bytes.fromhex(hexed.decode())

    keys = {k["key_id"]: k for k in keys_json(server, "--host", "generated")}
    assert keys[raw_id]["keyformat"] == "raw" and keys[hex_id]["keyformat"] == "hex"
    for key in keys.values():
        assert key["state"] == "active" and key["origin"] == "generated"
        assert key["pool_guid"] == POOL and key["legacy_name"] is None


def test_key_import_reads_the_key_from_stdin(shared_keyserver: KeyServer) -> None:
    server = shared_keyserver
    host = server.add_host("importer")
    raw = os.urandom(31) + b"\n"  # raw keys are bytes: even a final newline is key material
    hexed = os.urandom(32).hex().encode()
    phrase = b"correct horse battery staple"

    raw_id = create_key(server, "importer", "41", "--import", stdin=raw)
    create_key(server, "importer", "42", "--import", "--keyformat", "hex", stdin=hexed + b"\n")
    # The console script itself, with the passphrase on a pipe.
    result = run(
        "--data-dir",
        str(server.data_dir),
        "key",
        "create",
        "--host",
        "importer",
        "--pool-guid",
        POOL,
        "--dataset-guid",
        "43",
        "--dataset",
        "tank/importer/43",
        "--keyformat",
        "passphrase",
        "--import",
        stdin=phrase + b"\n",
    )
    assert result.returncode == 0, result.stderr
    assert KEY_ID.fullmatch(raw_id) and KEY_ID.fullmatch(result.stdout.strip())

    # What zfs load-key would read: the bytes given, less one trailing newline for text formats.
    assert released_key(server, host, "41") == raw
    assert released_key(server, host, "42") == hexed
    assert released_key(server, host, "43") == phrase
    origins = {k["dataset_guid"]: k["origin"] for k in keys_json(server, "--host", "importer")}
    assert origins == {"41": "imported", "42": "imported", "43": "imported"}
    audit_log = (server.data_dir / "audit.log").read_bytes()
    assert phrase not in audit_log and hexed not in audit_log


def test_key_material_is_never_taken_from_argv(keyserver: KeyServer) -> None:
    keyserver.add_host("argv")
    base: tuple[str, ...] = ("key", "create", "--host", "argv", "--pool-guid", POOL)
    base = (*base, "--dataset-guid", "51", "--dataset", "tank/argv")
    secret = os.urandom(32).hex()
    for attempt in ((*base, "--import", secret), (*base, "--key", secret)):
        result = run("--data-dir", str(keyserver.data_dir), *attempt)
        assert result.returncode == EX_USAGE, result.stderr
    assert keys_json(keyserver) == []


@pytest.mark.parametrize(
    ("options", "stdin"),
    [
        pytest.param(("--keyformat", "passphrase"), b"", id="passphrase-not-imported"),
        pytest.param(("--import",), os.urandom(31), id="raw-31-bytes"),
        pytest.param(("--import",), os.urandom(33), id="raw-33-bytes"),
        pytest.param(("--import", "--keyformat", "hex"), b"ab" * 31 + b"\n", id="hex-short"),
        pytest.param(("--import", "--keyformat", "hex"), b"zz" * 32, id="hex-not-hex"),
        pytest.param(("--import", "--keyformat", "passphrase"), b"short\n", id="passphrase-7"),
        pytest.param(
            ("--import", "--keyformat", "passphrase"), b"two\nlines long\n", id="passphrase-nl"
        ),
    ],
)
def test_key_create_refuses_material_that_fits_no_keyformat(
    keyserver: KeyServer, options: Sequence[str], stdin: bytes
) -> None:
    keyserver.add_host("strict")
    code, out, err = keyserver.admin(
        "key",
        "create",
        "--host",
        "strict",
        "--pool-guid",
        POOL,
        "--dataset-guid",
        "61",
        "--dataset",
        "tank/strict",
        *options,
        stdin=stdin,
    )
    assert code == EX_DATAERR, err
    assert out == ""
    if stdin.strip():
        assert stdin.strip().decode(errors="replace") not in err
    assert keys_json(keyserver) == []


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("--host", "nobody"),
        ("--pool-guid", "0"),
        ("--pool-guid", "pool"),
        ("--dataset-guid", str(2**64)),
        ("--dataset", "tank/@snap"),
        ("--dataset", "mirror/data"),
    ],
)
def test_key_create_refuses_bad_references(keyserver: KeyServer, field: str, value: str) -> None:
    keyserver.add_host("owner")
    options = {"--host": "owner", "--pool-guid": POOL, "--dataset-guid": "71"}
    options["--dataset"] = "tank/data"
    options[field] = value
    args = [item for pair in options.items() for item in pair]
    code, out, err = keyserver.admin("key", "create", *args)
    assert code == EX_DATAERR, err
    assert out == ""
    assert keys_json(keyserver) == []


def test_one_key_per_dataset(keyserver: KeyServer) -> None:
    keyserver.add_host("owner")
    first = create_key(keyserver, "owner", "81")
    code, _, _ = keyserver.admin(
        "key",
        "create",
        "--host",
        "owner",
        "--pool-guid",
        POOL,
        "--dataset-guid",
        "81",
        "--dataset",
        "tank/again",
    )
    assert code == EX_DATAERR
    assert [k["key_id"] for k in keys_json(keyserver)] == [first]


def test_key_list_never_shows_key_material(shared_keyserver: KeyServer) -> None:
    server = shared_keyserver
    host = server.add_host("lister")
    phrase = b"a passphrase to keep secret"
    ids = {
        create_key(server, "lister", "91"),
        create_key(server, "lister", "92", "--keyformat", "hex"),
        create_key(server, "lister", "93", "--import", "--keyformat", "passphrase", stdin=phrase),
    }
    materials = [released_key(server, host, guid) for guid in ("91", "92", "93")]

    as_json = server.must("key", "list", "--json", "--host", "lister")
    as_text = server.must("key", "list", "--host", "lister")
    keys = json.loads(as_json)
    assert {k["key_id"] for k in keys} == ids
    assert all(set(k) == KEY_FIELDS for k in keys)
    header, *lines = as_text.splitlines()
    assert header.split() == [
        "KEY-ID", "STATE", "AGE", "HOST", "DATASET", "POOL/DATASET-GUID", "FORMAT", "APPROVAL"
    ]  # fmt: skip
    assert len(lines) == 3
    assert {line.split()[0] for line in lines} == ids
    assert all(re.fullmatch(r"\d+[sm]", line.split()[2]) for line in lines)  # just made
    for material in materials:
        for encoding in (material, material.hex().encode(), base64.b64encode(material)):
            assert encoding.decode(errors="replace") not in as_json
            assert encoding.decode(errors="replace") not in as_text

    everyone = keys_json(server)
    assert ids <= {k["key_id"] for k in everyone}
    assert server.admin("key", "list", "--host", "nobody")[0] == EX_DATAERR


def test_key_revoke_and_restore_follow_the_state_machine(keyserver: KeyServer) -> None:
    keyserver.add_host("owner")
    key_id = create_key(keyserver, "owner", "101")

    def state() -> str:
        (key,) = keys_json(keyserver)
        return str(key["state"])

    unknown = "k-" + "0" * 24
    for action in ("revoke", "restore"):
        code, _, err = keyserver.admin("key", action, unknown)
        assert code == EX_DATAERR and unknown in err
        assert keyserver.admin("key", action, "not-a-key-id")[0] == EX_DATAERR

    code, _, err = keyserver.admin("key", "restore", key_id)  # it is active
    assert code == EX_DATAERR and "active" in err
    assert state() == "active"
    keyserver.must("key", "revoke", key_id)
    assert state() == "revoked"
    assert keyserver.admin("key", "revoke", key_id)[0] == EX_DATAERR
    assert state() == "revoked"
    keyserver.must("key", "restore", key_id)
    assert state() == "active"
    events = [r["event"] for r in keyserver.audit_records() if r.get("key_id") == key_id]
    assert events == ["key_created", "key_revoked", "key_restored"]


# audit


def test_audit_prints_and_filters_records(keyserver: KeyServer) -> None:
    keyserver.add_host("alpha")
    keyserver.add_host("beta")
    create_key(keyserver, "alpha", "111")
    keyserver.must("host", "disable", "beta")
    records = keyserver.audit_records()
    assert [r["event"] for r in records] == [
        "init",
        "host_added",
        "host_added",
        "key_created",
        "host_disabled",
    ]

    text = keyserver.must("audit").splitlines()
    assert len(text) == len(records)
    for line, record in zip(text, records, strict=True):
        assert line.startswith(f"{record['ts']} {record['event']}")
    assert "host=alpha" in text[1] and "host=beta" in text[2]

    lines = keyserver.must("audit", "--json").splitlines()
    assert [json.loads(line) for line in lines] == records

    def audit(*options: str) -> list[dict[str, Any]]:
        out = keyserver.must("audit", "--json", *options)
        return [json.loads(line) for line in out.splitlines()]

    alpha = audit("--host", "alpha")
    assert [r["event"] for r in alpha] == ["host_added", "key_created"]
    assert all(r["host"] == "alpha" for r in alpha)
    added = audit("--event", "host_added")
    assert [r["host"] for r in added] == ["alpha", "beta"]
    assert audit("--event", "host_disabled", "--host", "alpha") == []
    assert audit("--last", "1") == records[-1:]
    assert audit("--event", "no_such_event") == []
    for line in keyserver.must("audit", "--host", "beta").splitlines():
        assert "host=beta" in line


def test_issue_key_refused_by_the_database_leaves_no_key_behind(
    keyserver: KeyServer, tmp_path: Path
) -> None:
    keyserver.add_host("taken")
    bundle = tmp_path / "bundle"
    code, _, err = keyserver.admin(
        "host", "add", "taken", "--machine-id", "1" * 32, "--issue-key", str(bundle)
    )
    assert code == 65 and "already exists" in err
    assert not list(bundle.glob("client.*"))


# What a new admin meets in the first hour


def test_version_is_the_projects() -> None:
    result = run("--version")
    assert (result.returncode, result.stdout) == (0, f"zfs-unlock-server {__version__}\n")
    pyproject = tomllib.loads((Path(__file__).parents[2] / "pyproject.toml").read_text())
    assert __version__ == pyproject["project"]["version"]


def examples_of(parser: argparse.ArgumentParser) -> list[str]:
    """The epilog's command lines, each joined across its continuation lines."""
    epilog = parser.epilog or ""
    assert epilog.startswith(("example:\n", "examples:\n")), epilog
    return epilog.split(":\n", 1)[1].replace("\\\n", "").split("\n")


@pytest.mark.parametrize("command", sorted(every_parser()))
def test_every_option_has_help_and_every_command_a_real_example(command: str) -> None:
    parser = every_parser()[command]
    for action in parser._actions:
        assert action.help and action.help != argparse.SUPPRESS, (command, action.dest)
    examples = examples_of(parser)
    assert 1 <= len(examples) <= 2
    assert any(e.strip().startswith(f"zfs-unlock-server {command}") for e in examples)
    for example in examples:
        words = shlex.split(example, comments=True)
        assert words[0] == "zfs-unlock-server"
        if "--help" not in words:
            redirects = [words.index(r) for r in ("<", ">") if r in words]
            redirect = min(redirects, default=len(words))
            build_parser().parse_args(words[1:redirect])  # exits 64 if it is not a command


def test_help_keeps_the_examples_line_breaks() -> None:
    result = run("host", "add", "--help")
    assert result.returncode == 0
    epilog = result.stdout.split("\nexamples:\n", 1)[1].splitlines()
    assert epilog[0].startswith("  zfs-unlock-server host add web1 ") and epilog[0].endswith("\\")
    assert epilog[1].startswith("      --csr ")


def test_init_turns_the_deadman_switch_on_for_30_days(tmp_path: Path) -> None:
    data = tmp_path / "data"
    result = run("--data-dir", str(data), "init")
    assert result.returncode == 0, result.stderr
    assert (
        "dead-man switch: a host not heard from for 30 days is disabled; the agent's daemon"
        " checks in every 15 minutes; change deadman_timeout in server.toml"
    ) in result.stderr.splitlines()
    written = tomllib.loads((data / "server.toml").read_text())
    assert written["deadman_timeout"] == 2592000
    assert server_config.load(Layout(data)).deadman_timeout == 2592000
    # A server.toml without the setting, as older versions wrote none: the switch stays off.
    assert server_config.parse("", "server.toml").deadman_timeout == 0


def test_empty_lists_say_so_on_stderr_only(keyserver: KeyServer) -> None:
    for args, note in (
        (("host", "list"), "no hosts"),
        (("key", "list"), "no keys"),
        (("audit", "--host", "nobody"), "no audit records match"),
        (("audit", "--json", "--event", "key_released"), "no audit records match"),
    ):
        assert keyserver.admin(*args) == (0, "", note + "\n"), args
    assert keyserver.admin("host", "list", "--json") == (0, "[]\n", "")
    assert keyserver.admin("key", "list", "--json") == (0, "[]\n", "")
    keyserver.add_host("web1")
    assert keyserver.admin("key", "list", "--host", "web1") == (0, "", "no keys for host web1\n")
    (keyserver.data_dir / "audit.log").write_bytes(b"")  # rotated away
    assert keyserver.admin("audit") == (0, "", "no audit records\n")
    assert keyserver.admin("audit", "--json") == (0, "", "no audit records\n")


def test_each_change_is_confirmed_in_one_line(keyserver: KeyServer, tmp_path: Path) -> None:
    keyserver.add_host("web1")
    keyserver.add_host("web2")
    _, csr = new_csr(tmp_path, "web1-2")
    keyserver.must("host", "cert", "web1", "--csr", str(csr))
    first = json.loads(keyserver.must("host", "show", "web1", "--json"))["certificates"][0]
    key = create_key(keyserver, "web1", "11")
    create_key(keyserver, "web2", "21")
    named = f"key {key} of host web1 (tank/web1/11)"
    for args, message in (
        (("key", "revoke", key), f"{named} revoked: it is refused from the next request"),
        (("key", "restore", key), f"{named} restored: it is released again from the next request"),
        (("key", "revoke", key), f"{named} revoked: it is refused from the next request"),
        (("key", "delete", key), f"{named} deleted for good"),
        (
            ("host", "disable", "web1"),
            "host web1 disabled: its keys are refused from the next request",
        ),
        (
            ("host", "enable", "web1"),
            (
                "host web1 enabled: its keys are released again from the next request;"
                " its dead-man clock starts now"
            ),
        ),
        (
            ("host", "cert-remove", "web1", first["sha256"].upper()),
            (
                f"host web1: certificate {first['sha256']} removed: it is refused from the next"
                " request"
            ),
        ),
        (
            ("host", "remove", "web1"),
            "host web1 removed: its certificates are refused from the next request",
        ),
        (
            ("host", "remove", "web2", "--delete-keys"),
            (
                "host web2 removed, and its 1 key(s) deleted for good: its certificates are"
                " refused from the next request"
            ),
        ),
    ):
        assert keyserver.admin(*args) == (0, "", message + "\n"), args
    # A refusal confirms nothing.
    code, out, err = keyserver.admin("host", "disable", "web1")
    assert (code, out) == (EX_DATAERR, "") and "disabled" not in err


def test_host_add_says_a_host_may_fetch_from_anywhere_for_any_pool(
    keyserver: KeyServer, tmp_path: Path
) -> None:
    _, csr = new_csr(tmp_path, "open")
    code, _, err = keyserver.admin(
        "host", "add", "open", "--machine-id", machine_id_for("open"), "--csr", str(csr)
    )
    assert code == 0
    assert err.splitlines() == [
        "host open added",
        "host open: may fetch keys from any address; --allow-ip CIDR narrows it",
        "host open: may fetch keys for any pool; --pool GUID narrows it",
    ]
    code, _, err = keyserver.admin(
        *("host", "add", "fenced", "--machine-id", machine_id_for("fenced"), "--csr", str(csr)),
        *("--allow-ip", "192.0.2.0/24", "--pool", POOL),
    )
    assert (code, err) == (0, "host fenced added\n")


def test_issue_key_with_cert_out_writes_the_certificate_there_too(
    keyserver: KeyServer, tmp_path: Path
) -> None:
    bundle, out = tmp_path / "bundle", tmp_path / "db1.crt"
    code, stdout, err = keyserver.admin(
        *("host", "add", "db1", "--machine-id", machine_id_for("db1")),
        *("--issue-key", str(bundle), "--cert-out", str(out)),
    )
    assert (code, stdout) == (0, ""), err
    assert out.read_bytes() == (bundle / "client.crt").read_bytes()
    assert f"client certificate written to {out}" in err


def test_outputs_are_kept_only_when_the_command_succeeds(
    keyserver: KeyServer, tmp_path: Path
) -> None:
    keyserver.add_host("taken")
    _, csr = new_csr(tmp_path, "candidate")
    new, old = tmp_path / "new.crt", tmp_path / "old.crt"
    old.write_text("an older certificate, longer than a new one would be\n" * 100)
    for out in (new, old):
        code, _, _ = keyserver.admin(
            *("host", "add", "taken", "--machine-id", "1" * 32, "--csr", str(csr)),
            *("--cert-out", str(out)),
        )
        assert code == EX_DATAERR
    assert not new.exists()
    assert old.read_text().startswith("an older certificate")
    bundle = tmp_path / "a" / "b"
    code, _, _ = keyserver.admin(
        "host", "add", "taken", "--machine-id", "1" * 32, "--issue-key", str(bundle)
    )
    assert code == EX_DATAERR and not (tmp_path / "a").exists()

    # One that cannot be opened is refused before anything changes.
    before = keyserver.audit_records()
    code, _, err = keyserver.admin(
        *("host", "add", "second", "--machine-id", "1" * 32, "--csr", str(csr)),
        *("--cert-out", str(tmp_path / "missing" / "second.crt")),
    )
    assert code == EX_CANTCREAT and "--cert-out" in err and "No such file" in err
    assert keyserver.audit_records() == before

    # Success replaces an existing file's content entirely.
    keyserver.must(
        *("host", "add", "second", "--machine-id", "1" * 32, "--csr", str(csr)),
        *("--cert-out", str(old)),
    )
    cert = x509.load_pem_x509_certificate(old.read_bytes())
    assert old.read_bytes() == cert.public_bytes(serialization.Encoding.PEM)


# serve's first words


SERVING = "serving HTTPS (TLS, client certificates required) on https://127.0.0.1:{port}"


def test_serve_says_it_serves_https_with_client_certificates(keyserver: KeyServer) -> None:
    with running(keyserver, workers=1):
        line = SERVING.format(port=keyserver.port)
        wait_for(lambda: line in keyserver.log_path.read_text())
    log = keyserver.log_path.read_text()
    assert log.count(line) == 1
    assert "Listening at" not in log and "http://" not in log  # gunicorn's misleading line


def test_https_url_brackets_ipv6() -> None:
    assert serve.https_url(("::", 8443, 0, 0)) == "https://[::]:8443"
    assert serve.https_url(("192.0.2.1", 443)) == "https://192.0.2.1:443"


def test_serve_on_a_port_in_use_fails_at_once_with_exit_69(keyserver: KeyServer) -> None:
    with socket.socket() as taken, socket.socket() as free:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        free.bind(("127.0.0.1", 0))
        port, free_port = taken.getsockname()[1], free.getsockname()[1]
        free.close()
        result = run(
            *("--data-dir", str(keyserver.data_dir), "serve", "--workers", "1"),
            *("--listen", f"127.0.0.1:{free_port}", "--listen", f"127.0.0.1:{port}"),
            *ROOT_ONLY,
        )
    assert result.returncode == EX_UNAVAILABLE, result.stderr
    # One line, at once: not gunicorn's five attempts a second apart.
    assert result.stderr.splitlines() == [
        f"zfs-unlock-server: cannot listen on 127.0.0.1:{port}: address already in use"
    ]
    assert result.stdout == ""
    assert "server_start" not in {r["event"] for r in keyserver.audit_records()}
