"""The strict HTTP/1.1 reader (server/http1.py), in-process over a scripted connection.

The worker hands http1.serve_one a TLS socket; here a fake connection hands out
exactly the bytes a test scripts, in chunks as small as one byte, so that every
split of a request and every refusal can be checked without a server. The
contract is docs/protocol.md, "Responses from the HTTP layer". The same refusals
over real mutual TLS are in test_input.py; the few here that use a running server
show what only it can: an answer at once rather than after the I/O timeout, and a
request the application would have served.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from tests.keyserver import KeyServer
from tests.server.test_input import send
from zfs_unlock_server import http1
from zfs_unlock_server.http1 import RequestError

# What the worker adds to every environ (serve.py); it must reach the application.
BASE = {"REMOTE_ADDR": "192.0.2.7"}

# The largest head the reader must accept: the longest request line, then the most
# and longest header fields, then the blank line.
LARGEST_HEAD = (
    http1.MAX_REQUEST_LINE + 2 + http1.MAX_HEADER_FIELDS * (http1.MAX_HEADER_FIELD + 2) + 2
)


class ScriptedConnection:
    """recv() hands out CHUNKS in order, never more than asked for; after the last
    one it raises END, or returns b"" (the client closed) when END is None."""

    # An endless client is cut off here, so that a reader that never stops fails
    # the test instead of hanging it.
    GIVE_UP = 16 * LARGEST_HEAD

    def __init__(self, chunks: Iterable[bytes], end: OSError | None = None) -> None:
        self._chunks: Iterator[bytes] = iter(chunks)
        self._pending = b""
        self._end = end
        self.handed_out = 0
        self.sent = bytearray()

    def recv(self, size: int) -> bytes:
        if self.handed_out > self.GIVE_UP:
            raise AssertionError(f"the reader took {self.handed_out} bytes and kept reading")
        if not self._pending:
            self._pending = next(self._chunks, b"")
        if not self._pending:
            if self._end is not None:
                raise self._end
            return b""
        piece, self._pending = self._pending[:size], self._pending[size:]
        self.handed_out += len(piece)
        return piece

    def sendall(self, data: bytes) -> None:
        self.sent += data


@dataclass
class RecordingApp:
    """A WSGI application that remembers what it was given.

    It reads READ bytes of the body (None: as many as Content-Length says) and
    answers STATUS with BODY.
    """

    read: int | None = None
    status: str = "200 OK"
    body: bytes = b'{"ok":true}'
    environ: dict[str, Any] | None = None
    received: bytes | None = None
    read_error: OSError | None = None

    def __call__(self, environ: dict[str, Any], start_response: http1.StartResponse) -> list[bytes]:
        self.environ = dict(environ)
        size = self.read if self.read is not None else int(environ.get("CONTENT_LENGTH") or 0)
        try:
            self.received = environ["wsgi.input"].read(size)
        except OSError as exc:
            self.read_error = exc
        start_response(
            self.status,
            [("Content-Type", "application/json"), ("Content-Length", str(len(self.body)))],
        )
        return [self.body]


def request(
    method: bytes = b"POST",
    target: bytes = b"/v1/checkin",
    fields: Iterable[bytes] = (b"Host: 127.0.0.1",),
    body: bytes = b"",
    version: bytes = b"HTTP/1.1",
) -> bytes:
    """Raw request bytes; FIELDS are whole header lines, written as given."""
    head = b"%s %s %s\r\n" % (method, target, version)
    return head + b"".join(line + b"\r\n" for line in fields) + b"\r\n" + body


def post(body: bytes, *extra: bytes, target: bytes = b"/v1/checkin") -> bytes:
    fields = [
        b"Host: 127.0.0.1",
        b"Content-Type: application/json",
        b"Content-Length: %d" % len(body),
        *extra,
    ]
    return request(b"POST", target, fields, body)


def chunks_of(data: bytes, size: int) -> list[bytes]:
    return [data[i : i + size] for i in range(0, len(data), size)]


def serve(
    data: bytes | list[bytes], app: RecordingApp | None = None, end: OSError | None = None
) -> tuple[bytes, bool, RecordingApp]:
    app = app or RecordingApp()
    connection = ScriptedConnection([data] if isinstance(data, bytes) else data, end)
    response, complete = http1.serve_one(connection, app, BASE)
    assert not connection.sent, "serve_one returns the response; the worker sends it"
    return response, complete, app


def environ_of(data: bytes) -> dict[str, Any]:
    _, _, app = serve(data)
    assert app.environ is not None
    return app.environ


def refusal(data: bytes) -> int:
    """The status serve_one refuses DATA with; the application must not have run."""
    app = RecordingApp()
    with pytest.raises(RequestError) as refused:
        http1.serve_one(ScriptedConnection([data]), app, BASE)
    assert app.environ is None, "the application ran on a refused request"
    return refused.value.status


def worker_answer(data: bytes) -> bytes:
    """What KeyServerWorker.handle sends for DATA (serve.py), minus TLS."""
    try:
        response, _ = http1.serve_one(ScriptedConnection([data]), RecordingApp(), BASE)
    except RequestError as exc:
        response = http1.error_response(exc.status)
    return response


@dataclass
class Response:
    status_line: str
    headers: list[tuple[str, str]]
    body: bytes


def parse_response(raw: bytes) -> Response:
    head, separator, body = raw.partition(b"\r\n\r\n")
    assert separator, raw
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = [(name, value) for name, _, value in (line.partition(": ") for line in lines)]
    return Response(status_line, headers, body)


# A request that is read and run


@pytest.mark.parametrize("chunk", [1, 3, 7, 64, 1 << 20])
def test_a_post_reaches_the_application_whole_however_it_is_split(chunk: int) -> None:
    body = json.dumps({"machine_id": "5eed" * 8, "padding": "p" * 300}).encode()
    data = post(body, b"Accept: application/json")
    response, complete, app = serve(chunks_of(data, chunk))

    assert app.environ is not None
    environ = app.environ
    assert environ["REQUEST_METHOD"] == "POST"
    assert environ["PATH_INFO"] == "/v1/checkin"
    assert environ["QUERY_STRING"] == ""
    assert environ["SERVER_PROTOCOL"] == "HTTP/1.1"
    assert environ["CONTENT_TYPE"] == "application/json"
    assert environ["CONTENT_LENGTH"] == str(len(body))
    assert environ["HTTP_ACCEPT"] == "application/json"
    assert environ["HTTP_HOST"] == "127.0.0.1"
    assert environ["REMOTE_ADDR"] == BASE["REMOTE_ADDR"]
    assert app.received == body
    assert complete

    answer = parse_response(response)
    assert answer.status_line == "HTTP/1.1 200 OK"
    assert ("Content-Length", str(len(app.body))) in answer.headers
    assert answer.body == app.body


def test_the_head_is_read_when_its_blank_line_is_split_between_reads() -> None:
    data = post(b'{"a":1}')
    blank_line = data.index(b"\r\n\r\n")
    for split in range(blank_line, blank_line + 5):
        _, complete, app = serve([data[:split], data[split:]])
        assert app.received == b'{"a":1}', split
        assert complete, split


def test_header_values_lose_surrounding_whitespace_only() -> None:
    environ = environ_of(request(b"GET", b"/", [b"Accept:application/json", b"X-Note: \t a  b \t"]))
    assert environ["HTTP_ACCEPT"] == "application/json"
    assert environ["HTTP_X_NOTE"] == "a  b"


def test_the_query_is_split_off_and_percent_escapes_are_not_decoded() -> None:
    environ = environ_of(request(b"GET", b"/v1/keys%2Frelease?a=%41&b=?"))
    assert environ["PATH_INFO"] == "/v1/keys%2Frelease"
    assert environ["QUERY_STRING"] == "a=%41&b=?"


@pytest.mark.parametrize(
    "target", [b"/v1/checkin?", b"/?", b"/v1/hosts/" + b"5eed" * 8 + b"/keys/1/2?"]
)
def test_an_empty_query_is_refused_with_400(target: bytes) -> None:
    """The application refuses every query, but QUERY_STRING is "" for a bare "?" just as
    for none: only the reader can tell the two apart."""
    assert refusal(request(b"GET", target)) == 400
    assert refusal(post(b"{}", target=target)) == 400


def test_a_real_server_refuses_a_check_in_with_an_empty_query(
    shared_keyserver: KeyServer,
) -> None:
    host = shared_keyserver.add_host("empty-query")
    body = json.dumps({"machine_id": host.machine_id}).encode()
    checkin = post(body, b"Accept: application/json", target=b"/v1/checkin")
    assert send(shared_keyserver, host, checkin).status == 200  # the request is otherwise good

    reply = send(shared_keyserver, host, checkin.replace(b"/v1/checkin ", b"/v1/checkin? ", 1))

    assert reply.status == 400, reply.raw[:200]
    assert json.loads(reply.body) == {"error": "bad_request"}


def test_http_1_0_is_accepted() -> None:
    environ = environ_of(request(b"GET", b"/v1/checkin", version=b"HTTP/1.0"))
    assert environ["SERVER_PROTOCOL"] == "HTTP/1.0"


# The request line


@pytest.mark.parametrize(
    "line",
    [
        b"get /v1/checkin HTTP/1.1",
        b"Get /v1/checkin HTTP/1.1",
        b"GET * HTTP/1.1",
        b"OPTIONS * HTTP/1.1",
        b"GET http://x/ HTTP/1.1",
        b"GET v1/checkin HTTP/1.1",
        "GET /v1/chéckin HTTP/1.1".encode(),
        b"GET /v1/checkin\x00 HTTP/1.1",
        b"GET /v1/a b HTTP/1.1",
        b"GET /v1/a\tb HTTP/1.1",
        b"GET /v1/a\x7f HTTP/1.1",
        b"GET /v1/checkin HTTP/2.0",
        b"GET /v1/checkin HTTP/1.2",
        b"GET /v1/checkin HTTP/1",
        b"GET /v1/checkin http/1.1",
        b"GET /v1/checkin",
        b"GET /v1/checkin ",
        b"GET /v1/checkin HTTP/1.1 ",
        b"GET  /v1/checkin HTTP/1.1",
        b" GET /v1/checkin HTTP/1.1",
        b"GET /v1/checkin\nHTTP/1.1",
        b"",
    ],
)
def test_a_malformed_request_line_is_refused_with_400(line: bytes) -> None:
    assert refusal(line + b"\r\nHost: 127.0.0.1\r\n\r\n") == 400


def request_line_of(length: int) -> bytes:
    prefix, suffix = b"GET /", b" HTTP/1.1"
    line = prefix + b"a" * (length - len(prefix) - len(suffix)) + suffix
    assert len(line) == length
    return line


def test_a_request_line_of_the_limit_is_read() -> None:
    line = request_line_of(http1.MAX_REQUEST_LINE)
    environ = environ_of(line + b"\r\nHost: 127.0.0.1\r\n\r\n")
    assert len(environ["PATH_INFO"]) == http1.MAX_REQUEST_LINE - len(b"GET  HTTP/1.1")


def test_a_request_line_over_the_limit_is_refused_with_414() -> None:
    line = request_line_of(http1.MAX_REQUEST_LINE + 1)
    assert refusal(line + b"\r\nHost: 127.0.0.1\r\n\r\n") == 414


@pytest.mark.parametrize("chunk", [1, 100, 5000])
def test_an_endless_request_line_is_refused_after_the_limit(chunk: int) -> None:
    # No CRLF ever comes: the reader must give up on length alone, not wait for one.
    connection = ScriptedConnection(itertools.chain([b"GET /"], itertools.repeat(b"a" * chunk)))
    with pytest.raises(RequestError) as refused:
        http1.read_head(connection)
    assert refused.value.status == 414
    assert connection.handed_out <= http1.MAX_REQUEST_LINE + 2 + chunk


# Header fields


def fields_request(fields: Iterable[bytes]) -> bytes:
    return request(b"GET", b"/v1/checkin", fields)


def test_the_most_and_longest_header_fields_are_read() -> None:
    longest = b"X-Long: " + b"l" * (http1.MAX_HEADER_FIELD - len(b"X-Long: "))
    fields = [longest, *(b"X-F%d: v" % i for i in range(http1.MAX_HEADER_FIELDS - 1))]
    environ = environ_of(fields_request(fields))
    assert len(environ["HTTP_X_LONG"]) == http1.MAX_HEADER_FIELD - len(b"X-Long: ")
    assert environ[f"HTTP_X_F{http1.MAX_HEADER_FIELDS - 2}"] == "v"


def test_one_header_field_too_many_is_refused_with_431() -> None:
    fields = [b"X-F%d: v" % i for i in range(http1.MAX_HEADER_FIELDS + 1)]
    assert refusal(fields_request(fields)) == 431


def test_a_header_field_over_the_limit_is_refused_with_431() -> None:
    field = b"X-Long: " + b"l" * (http1.MAX_HEADER_FIELD + 1 - len(b"X-Long: "))
    assert refusal(fields_request([field])) == 431


def endless_fields() -> Iterator[bytes]:
    return itertools.repeat(b"X-Filler: " + b"f" * 90 + b"\r\n")


def endless_field() -> Iterator[bytes]:
    return itertools.chain([b"X-Filler: "], itertools.repeat(b"f" * 1000))


@pytest.mark.parametrize("stream", [endless_fields, endless_field])
def test_a_head_without_end_is_refused_with_431_and_reading_stops(
    stream: Callable[[], Iterator[bytes]],
) -> None:
    connection = ScriptedConnection(itertools.chain([b"GET / HTTP/1.1\r\n"], stream()))
    with pytest.raises(RequestError) as refused:
        http1.read_head(connection)
    assert refused.value.status == 431
    # It stopped soon after the largest head it could ever accept.
    assert connection.handed_out < 2 * LARGEST_HEAD


@pytest.mark.parametrize(
    "field",
    [
        pytest.param(b" folded", id="folded-space"),
        pytest.param(b"\tfolded", id="folded-tab"),
        pytest.param(b"X-A: one\ntwo", id="bare-lf"),
        pytest.param(b"X-A: one\rtwo", id="bare-cr"),
        pytest.param(b"X-A: one\r", id="trailing-cr"),
        pytest.param(b"X-A: a\x00b", id="nul"),
        pytest.param(b"X-A: a\x01b", id="soh"),
        pytest.param(b"X-A: a\x1bb", id="escape"),
        pytest.param(b"X-A: a\x7fb", id="del"),
        pytest.param(b"X-A one", id="no-colon"),
        pytest.param(b": value", id="empty-name"),
        pytest.param(b"X-A : one", id="space-before-colon"),
        pytest.param(b"X A: one", id="space-in-name"),
        pytest.param("X-Ä: one".encode("latin-1"), id="non-ascii-name"),
        pytest.param(b"X-A\x00: one", id="nul-in-name"),
    ],
)
def test_a_malformed_header_field_is_refused_with_400(field: bytes) -> None:
    # The folded lines follow a valid field, as a continuation of it would.
    assert refusal(fields_request([b"Host: 127.0.0.1", b"X-Before: one", field])) == 400


@pytest.mark.parametrize(
    "fields",
    [
        pytest.param([b"Content-Length: 2", b"Content-Length: 2"], id="content-length-equal"),
        pytest.param([b"Content-Length: 2", b"Content-Length: 20"], id="content-length-differ"),
        pytest.param([b"Content-Length: 2", b"content-length: 2"], id="content-length-case"),
        pytest.param([b"Content-Type: application/json"] * 2, id="content-type"),
        pytest.param([b"Accept: application/json", b"Accept: text/html"], id="accept"),
        pytest.param([b"Accept: */*", b"ACCEPT: */*"], id="accept-case"),
        pytest.param([b"Transfer-Encoding: chunked"] * 2, id="transfer-encoding"),
        pytest.param([b"X-Note: a", b"X_Note: b"], id="dash-and-underscore"),
    ],
)
def test_a_repeated_header_field_is_refused_with_400(fields: list[bytes]) -> None:
    data = request(b"POST", b"/v1/checkin", [b"Host: 127.0.0.1", *fields], b"{}")
    assert refusal(data) == 400


# Line ends: CRLF only


BARE_LF_REQUESTS = [
    pytest.param(b"GET /v1/checkin HTTP/1.1\nHost: 127.0.0.1\n\n", id="all-lf"),
    pytest.param(b"POST /v1/checkin HTTP/1.1\nContent-Length: 2\n\n{}", id="post-all-lf"),
    pytest.param(b"GET /v1/checkin HTTP/1.1\r\nHost: 127.0.0.1\n\n", id="fields-lf"),
    pytest.param(b"GET /v1/checkin HTTP/1.1\r\nHost: 127.0.0.1\r\n\n", id="blank-line-lf"),
    pytest.param(b"GET /v1/checkin HTTP/1.1\r\nX-A: one\ntwo", id="lf-in-unfinished-head"),
    pytest.param(b"GET /v1/checkin HTTP/1.1\n", id="request-line-only"),
]


@pytest.mark.parametrize("data", BARE_LF_REQUESTS)
@pytest.mark.parametrize("chunk", [1, 7, 1 << 20])
def test_a_bare_lf_in_the_head_is_refused_with_400_without_waiting_for_more(
    data: bytes, chunk: int
) -> None:
    """The client has sent all it will and waits for the answer: a reader that asked for
    more would get nothing until the socket's timeout, then close without one."""
    app = RecordingApp()
    connection = ScriptedConnection(chunks_of(data, chunk), end=TimeoutError("nothing more"))
    with pytest.raises(RequestError) as refused:
        http1.serve_one(connection, app, BASE)
    assert refused.value.status == 400
    assert app.environ is None


