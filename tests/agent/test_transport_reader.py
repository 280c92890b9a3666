"""zfs_unlock_agent.transport on its own: the answer is read strictly and within bounds,
and the request goes where the URL says, with nothing sent before the pin matched. (The
whole conversation through the command line is in test_transport.py.)"""

from __future__ import annotations

import contextlib
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import NoReturn, TypeVar

import pytest

from tests.fakes.stub_https import (
    Reply,
    StubHTTPS,
    TlsFiles,
    json_reply,
    make_ca,
    self_signed_cert,
)
from tests.keyserver import HostCreds, KeyServer
from zfs_unlock_agent import transport
from zfs_unlock_common import pinning

MAX_BODY = 1024
T = TypeVar("T")


def soon(seconds: float = 30.0) -> float:
    """A deadline for transport calls, SECONDS from now."""
    return time.monotonic() + seconds


def answer(*chunks: bytes) -> transport.Response:
    """read_response over a socket pair whose far end sends CHUNKS, then closes."""
    ours, theirs = socket.socketpair()
    with ours, theirs:

        def send() -> None:
            for chunk in chunks:
                theirs.sendall(chunk)
            theirs.shutdown(socket.SHUT_WR)

        sender = threading.Thread(target=send)
        sender.start()
        try:
            return transport.read_response(ours, MAX_BODY, 5.0, soon())
        finally:
            sender.join()


def test_a_well_formed_answer() -> None:
    response = answer(
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n", b"Content-Length: 2\r\n\r\n{}"
    )
    assert (response.status, response.body) == (200, bytearray(b"{}"))
    assert response.headers == {"content-type": "application/json", "content-length": "2"}


def test_head_and_body_in_small_pieces_and_bytes_after_the_body_ignored() -> None:
    whole = b"HTTP/1.0 404 Not Found\r\nContent-Length: 5\r\n\r\nhello, and more"
    response = answer(*(whole[i : i + 3] for i in range(0, len(whole), 3)))
    assert (response.status, bytes(response.body)) == (404, b"hello")


@pytest.mark.parametrize(
    "head",
    [
        b"HTTP/1.1 200 OK\r\n",  # no Content-Length
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 0\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nContent-Length: 0\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 1e3\r\n",
        b"HTTP/2 200\r\nContent-Length: 0\r\n",
        b"HTTP/1.1 2000 OK\r\nContent-Length: 0\r\n",
        b"ICY 200 OK\r\nContent-Length: 0\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length 0\r\n",
        b"HTTP/1.1 200 OK\r\nBad Name: x\r\nContent-Length: 0\r\n",
        b"HTTP/1.1 200 OK\r\n" + b"X-A: b\r\n" * 65 + b"Content-Length: 0\r\n",
        b"HTTP/1.1 200 OK\r\nX-Big: " + b"a" * (17 * 1024) + b"\r\nContent-Length: 0\r\n",
        b"HTTP/1.1 200 OK\nContent-Length: 0\n",
        b"HTTP/1.1 200 OK\r\nX-A: a\nb\r\nContent-Length: 0\r\n",
        b"HTTP/1.1 200 OK\r\nX-A: a\x01b\r\nContent-Length: 0\r\n",
        b"HTTP/1.1 200 OK\r\nX-A: a\rb\r\nContent-Length: 0\r\n",
        b"HTTP/1.1 200 OK\r\nX-A: a\r\n b\r\nContent-Length: 0\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\ncontent-length: 0\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: \xef\xbc\x95\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n",
    ],
    ids=[
        "no-length",
        "chunked",
        "repeated-header",
        "negative-length",
        "odd-length",
        "http-2",
        "status-4-digits",
        "not-http",
        "no-colon",
        "space-in-name",
        "too-many-headers",
        "head-too-large",
        "bare-lf-line-ends",
        "bare-lf-in-value",
        "control-byte-in-value",
        "bare-cr-in-value",
        "folded-header",
        "repeated-in-another-case",
        "fullwidth-digit-length",
        "chunked-alone",
    ],
)
def test_a_malformed_head_is_refused(head: bytes) -> None:
    with pytest.raises(transport.MalformedAnswer):
        answer(head + b"\r\n")


