"""HTTP/1.1 for one request per connection, read strictly; the key server's only parser.

Our clients send a request line, a few headers and at most 64 KiB of JSON, then
wait for the answer; the connection closes after it. That is all this accepts:
no keep-alive, no chunked bodies, no continuation lines, no percent-decoding of
the path (no route contains an escape, so an escaped path is simply not found).
Anything else is a RequestError with a 4xx/5xx status and nothing is run.
A general-purpose parser cost about 0.5 ms of CPU per request (benchmarks.md).
The head's grammar is the one the agent reads answers by (zfs_unlock_common.http1);
the request line, the limits and the statuses are this module's own.
"""

from __future__ import annotations

import re
import socket
from collections.abc import Callable, Iterable
from typing import Any, Protocol

from zfs_unlock_common.http1 import (
    HEAD_END,
    MalformedHead,
    body_length,
    find_head_end,
    parse_fields,
    split_head,
)

MAX_REQUEST_LINE = 1024
MAX_HEADER_FIELDS = 32
MAX_HEADER_FIELD = 4096
MAX_LENGTH_DIGITS = 20  # 2**64 and more: the application answers 413 from the header
_MAX_HEAD = MAX_REQUEST_LINE + 2 + MAX_HEADER_FIELDS * (MAX_HEADER_FIELD + 2) + 2

_REQUEST_LINE = re.compile(rb"([A-Z]{1,16}) (/[\x21-\x7e]*) HTTP/1\.([01])")

REASONS = {
    400: "Bad Request",
    414: "URI Too Long",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
}

StartResponse = Callable[[str, list[tuple[str, str]]], Any]
WsgiApp = Callable[[dict[str, Any], StartResponse], Iterable[bytes]]


class Connection(Protocol):
    def recv(self, size: int) -> bytes: ...
    def sendall(self, data: bytes) -> None: ...


class RequestError(Exception):
    """The request is refused before any application code sees it."""

    def __init__(self, status: int) -> None:
        super().__init__(status)
        self.status = status


class Body:
    """wsgi.input: the bytes after the head, then the socket (each recv under its timeout).

    A client that stalls mid-body makes read() raise OSError (TimeoutError).
    """

    def __init__(self, connection: Connection, buffered: bytes) -> None:
        self._connection = connection
        self._buffered = buffered
        self.consumed = 0

    def read(self, size: int) -> bytes:
        data = bytearray(self._buffered[:size])
        self._buffered = self._buffered[size:]
        while len(data) < size:
            chunk = self._connection.recv(min(65536, size - len(data)))
            if not chunk:
                break
            data += chunk
        self.consumed += len(data)
        return bytes(data)

    @property
    def leftover(self) -> int:
        return len(self._buffered)


def read_head(connection: Connection) -> tuple[bytes, bytes]:
    """Receive up to the blank line; return (head, the bytes already read after it)."""
    data = b""
    scanned = 0
    while True:
        try:
            end = find_head_end(data, scanned)
        except MalformedHead:
            raise RequestError(400) from None
        if end >= 0:
            return data[:end], data[end + len(HEAD_END) :]
        if b"\r\n" not in data[: MAX_REQUEST_LINE + 2] and len(data) > MAX_REQUEST_LINE + 1:
            raise RequestError(414)
        if len(data) > _MAX_HEAD:
            raise RequestError(431)
        scanned = len(data)
        chunk = connection.recv(16384)
        if not chunk:
            raise EOFError("the client closed before finishing its request")
        data += chunk


def parse_head(head: bytes) -> dict[str, Any]:
    """The WSGI environ of HEAD (without wsgi.input and the connection's own keys)."""
    request_line, lines = split_head(head)
    if len(request_line) > MAX_REQUEST_LINE:
        raise RequestError(414)
    match = _REQUEST_LINE.fullmatch(request_line)
    if match is None:
        raise RequestError(400)
    method, target, minor = match.groups()
    path, question_mark, query = target.partition(b"?")
    if question_mark and not query:
        # The application refuses any query, but QUERY_STRING is "" for "/x?" as for "/x".
        raise RequestError(400)
    environ: dict[str, Any] = {
        "REQUEST_METHOD": method.decode("ascii"),
        "PATH_INFO": path.decode("ascii"),
        "QUERY_STRING": query.decode("ascii"),
        "SERVER_PROTOCOL": f"HTTP/1.{minor.decode('ascii')}",
    }
    if len(lines) > MAX_HEADER_FIELDS or max(map(len, lines), default=0) > MAX_HEADER_FIELD:
        raise RequestError(431)
    try:
        fields = parse_fields(lines)
    except MalformedHead:  # also a continuation line, a bare CR, a control byte, a repeat
        raise RequestError(400) from None
    for field, value in fields.items():
        name = field.upper().replace("-", "_")
        key = name if name in ("CONTENT_TYPE", "CONTENT_LENGTH") else "HTTP_" + name
        if key in environ:  # X-A and X_A would both be HTTP_X_A: a repeat all the same
            raise RequestError(400)
        environ[key] = value
    try:
        body_length(
            environ.get("CONTENT_LENGTH"), environ.get("HTTP_TRANSFER_ENCODING"), MAX_LENGTH_DIGITS
        )
    except MalformedHead:
        raise RequestError(400) from None
    return environ


def response_head(status: str, headers: Iterable[tuple[str, str]]) -> bytes:
    lines = [f"HTTP/1.1 {status}", *(f"{name}: {value}" for name, value in headers)]
    lines.append("Connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def error_response(status: int) -> bytes:
    """The fixed answer to a request refused here: JSON that echoes nothing."""
    body = b'{"error":"internal"}' if status >= 500 else b'{"error":"bad_request"}'
    head = response_head(
        f"{status} {REASONS[status]}",
        [
            ("Cache-Control", "no-store"),
            ("X-Content-Type-Options", "nosniff"),
            ("Content-Type", "application/json"),
            ("Content-Length", str(len(body))),
        ],
    )
    return head + body


def serve_one(connection: Connection, app: WsgiApp, base: dict[str, Any]) -> tuple[bytes, bool]:
    """Read one request from CONNECTION and run APP on it; return (the response bytes,
    whether the request was read completely). BASE adds to the environ."""
    head, rest = read_head(connection)
    environ = parse_head(head)
    environ.update(base)
    body = Body(connection, rest)
    environ["wsgi.input"] = body
    answer: list[tuple[str, list[tuple[str, str]]]] = []

    def start_response(status: str, headers: list[tuple[str, str]]) -> None:
        answer.append((status, headers))

    chunks = b"".join(app(environ, start_response))
    status, headers = answer[0]
    if environ["REQUEST_METHOD"] == "HEAD":
        chunks = b""
    declared = int(environ.get("CONTENT_LENGTH", "0") or "0")
    complete = (
        body.leftover == 0 and body.consumed >= declared and "HTTP_TRANSFER_ENCODING" not in environ
    )
    return response_head(status, headers) + chunks, complete


def close_after_response(sock: socket.socket, complete: bool, drain_seconds: float) -> None:
    """Close SOCK. When request bytes may still be unread, stop sending first and read
    them away for a moment: closing with unread data makes the kernel send a reset,
    which can destroy the answer before the client reads it."""
    try:
        if not complete:
            sock.shutdown(socket.SHUT_WR)
            sock.settimeout(drain_seconds)
            drained = 0
            while drained < 1 << 20 and (chunk := sock.recv(65536)):
                drained += len(chunk)
    except OSError:
        pass
    finally:
        sock.close()
