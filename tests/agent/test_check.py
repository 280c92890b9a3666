"""`zfs-unlock-agent check` against the real key server: one behaviour per test, each
class of failure with its own exit status and the words an admin acts on."""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.agent.harness import AGENT_BIN, AgentHost
from tests.fakes.stub_https import self_signed_cert
from tests.faketime import faketime_env
from tests.keyserver import SERVER_BIN, KeyServer
from zfs_unlock_agent.check import CHECKS

ROOT = os.geteuid() == 0


def code(kind: str) -> int:
    return CHECKS[kind].exit_code


def test_a_host_that_can_fetch_its_keys_passes_every_check(
    shared_keyserver: KeyServer, tmp_path: Path
) -> None:
    host = AgentHost.create(tmp_path, shared_keyserver, "check-ok")
    host.encrypted_dataset("tank/secret", host.zfs.add_pool("tank"))
    result = host.run("check")
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert out.startswith(shared_keyserver.url("") + "\n")
    for fact in (
        "ok    reachable: TCP and TLS to 127.0.0.1:",
        "ok    pin matches the server's public key",
        "ok    client certificate accepted",
        "ok    enrolled as check-ok, enabled",
        "ok    machine-id matches the enrollment",
        "ok    requests from 127.0.0.1 are allowed",
        "ok    may unlock datasets on any pool",
        "ok    client certificate valid until ",
        "ok    clock within ",
        "1 of 1 key server(s) would release this host's keys now",
    ):
        assert fact in out
    assert "FAIL" not in out
    # It asked about the host and released nothing: no release record, no dead-man touch.
    events = [r["event"] for r in shared_keyserver.audit_records() if r.get("host") == "check-ok"]
    assert "host_status" in events and "release" not in events


@pytest.fixture
def port() -> int:
    """A port on 127.0.0.1 that nothing listens on (bound once, then let go)."""
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        number: int = unused.getsockname()[1]
        return number


def test_a_port_nobody_listens_on_is_connection_refused(
    shared_keyserver: KeyServer, tmp_path: Path, port: int
) -> None:
    host = AgentHost.create(tmp_path, shared_keyserver, "check-refused")
    host.write_config(urls=[f"https://127.0.0.1:{port}"])
    result = host.run("check")
    assert result.returncode == code("refused") == 11
    assert f"FAIL  cannot reach 127.0.0.1:{port}: cannot connect (connection refused)" in (
        result.stdout
    )
    assert "0 of 1 key server(s)" in result.stdout


