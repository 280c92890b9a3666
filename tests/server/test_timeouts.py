"""Slow or silent clients cannot hold a worker: every socket operation has a deadline."""

from __future__ import annotations

import socket
import ssl
import time
from collections.abc import Iterator

import pytest

from tests.keyserver import HostCreds, KeyServer, release, wait_for

IO_TIMEOUT = 1.0


@pytest.fixture
def impatient(keyserver: KeyServer) -> Iterator[tuple[KeyServer, HostCreds]]:
    keyserver.configure(io_timeout=IO_TIMEOUT, request_timeout=5)
    host = keyserver.add_host("patient")
    keyserver.start(workers=2)
    yield keyserver, host


def closed_within(sock: socket.socket, limit: float) -> float:
    """Seconds until the peer closed SOCK (EOF or reset); fails past LIMIT."""
    sock.settimeout(limit)
    started = time.monotonic()
    try:
        while sock.recv(4096):
            pass
    except (ConnectionResetError, ssl.SSLError):
        pass
    except TimeoutError:
        pytest.fail(f"server kept the connection open for more than {limit} s")
    return time.monotonic() - started


def test_silent_connection_is_dropped_before_the_handshake(
    impatient: tuple[KeyServer, HostCreds],
) -> None:
    server, _ = impatient
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        elapsed = closed_within(sock, IO_TIMEOUT + 4)
    assert elapsed >= IO_TIMEOUT * 0.8

    def audited() -> bool:
        return any(r["event"] == "tls_handshake_failed" for r in server.audit_records())

    wait_for(audited, timeout=5)  # written right after the socket is closed


def test_stalled_request_is_dropped_and_others_are_served_meanwhile(
    impatient: tuple[KeyServer, HostCreds],
) -> None:
    server, host = impatient
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.load_cert_chain(str(host.cert), str(host.key))
    with (
        socket.create_connection(("127.0.0.1", server.port), timeout=10) as raw,
        context.wrap_socket(raw) as tls,
    ):
        tls.sendall(b"GET /v1/hosts/")  # and then nothing more
        # While this client stalls one worker, another host is served.
        with server.session(host) as session:
            answer = release(session, server, host, "1", "2")
        assert answer.status_code == 403  # no such key, but an answer
        elapsed = closed_within(tls, IO_TIMEOUT + 4)
    assert elapsed < IO_TIMEOUT + 4