def test_a_bare_lf_in_the_body_is_only_data() -> None:
    body = b'{"a":\n1}\n'
    for chunk in (1, 5, 1 << 20):
        _, complete, app = serve(chunks_of(post(body), chunk))
        assert app.received == body, chunk
        assert complete, chunk


def test_a_real_server_answers_bare_lf_requests_with_400_at_once(
    shared_keyserver: KeyServer,
) -> None:
    """Over mutual TLS, against the worker's io_timeout of 10 s."""
    host = shared_keyserver.add_host("bare-lf")
    for data in (
        b"GET /v1/checkin HTTP/1.1\nHost: 127.0.0.1\n\n",
        b"POST /v1/checkin HTTP/1.1\r\nHost: 127.0.0.1\nContent-Length: 2\n\n{}",
    ):
        reply = send(shared_keyserver, host, data)
        assert reply.status == 400, reply.raw[:200]
        assert json.loads(reply.body) == {"error": "bad_request"}
        assert "x-request-id" not in reply.headers  # the HTTP layer answered, not the app
        assert reply.seconds < 3.0


# Framing of the body


@pytest.mark.parametrize(
    "value",
    # The last is a FULLWIDTH DIGIT FIVE: a digit to Unicode, not to HTTP.
    [b"-5", b"+5", b"5x", b"0x5", b"5 5", b"5,5", b"5.0", b"", b"1" * 21, "\uff15".encode()],
)
def test_a_content_length_that_is_not_1_to_20_digits_is_refused_with_400(value: bytes) -> None:
    data = request(b"POST", b"/v1/checkin", [b"Content-Length: " + value], b"12345")
    assert refusal(data) == 400


