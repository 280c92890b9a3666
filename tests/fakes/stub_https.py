"""A small threaded HTTPS server on 127.0.0.1 that answers from a script, for transport tests.

It counts what arrives at each layer, so a test can tell "nobody connected" from
"the TLS handshake completed but no request byte followed" from "one complete
request": `connections` (TCP accepts), `handshakes` (completed TLS handshakes),
`app_bytes` (application-data bytes read after the handshake) and `requests`
(complete HTTP requests, each with its arrival time).

Replies come from a list, used in order with the last one repeated once the list
runs out ("500 forever" is `[Reply(500)]`), or from a function of the request.
Every connection is answered once and then closed (`Connection: close`). With
`trickle`, each reply goes out one byte at a time, that many seconds apart: a peer
that is never silent long enough for a per-read timeout to fire.

Also here: certificates for such servers (a CA and a leaf it signs, or a
self-signed one), each with its public-key pin in the agent's format.
"""

from __future__ import annotations

import contextlib
import datetime
import http
import ipaddress
import json
import socket
import ssl
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from zfs_unlock_common import pinning
from zfs_unlock_server import pki

MAX_HEAD = 64 * 1024
MAX_BODY = 1024 * 1024
IO_TIMEOUT = 10.0


# Certificates


@dataclass(frozen=True)
class TlsFiles:
    """A certificate and its private key on disk, and the agent-style pin of its public key."""

    cert: Path
    key: Path
    pin: str
    cert_obj: x509.Certificate
    key_obj: ec.EllipticCurvePrivateKey


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _write(
    directory: Path, stem: str, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey
) -> TlsFiles:
    directory.mkdir(parents=True, exist_ok=True)
    cert_path, key_path = directory / f"{stem}.crt", directory / f"{stem}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    key_path.chmod(0o600)
    pin = pinning.pin_of_certificate(cert.public_bytes(serialization.Encoding.DER))
    return TlsFiles(cert_path, key_path, pin, cert, key)


def _builder(
    subject: str, issuer: x509.Name, public_key: ec.EllipticCurvePublicKey
) -> x509.CertificateBuilder:
    now = datetime.datetime.now(datetime.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=30))
    )


def _server_extensions(builder: x509.CertificateBuilder) -> x509.CertificateBuilder:
    names: list[x509.GeneralName] = [
        x509.DNSName("localhost"),
        x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
    ]
    return (
        builder.add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
    )


def make_ca(directory: Path, common_name: str = "stub CA") -> TlsFiles:
    """A CA made the way the key server makes its own (zfs_unlock_server.pki)."""
    pair = pki.create_ca(common_name)
    key = serialization.load_pem_private_key(pair.key_pem, password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    return _write(directory, "ca", x509.load_pem_x509_certificate(pair.cert_pem), key)


def issue_server_cert(directory: Path, ca: TlsFiles, stem: str = "leaf") -> TlsFiles:
    """A server certificate for localhost and 127.0.0.1, signed by CA."""
    key = ec.generate_private_key(ec.SECP256R1())
    ca_public = ca.key_obj.public_key()
    cert = (
        _server_extensions(_builder("localhost", ca.cert_obj.subject, key.public_key()))
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_public), critical=False
        )
        .sign(ca.key_obj, hashes.SHA256())
    )
    return _write(directory, stem, cert, key)


def self_signed_cert(directory: Path, stem: str = "self") -> TlsFiles:
    """A self-signed server certificate for localhost and 127.0.0.1."""
    key = ec.generate_private_key(ec.SECP256R1())
    cert = _server_extensions(_builder("localhost", _name("localhost"), key.public_key())).sign(
        key, hashes.SHA256()
    )
    return _write(directory, stem, cert, key)


# The server


@dataclass(frozen=True)
class Reply:
    status: int
    headers: Sequence[tuple[str, str]] = ()
    body: bytes = b""


def json_reply(payload: Any, status: int = 200, content_type: str = "application/json") -> Reply:
    return Reply(status, [("Content-Type", content_type)], json.dumps(payload).encode())


@dataclass(frozen=True)
class Received:
    method: str
    path: str
    headers: dict[str, str]  # names in lower case
    body: bytes
    at: float  # time.monotonic() when the request was complete
    connection: int  # which accepted connection (1-based) carried it


Responder = Callable[[Received], Reply]


@dataclass
class _Counters:
    connections: int = 0
    handshakes: int = 0
    app_bytes: int = 0
    requests: list[Received] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