def test_a_head_with_bare_lf_line_ends_is_refused_without_waiting_for_more() -> None:
    """The server keeps the connection open: waiting for a CRLF CRLF that never comes would
    last until the read timeout."""
    ours, theirs = socket.socketpair()
    with ours, theirs:
        theirs.sendall(b"HTTP/1.1 200 OK\nContent-Length: 2\n\n{}")
        started = time.monotonic()
        with pytest.raises(transport.MalformedAnswer):
            transport.read_response(ours, MAX_BODY, 5.0, soon())
    assert time.monotonic() - started < 1.0


def test_header_values_lose_the_whitespace_around_them_and_keep_obs_text() -> None:
    response = answer(b"HTTP/1.1 200 OK\r\nX-Note: \t a\xe9 b \t\r\nContent-Length:0\r\n\r\n")
    assert response.headers == {"x-note": "a\xe9 b", "content-length": "0"}


def test_a_body_larger_than_the_bound_is_refused_unread() -> None:
    with pytest.raises(transport.AnswerTooLarge):
        answer(f"HTTP/1.1 200 OK\r\nContent-Length: {MAX_BODY + 1}\r\n\r\n".encode())


@pytest.mark.parametrize(
    "cut", [b"HTTP/1.1 200 OK\r\nContent-Le", b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\n{}"]
)
def test_an_answer_cut_short_is_a_lost_connection(cut: bytes) -> None:
    with pytest.raises(transport.ConnectionLost):
        answer(cut)


# Against a TLS stub that demands a client certificate from the key server's CA


@pytest.fixture
def me(shared_keyserver: KeyServer, request: pytest.FixtureRequest) -> HostCreds:
    return shared_keyserver.add_host(f"rd-{request.node.name[5:20]}")


@pytest.fixture
def stub_tls(tmp_path: Path) -> TlsFiles:
    return self_signed_cert(tmp_path / "server", "stub")


@pytest.fixture
def stub(shared_keyserver: KeyServer, stub_tls: TlsFiles) -> Iterator[StubHTTPS]:
    client_ca = shared_keyserver.data_dir / "ca.crt"
    with StubHTTPS(stub_tls, [json_reply({"ok": True})], client_ca=client_ca) as server:
        yield server


def server_for(url: str, pin: str, me: HostCreds) -> transport.PinnedServer:
    context = transport.client_context(me.cert, me.key)
    return transport.PinnedServer(url, (pinning.parse_pin(pin),), context)


def test_the_request_goes_below_the_urls_path_with_a_client_certificate(
    stub: StubHTTPS, stub_tls: TlsFiles, me: HostCreds
) -> None:
    server = server_for(stub.url + "/zfs/", stub_tls.pin, me)
    response = server.request("POST", "/v1/keys/release", b"{}", 5, 5, MAX_BODY, soon())
    assert response.status == 200
    [request] = stub.requests
    assert (request.method, request.path, request.body) == ("POST", "/zfs/v1/keys/release", b"{}")
    assert request.headers["connection"] == "close"
    assert request.headers["content-type"] == "application/json"


def test_an_unpinned_server_gets_no_request_byte(
    stub: StubHTTPS, stub_tls: TlsFiles, shared_keyserver: KeyServer, me: HostCreds
) -> None:
    server = server_for(stub.url, shared_keyserver.pin, me)  # the key server's pin, not the stub's
    with pytest.raises(transport.PinMismatch) as mismatch:
        server.request("POST", "/v1/keys/release", b"{}", 5, 5, MAX_BODY, soon())
    stub.wait_idle()
    assert stub.handshakes == 1 and stub.requests == [] and stub.app_bytes == 0
    assert mismatch.value.presented == stub_tls.pin  # what the admin compares with the config


def test_a_server_that_trusts_another_ca_refuses_the_connection(
    tmp_path: Path, stub_tls: TlsFiles, me: HostCreds
) -> None:
    other_ca = make_ca(tmp_path / "other-ca")
    with StubHTTPS(stub_tls, [Reply(200)], client_ca=other_ca.cert) as stub:
        server = server_for(stub.url, stub_tls.pin, me)
        # TLS 1.3: the server checks the client's certificate after the client's side of the
        # handshake is done, so the refusal arrives as the answer is read, or, when the
        # request went out after the server closed, as a reset that swallowed the alert.
        with pytest.raises((transport.CertificateRefused, transport.ConnectionLost)):
            server.request("POST", "/v1/keys/release", b"{}", 5, 5, MAX_BODY, soon())
        # Listening first (as `check` does) always hears the alert, and names it.
        with pytest.raises(transport.CertificateRefused) as refused:
            server.request("POST", "/v1/keys/release", b"{}", 5, 5, MAX_BODY, soon(), 2.0)
        assert stub.requests == []
        assert refused.value.kind == "client-certificate"
        assert "refused this host's client certificate (" in refused.value.reason


def test_nothing_listening_is_cannot_connect(stub_tls: TlsFiles, me: HostCreds) -> None:
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        port = unused.getsockname()[1]
    server = server_for(f"https://127.0.0.1:{port}", stub_tls.pin, me)
    with pytest.raises(transport.ConnectFailed) as failed:
        server.request("POST", "/", b"{}", 5, 5, MAX_BODY, soon())
    assert (failed.value.kind, failed.value.reason) == (
        "refused",
        "cannot connect (connection refused)",
    )


def test_a_name_that_does_not_resolve_says_so(
    stub_tls: TlsFiles, me: HostCreds, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The resolver's answer is made up: a real lookup could leave the machine.
    def no_such_name(*args: object, **kwargs: object) -> NoReturn:
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", no_such_name)
    server = server_for("https://keys.example.net:8443", stub_tls.pin, me)
    with pytest.raises(transport.ConnectFailed) as failed:
        server.request("POST", "/", b"{}", 5, 5, MAX_BODY, soon())
    assert failed.value.kind == "dns"
    assert failed.value.reason == (
        "cannot connect (cannot resolve keys.example.net: name or service not known)"
    )


def test_the_request_is_not_held_back_by_nagle(
    stub: StubHTTPS, stub_tls: TlsFiles, me: HostCreds, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The request follows the handshake's last flight at once; with Nagle it would wait for
    that flight's ACK, which a server with nothing to send delays by up to 40 ms."""
    server = server_for(stub.url, stub_tls.pin, me)
    seen = at_handshake(
        server, monkeypatch, lambda sock: sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
    )
    assert server.request("POST", "/v1/keys/release", b"{}", 5, 5, MAX_BODY, soon()).status == 200
    assert seen == [1]


def test_the_handshake_waits_under_the_read_timeout(
    stub: StubHTTPS, stub_tls: TlsFiles, me: HostCreds, monkeypatch: pytest.MonkeyPatch
) -> None:
    server = server_for(stub.url, stub_tls.pin, me)
    timeouts = at_handshake(server, monkeypatch, lambda sock: sock.gettimeout())
    assert server.request("POST", "/", b"{}", 0.5, 7.0, MAX_BODY, soon()).status == 200
    assert timeouts == [7.0]


def test_a_connection_queued_past_the_connect_timeout_is_still_served(
    stub_tls: TlsFiles, me: HostCreds
) -> None:
    """A busy server (a reboot storm) accepts late: the kernel has completed the TCP
    connection, and the handshake waits its turn instead of giving up after connect_timeout."""
    tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    tls.load_cert_chain(stub_tls.cert, stub_tls.key)
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)

        def serve_late() -> None:
            time.sleep(0.8)  # four connect timeouts
            conn, _ = listener.accept()
            with tls.wrap_socket(conn, server_side=True) as secure:
                secure.recv(4096)
                secure.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}")

        late = threading.Thread(target=serve_late)
        late.start()
        try:
            server = server_for(f"https://127.0.0.1:{listener.getsockname()[1]}", stub_tls.pin, me)
            response = server.request("POST", "/", b"{}", 0.2, 5.0, MAX_BODY, soon())
        finally:
            late.join()
    assert (response.status, bytes(response.body)) == (200, b"{}")


@contextlib.contextmanager
def silent_listener() -> Iterator[str]:
    """The URL of a socket whose TCP handshakes the kernel completes, but that nobody
    ever accepts: a TLS handshake with it never starts."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        yield f"https://127.0.0.1:{silent.getsockname()[1]}"


def test_a_server_that_never_handshakes_times_out_after_the_read_timeout(
    stub_tls: TlsFiles, me: HostCreds
) -> None:
    with silent_listener() as url:
        server = server_for(url, stub_tls.pin, me)
        started = time.monotonic()
        with pytest.raises(transport.TimedOut):
            server.request("POST", "/", b"{}", 0.1, 0.6, MAX_BODY, soon())
        # A socket timeout never fires early; the connect timeout alone would be 0.1 s.
        assert time.monotonic() - started >= 0.6


# The deadline: every wait is cut to the time left, whatever the server does


def test_a_trickling_answer_is_cut_off_at_the_deadline_not_the_read_timeout(
    stub_tls: TlsFiles, me: HostCreds
) -> None:
    """One byte every 0.25 s: no single wait reaches the 3 s read timeout, and the whole
    answer (head and body) would take about a minute."""
    slow_answer = json_reply({"padding": "p" * 100})
    with StubHTTPS(stub_tls, [slow_answer], trickle=0.25) as slow:
        server = server_for(slow.url, stub_tls.pin, me)
        started = time.monotonic()
        with pytest.raises(transport.TimedOut):
            server.request("POST", "/", b"{}", 1.0, 3.0, MAX_BODY, started + 1.5)
        elapsed = time.monotonic() - started
        assert slow.requests  # the request went out; the answer was under way
    assert 1.5 <= elapsed < 1.5 + 1.0


def test_a_handshake_that_never_comes_times_out_at_the_deadline(
    stub_tls: TlsFiles, me: HostCreds
) -> None:
    with silent_listener() as url:
        server = server_for(url, stub_tls.pin, me)
        started = time.monotonic()
        with pytest.raises(transport.TimedOut):
            server.request("POST", "/", b"{}", 1.0, 5.0, MAX_BODY, started + 0.8)
    assert time.monotonic() - started < 0.8 + 1.0  # not the 5 s read timeout


def test_a_deaf_server_cannot_hold_the_request_past_the_deadline(
    stub_tls: TlsFiles, me: HostCreds
) -> None:
    """The handshake completes, then the server reads nothing: once the socket buffers are
    full, sending the rest waits for room that never comes."""
    tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    tls.load_cert_chain(stub_tls.cert, stub_tls.key)
    done = threading.Event()
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)

        def handshake_then_nothing() -> None:
            conn, _ = listener.accept()
            with tls.wrap_socket(conn, server_side=True):
                done.wait(30)

        deaf = threading.Thread(target=handshake_then_nothing)
        deaf.start()
        try:
            server = server_for(f"https://127.0.0.1:{listener.getsockname()[1]}", stub_tls.pin, me)
            started = time.monotonic()
            with pytest.raises(transport.TimedOut):
                server.request("POST", "/", bytes(32 << 20), 1.0, 3.0, MAX_BODY, started + 1.0)
            elapsed = time.monotonic() - started
        finally:
            done.set()
            deaf.join()
    assert elapsed < 1.0 + 1.0  # not the 3 s read timeout


def test_read_response_gives_up_at_the_deadline_while_bytes_keep_coming() -> None:
    ours, theirs = socket.socketpair()
    stop = threading.Event()
    with ours, theirs:

        def trickle() -> None:
            for byte in b"HTTP/1.1 200 OK\r\nX-Slow: " + b"s" * 200:
                if stop.wait(0.2):
                    return
                theirs.sendall(bytes([byte]))

        sender = threading.Thread(target=trickle)
        sender.start()
        started = time.monotonic()
        try:
            with pytest.raises(transport.TimedOut):
                transport.read_response(ours, MAX_BODY, 3.0, started + 1.0)
        finally:
            stop.set()
            sender.join()
    assert time.monotonic() - started < 1.0 + 1.0


def at_handshake(
    server: transport.PinnedServer,
    monkeypatch: pytest.MonkeyPatch,
    probe: Callable[[socket.socket], T],
) -> list[T]:
    """What PROBE finds on the plain socket each time SERVER begins a TLS handshake."""
    seen: list[T] = []
    wrap = server.context.wrap_socket

    def recording_wrap(sock: socket.socket, **kwargs: object) -> ssl.SSLSocket:
        seen.append(probe(sock))
        return wrap(sock, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(server, "context", _Wrapping(recording_wrap))
    return seen


class _Wrapping:
    """Stands in for an SSLContext that only needs wrap_socket."""

    def __init__(self, wrap: object) -> None:
        self.wrap_socket = wrap


def test_host_names_go_on_the_wire_in_ascii() -> None:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    pins = (bytes(32),)
    assert (
        transport.PinnedServer("https://keys.example.net", pins, context).wire_host
        == b"keys.example.net"
    )
    assert transport.PinnedServer("https://[::1]:8443", pins, context).wire_host == b"::1"
    # An internationalized name in its ASCII (punycode) form, as DNS knows it.
    idn = transport.PinnedServer("https://b\u00fccher.example", pins, context)
    assert idn.wire_host == b"xn--bcher-kva.example"