def test_a_20_digit_content_length_reaches_the_application() -> None:
    # The application answers 413 from the header alone, reading nothing.
    length = b"9" * 20
    app = RecordingApp(read=0, status="413 Payload Too Large")
    data = request(b"POST", b"/v1/enroll", [b"Content-Length: " + length], b"{")
    response, complete, app = serve(data, app)
    assert app.environ is not None
    assert app.environ["CONTENT_LENGTH"] == length.decode()
    assert parse_response(response).status_line == "HTTP/1.1 413 Payload Too Large"
    assert not complete


@pytest.mark.parametrize(
    "fields",
    [
        [b"Content-Length: 5", b"Transfer-Encoding: chunked"],
        [b"Transfer-Encoding: chunked", b"Content-Length: 5"],
        [b"Content-Length: 5", b"Transfer-Encoding: identity"],
    ],
)
def test_content_length_with_transfer_encoding_is_refused_with_400(fields: list[bytes]) -> None:
    assert refusal(request(b"POST", b"/v1/checkin", fields, b"0\r\n\r\n")) == 400


def test_transfer_encoding_alone_reaches_the_application_without_a_length() -> None:
    # Nothing of the chunked body arrives: still not complete, since chunked bodies are
    # never read, so the worker must not assume the connection is drained.
    data = request(b"POST", b"/v1/checkin", [b"Transfer-Encoding: chunked"])
    _, complete, app = serve(data, RecordingApp(read=0, status="411 Length Required"))
    assert app.environ is not None
    assert "CONTENT_LENGTH" not in app.environ
    assert app.environ["HTTP_TRANSFER_ENCODING"] == "chunked"
    assert not complete


