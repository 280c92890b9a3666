"""The only module that opens connections: one pinned, mutually authenticated TLS
connection per request, with the standard library's ssl and socket alone.

The server's public key must match a configured pin right after the TLS handshake,
before a single request byte is written; a certificate that a system CA signed gains
nothing, and no CA store is ever loaded. The client certificate is always presented.
Nothing comes from the environment (no proxies, no CA bundles), nothing is followed
(a redirect is an answer like any other), and the answer is read strictly and within
bounds: one HTTP/1.x response framed by Content-Length, the connection closed after it.
Every exchange is over by its deadline, whatever the server does: a server that sends a
byte now and then never lets a per-read timeout fire, so each wait is also cut to the
time left.
"""

from __future__ import annotations

import errno
import re
import socket
import ssl
import time
from pathlib import Path
from typing import NamedTuple
from urllib.parse import urlsplit

from zfs_unlock_agent import __version__
from zfs_unlock_common import http1, pinning
from zfs_unlock_common.der import CertificateFormatError

MAX_HEAD_BYTES = 16 * 1024
MAX_HEADER_LINES = 64
MAX_LENGTH_DIGITS = 9  # far more than any answer we accept
_STATUS_LINE = re.compile(rb"HTTP/1\.[01] ([1-5][0-9][0-9])(?: [\x20-\x7e\t]*)?")
# The path of a server URL, written into the request line as it is: RFC 3986 segments.
URL_PATH = re.compile(r"(?:/[A-Za-z0-9._~!$&'()*+,;=:@%-]*)*")


class TransportError(Exception):
    """The exchange failed before a whole answer arrived; worth another try. `reason`
    says what failed and, when the system said why, why: "cannot connect (connection
    refused)". `kind` names the class of failure for `zfs-unlock-agent check`."""

    what = "the connection failed"
    kind = "connection"

    def __init__(self, detail: str = "", kind: str = "") -> None:
        super().__init__(detail)
        self.detail = detail
        if kind:
            self.kind = kind

    @property
    def reason(self) -> str:
        return f"{self.what} ({self.detail})" if self.detail else self.what


class ConnectFailed(TransportError):
    what = "cannot connect"


class TimedOut(TransportError):
    what = "timed out"
    kind = "timeout"


class HandshakeFailed(TransportError):
    what = "TLS handshake failed"
    kind = "tls"


class ConnectionLost(TransportError):
    what = "the connection broke before the whole answer"


class MalformedAnswer(TransportError):
    what = "answer is not well-formed HTTP"
    kind = "http"


class CertificateRefused(TransportError):
    """The server's TLS layer refused this host's client certificate (an alert about it,
    in TLS 1.3 only after the handshake, at the first read)."""

    what = "the server refused this host's client certificate"
    kind = "client-certificate"


class PinMismatch(Exception):
    """The server presented a public key that matches no configured pin."""

    def __init__(self, message: str, presented: str) -> None:
        super().__init__(message)
        self.presented = presented  # the pin of the key it presented, for the admin to compare


class AnswerTooLarge(Exception):
    """The answer announced a body larger than the caller accepts."""


class Response(NamedTuple):
    status: int
    headers: dict[str, str]  # names in lower case
    body: bytearray  # the caller wipes it once parsed: it may hold keys


def check_url(url: str) -> str:
    """The one check of a server URL, made when the configuration is read and again by
    PinnedServer: https://HOST[:PORT][/PATH], no credentials, query or fragment, a path
    written as it goes on the wire. Returns it without a trailing slash."""
    parts = urlsplit(url)
    if parts.scheme != "https" or not parts.hostname:
        raise ValueError("server URL must be https://HOST[:PORT]")
    if not parts.hostname.isascii():
        try:
            parts.hostname.encode("idna")
        except UnicodeError:
            raise ValueError("server URL host is not a valid internationalized name") from None
    if parts.username or parts.password or parts.query or parts.fragment:
        raise ValueError("server URL must not carry credentials, a query or a fragment")
    if not URL_PATH.fullmatch(parts.path):
        raise ValueError("server URL path must be plain segments (percent-encode the rest)")
    parts.port  # noqa: B018 - raises ValueError for a port that is not a number in range
    return url.rstrip("/")


