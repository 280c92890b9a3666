"""The metrics listener: what it counts across workers, what Prometheus's own checker says
of a live scrape, and the health check a load balancer asks."""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from bench import postgres
from bench.common import free_port
from tests.keyserver import KeyServer, enroll, release, run_serve, wait_for
from zfs_unlock_server.errors import EX_UNAVAILABLE

# Every test here runs on SQLite and on PostgreSQL (tests/conftest.py).
BOTH_STORES = True

POOL = "6666666666666666666"
NO_RATE_LIMITS = {
    "per_certificate_burst": 100000,
    "per_certificate_rate": 10000.0,
    "per_address_burst": 100000,
    "per_address_rate": 10000.0,
}


def get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=10) as answer:  # noqa: S310 (loopback http)
            return answer.status, answer.read().decode()
    except urllib.error.HTTPError as error:
        with error:
            return error.code, error.read().decode()


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


def with_metrics(server: KeyServer) -> str:
    port = free_port()
    server.configure(rate_limits=NO_RATE_LIMITS, metrics={"listen": f"127.0.0.1:{port}"})
    return f"http://127.0.0.1:{port}"


def handshake_failures(found: dict[tuple[str, tuple[tuple[str, str], ...]], float]) -> float:
    return sum(v for (n, _), v in found.items() if n == "zfs_unlock_tls_handshake_failures_total")


def test_counts_add_up_across_workers_and_promtool_accepts_the_scrape(
    keyserver: KeyServer,
) -> None:
    base = with_metrics(keyserver)
    host = keyserver.add_host("counted")
    keyserver.add_host("switched-off")
    keyserver.must("host", "disable", "switched-off")
    keyserver.start(workers=2)
    with keyserver.session(host) as session:
        for guid in ("1", "2", "3"):
            assert enroll(session, keyserver, host, POOL, guid).status_code == 201
    for _ in range(7):  # a new connection each: the two workers share them
        with keyserver.session(host) as session:
            assert release(session, keyserver, host, POOL, "1").status_code == 200
    for guid in ("8", "9"):
        with keyserver.session(host) as session:
            assert release(session, keyserver, host, POOL, guid).status_code == 403
    with socket.create_connection(("127.0.0.1", keyserver.port)) as plain:
        plain.sendall(b"GET / HTTP/1.1\r\n\r\n")  # no TLS at all: a failed handshake
        with contextlib.suppress(ConnectionResetError):
            plain.recv(1024)
    # The TLS alert reaches the client before the worker has recorded the failure.
    wait_for(lambda: handshake_failures(samples(get(base + "/metrics")[1])) > 0)

    status, text = get(base + "/metrics")
    assert status == 200
    found = samples(text)
    allow = (("decision", "allow"), ("reason", "ok"))
    denied = (("decision", "deny"), ("reason", "no_such_key"))
    assert found[("zfs_unlock_releases_total", allow)] == 7
    assert found[("zfs_unlock_releases_total", denied)] == 2
    created = (("decision", "allow"), ("reason", "created"))
    assert found[("zfs_unlock_enrolments_total", created)] == 3
    assert handshake_failures(found)
    assert found[("zfs_unlock_request_seconds_count", (("route", "release_one"),))] == 9
    assert found[("zfs_unlock_responses_total", (("status", "403"),))] == 2
    assert found[("zfs_unlock_database_seconds_count", ())] > 12
    assert found[("zfs_unlock_audit_write_failures_total", ())] == 0
    assert found[("zfs_unlock_hosts", (("state", "enabled"),))] == 1
    assert found[("zfs_unlock_hosts", (("state", "disabled_admin"),))] == 1
    assert "client.key" not in text and host.machine_id not in text

    promtool = shutil.which("promtool")
    assert promtool, "promtool (Debian's prometheus) is missing: scripts/test.sh installs it"
    checked = subprocess.run(
        [promtool, "check", "metrics"], input=text, capture_output=True, text=True, check=False
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_audit_failures_are_counted(keyserver: KeyServer) -> None:
    base = with_metrics(keyserver)
    host = keyserver.add_host("unrecorded")
    keyserver.break_audit()
    keyserver.start(workers=1)
    with keyserver.session(host) as session:
        assert enroll(session, keyserver, host, POOL, "1").status_code == 503
    found = samples(get(base + "/metrics")[1])
    assert found[("zfs_unlock_audit_write_failures_total", ())] >= 1
    assert found[("zfs_unlock_responses_total", (("status", "503"),))] == 1


def test_health_says_whether_the_database_answers(keyserver: KeyServer) -> None:
    base = with_metrics(keyserver)
    keyserver.start(workers=1)
    assert get(base + "/health") == (200, '{"database": "ok"}\n')
    assert get(base + "/nothing")[0] == 404
    request = urllib.request.Request(base + "/metrics", method="POST", data=b"")  # noqa: S310
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=10)  # noqa: S310 (loopback http)
    with refused.value:
        assert refused.value.code == 405


def test_health_is_503_while_postgresql_is_down_and_200_again_after(tmp_path: Path) -> None:
    with postgres.cluster() as own:
        server = KeyServer(tmp_path, database_url=own.new_database("health"))
        base = with_metrics(server)
        server.start(workers=1)
        try:
            assert get(base + "/health")[0] == 200
            own.stop()
            status, body = get(base + "/health")
            assert status == 503 and '"database": "unavailable"' in body
            found = samples(get(base + "/metrics")[1])
            assert not [k for k in found if k[0] == "zfs_unlock_hosts"]  # unknown, not 0
            own.start()
            assert get(base + "/health")[0] == 200
        finally:
            server.stop()


def test_metrics_are_off_unless_asked_for(keyserver: KeyServer) -> None:
    keyserver.configure(rate_limits=NO_RATE_LIMITS)
    keyserver.start(workers=1)
    text = (keyserver.data_dir / "server.toml").read_text()
    assert "metrics" not in text  # the test's own server.toml: nothing set
    assert "metrics" not in keyserver.log_path.read_text()


def test_a_metrics_port_in_use_is_exit_69(keyserver: KeyServer) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        keyserver.configure(metrics={"listen": f"127.0.0.1:{port}"})
        code, err, _ = run_serve(keyserver)
    assert code == EX_UNAVAILABLE, err
    assert f"127.0.0.1:{port}" in err and "in use" in err