# The connection ending or stalling


@pytest.mark.parametrize(
    "sent",
    [b"", b"GET /v1/checkin HTTP/1.1", b"GET /v1/checkin HTTP/1.1\r\nHost: 127.0.0.1\r\n"],
)
def test_a_client_closing_before_the_head_ends_raises_eof(sent: bytes) -> None:
    app = RecordingApp()
    chunks = chunks_of(sent, 5)
    with pytest.raises(EOFError):
        http1.serve_one(ScriptedConnection(chunks), app, BASE)
    assert app.environ is None


def test_a_recv_timeout_mid_head_is_an_oserror() -> None:
    with pytest.raises(OSError):
        http1.serve_one(ScriptedConnection([b"GET /v1/ch"], TimeoutError()), RecordingApp(), BASE)


def test_a_recv_timeout_mid_body_surfaces_from_wsgi_input_read() -> None:
    data = post(b'{"machine_id":"' + b"5" * 100 + b'"}')[:-50]  # the head, part of the body
    _, complete, app = serve(data, end=TimeoutError("timed out"))
    assert isinstance(app.read_error, TimeoutError)
    assert not complete


def test_a_client_closing_mid_body_gives_a_short_read() -> None:
    body = b'{"machine_id":"5eed"}'
    data = post(body)[:-5]
    _, complete, app = serve(chunks_of(data, 9))
    assert app.received == body[:-5]
    assert not complete