def client_context(client_cert: Path, client_key: Path) -> ssl.SSLContext:
    """TLS 1.2 or newer with this host's certificate; no CA store and no chain or name
    check, because the pin is the whole of the server's verification."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    # No session is ever resumed (one connection per request), so no tickets are wanted.
    context.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_TICKET | ssl.OP_NO_RENEGOTIATION
    # A key protected by a passphrase fails here (an empty one is offered); without the
    # callback OpenSSL would ask on the terminal, and a boot would wait at that prompt.
    context.load_cert_chain(str(client_cert), str(client_key), password=_no_passphrase)
    return context


def _no_passphrase() -> bytes:
    return b""


class PinnedServer:
    """One configured server: https://HOST[:PORT] and the digests its key may match."""

    def __init__(
        self,
        url: str,
        pins: tuple[bytes, ...],
        context: ssl.SSLContext,
        source_address: tuple[str, int] | None = None,
    ) -> None:
        if not pins:
            raise ValueError("at least one pin is required")
        parts = urlsplit(check_url(url))
        self.host = parts.hostname or ""  # check_url refused a URL without one
        # Given bytes, getaddrinfo() and the TLS layer use an ASCII name as it is; given a
        # str, they run it through the idna codec, whose import costs a cold unlock 1.5 ms.
        self.wire_host = self.host.encode("ascii" if self.host.isascii() else "idna")
        self.port = parts.port or 443
        self.authority = parts.netloc  # the Host header; config refused credentials in it
        self.prefix = parts.path  # a server may live below a path
        self.pins = pins
        self.context = context
        self.source_address = source_address

    def request(
        self,
        method: str,
        path: str,
        body: bytes,
        connect_timeout: float,
        read_timeout: float,
        max_body: int,
        deadline: float,
        listen_first: float = 0.0,
    ) -> Response:
        """One exchange on a new connection, over by DEADLINE (a time.monotonic() value)
        or TimedOut. CONNECT_TIMEOUT bounds the TCP connection; READ_TIMEOUT bounds each
        wait for the server after it, the TLS handshake included; no wait outlasts DEADLINE.
        LISTEN_FIRST > 0 waits that long for the server to speak before sending (`check`):
        in TLS 1.3 a server refuses our certificate with an alert after the handshake, and
        a request sent into the connection it then closes can turn that alert into a reset."""
        raw = self._connect(connect_timeout, deadline)
        with raw:
            # Without it, the request waits for the ACK of the handshake's last flight,
            # which the server delays by up to 40 ms when it has nothing to send (no tickets).
            raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            # Connected means the server's kernel has queued us for a worker, and in a reboot
            # storm the handshake waits for that queue. Giving up early would only rejoin it
            # at the back: the storm benchmark served 10,000 hosts 1.2x faster this way.
            # (The ssl module bounds the whole handshake by the socket's timeout.)
            raw.settimeout(_wait(read_timeout, deadline))
            try:
                connection = self.context.wrap_socket(raw, server_hostname=self.wire_host)
            except TimeoutError:
                raise TimedOut() from None
            except ssl.SSLError as exc:
                raise _tls_failure(exc, HandshakeFailed) from None
            except OSError as exc:
                raise ConnectFailed(_os_reason(exc)) from None
            with connection:
                der = connection.getpeercert(binary_form=True)
                if not der or not pinning.matches(der, self.pins):
                    raise PinMismatch(
                        f"server {self.host}:{self.port} presented an unpinned public key",
                        _presented_pin(der),
                    )
                try:
                    if listen_first > 0:
                        _listen(connection, listen_first, deadline)
                    _send_all(
                        connection,
                        self._head(method, path, len(body)) + body,
                        read_timeout,
                        deadline,
                    )
                    return read_response(connection, max_body, read_timeout, deadline)
                except TimeoutError:
                    raise TimedOut() from None
                except ssl.SSLError as exc:
                    raise _tls_failure(exc, ConnectionLost) from None
                except OSError as exc:
                    raise ConnectionLost(_os_reason(exc)) from None

    def _connect(self, connect_timeout: float, deadline: float) -> socket.socket:
        """A TCP connection to the first of the host's addresses that takes one, each try
        bounded by CONNECT_TIMEOUT and all of them by DEADLINE (socket.create_connection
        would give every address the whole timeout)."""
        try:
            addresses = socket.getaddrinfo(self.wire_host, self.port, type=socket.SOCK_STREAM)
        except OSError as exc:
            raise ConnectFailed(f"cannot resolve {self.host}: {_os_reason(exc)}", "dns") from None
        first_error: OSError | None = None
        for family, kind, protocol, _, address in addresses:
            wait = _wait(connect_timeout, deadline)
            sock = socket.socket(family, kind, protocol)
            try:
                sock.settimeout(wait)
                if self.source_address is not None:
                    sock.bind(self.source_address)
                sock.connect(address)
            except OSError as exc:
                sock.close()
                first_error = first_error or exc
                continue
            return sock
        # As create_connection does, the first address's failure names the problem.
        if isinstance(first_error, TimeoutError):
            raise TimedOut()
        code = getattr(first_error, "errno", None) or 0
        raise ConnectFailed(_os_reason(first_error), _CONNECT_KINDS.get(code, ""))

    def _head(self, method: str, path: str, length: int) -> bytes:
        return (
            f"{method} {self.prefix}{path} HTTP/1.1\r\n"
            f"Host: {self.authority}\r\n"
            f"User-Agent: zfs-unlock-agent/{__version__}\r\n"
            "Accept: application/json\r\n"
            "Content-Type: application/json\r\n"
            f"Content-Length: {length}\r\n"
            "Connection: close\r\n\r\n"
        ).encode("ascii")


