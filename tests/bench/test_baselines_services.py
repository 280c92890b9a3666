"""The baselines answer as the benchmark needs: nginx over the key server's mutual TLS
(client certificate, pinned key) with the static key, tangd's recovery request, clevis's
round trip. Debian's packages are required; without them the tests are skipped."""

from __future__ import annotations

import json
import os
import socket
import ssl
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from bench import baselines, common

# bench/prepare.sh (once per session) installs Debian's nginx, tang, clevis, systemd and
# gcc when they are missing, as on a fresh CI machine.
pytestmark = pytest.mark.usefixtures("bench_prepared")


@pytest.fixture(scope="module")
def loadgen(tmp_path_factory: pytest.TempPathFactory) -> Path:
    binary = tmp_path_factory.mktemp("build") / "loadgen"
    source = common.REPO / "bench" / "loadgen.c"
    subprocess.run(
        ["gcc", "-O2", "-o", str(binary), str(source), "-lssl", "-lcrypto", "-lpthread"],
        check=True,
    )
    return binary


@pytest.fixture(scope="module")
def key_server(tmp_path_factory: pytest.TempPathFactory) -> tuple[common.KeyServer, common.Host]:
    server = common.KeyServer(tmp_path_factory.mktemp("keyserver"))
    return server, server.add_hosts(["bench-host"])[0]


@pytest.fixture(scope="module")
def nginx(
    tmp_path_factory: pytest.TempPathFactory, key_server: tuple[common.KeyServer, common.Host]
) -> Iterator[baselines.Nginx]:
    with baselines.nginx(tmp_path_factory.mktemp("nginx"), key_server[0]) as instance:
        yield instance


@pytest.fixture(scope="module")
def tang(tmp_path_factory: pytest.TempPathFactory) -> Iterator[baselines.Tang]:
    with baselines.tangd(tmp_path_factory.mktemp("tang")) as instance:
        yield instance


def steady(loadgen: Path, port: int, request: Path, *tls: str) -> dict[str, object]:
    """Half a second of one closed-loop client."""
    argv = [str(loadgen), "steady", "127.0.0.1", str(port), "1", "0", "0.5", str(request), *tls]
    result: dict[str, object] = json.loads(
        subprocess.run(argv, check=True, capture_output=True, text=True).stdout
    )
    return result


def tls_get(nginx: baselines.Nginx, cert: Path | None, key: Path | None) -> bytes:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    if cert and key:
        context.load_cert_chain(cert, key)
    with (
        socket.create_connection(("127.0.0.1", nginx.port), timeout=10) as raw,
        context.wrap_socket(raw) as conn,
    ):
        conn.sendall(nginx.request())
        answer = b""
        while chunk := conn.recv(65536):
            answer += chunk
        return answer


def test_nginx_config_has_the_key_servers_tls_terms(
    tmp_path: Path, key_server: tuple[common.KeyServer, common.Host]
) -> None:
    server = key_server[0]
    text = baselines.nginx_config(tmp_path, 4321, server, b"k" * 64)
    for line in (
        "listen 127.0.0.1:4321 ssl",
        f"ssl_certificate {server.server_cert};",
        f"ssl_certificate_key {server.server_key};",
        f"ssl_client_certificate {server.ca_cert};",
        "ssl_verify_client on;",
        "ssl_session_tickets off;",
        "ssl_session_cache off;",
        "keepalive_timeout 0;",
        "access_log off;",
        "worker_processes auto;",
        f"pid {tmp_path / 'nginx.pid'};",
    ):
        assert line in text


def test_nginx_serves_the_key_to_the_load_generator_with_the_pin(
    nginx: baselines.Nginx,
    key_server: tuple[common.KeyServer, common.Host],
    loadgen: Path,
    tmp_path: Path,
) -> None:
    server, host = key_server
    request = tmp_path / "get.http"
    request.write_bytes(nginx.request())
    tls = (str(host.cert), str(host.key))
    good = steady(loadgen, nginx.port, request, *tls, common.pin_hex(server.pin))
    outcomes = good["outcomes"]
    assert isinstance(outcomes, dict)
    assert good["ok"] and good["ok"] == sum(outcomes.values())
    wrong_pin = steady(loadgen, nginx.port, request, *tls, "00" * 32)
    assert wrong_pin["ok"] == 0
    assert isinstance(wrong_pin["outcomes"], dict) and wrong_pin["outcomes"]["pin"]


def test_nginx_answers_the_64_byte_body_only_with_a_client_certificate(
    nginx: baselines.Nginx, key_server: tuple[common.KeyServer, common.Host]
) -> None:
    host = key_server[1]
    answer = tls_get(nginx, host.cert, host.key)
    assert answer.startswith(b"HTTP/1.1 200 ")
    assert answer.endswith(b"\r\n\r\n" + nginx.body) and len(nginx.body) == 64
    assert tls_get(nginx, None, None).startswith(b"HTTP/1.1 400 ")


def test_nginx_runs_its_own_workers_and_stops_with_them(
    tmp_path: Path, key_server: tuple[common.KeyServer, common.Host]
) -> None:
    with baselines.nginx(tmp_path, key_server[0]) as instance:
        workers = instance.worker_pids()
        assert len(workers) == os.cpu_count()
        assert (tmp_path / "nginx.pid").read_text().strip() == str(instance.master_pid)
    for pid in [instance.master_pid, *workers]:
        assert not Path(f"/proc/{pid}").exists()


def test_tangd_answers_the_recovery_request(
    tang: baselines.Tang, loadgen: Path, tmp_path: Path
) -> None:
    request = tmp_path / "rec.http"
    request.write_bytes(tang.recovery_request())
    result = steady(loadgen, tang.port, request)
    outcomes = result["outcomes"]
    assert isinstance(outcomes, dict)
    assert result["ok"] and result["ok"] == sum(outcomes.values())
    assert tang.url == f"http://127.0.0.1:{tang.port}"


def test_tangd_recovery_answer_is_a_p521_point(tang: baselines.Tang) -> None:
    with socket.create_connection(("127.0.0.1", tang.port), timeout=10) as conn:
        conn.sendall(tang.recovery_request())
        conn.shutdown(socket.SHUT_WR)
        answer = b""
        while chunk := conn.recv(65536):
            answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 ")
    point = json.loads(body)
    assert point["kty"] == "EC" and point["crv"] == "P-521"


def test_clevis_round_trip_through_tangd(tang: baselines.Tang, tmp_path: Path) -> None:
    jwe = tmp_path / "secret.jwe"
    baselines.clevis_bind(tang, b"a secret of the benchmark", jwe)
    assert baselines.clevis_decrypt(jwe) == b"a secret of the benchmark"
    timed = common.run_measured(baselines.clevis_decrypt_argv(), stdin_path=jwe)
    assert timed.returncode == 0