# Whether the request was read to its end


@pytest.mark.parametrize(
    ("data", "read", "expected"),
    [
        pytest.param(post(b"0123456789"), None, True, id="body-read"),
        pytest.param(post(b""), None, True, id="empty-body"),
        pytest.param(request(b"GET", b"/v1/checkin"), None, True, id="no-body"),
        pytest.param(post(b"0123456789"), 0, False, id="body-unread"),
        pytest.param(post(b"0123456789"), 4, False, id="body-part-read"),
    ],
)
def test_serve_one_says_whether_the_request_was_read_to_its_end(
    data: bytes, read: int | None, expected: bool
) -> None:
    for chunk in (1, 16, len(data)):
        _, complete, _ = serve(chunks_of(data, chunk), RecordingApp(read=read))
        assert complete is expected, chunk


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(post(b"0123456789") + b"extra", id="bytes-after-body"),
        pytest.param(request(b"GET", b"/v1/checkin") + request(b"GET", b"/"), id="pipelined"),
    ],
)
def test_bytes_read_beyond_the_request_make_it_incomplete(data: bytes) -> None:
    # They arrive with the request in one read, so they sit unread in the buffer:
    # closing at once could make the kernel reset the connection.
    _, complete, _ = serve(data)
    assert not complete


# Responses