def _in_new_network_namespace(
    host: AgentHost, *args: str, lo_up: bool
) -> subprocess.CompletedProcess[str]:
    """The agent in a network namespace made for it: only a loopback, no route, no DNS
    server it can reach, so nothing leaves the machine."""
    up = "ip link set lo up && " if lo_up else ""
    return subprocess.run(
        [
            "unshare",
            "--net",
            "sh",
            "-c",
            f'{up}exec "$@"',
            "sh",
            str(AGENT_BIN),
            "-c",
            str(host.config_path),
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.mark.skipif(not ROOT or not shutil.which("unshare"), reason="needs root for unshare --net")
def test_a_name_that_does_not_resolve_is_a_dns_failure(
    shared_keyserver: KeyServer, tmp_path: Path
) -> None:
    host = AgentHost.create(tmp_path, shared_keyserver, "check-dns")
    host.write_config(urls=["https://keys.zua-check.invalid:8443"])
    result = _in_new_network_namespace(host, "check", lo_up=False)
    assert result.returncode == code("dns") == 10, result.stdout + result.stderr
    assert "FAIL  cannot resolve keys.zua-check.invalid: " in result.stdout


@pytest.mark.skipif(not ROOT or not shutil.which("unshare"), reason="needs root for unshare --net")
def test_an_address_without_a_route_is_unreachable(
    shared_keyserver: KeyServer, tmp_path: Path
) -> None:
    host = AgentHost.create(tmp_path, shared_keyserver, "check-unreachable")
    host.write_config(urls=["https://192.0.2.1:8443"])  # TEST-NET-1, and no route to it
    result = _in_new_network_namespace(host, "check", lo_up=True)
    assert result.returncode == code("unreachable") == 12, result.stdout + result.stderr
    assert "FAIL  cannot reach 192.0.2.1:8443: cannot connect (network is unreachable)" in (
        result.stdout
    )


@pytest.fixture
def silent_listener() -> Iterator[int]:
    """A port that takes TCP connections (the kernel's backlog) and never says a word."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        yield listener.getsockname()[1]


def test_a_server_that_never_answers_is_a_timeout(
    shared_keyserver: KeyServer, tmp_path: Path, silent_listener: int
) -> None:
    host = AgentHost.create(tmp_path, shared_keyserver, "check-timeout")
    host.write_config(
        urls=[f"https://127.0.0.1:{silent_listener}"],
        network={"connect_timeout": 1, "read_timeout": 0.5},
    )
    result = host.run("check")
    assert result.returncode == code("timeout") == 13
    assert f"FAIL  127.0.0.1:{silent_listener}: no answer within the time limits" in result.stdout


@pytest.fixture
def plain_http_port() -> Iterator[int]:
    """A server that speaks plain HTTP where TLS is expected."""
    listener = socket.create_server(("127.0.0.1", 0))

    def answer() -> None:
        with listener:
            connection, _ = listener.accept()
            with connection:
                connection.recv(4096)
                connection.sendall(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")

    thread = threading.Thread(target=answer, daemon=True)
    thread.start()
    yield listener.getsockname()[1]
    thread.join(timeout=10)


def test_a_server_that_does_not_speak_tls_fails_the_handshake(
    shared_keyserver: KeyServer, tmp_path: Path, plain_http_port: int
) -> None:
    host = AgentHost.create(tmp_path, shared_keyserver, "check-tls")
    host.write_config(urls=[f"https://127.0.0.1:{plain_http_port}"])
    result = host.run("check")
    assert result.returncode == code("tls") == 15
    assert "FAIL  127.0.0.1:" in result.stdout and "TLS handshake failed (" in result.stdout


def test_a_wrong_pin_shows_the_pin_the_server_presented(
    shared_keyserver: KeyServer, tmp_path: Path
) -> None:
    host = AgentHost.create(tmp_path, shared_keyserver, "check-pin")
    wrong = "sha256//" + "A" * 43 + "="
    host.write_config(pins=[wrong])
    result = host.run("check")
    assert result.returncode == code("pin") == 16
    assert "FAIL  the server's public key matches no configured pin" in result.stdout
    assert f"it presented:  {shared_keyserver.pin}" in result.stdout
    assert f"configured:    {wrong}" in result.stdout
    assert "zfs-unlock-server pin" in result.stdout


def test_a_certificate_from_another_ca_is_refused_by_the_server(
    shared_keyserver: KeyServer, tmp_path: Path
) -> None:
    host = AgentHost.create(tmp_path, shared_keyserver, "check-ca")
    stranger = self_signed_cert(tmp_path / "stranger")
    text = host.config_path.read_text()
    text = text.replace(str(host.creds.cert), str(stranger.cert))
    text = text.replace(str(host.creds.key), str(stranger.key))
    host.config_path.write_text(text)
    stranger.key.chmod(0o400)
    result = host.run("check")
    assert result.returncode == code("client-certificate") == 17, result.stdout + result.stderr
    assert "ok    pin matches the server's public key" in result.stdout
    assert "FAIL  the server refused this host's client certificate (" in result.stdout


def test_a_removed_host_is_not_enrolled(shared_keyserver: KeyServer, tmp_path: Path) -> None:
    host = AgentHost.create(tmp_path, shared_keyserver, "check-removed")
    shared_keyserver.must("host", "remove", "check-removed")
    result = host.run("check")
    assert result.returncode == code("not-enrolled") == 18
    assert "ok    client certificate accepted" in result.stdout
    assert "FAIL  the server does not know this host's client certificate" in result.stdout


def test_a_disabled_host_is_told_how_to_enable_it(
    shared_keyserver: KeyServer, tmp_path: Path
) -> None:
    host = AgentHost.create(tmp_path, shared_keyserver, "check-disabled")
    shared_keyserver.must("host", "disable", "check-disabled")
    result = host.run("check")
    assert result.returncode == code("disabled") == 19
    assert "FAIL  enrolled as check-disabled, but disabled (admin)" in result.stdout
    assert "zfs-unlock-server host enable check-disabled" in result.stdout


def test_another_machine_id_is_named_as_such(shared_keyserver: KeyServer, tmp_path: Path) -> None:
    host = AgentHost.create(tmp_path, shared_keyserver, "check-mid")
    (host.root / "etc" / "machine-id").write_text("f" * 32 + "\n")
    result = host.run("check")
    assert result.returncode == code("machine-id") == 20
    assert "FAIL  this host's machine-id is not the one enrolled" in result.stdout


def test_an_address_outside_the_allowed_networks_is_named(
    shared_keyserver: KeyServer, tmp_path: Path
) -> None:
    host = AgentHost.create(tmp_path, shared_keyserver, "check-addr", "--allow-ip", "10.0.0.0/8")
    result = host.run("check")
    assert result.returncode == code("address") == 21
    assert "FAIL  requests from 127.0.0.1 are not in the host's allowed networks" in result.stdout


def test_a_managed_root_on_a_pool_not_allowed_is_named(
    shared_keyserver: KeyServer, tmp_path: Path
) -> None:
    host = AgentHost.create(tmp_path, shared_keyserver, "check-pool", "--pool", "1234")
    tank = host.zfs.add_pool("tank")
    host.zfs.add_encrypted("tank/secret", os.urandom(32))
    result = host.run("check")
    assert result.returncode == code("pool") == 22
    assert "ok    may unlock datasets on pools 1234 (not imported here)" in result.stdout
    assert f"FAIL  pool tank ({tank}) holds a managed encryption root" in result.stdout


def test_a_certificate_near_its_end_is_named_with_its_date(
    shared_keyserver: KeyServer, tmp_path: Path
) -> None:
    host = AgentHost.create(tmp_path, shared_keyserver, "check-expiry")
    # The admin renews the host's certificate with a clock 1800 days behind: the new
    # certificate (5 years) has 25 days left, and the host uses it.
    renew = ("host", "cert", "check-expiry", "--csr", host.creds.cert.with_name("client.csr"))
    renewed = subprocess.run(
        [SERVER_BIN, "--data-dir", shared_keyserver.data_dir, *renew],
        capture_output=True,
        env={**os.environ, **faketime_env("-1800d")},
        timeout=60,
        check=True,
    )
    host.creds.cert.write_bytes(renewed.stdout)
    result = host.run("check")
    assert result.returncode == code("expiry") == 23, result.stdout + result.stderr
    assert re.search(
        r"FAIL  client certificate expires on \S+ \S+ UTC, in 2[45] days", result.stdout
    )
    assert "renew it: zfs-unlock-server host cert" in result.stdout


def test_a_clock_far_from_the_servers_is_named(shared_keyserver: KeyServer, tmp_path: Path) -> None:
    host = AgentHost.create(tmp_path, shared_keyserver, "check-clock")
    result = host.run("check", env=faketime_env("-2h"))
    assert result.returncode == code("clock") == 24, result.stdout + result.stderr
    assert re.search(r"FAIL  this host's clock is 7[12]\d\d s behind the server's", result.stdout)


def test_a_wrong_url_path_is_a_server_error(shared_keyserver: KeyServer, tmp_path: Path) -> None:
    host = AgentHost.create(tmp_path, shared_keyserver, "check-path")
    host.write_config(urls=[shared_keyserver.url("/not-here")])
    result = host.run("check")
    assert result.returncode == code("server") == 25
    assert "FAIL  the server answered HTTP 404" in result.stdout
    assert "a wrong path in the URL" in result.stdout


def test_every_server_is_checked_and_the_first_failure_decides(
    shared_keyserver: KeyServer, tmp_path: Path, port: int
) -> None:
    host = AgentHost.create(tmp_path, shared_keyserver, "check-two")
    host.write_config(urls=[f"https://127.0.0.1:{port}", shared_keyserver.url("")])
    result = host.run("check")
    assert result.returncode == code("refused")
    assert "ok    enrolled as check-two, enabled" in result.stdout  # the second was asked too
    assert "1 of 2 key server(s) would release this host's keys now" in result.stdout


def test_every_exit_status_is_in_the_man_page() -> None:
    page = (Path(__file__).resolve().parents[2] / "docs/man/zfs-unlock-agent.8").read_text()
    section = page[page.index('.SS "Exit status of check"') :]
    for check in CHECKS.values():
        assert re.search(rf"^\.IP {check.exit_code}\n", section, re.MULTILINE), check
    assert len({c.exit_code for c in CHECKS.values()}) == len(CHECKS)
