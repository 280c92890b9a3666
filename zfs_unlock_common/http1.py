"""HTTP/1.1 message syntax (RFC 9112) as both sides read it: where a head ends, what a
field line is, when a name repeats, and how Content-Length frames a body.

The agent's answer reader (zfs_unlock_agent.transport) and the key server's request
reader (server/http1.py) each add their own start line, limits and answers; what a
well-formed head is, is decided here once. Only re: the agent imports this at boot.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

LINE_END = b"\r\n"
HEAD_END = b"\r\n\r\n"
TOKEN = re.compile(rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
# name ":" OWS value OWS; the value is visible ASCII, space, tab or obs-text: no control
# byte, so no NUL and no bare CR or LF. A line that starts with whitespace (a folded
# continuation) does not match either.
_FIELD_LINE = re.compile(b"(" + TOKEN.pattern + rb"):[ \t]*([\x20-\x7e\t\x80-\xff]*?)[ \t]*")


class MalformedHead(ValueError):
    """The head breaks the grammar. The message is fixed: it never repeats the input."""


def find_head_end(data: bytes | bytearray, scanned: int = 0) -> int:
    """Where the blank line that ends the head starts in DATA, or -1 while it has not all
    arrived; SCANNED bytes were looked at by an earlier call. A bare LF before it is
    MalformedHead at once: a peer that ends lines with LF alone would otherwise be waited
    for, until a timeout, for a CRLF CRLF that never comes."""
    start = max(scanned - len(HEAD_END) + 1, 0)  # the end may straddle the last read
    end = data.find(HEAD_END, start)
    stop = len(data) if end < 0 else end
    # Each LF from START on has its CR when there are as many CRLFs as LFs; the CRLFs are
    # counted from one byte earlier, for a CR that came with the last read.
    if data.count(b"\n", start, stop) != data.count(LINE_END, max(start - 1, 0), stop):
        raise MalformedHead("a line ends with a bare LF")
    return end


def split_head(head: bytes) -> tuple[bytes, list[bytes]]:
    """The start line and the field lines of HEAD (everything before its blank line)."""
    start_line, *field_lines = head.split(LINE_END)
    return start_line, field_lines


def parse_fields(lines: Iterable[bytes]) -> dict[str, str]:
    """The field lines as {name in lower case: value without the whitespace around it}.
    A line that breaks the grammar is MalformedHead, and so is a name given twice, in any
    case: two values could mean two things to two readers."""
    fields: dict[str, str] = {}
    for line in lines:
        match = _FIELD_LINE.fullmatch(line)
        if match is None:
            raise MalformedHead("malformed header field")
        name = match.group(1).decode("ascii").lower()
        if name in fields:
            raise MalformedHead("repeated header field")
        fields[name] = match.group(2).decode("latin-1")
    return fields


def body_length(
    content_length: str | None, transfer_encoding: str | None, max_digits: int
) -> int | None:
    """The body size a head declares: its Content-Length, which must be 1 to MAX_DIGITS
    decimal digits (no sign, no space), or None without one. Content-Length together
    with Transfer-Encoding is MalformedHead: two framings at once are how requests are
    smuggled past one reader to another."""
    if content_length is None:
        return None
    if transfer_encoding is not None:
        raise MalformedHead("Content-Length with Transfer-Encoding")
    # isdigit() alone would take other scripts' digits; isascii() keeps it to 0-9.
    if not (content_length.isascii() and content_length.isdigit()):
        raise MalformedHead("malformed Content-Length")
    if len(content_length) > max_digits:
        raise MalformedHead("malformed Content-Length")
    return int(content_length)