def test_a_head_response_has_the_headers_but_no_body() -> None:
    app = RecordingApp(status="405 Method Not Allowed", body=b'{"error":"method_not_allowed"}')
    response, _, _ = serve(request(b"HEAD", b"/v1/checkin"), app)
    answer = parse_response(response)
    assert answer.status_line == "HTTP/1.1 405 Method Not Allowed"
    assert ("Content-Length", str(len(app.body))) in answer.headers
    assert answer.body == b""
    assert response.endswith(b"\r\n\r\n")


def test_every_response_closes_the_connection() -> None:
    responses = [
        serve(post(b"{}"))[0],
        serve(request(b"HEAD", b"/"))[0],
        *(http1.error_response(status) for status in (400, 414, 431, 500)),
    ]
    for response in responses:
        headers = parse_response(response).headers
        assert headers[-1] == ("Connection", "close"), response
        assert [name for name, _ in headers].count("Connection") == 1, response


@pytest.mark.parametrize(
    ("status", "body"),
    [
        (400, b'{"error":"bad_request"}'),
        (414, b'{"error":"bad_request"}'),
        (431, b'{"error":"bad_request"}'),
        (500, b'{"error":"internal"}'),
    ],
)
def test_an_error_response_is_fixed_json_with_a_fixed_header_set(status: int, body: bytes) -> None:
    answer = parse_response(http1.error_response(status))
    assert answer.status_line.startswith(f"HTTP/1.1 {status} ")
    assert answer.headers == [
        ("Cache-Control", "no-store"),
        ("X-Content-Type-Options", "nosniff"),
        ("Content-Type", "application/json"),
        ("Content-Length", str(len(body))),
        ("Connection", "close"),
    ]
    assert answer.body == body


MARKER = b"EchoMe"


@pytest.mark.parametrize(
    ("data", "status"),
    [
        pytest.param(request(b"GET", b"/" + MARKER + b"\x00"), 400, id="request-line"),
        pytest.param(fields_request([b"X-" + MARKER + b": a\x01"]), 400, id="header"),
        pytest.param(request(b"GET", b"/" + MARKER * 200), 414, id="long-line"),
        pytest.param(fields_request([b"X-A: " + MARKER * 700]), 431, id="long-field"),
    ],
)
def test_a_refused_request_gets_the_fixed_answer_and_nothing_of_it_comes_back(
    data: bytes, status: int
) -> None:
    response = worker_answer(data)
    assert response == http1.error_response(status)
    assert MARKER not in response