# How `check` classes a failed connect(), by errno.
_CONNECT_KINDS = {
    errno.ECONNREFUSED: "refused",
    errno.ENETUNREACH: "unreachable",
    errno.EHOSTUNREACH: "unreachable",
    errno.EHOSTDOWN: "unreachable",
}


def _os_reason(exc: OSError | None) -> str:
    """What the system said, in its words and in lower case: "connection refused"."""
    if exc is None or not exc.strerror:
        return ""
    return exc.strerror[:1].lower() + exc.strerror[1:]


def _tls_failure(exc: ssl.SSLError, otherwise: type[TransportError]) -> TransportError:
    """A TLS alert about a certificate is the server refusing ours (the agent checks the
    server's by pin, never by alert); anything else is OTHERWISE, with OpenSSL's reason."""
    reason = str(exc.reason or "")
    if "ALERT" in reason and ("CERTIFICATE" in reason or "UNKNOWN_CA" in reason):
        return CertificateRefused(reason.lower())
    return otherwise(reason.lower())


def _presented_pin(der: bytes | None) -> str:
    try:
        return pinning.pin_of_certificate(der) if der else "none (no certificate)"
    except CertificateFormatError:
        return "none (a certificate that cannot be read)"


def _wait(timeout: float, deadline: float) -> float:
    """TIMEOUT, cut to the time left before DEADLINE; TimedOut when none is left."""
    left = deadline - time.monotonic()
    if left <= 0:
        raise TimedOut()
    return min(timeout, left)


def _listen(connection: socket.socket, wait: float, deadline: float) -> None:
    """Wait up to WAIT for the server to say something before the request: it has nothing
    to say but an alert or a close, which this raises as such; silence is consent."""
    connection.settimeout(_wait(wait, deadline))
    try:
        spoke = connection.recv(1)
    except TimeoutError:
        return
    if not spoke:
        raise ConnectionLost("closed by the server before the request")
    raise MalformedAnswer("the server spoke before the request")


def _send_all(connection: socket.socket, data: bytes, timeout: float, deadline: float) -> None:
    """sendall(), with every wait for room to write bounded by TIMEOUT and by DEADLINE."""
    view, sent = memoryview(data), 0
    while sent < len(data):
        connection.settimeout(_wait(timeout, deadline))
        sent += connection.send(view[sent:])


def _recv(connection: socket.socket, size: int, timeout: float, deadline: float) -> bytes:
    connection.settimeout(_wait(timeout, deadline))
    try:
        return connection.recv(size)
    except TimeoutError:
        raise TimedOut() from None


def read_response(
    connection: socket.socket, max_body: int, read_timeout: float, deadline: float
) -> Response:
    """One HTTP/1.x answer: a status line, at most MAX_HEADER_LINES headers in at most
    MAX_HEAD_BYTES, and a body of exactly Content-Length bytes (required, and at most
    MAX_BODY). A head that breaks the grammar of zfs_unlock_common.http1 (a bare LF, a
    repeated or malformed header, a transfer coding) is a MalformedAnswer, an early end of
    the connection ConnectionLost; what follows the body is ignored. Each wait lasts at
    most READ_TIMEOUT, and none goes past DEADLINE (time.monotonic()): TimedOut."""
    buffered = bytearray()
    scanned = 0
    while (end := _head_end(buffered, scanned)) < 0:
        if len(buffered) > MAX_HEAD_BYTES:
            raise MalformedAnswer()
        scanned = len(buffered)
        chunk = _recv(connection, 16384, read_timeout, deadline)
        if not chunk:
            raise ConnectionLost()
        buffered += chunk
    if end > MAX_HEAD_BYTES:
        raise MalformedAnswer()
    status, headers, size = _parse_head(bytes(buffered[:end]))
    if size > max_body:
        raise AnswerTooLarge()
    body = buffered[end + 4 : end + 4 + size]
    buffered[:] = bytes(len(buffered))  # what we own, we wipe
    while len(body) < size:
        chunk = _recv(connection, min(65536, size - len(body)), read_timeout, deadline)
        if not chunk:
            raise ConnectionLost()
        body += chunk
    return Response(status, headers, body)


def _head_end(buffered: bytearray, scanned: int) -> int:
    try:
        return http1.find_head_end(buffered, scanned)
    except http1.MalformedHead:
        raise MalformedAnswer() from None


def _parse_head(head: bytes) -> tuple[int, dict[str, str], int]:
    """The status, the headers (names in lower case) and the body size of HEAD."""
    status_line, lines = http1.split_head(head)
    status = _STATUS_LINE.fullmatch(status_line)
    if status is None or len(lines) > MAX_HEADER_LINES:
        raise MalformedAnswer()
    try:
        headers = http1.parse_fields(lines)
        size = http1.body_length(
            headers.get("content-length"), headers.get("transfer-encoding"), MAX_LENGTH_DIGITS
        )
    except http1.MalformedHead:
        raise MalformedAnswer() from None
    if size is None:  # Content-Length is required, so a transfer coding is refused even alone
        raise MalformedAnswer()
    return int(status.group(1)), headers, size