class StubHTTPS:
    """Serves on 127.0.0.1:PORT (an ephemeral port unless given) until stop()."""

    def __init__(
        self,
        tls: TlsFiles,
        replies: Sequence[Reply] | Responder = (),
        client_ca: Path | None = None,
        port: int = 0,
        trickle: float = 0.0,
    ) -> None:
        self.tls = tls
        self._trickle = trickle
        self._replies = replies if callable(replies) else list(replies)
        self._context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self._context.minimum_version = ssl.TLSVersion.TLSv1_2
        self._context.load_cert_chain(tls.cert, tls.key)
        if client_ca is not None:
            self._context.verify_mode = ssl.CERT_REQUIRED
            self._context.load_verify_locations(cafile=str(client_ca))
        self._lock = threading.Lock()
        self._counters = _Counters()
        self._threads: list[threading.Thread] = []
        self._open: set[socket.socket] = set()
        self._stopping = threading.Event()
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind(("127.0.0.1", port))
        self._listener.listen(64)
        self._listener.settimeout(0.05)
        self.port: int = self._listener.getsockname()[1]
        self._acceptor = threading.Thread(target=self._accept_loop, name="stub-accept", daemon=True)
        self._acceptor.start()

    # What a test reads

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    @property
    def connections(self) -> int:
        with self._lock:
            return self._counters.connections

    @property
    def handshakes(self) -> int:
        with self._lock:
            return self._counters.handshakes

    @property
    def app_bytes(self) -> int:
        with self._lock:
            return self._counters.app_bytes

    @property
    def requests(self) -> list[Received]:
        with self._lock:
            return list(self._counters.requests)

    @property
    def errors(self) -> list[str]:
        with self._lock:
            return list(self._counters.errors)

    def wait_idle(self, timeout: float = 5.0) -> None:
        """Wait until every accepted connection has been handled (the client may have gone)."""
        end = time.monotonic() + timeout
        while True:
            with self._lock:
                busy = [t for t in self._threads if t.is_alive()]
            if not busy:
                return
            if time.monotonic() > end:
                raise TimeoutError(f"{len(busy)} stub connection(s) still open")
            busy[0].join(0.05)

    def stop(self) -> None:
        self._stopping.set()
        self._acceptor.join(5)
        self._listener.close()
        with self._lock:
            open_sockets, threads = list(self._open), list(self._threads)
        for sock in open_sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        for thread in threads:
            thread.join(5)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # Serving

    def _accept_loop(self) -> None:
        number = 0
        while not self._stopping.is_set():
            try:
                conn, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            number += 1
            thread = threading.Thread(
                target=self._serve, args=(conn, number), name=f"stub-conn-{number}", daemon=True
            )
            with self._lock:
                self._counters.connections += 1
                self._open.add(conn)
                self._threads.append(thread)
            thread.start()

    def _serve(self, raw: socket.socket, number: int) -> None:
        try:
            raw.settimeout(IO_TIMEOUT)
            with self._context.wrap_socket(raw, server_side=True) as conn:
                with self._lock:
                    self._counters.handshakes += 1
                request = self._read_request(conn, number)
                if request is None:
                    return
                reply = self._reply_for(request)
                self._send(conn, _encode(reply))
                with contextlib.suppress(OSError):
                    conn.unwrap()
        except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
            with self._lock:
                self._counters.errors.append(f"connection {number}: {exc!r}")
        finally:
            raw.close()
            with self._lock:
                self._open.discard(raw)

    def _send(self, conn: ssl.SSLSocket, data: bytes) -> None:
        if not self._trickle:
            conn.sendall(data)
            return
        for index in range(len(data)):
            if self._stopping.wait(self._trickle):
                return  # stop() need not wait for the rest of a slow reply
            conn.sendall(data[index : index + 1])

    def _recv(self, conn: ssl.SSLSocket) -> bytes:
        try:
            chunk = conn.recv(65536)
        except ssl.SSLZeroReturnError:
            return b""
        with self._lock:
            self._counters.app_bytes += len(chunk)
        return chunk

    def _read_request(self, conn: ssl.SSLSocket, number: int) -> Received | None:
        data = b""
        while b"\r\n\r\n" not in data:
            if len(data) > MAX_HEAD:
                raise ValueError("request head too large")
            chunk = self._recv(conn)
            if not chunk:
                return None  # closed before a complete request head
            data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        method, path, _version = lines[0].split(" ", 2)
        headers: dict[str, str] = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        length = int(headers.get("content-length", "0"))
        if not 0 <= length <= MAX_BODY:
            raise ValueError("bad Content-Length")
        while len(body) < length:
            chunk = self._recv(conn)
            if not chunk:
                return None  # closed before the body was complete
            body += chunk
        request = Received(method, path, headers, body[:length], time.monotonic(), number)
        with self._lock:
            self._counters.requests.append(request)
        return request

    def _reply_for(self, request: Received) -> Reply:
        if callable(self._replies):
            return self._replies(request)
        if not self._replies:
            return Reply(500)
        with self._lock:
            index = min(len(self._counters.requests), len(self._replies)) - 1
        return self._replies[index]


def _encode(reply: Reply) -> bytes:
    try:
        reason = http.HTTPStatus(reply.status).phrase
    except ValueError:
        reason = "Whatever"
    lines = [f"HTTP/1.1 {reply.status} {reason}"]
    lines += [f"{name}: {value}" for name, value in reply.headers]
    lines += [f"Content-Length: {len(reply.body)}", "Connection: close"]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + reply.body
