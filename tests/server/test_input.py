"""Hostile input: every malformed request gets a fixed refusal and changes nothing.

The table is sent over real mutual TLS to a real server on 127.0.0.1, as raw
bytes, so that nothing (requests, urllib3) normalises a path or fixes a header
on the way. Each case names the exact status and the exact JSON body; the
database is hashed around every case and around the whole table.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import socket
import sqlite3
import ssl
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest

from tests.keyserver import HostCreds, KeyServer
from zfs_unlock_common import protocol, validate

MID = "5eed" * 8  # the enrolled host's machine-id
POOL = "1111111111111111111"
DS = "2222222222"  # a dataset GUID with no key: nothing may ever be created for it
U64 = 2**64
IO_TIMEOUT = 1.5  # server.toml io_timeout for this module: a stalled client costs this much
RELEASE_ONE = f"/v1/hosts/{MID}/keys/{POOL}/{DS}"
LEGACY = f"/{MID}/{POOL}"

# Fixed error bodies.
NOT_FOUND = {"error": "not_found"}
METHOD = {"error": "method_not_allowed"}
TOO_LARGE = {"error": "too_large"}
LENGTH = {"error": "length_required", "detail": "Content-Length is required"}
MEDIA = {"error": "unsupported_media_type", "detail": "Content-Type must be application/json"}
NOT_ACCEPTABLE = {"error": "not_acceptable"}
NOT_JSON = {"error": "bad_request", "detail": "body is not valid JSON"}
NOT_OBJECT = {"error": "bad_request", "detail": "body must be a JSON object"}
UNKNOWN = {"error": "bad_request", "detail": "unknown field(s) in body"}
QUERY = {"error": "bad_request", "detail": "query strings are not accepted"}
TRUNCATED = {"error": "bad_request", "detail": "truncated body"}
MACHINE_ID = {"error": "bad_request", "detail": "machine_id must be 32 lowercase hex digits"}
NAME_LENGTH = {"error": "bad_request", "detail": "dataset name must be 1 to 255 characters"}
NAME_START = {
    "error": "bad_request",
    "detail": "dataset name must start with a letter (the pool name)",
}
NAME_RESERVED = {"error": "bad_request", "detail": "dataset name uses a reserved pool name"}
NAME_COMPONENT = {
    "error": "bad_request",
    "detail": "dataset name components must be non-empty and use only "
    "letters, digits, '-', '_', '.', ':' and space",
}
KEYFORMAT = {"error": "bad_request", "detail": "keyformat must be raw, hex or passphrase"}
NOT_BASE64 = {"error": "bad_request", "detail": "key must be base64 of the key bytes"}
PASSPHRASE_NEEDS_KEY = {
    "error": "bad_request",
    "detail": "a passphrase key must be imported (field 'key')",
}
HEX_KEY = {"error": "bad_request", "detail": "hex key must be exactly 64 hexadecimal digits"}
PASSPHRASE_CHARS = {
    "error": "bad_request",
    "detail": "passphrase must not contain newline, carriage return or NUL",
}
KEY_ID = {"error": "bad_request", "detail": "key_id is malformed"}
BATCH_SIZE = {
    "error": "bad_request",
    "detail": f"datasets must be a list of 1 to {protocol.MAX_BATCH}",
}
BATCH_REPEAT = {"error": "bad_request", "detail": "datasets must not repeat"}
DUPLICATE_MEMBER = {"error": "bad_request", "detail": "body repeats a member name"}


def bad(detail: str) -> dict[str, str]:
    return {"error": "bad_request", "detail": detail}


def guid_error(name: str) -> dict[str, str]:
    return bad(f"{name} must be a decimal unsigned 64-bit integer")


def missing(*names: str) -> dict[str, str]:
    return bad(f"missing field(s): {', '.join(names)}")


def raw_key_length(size: int) -> dict[str, str]:
    return bad(f"raw key must be exactly {protocol.RAW_KEY_BYTES} bytes, got {size}")


def passphrase_length(size: int) -> dict[str, str]:
    return bad(f"passphrase must be 8 to 512 bytes, got {size}")


# Raw HTTP/1.1 requests


def http(
    method: str,
    target: bytes | str,
    headers: dict[str, str] | None = None,
    body: bytes = b"",
) -> bytes:
    line = target.encode("utf-8") if isinstance(target, str) else target
    head = b"%s %s HTTP/1.1\r\nHost: 127.0.0.1\r\n" % (method.encode("ascii"), line)
    for name, value in (headers or {}).items():
        head += f"{name}: {value}\r\n".encode("latin-1")
    return head + b"\r\n" + body


def get(target: bytes | str, method: str = "GET") -> bytes:
    return http(method, target)


def post(
    target: str,
    body: bytes,
    content_type: str | None = "application/json",
    length: int | str | None = -1,
    **headers: str,
) -> bytes:
    """A POST; length -1 means the true length, None means no Content-Length at all."""
    fields: dict[str, str] = {}
    if content_type is not None:
        fields["Content-Type"] = content_type
    if length is not None:
        fields["Content-Length"] = str(len(body) if length == -1 else length)
    fields.update({k.replace("_", "-"): v for k, v in headers.items()})
    return http("POST", target, fields, body)


def post_json(target: str, payload: Any) -> bytes:
    return post(target, json.dumps(payload).encode("utf-8"))


def enroll_body(**overrides: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "machine_id": MID,
        "pool_guid": POOL,
        "dataset_guid": DS,
        "dataset": "tank/data",
        "keyformat": "raw",
    }
    body.update(overrides)
    return {k: v for k, v in body.items() if v is not _ABSENT}


def enroll_with(**overrides: Any) -> bytes:
    return post_json(protocol.ROUTE_ENROLL, enroll_body(**overrides))


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def batch(datasets: Any) -> bytes:
    return post_json(protocol.ROUTE_RELEASE_BATCH, {"machine_id": MID, "datasets": datasets})


def item(dataset_guid: str | int = DS, **extra: Any) -> dict[str, Any]:
    return {"pool_guid": POOL, "dataset_guid": dataset_guid, **extra}


def activate_with(key_id: Any) -> bytes:
    return post_json(
        protocol.ROUTE_ACTIVATE,
        {"machine_id": MID, "pool_guid": POOL, "dataset_guid": DS, "key_id": key_id},
    )


_ABSENT = object()


@dataclass(frozen=True)
class Case:
    name: str
    request: bytes
    status: int
    # The exact JSON body; None: the HTTP reader refused the request before our code saw it.
    body: dict[str, str] | None
    allow: str | None = None
    hostile: tuple[bytes, ...] = ()  # must not come back in the reply
    slow: bool = False  # the server has to wait out its io_timeout


CHECKIN_BODY = json.dumps({"machine_id": MID}).encode()

PATH_CASES = [
    # Dot segments, plain and encoded: a server that normalised them would run a
    # successful check-in (and so change last_seen). It must not route them at all.
    Case("dotdot", post("/v1/keys/../checkin", CHECKIN_BODY), 404, NOT_FOUND),
    Case("dotdot-encoded", post("/v1/keys/%2e%2e/checkin", CHECKIN_BODY), 404, NOT_FOUND),
    Case("dotdot-encoded-slash", post("/v1/keys/..%2fcheckin", CHECKIN_BODY), 404, NOT_FOUND),
    Case("dotdot-all-encoded", post("/v1/keys/%2e%2e%2fcheckin", CHECKIN_BODY), 404, NOT_FOUND),
    Case("dot", post("/v1/./checkin", CHECKIN_BODY), 404, NOT_FOUND),
    Case("double-slash-leading", post("//v1/checkin", CHECKIN_BODY), 404, NOT_FOUND),
    Case("double-slash-inner", post("/v1//checkin", CHECKIN_BODY), 404, NOT_FOUND),
    Case("trailing-slash", post("/v1/checkin/", CHECKIN_BODY), 404, NOT_FOUND),
    Case("trailing-dot", post("/v1/checkin.", CHECKIN_BODY), 404, NOT_FOUND),
    Case("semicolon", post("/v1/checkin;x=1", CHECKIN_BODY), 404, NOT_FOUND),
    Case("nul-encoded", post("/v1/checkin%00", CHECKIN_BODY), 404, NOT_FOUND),
    Case(
        "crlf-encoded",
        get("/v1/checkin%0d%0aX-Injected:%20yes"),
        404,
        NOT_FOUND,
        hostile=(b"X-Injected", b"yes"),
    ),
    Case("overlong-utf8-dot", get("/v1/keys/%c0%ae%c0%ae/checkin"), 404, NOT_FOUND),
    Case("utf8-encoded", get("/v1/ch%C3%A9ckin"), 404, NOT_FOUND, hostile=("é".encode(),)),
    Case("query", post("/v1/checkin?machine_id=x", CHECKIN_BODY), 400, QUERY),
    Case("query-on-release", get(RELEASE_ONE + "?x=1"), 400, QUERY),
    Case("unknown-route", get("/v1/admin"), 404, NOT_FOUND),
    Case("root", get("/"), 404, NOT_FOUND),
    Case("etc-passwd", get("/../../../../etc/passwd"), 404, NOT_FOUND, hostile=(b"root:",)),
    Case("dotdot-in-release", get(RELEASE_ONE.replace(f"/{DS}", f"/../{DS}")), 404, NOT_FOUND),
    # Release-one path parameters.
    Case("mid-uppercase", get(RELEASE_ONE.replace(MID, MID.upper())), 404, NOT_FOUND),
    Case("mid-31", get(RELEASE_ONE.replace(MID, MID[:31])), 404, NOT_FOUND),
    Case("mid-33", get(RELEASE_ONE.replace(MID, MID + "5")), 404, NOT_FOUND),
    Case("mid-non-hex", get(RELEASE_ONE.replace(MID, "g" * 32)), 404, NOT_FOUND),
    Case("guid-leading-zero", get(f"/v1/hosts/{MID}/keys/0{POOL}/{DS}"), 400, guid_error("guid")),
    Case("guid-zero", get(f"/v1/hosts/{MID}/keys/0/{DS}"), 400, guid_error("guid")),
    Case("guid-2**64", get(f"/v1/hosts/{MID}/keys/{POOL}/{U64}"), 400, guid_error("guid")),
    Case("guid-21-digits", get(f"/v1/hosts/{MID}/keys/{POOL}/{'9' * 21}"), 404, NOT_FOUND),
    Case("guid-negative", get(f"/v1/hosts/{MID}/keys/-1/{DS}"), 404, NOT_FOUND),
    Case("guid-plus", get(f"/v1/hosts/{MID}/keys/+1/{DS}"), 404, NOT_FOUND),
    Case("guid-non-digit", get(f"/v1/hosts/{MID}/keys/{POOL}/12a"), 404, NOT_FOUND),
    Case("guid-empty", get(f"/v1/hosts/{MID}/keys//{DS}"), 404, NOT_FOUND),
    # The SimpleZFSKeySystem route (enabled for this module).
    Case("legacy-dotdot", get(f"{LEGACY}/.."), 404, NOT_FOUND),
    Case("legacy-dot", get(f"{LEGACY}/."), 404, NOT_FOUND),
    Case("legacy-dotdot-encoded", get(f"{LEGACY}/%2e%2e"), 404, NOT_FOUND),
    Case("legacy-encoded-slash", get(f"{LEGACY}/a%2fb"), 404, NOT_FOUND),
    Case("legacy-name-256", get(f"{LEGACY}/{'n' * 256}"), 404, NOT_FOUND),
    Case("legacy-name-space", get(f"{LEGACY}/a%20b"), 404, NOT_FOUND),
    Case("legacy-guid-zero", get(f"/{MID}/0/name"), 400, guid_error("guid")),
    Case("legacy-guid-leading-zero", get(f"/{MID}/0{POOL}/name"), 400, guid_error("guid")),
    # Refused by the HTTP reader (server/http1.py) before our application runs; the worker
    # still answers with a fixed JSON body (http1.error_response).
    Case("segment-10k", get("/v1/hosts/" + "a" * 10_000), 414, None),
    Case("utf8-raw", get("/v1/chéckin"), 400, None),
    Case("nul-raw", get(b"/v1/checkin\x00"), 400, None),
    Case("asterisk", get("*"), 400, None),
    Case("method-lowercase", get(RELEASE_ONE, method="get"), 400, None),
    Case(
        "content-length-negative",
        post(protocol.ROUTE_CHECKIN, CHECKIN_BODY, length=-5),
        400,
        None,
    ),
]

METHOD_CASES = [
    Case("post-on-release-one", post(RELEASE_ONE, b"{}"), 405, METHOD, allow="GET"),
    Case("delete-on-release-one", get(RELEASE_ONE, "DELETE"), 405, METHOD, allow="GET"),
    Case("put-on-release-one", get(RELEASE_ONE, "PUT"), 405, METHOD, allow="GET"),
    Case("post-on-legacy", post(f"{LEGACY}/name", b"{}"), 405, METHOD, allow="GET"),
    Case("get-on-checkin", get(protocol.ROUTE_CHECKIN), 405, METHOD, allow="POST"),
    Case("get-on-enroll", get(protocol.ROUTE_ENROLL), 405, METHOD, allow="POST"),
    Case(
        "put-on-enroll",
        post(protocol.ROUTE_ENROLL, b"{}").replace(b"POST", b"PUT", 1),
        405,
        METHOD,
        allow="POST",
    ),
    Case("delete-on-activate", get(protocol.ROUTE_ACTIVATE, "DELETE"), 405, METHOD, allow="POST"),
    Case("patch-on-batch", get(protocol.ROUTE_RELEASE_BATCH, "PATCH"), 405, METHOD, allow="POST"),
    Case("options", get(protocol.ROUTE_CHECKIN, "OPTIONS"), 405, METHOD, allow="POST"),
    Case("trace", get(RELEASE_ONE, "TRACE"), 405, METHOD, allow="GET"),
    # HEAD: same status and headers, and (HTTP says) no body.
    Case("head", get(RELEASE_ONE, "HEAD"), 405, {}, allow="GET"),
]

MAX = protocol.MAX_BODY_BYTES
FILLER = b"{" * 1024

FRAMING_CASES = [
    Case("no-content-type", post(protocol.ROUTE_CHECKIN, CHECKIN_BODY, None), 415, MEDIA),
    Case("text-plain", post(protocol.ROUTE_CHECKIN, CHECKIN_BODY, "text/plain"), 415, MEDIA),
    Case(
        "form", post(protocol.ROUTE_ENROLL, b"a=b", "application/x-www-form-urlencoded"), 415, MEDIA
    ),
    Case(
        "json-lookalike",
        post(protocol.ROUTE_CHECKIN, CHECKIN_BODY, "application/jsonx"),
        415,
        MEDIA,
    ),
    Case("no-content-length", post(protocol.ROUTE_CHECKIN, b"", length=None), 411, LENGTH),
    Case(
        "chunked",
        post(
            protocol.ROUTE_CHECKIN,
            b"%x\r\n%s\r\n0\r\n\r\n" % (len(CHECKIN_BODY), CHECKIN_BODY),
            length=None,
            Transfer_Encoding="chunked",
        ),
        411,
        LENGTH,
    ),
    # Over the limit: refused from the header alone (these cases send at most
    # 1 KiB of body; a server that tried to read the rest would stall for its
    # io_timeout and the case would fail on time).
    Case("length-max+1", post(protocol.ROUTE_CHECKIN, FILLER, length=MAX + 1), 413, TOO_LARGE),
    Case("length-huge", post(protocol.ROUTE_ENROLL, FILLER, length=10**12), 413, TOO_LARGE),
    Case("length-2**64", post(protocol.ROUTE_ENROLL, FILLER, length=U64), 413, TOO_LARGE),
    Case(
        "body-max+1",
        post(protocol.ROUTE_CHECKIN, b" " * (MAX + 1)),
        413,
        TOO_LARGE,
    ),
    # Exactly the limit is read and judged on its content.
    Case(
        "body-exactly-max",
        post(protocol.ROUTE_CHECKIN, b'{"machine_id": "x"}'.ljust(MAX)),
        400,
        MACHINE_ID,
    ),
    Case(
        "stalled-body",
        post(protocol.ROUTE_CHECKIN, b"{", length=20),
        400,
        TRUNCATED,
        slow=True,
    ),
    Case(
        "accept-html",
        post(protocol.ROUTE_CHECKIN, CHECKIN_BODY, Accept="text/html"),
        406,
        NOT_ACCEPTABLE,
    ),
]

JSON_CASES = [
    Case("json-broken", post(protocol.ROUTE_CHECKIN, b'{"machine_id": '), 400, NOT_JSON),
    Case("json-empty", post(protocol.ROUTE_CHECKIN, b""), 400, NOT_JSON),
    Case(
        "json-not-utf8",
        post(protocol.ROUTE_CHECKIN, b'{"machine_id": "\xff\xfe"}'),
        400,
        NOT_JSON,
    ),
    Case(
        "json-deeply-nested",
        post(protocol.ROUTE_CHECKIN, b"[" * 50_000),
        400,
        NOT_JSON,
    ),
    Case("json-array", post_json(protocol.ROUTE_CHECKIN, [MID]), 400, NOT_OBJECT),
    Case("json-string", post_json(protocol.ROUTE_CHECKIN, MID), 400, NOT_OBJECT),
    Case("json-null", post_json(protocol.ROUTE_CHECKIN, None), 400, NOT_OBJECT),
    Case("json-number", post_json(protocol.ROUTE_CHECKIN, 1), 400, NOT_OBJECT),
    Case(
        "unknown-field",
        post_json(protocol.ROUTE_CHECKIN, {"machine_id": MID, "EVIL_FIELD": "EVIL_VALUE"}),
        400,
        UNKNOWN,
        hostile=(b"EVIL",),
    ),
    Case("missing-field", post_json(protocol.ROUTE_CHECKIN, {}), 400, missing("machine_id")),
    Case("mid-int", post_json(protocol.ROUTE_CHECKIN, {"machine_id": 5}), 400, MACHINE_ID),
    Case("mid-null", post_json(protocol.ROUTE_CHECKIN, {"machine_id": None}), 400, MACHINE_ID),
    Case("mid-list", post_json(protocol.ROUTE_CHECKIN, {"machine_id": [MID]}), 400, MACHINE_ID),
    Case("mid-bool", post_json(protocol.ROUTE_CHECKIN, {"machine_id": True}), 400, MACHINE_ID),
    Case(
        "mid-nan",
        post(protocol.ROUTE_CHECKIN, b'{"machine_id": NaN}'),
        400,
        MACHINE_ID,
    ),
    Case(
        "mid-uppercase",
        post_json(protocol.ROUTE_CHECKIN, {"machine_id": MID.upper()}),
        400,
        MACHINE_ID,
        hostile=(MID.upper().encode(),),
    ),
    Case("mid-31", post_json(protocol.ROUTE_CHECKIN, {"machine_id": MID[:31]}), 400, MACHINE_ID),
    Case("mid-33", post_json(protocol.ROUTE_CHECKIN, {"machine_id": MID + "5"}), 400, MACHINE_ID),
    Case(
        "mid-newline",
        post_json(protocol.ROUTE_CHECKIN, {"machine_id": MID + "\n"}),
        400,
        MACHINE_ID,
    ),
]


def duplicated(route: str, text: str) -> bytes:
    """A body with a member named twice, exactly as written (json.dumps cannot make one)."""
    return post(route, text.replace("MID", MID).replace("POOL", POOL).replace("DS", DS).encode())


# A member named twice: one parser reads the first, another the last, so the value
# that was checked need not be the value that is used. Refused at any depth.
DUPLICATE_CASES = [
    Case(
        "duplicate-member",
        duplicated(protocol.ROUTE_CHECKIN, '{"machine_id": "EVIL", "machine_id": "MID"}'),
        400,
        DUPLICATE_MEMBER,
        hostile=(b"EVIL",),
    ),
    Case(
        "duplicate-member-same-value",
        duplicated(protocol.ROUTE_CHECKIN, '{"machine_id": "MID", "machine_id": "MID"}'),
        400,
        DUPLICATE_MEMBER,
    ),
    Case(
        "duplicate-member-escaped",
        duplicated(protocol.ROUTE_CHECKIN, '{"machine_id": "MID", "machine\\u005fid": "MID"}'),
        400,
        DUPLICATE_MEMBER,
    ),
    Case(
        "duplicate-member-in-batch-item",
        duplicated(
            protocol.ROUTE_RELEASE_BATCH,
            '{"machine_id": "MID", "datasets": [{"pool_guid": "POOL", "dataset_guid": "9",'
            ' "dataset_guid": "DS"}]}',
        ),
        400,
        DUPLICATE_MEMBER,
    ),
    Case(
        "duplicate-member-deep-in-unknown-field",
        duplicated(protocol.ROUTE_CHECKIN, '{"machine_id": "MID", "x": [[{"a": 1, "a": 2}]]}'),
        400,
        DUPLICATE_MEMBER,
    ),
    Case(
        "duplicate-key-in-enroll",
        duplicated(
            protocol.ROUTE_ENROLL,
            '{"machine_id": "MID", "pool_guid": "POOL", "dataset_guid": "DS",'
            f' "dataset": "tank/data", "keyformat": "raw", "key": "{b64(b"x" * 31)}",'
            f' "key": "{b64(b"y" * 32)}"}}',
        ),
        400,
        DUPLICATE_MEMBER,
    ),
]

ENROLL_CASES = [
    # Dataset names ZFS would refuse (or read as an option).
    Case("name-empty", enroll_with(dataset=""), 400, NAME_LENGTH),
    Case("name-300", enroll_with(dataset="tank/" + "x" * 295), 400, NAME_LENGTH),
    Case("name-int", enroll_with(dataset=7), 400, NAME_LENGTH),
    Case("name-null", enroll_with(dataset=None), 400, NAME_LENGTH),
    Case("name-option", enroll_with(dataset="-o"), 400, NAME_START, hostile=(b"-o",)),
    Case("name-digit-first", enroll_with(dataset="1tank/x"), 400, NAME_START),
    Case("name-leading-slash", enroll_with(dataset="/tank"), 400, NAME_START),
    Case("name-non-ascii-pool", enroll_with(dataset="ëtank/x"), 400, NAME_START),
    Case("name-reserved-pool", enroll_with(dataset="mirror/x"), 400, NAME_RESERVED),
    Case("name-double-slash", enroll_with(dataset="pool//x"), 400, NAME_COMPONENT),
    Case("name-trailing-slash", enroll_with(dataset="tank/"), 400, NAME_COMPONENT),
    Case(
        "name-snapshot",
        enroll_with(dataset="tank/a@snap"),
        400,
        NAME_COMPONENT,
        hostile=(b"@snap",),
    ),
    Case("name-bookmark", enroll_with(dataset="tank/a#mark"), 400, NAME_COMPONENT),
    Case("name-dotdot", enroll_with(dataset="tank/../x"), 400, NAME_COMPONENT),
    Case("name-non-ascii", enroll_with(dataset="tank/dätä"), 400, NAME_COMPONENT),
    Case("name-newline", enroll_with(dataset="tank/x\nrm"), 400, NAME_COMPONENT),
    Case("name-percent", enroll_with(dataset="tank/x%y"), 400, NAME_COMPONENT),
    # GUIDs in bodies.
    Case("pool-zero", enroll_with(pool_guid="0"), 400, guid_error("pool_guid")),
    Case("pool-leading-zero", enroll_with(pool_guid="0" + POOL), 400, guid_error("pool_guid")),
    Case("pool-2**64", enroll_with(pool_guid=str(U64)), 400, guid_error("pool_guid")),
    Case("pool-negative", enroll_with(pool_guid="-1"), 400, guid_error("pool_guid")),
    Case("pool-non-digit", enroll_with(pool_guid="1e3"), 400, guid_error("pool_guid")),
    Case("pool-int", enroll_with(pool_guid=int(POOL)), 400, guid_error("pool_guid")),
    Case("dataset-guid-empty", enroll_with(dataset_guid=""), 400, guid_error("dataset_guid")),
    Case(
        "dataset-guid-fullwidth",
        enroll_with(dataset_guid="\uff11\uff12\uff13"),
        400,
        guid_error("dataset_guid"),
    ),
    # Key formats and imported keys.
    Case("keyformat-unknown", enroll_with(keyformat="aes"), 400, KEYFORMAT),
    Case("keyformat-uppercase", enroll_with(keyformat="RAW"), 400, KEYFORMAT),
    Case("keyformat-missing", enroll_with(keyformat=_ABSENT), 400, missing("keyformat")),
    Case("passphrase-without-key", enroll_with(keyformat="passphrase"), 400, PASSPHRASE_NEEDS_KEY),
    Case("key-not-base64", enroll_with(key="not base64!"), 400, NOT_BASE64),
    Case("key-base64-unpadded", enroll_with(key="AAA"), 400, NOT_BASE64),
    Case("key-non-ascii", enroll_with(key="ÄÄÄÄ"), 400, NOT_BASE64),
    Case("key-int", enroll_with(key=12345), 400, NOT_BASE64),
    Case("key-null", enroll_with(key=None), 400, NOT_BASE64),
    Case("key-too-long-text", enroll_with(key="A" * 1028), 400, NOT_BASE64),
    Case("raw-key-empty", enroll_with(key=""), 400, raw_key_length(0)),
    Case("raw-key-31", enroll_with(key=b64(b"\x01" * 31)), 400, raw_key_length(31)),
    Case("raw-key-33", enroll_with(key=b64(b"\x01" * 33)), 400, raw_key_length(33)),
    Case("hex-key-63", enroll_with(keyformat="hex", key=b64(b"a" * 63)), 400, HEX_KEY),
    Case("hex-key-65", enroll_with(keyformat="hex", key=b64(b"a" * 65)), 400, HEX_KEY),
    Case("hex-key-non-hex", enroll_with(keyformat="hex", key=b64(b"g" * 64)), 400, HEX_KEY),
    Case("hex-key-as-raw", enroll_with(keyformat="hex", key=b64(b"\x01" * 32)), 400, HEX_KEY),
    Case(
        "passphrase-7",
        enroll_with(keyformat="passphrase", key=b64(b"x" * 7)),
        400,
        passphrase_length(7),
    ),
    Case(
        "passphrase-513",
        enroll_with(keyformat="passphrase", key=b64(b"x" * 513)),
        400,
        passphrase_length(513),
    ),
    Case(
        "passphrase-newline",
        enroll_with(keyformat="passphrase", key=b64(b"EVILpass\nword")),
        400,
        PASSPHRASE_CHARS,
        hostile=(b"EVIL",),
    ),
    Case(
        "passphrase-cr",
        enroll_with(keyformat="passphrase", key=b64(b"password\r")),
        400,
        PASSPHRASE_CHARS,
    ),
    Case(
        "passphrase-nul",
        enroll_with(keyformat="passphrase", key=b64(b"pass\0word")),
        400,
        PASSPHRASE_CHARS,
    ),
    Case("enroll-unknown-field", enroll_with(owner="root"), 400, UNKNOWN),
    Case("enroll-mid-uppercase", enroll_with(machine_id=MID.upper()), 400, MACHINE_ID),
]

ACTIVATE_CASES = [
    Case("key-id-short", activate_with("k-" + "a" * 23), 400, KEY_ID),
    Case("key-id-uppercase", activate_with("k-" + "A" * 24), 400, KEY_ID),
    Case("key-id-int", activate_with(7), 400, KEY_ID),
    Case("key-id-traversal", activate_with("../../k-" + "a" * 24), 400, KEY_ID, hostile=(b"../",)),
    Case(
        "activate-missing",
        post_json(protocol.ROUTE_ACTIVATE, {"machine_id": MID}),
        400,
        missing("dataset_guid", "key_id", "pool_guid"),
    ),
]

BATCH_CASES = [
    Case("batch-empty", batch([]), 400, BATCH_SIZE),
    Case(
        "batch-max+1",
        batch([item(str(10_000 + n)) for n in range(protocol.MAX_BATCH + 1)]),
        400,
        BATCH_SIZE,
    ),
    Case("batch-duplicate", batch([item(), item("3"), item()]), 400, BATCH_REPEAT),
    Case(
        "batch-duplicate-with-name",
        batch([item(), item(dataset="tank/data")]),
        400,
        BATCH_REPEAT,
    ),
    Case("batch-not-list", batch("all"), 400, BATCH_SIZE),
    Case("batch-object", batch({"pool_guid": POOL, "dataset_guid": DS}), 400, BATCH_SIZE),
    Case("batch-item-not-object", batch([DS]), 400, NOT_OBJECT),
    Case("batch-item-bad-guid", batch([item("0")]), 400, guid_error("dataset_guid")),
    Case("batch-item-int-guid", batch([item(int(DS))]), 400, guid_error("dataset_guid")),
    Case("batch-item-bad-name", batch([item(dataset="tank/a@b")]), 400, NAME_COMPONENT),
    Case("batch-item-unknown-field", batch([item(key="x")]), 400, UNKNOWN),
    Case("batch-item-missing", batch([{"dataset_guid": DS}]), 400, missing("pool_guid")),
    Case(
        "batch-missing-datasets",
        post_json(protocol.ROUTE_RELEASE_BATCH, {"machine_id": MID}),
        400,
        missing("datasets"),
    ),
]

CASES = (
    PATH_CASES
    + METHOD_CASES
    + FRAMING_CASES
    + JSON_CASES
    + DUPLICATE_CASES
    + ENROLL_CASES
    + ACTIVATE_CASES
    + BATCH_CASES
)


# Talking to the server


@dataclass
class Reply:
    status: int
    headers: dict[str, str]  # lower-case names
    body: bytes
    raw: bytes
    seconds: float
    header_names: list[str] = field(default_factory=list)


def send(server: KeyServer, host: HostCreds, request: bytes, timeout: float = 10.0) -> Reply:
    """Send REQUEST over mutual TLS (trusting only the server's own certificate); read to EOF."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.load_verify_locations(cafile=str(server.data_dir / "server.crt"))
    context.load_cert_chain(str(host.cert), str(host.key))
    with (
        socket.create_connection(("127.0.0.1", server.port), timeout=timeout) as raw,
        context.wrap_socket(raw, server_hostname="127.0.0.1") as tls,
    ):
        started = time.monotonic()  # after the handshake: time the request alone
        tls.sendall(request)
        data = b""
        while chunk := tls.recv(65536):
            data += chunk
    seconds = time.monotonic() - started
    head, separator, body = data.partition(b"\r\n\r\n")
    assert separator, f"no complete HTTP response: {data[:200]!r}"
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    version, status, _ = status_line.split(" ", 2)
    assert version == "HTTP/1.1"
    names = [line.split(":", 1)[0].strip().lower() for line in header_lines]
    headers = {
        line.split(":", 1)[0].strip().lower(): line.split(":", 1)[1].strip()
        for line in header_lines
    }
    return Reply(int(status), headers, body, data, seconds, names)


def database_digest(server: KeyServer) -> str:
    with contextlib.closing(sqlite3.connect(server.data_dir / "keys.db")) as db:
        return hashlib.sha256("\n".join(db.iterdump()).encode()).hexdigest()


@dataclass
class InputServer:
    server: KeyServer
    host: HostCreds
    digest_before_table: str


@pytest.fixture(scope="module")
def input_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[InputServer]:
    server = KeyServer(tmp_path_factory.mktemp("input"))
    # Generous rate limits: this module is about input, test_ratelimit.py about floods.
    server.configure(
        io_timeout=IO_TIMEOUT,
        simplezfs_route=True,
        rate_limits={
            "per_certificate_burst": 10_000,
            "per_certificate_rate": 1_000.0,
            "per_address_burst": 10_000,
            "per_address_rate": 1_000.0,
        },
    )
    host = server.add_host("hostile", machine_id=MID)
    server.start()
    try:
        yield InputServer(server, host, database_digest(server))
    finally:
        server.stop()


def assert_no_internals(reply: Reply, server: KeyServer) -> None:
    for leak in (b"Traceback", b'File "', b".py", b"site-packages", b"zfs_unlock"):
        assert leak not in reply.raw, leak
    assert str(server.root).encode() not in reply.raw


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input_is_refused_and_changes_nothing(input_server: InputServer, case: Case) -> None:
    server, host = input_server.server, input_server.host
    before = database_digest(server)
    reply = send(server, host, case.request)
    assert reply.status == case.status, reply.raw[:400]
    assert 400 <= reply.status < 500
    assert_no_internals(reply, server)
    if case.slow:
        assert reply.seconds >= IO_TIMEOUT * 0.9
    else:
        # Nothing made the server wait for bytes that were never sent.
        assert reply.seconds < IO_TIMEOUT, reply.seconds
    if case.body is None:
        # The HTTP reader refused it: our application never saw the request,
        # but the answer is still our fixed, uncacheable JSON, echoing nothing.
        assert "x-request-id" not in reply.headers
        assert reply.headers["connection"] == "close"
        assert reply.headers["cache-control"] == "no-store"
        assert reply.headers["content-type"] == "application/json"
        assert json.loads(reply.body) == {"error": "bad_request"}
    else:
        assert reply.headers["cache-control"] == "no-store"
        assert reply.headers["x-content-type-options"] == "nosniff"
        assert reply.headers["content-type"] == "application/json"
        assert len(reply.headers["x-request-id"]) == 16
        if case.request.startswith(b"HEAD "):
            assert reply.body == b""
        else:
            assert reply.headers["content-length"] == str(len(reply.body))
            assert json.loads(reply.body) == case.body
        for hostile in case.hostile:
            assert hostile not in reply.raw, hostile
    if case.allow is None:
        assert "allow" not in reply.headers
    else:
        assert reply.headers["allow"] == case.allow
    # A header injected through the path would appear as its own header line.
    assert "x-injected" not in reply.header_names
    assert database_digest(server) == before


def test_the_whole_table_changed_nothing_and_the_server_still_works(
    input_server: InputServer,
) -> None:
    """Runs after the table (file order): nothing changed, and the digest does see changes."""
    server, host = input_server.server, input_server.host
    assert database_digest(server) == input_server.digest_before_table
    # No case reached the catch-all: no 500, no traceback in the server's log.
    log = server.log_path.read_text()
    assert "Traceback" not in log and "internal error" not in log
    # The host is still served: a good enrollment for the very dataset the table
    # kept attacking succeeds, and it does show up in the digest.
    reply = send(server, host, enroll_with())
    assert reply.status == 201, reply.raw[:400]
    assert json.loads(reply.body)["dataset_guid"] == DS
    assert database_digest(server) != input_server.digest_before_table


# The validators themselves, in-process.

VALID_MACHINE_IDS = ["0" * 32, "f" * 32, "0123456789abcdef" * 2]
INVALID_MACHINE_IDS: list[object] = [
    "",
    "F" * 32,
    "0" * 31,
    "0" * 33,
    "g" * 32,
    "0" * 31 + "\n",
    "0" * 32 + "\n",
    " " + "0" * 31,
    "\uff10" * 32,  # fullwidth digits
    0,
    None,
    b"0" * 32,
    ["0" * 32],
]


@pytest.mark.parametrize("value", VALID_MACHINE_IDS)
def test_machine_id_accepts(value: str) -> None:
    assert validate.machine_id(value) == value


@pytest.mark.parametrize("value", INVALID_MACHINE_IDS, ids=repr)
def test_machine_id_refuses(value: object) -> None:
    with pytest.raises(validate.InvalidInput) as refused:
        validate.machine_id(value)
    assert_not_echoed(value, refused.value)


VALID_GUIDS = ["1", "9", "10", "1111111111111111111", str(2**64 - 1), str(2**63)]
INVALID_GUIDS: list[object] = [
    "",
    "0",
    "00",
    "01",
    "0001",
    str(2**64),
    "9" * 20,
    "1" * 21,
    "-1",
    "+1",
    " 1",
    "1 ",
    "1\n",
    "1e3",
    "0x10",
    "1_000",
    "١٢٣",  # Arabic-Indic digits: str.isdigit() says yes, the wire says no
    "\uff11\uff12\uff13",
    1,
    2**63,
    1.0,
    None,
    True,
]


@pytest.mark.parametrize("value", VALID_GUIDS)
def test_guid_accepts(value: str) -> None:
    assert validate.guid(value) == value


@pytest.mark.parametrize("value", INVALID_GUIDS, ids=repr)
def test_guid_refuses(value: object) -> None:
    with pytest.raises(validate.InvalidInput) as refused:
        validate.guid(value, "pool_guid")
    assert str(refused.value) == "pool_guid must be a decimal unsigned 64-bit integer"


VALID_DATASET_NAMES = [
    "tank",
    "tank/data",
    "tank/a/b/c",
    "Tank_2/x-y.z:w",
    "tank/with space",
    "tank/1starts-with-digit",
    "tank/.hidden",
    "tank/a..b",
    "logs/x",  # only "log" itself is reserved, not names that start with it
    "cache/x",
    "t/" + "x" * 253,  # exactly 255
]
INVALID_DATASET_NAMES: list[object] = [
    "",
    "t/" + "x" * 254,  # 256
    "x" * 300,
    "pool//x",
    "tank/",
    "/tank",
    "-o",
    "-otank",
    "1tank",
    "_tank",
    ".tank",
    "ëtank/x",
    "tank/dätä",
    "tank/a@snap",
    "tank@snap",
    "tank/a#bookmark",
    "tank/../x",
    "tank/./x",
    "tank/..",
    "tank/x\n",
    "tank/x\0",
    "tank/x%y",
    "tank/x*",
    "mirror",
    "mirror-0/x",
    "mirrored/x",  # zpool reserves every name that starts with a vdev keyword
    "raidz1/x",
    "draid/x",
    "spare/x",
    "log",
    "log/x",
    "c0t0d0/x",
    None,
    7,
    ["tank"],
]


@pytest.mark.parametrize("value", VALID_DATASET_NAMES)
def test_dataset_name_accepts(value: str) -> None:
    assert validate.dataset_name(value) == value


@pytest.mark.parametrize("value", INVALID_DATASET_NAMES, ids=repr)
def test_dataset_name_refuses(value: object) -> None:
    with pytest.raises(validate.InvalidInput) as refused:
        validate.dataset_name(value)
    assert_not_echoed(value, refused.value)


VALID_LABELS = ["a", "host-1", "web_01.example.com", "A:B", "..x", "x..", "n" * 255]
INVALID_LABELS: list[object] = [
    "",
    ".",
    "..",
    "a/b",
    "../etc",
    "a b",
    "a\n",
    "ä",
    "n" * 256,
    "a@b",
    None,
    1,
]


@pytest.mark.parametrize("value", VALID_LABELS)
def test_label_accepts(value: str) -> None:
    assert validate.label(value) == value


@pytest.mark.parametrize("value", INVALID_LABELS, ids=repr)
def test_label_refuses(value: object) -> None:
    with pytest.raises(validate.InvalidInput) as refused:
        validate.label(value, "host")
    assert str(refused.value).startswith("host must be")
    assert_not_echoed(value, refused.value)


VALID_KEY_IDS = ["k-" + "0" * 24, "k-0123456789abcdef01234567"]
INVALID_KEY_IDS: list[object] = [
    "",
    "k-",
    "k-" + "0" * 23,
    "k-" + "0" * 25,
    "K-" + "0" * 24,
    "k-" + "A" * 24,
    "k_" + "0" * 24,
    "x-" + "0" * 24,
    "k-" + "0" * 24 + "\n",
    "../k-" + "0" * 24,
    None,
    24,
]


@pytest.mark.parametrize("value", VALID_KEY_IDS)
def test_key_id_accepts(value: str) -> None:
    assert validate.key_id(value) == value


@pytest.mark.parametrize("value", INVALID_KEY_IDS, ids=repr)
def test_key_id_refuses(value: object) -> None:
    with pytest.raises(validate.InvalidInput) as refused:
        validate.key_id(value)
    assert str(refused.value) == "key_id is malformed"


def assert_not_echoed(value: object, error: Exception) -> None:
    if isinstance(value, str) and len(value) >= 3:
        assert value not in str(error)


RAW_WITH_NEWLINES = b"\n" * 8 + bytes(range(24))  # 32 bytes, 0x0a bytes included

VALID_KEYS = [
    ("raw", b"\x00" * 32),
    ("raw", RAW_WITH_NEWLINES),
    ("raw", bytes(range(0x0A, 0x0A + 32))),
    ("raw", b"\r\n" * 16),
    ("hex", b"0123456789abcdef" * 4),
    ("hex", b"0123456789ABCDEF" * 4),
    ("passphrase", b"x" * 8),
    ("passphrase", b"x" * 512),
    ("passphrase", "correct horse ünicode".encode()),
    ("passphrase", b"with\ttab and spaces "),
]
INVALID_KEYS = [
    ("raw", b""),
    ("raw", b"\x00" * 31),
    ("raw", b"\x00" * 33),
    ("raw", b"0" * 64),  # a hex key is not a raw key
    ("hex", b"0" * 63),
    ("hex", b"0" * 65),
    ("hex", b"g" * 64),
    ("hex", b"0" * 62 + b"\r\n"),
    ("hex", b" " + b"0" * 63),
    ("hex", b"\x01" * 32),
    ("passphrase", b""),
    ("passphrase", b"x" * 7),
    ("passphrase", b"x" * 513),
    ("passphrase", b"password\n"),
    ("passphrase", b"pass\nword"),
    ("passphrase", b"password\r"),
    ("passphrase", b"pass\0word"),
    ("aes-256", b"\x00" * 32),
    ("", b"\x00" * 32),
    ("RAW", b"\x00" * 32),
]


@pytest.mark.parametrize(("keyformat", "material"), VALID_KEYS)
def test_key_material_accepts(keyformat: str, material: bytes) -> None:
    protocol.check_key_material(material, keyformat)
    protocol.check_key_material(bytearray(material), keyformat)


def test_raw_key_with_newline_bytes_is_valid() -> None:
    """zfs reads a raw key as 32 bytes, not as a line: 0x0a is just a byte."""
    assert len(RAW_WITH_NEWLINES) == 32 and b"\n" in RAW_WITH_NEWLINES
    protocol.check_key_material(RAW_WITH_NEWLINES, "raw")
    # The same bytes as a passphrase would be cut at the newline by zfs.
    with pytest.raises(protocol.KeyMaterialError):
        protocol.check_key_material(RAW_WITH_NEWLINES, "passphrase")


@pytest.mark.parametrize(("keyformat", "material"), INVALID_KEYS)
def test_key_material_refuses(keyformat: str, material: bytes) -> None:
    with pytest.raises(protocol.KeyMaterialError) as refused:
        protocol.check_key_material(material, keyformat)
    text = material.decode("latin-1")
    if len(text) >= 4 and len(set(text)) > 1:
        assert text not in str(refused.value)
