"""The HTTP face of the key server: a WSGI application with a strict route allowlist (ROUTES).

Everything a client sends is checked here before the service sees it: method,
path, query, content type, size, JSON schema. Errors are fixed JSON bodies that
never echo input and never carry a traceback. Every response is uncacheable.
"""

from __future__ import annotations

import base64
import binascii
import functools
import hashlib
import json
import logging
import os
import re
import sqlite3
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, Protocol

from zfs_unlock_common import protocol, validate
from zfs_unlock_common.protocol import DatasetRef
from zfs_unlock_server import database, hostca, masterring, pki, tlspins
from zfs_unlock_server.approvalnotify import Notifier
from zfs_unlock_server.audit import AuditError, AuditSink, SharedSync
from zfs_unlock_server.config import Layout, ServerConfig
from zfs_unlock_server.errors import Conflict, DatabaseUnavailable, DataError, StaleMasterKey
from zfs_unlock_server.ratelimit import BucketPolicy, RateLimiter, retry_after_header
from zfs_unlock_server.sealing import Sealer, load_master_key
from zfs_unlock_server.service import Caller, Denied, KeyService, Released
from zfs_unlock_server.store import KeyRecord

log = logging.getLogger("zfs_unlock_server")

StartResponse = Callable[..., Any]
Environ = dict[str, Any]
# The environ key under which the worker passes the client certificate (DER) it verified.
PEER_CERTIFICATE = "zfs_unlock_server.peer_certificate"
# Where _handle notes the name of the route it chose, for the metrics.
ROUTE_NAME = "zfs_unlock_server.route"

STATUS_TEXT = {
    200: "200 OK",
    201: "201 Created",
    400: "400 Bad Request",
    403: "403 Forbidden",
    404: "404 Not Found",
    405: "405 Method Not Allowed",
    406: "406 Not Acceptable",
    409: "409 Conflict",
    411: "411 Length Required",
    413: "413 Content Too Large",
    415: "415 Unsupported Media Type",
    429: "429 Too Many Requests",
    500: "500 Internal Server Error",
    503: "503 Service Unavailable",
}

ERROR_CODES = {
    400: "bad_request",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    406: "not_acceptable",
    409: "conflict",
    411: "length_required",
    413: "too_large",
    415: "unsupported_media_type",
    429: "rate_limited",
    500: "internal",
    503: "unavailable",
}

BASE_HEADERS = [
    ("Cache-Control", "no-store"),
    ("X-Content-Type-Options", "nosniff"),
]


class HttpError(Exception):
    def __init__(self, status: int, detail: str = "", headers: Iterable[tuple[str, str]] = ()):
        super().__init__(status)
        self.status = status
        self.detail = detail
        self.headers = list(headers)


@dataclass
class Response:
    status: int
    body: bytes
    content_type: str = "application/json"
    headers: list[tuple[str, str]] | None = None


def json_response(status: int, payload: dict[str, Any]) -> Response:
    return Response(status, json.dumps(payload, separators=(",", ":")).encode("ascii"))


def error_response(error: HttpError) -> Response:
    payload = {"error": ERROR_CODES[error.status]}
    if error.detail:
        payload["detail"] = error.detail
    response = json_response(error.status, payload)
    response.headers = error.headers
    return response


def key_json(released: Released) -> dict[str, Any]:
    return {
        **record_json(released.record),
        "key": base64.b64encode(released.material).decode("ascii"),
    }


def record_json(record: KeyRecord) -> dict[str, Any]:
    return {
        "pool_guid": record.pool_guid,
        "dataset_guid": record.dataset_guid,
        "dataset": record.dataset,
        "key_id": record.key_id,
        "keyformat": record.keyformat,
        "state": record.state,
    }


# Request body schemas: field -> validator. Unknown or missing fields are 400.
def _dataset_ref(item: Any) -> DatasetRef:
    body = _fields(item, {"pool_guid", "dataset_guid"}, {"dataset"})
    if "dataset" in body:
        validate.dataset_name(body["dataset"])
    return DatasetRef(
        validate.guid(body["pool_guid"], "pool_guid"),
        validate.guid(body["dataset_guid"], "dataset_guid"),
    )


def _fields(body: Any, required: set[str], optional: set[str] = frozenset()) -> dict[str, Any]:  # type: ignore[assignment]
    if not isinstance(body, dict):
        raise validate.InvalidInput("body must be a JSON object")
    missing = required - body.keys()
    unknown = body.keys() - required - optional
    if missing:
        raise validate.InvalidInput(f"missing field(s): {', '.join(sorted(missing))}")
    if unknown:
        raise validate.InvalidInput("unknown field(s) in body")
    return body


def _keyformat(value: Any) -> str:
    if value not in protocol.KEY_FORMATS:
        raise validate.InvalidInput("keyformat must be raw, hex or passphrase")
    return str(value)


class KeyServerApp:
    """WSGI application. Per-process resources open on first use, after gunicorn forks."""

    def __init__(self, layout: Layout, config: ServerConfig) -> None:
        self.layout = layout
        self.config = config
        self._service: KeyService | None = None
        self._limiter: RateLimiter | None = None
        self._pid = 0
        # The master keys as serve's master process holds them (follow_master_keys), so
        # that a worker forked after a rotation starts with the new key, whatever the
        # credential it was started with says. None: each worker reads its own.
        self.master_keys: Sealer | None = None
        self._next_ring_check = 0.0
        self._audit_sync = SharedSync()  # made before gunicorn forks the workers
        self._served_pin = tlspins.served_pin(layout.server_cert)
        self._next_ca = hostca.next_ca_key_id(layout)
        self.routes = ROUTES + ((SIMPLEZFS_ROUTE,) if config.simplezfs_route else ())
        self.notifier = Notifier(config.approval.notify, config.approval.notify_timeout)
        # Imported only when asked for: serve has set PROMETHEUS_MULTIPROC_DIR by then.
        self.metrics: ModuleType | None = None
        if config.metrics.listen:
            from zfs_unlock_server import metrics  # noqa: PLC0415

            self.metrics = metrics

    # Per-process resources

    def _resources(self) -> tuple[KeyService, RateLimiter]:
        if self._service is None or self._limiter is None or self._pid != os.getpid():
            # A database that cannot be reached raises DatabaseUnavailable here (503), and
            # the next request tries again.
            store = database.open_store(self.layout, self.config)
            audit = database.open_audit(self.layout, self.config, store, self._audit_sync)
            sealer = self.master_keys or load_master_key(self.layout.master_key)
            buckets = database.open_buckets(self.layout, self.config, store)
            if self.metrics is not None:
                audit = self.metrics.CountingAudit(audit)
                store = self.metrics.timed_store(store)
            limits = self.config.rate_limits
            self._limiter = RateLimiter(
                buckets.buckets,
                {
                    "cert": BucketPolicy(limits.per_certificate_burst, limits.per_certificate_rate),
                    "addr": BucketPolicy(limits.per_address_burst, limits.per_address_rate),
                },
                clock=buckets.clock,
            )
            self._service = KeyService(
                store,
                sealer,
                audit,
                self.config.deadman_timeout,
                retired_key_grace=self.config.retired_key_grace_days * 86400,
                max_key_age=self.config.max_key_age_days * 86400,
                served_pin=self._served_pin,
                sign=lambda name, csr: hostca.sign(self.layout, name, csr),
                renewed_certificate_grace=self.config.renewed_certificate_grace_days * 86400,
                next_ca_key_id=self._next_ca,
                max_pending_approvals=self.config.approval.max_pending,
                approval_poll=self.config.approval.poll_seconds,
                notify=self.notifier,
            )
            self._pid = os.getpid()
        return self._service, self._limiter

    def audit_log(self) -> AuditSink:
        return self._resources()[0].audit

    # The master key ring (masterring.py)

    def follow_master_keys(self) -> None:
        """In serve's master process, before each fork: hold what the ring holds now."""
        if self.master_keys is None:
            self.master_keys = load_master_key(self.layout.master_key)
        store = database.open_store(self.layout, self.config)
        try:
            masterring.refresh(self.master_keys, store)
        finally:
            store.close()

    def tick(self) -> None:
        """Between connections, and at least every request_timeout/2 s while idle (serve.py):
        look at the ring every REFRESH_SECONDS, so that an idle worker learns a rotation's
        new key while the ring still holds it."""
        if self._service is not None and self._pid == os.getpid():
            try:
                self.notifier.collect(self._service.audit)
            except AuditError:
                log.exception("cannot audit the notification hook's outcome")
        now = time.monotonic()
        if now < self._next_ring_check:
            return
        self._next_ring_check = now + masterring.REFRESH_SECONDS
        try:
            service = self._resources()[0]
            masterring.refresh(service.sealer, service.store)
        except Exception as exc:  # noqa: BLE001 (the next request meets it, and says so)
            # A database that is down is not asked again every second by every idle worker.
            self._next_ring_check = now + 10 * masterring.REFRESH_SECONDS
            log.debug("could not read the master key ring: %s", exc)

    # WSGI entry point

    def __call__(self, environ: Environ, start_response: StartResponse) -> list[bytes]:
        request_id = os.urandom(8).hex()
        started = time.perf_counter()
        try:
            response = self._handle(environ, request_id)
        except HttpError as error:
            response = error_response(error)
        except AuditError:
            log.exception("audit log unwritable; refusing request %s", request_id)
            response = error_response(HttpError(503, headers=[("Retry-After", "30")]))
        except DatabaseUnavailable as exc:
            log.warning("database unavailable (%s); refusing request %s", exc, request_id)
            response = error_response(HttpError(503, headers=[("Retry-After", "5")]))
        except StaleMasterKey as exc:  # a rotation raced this request, or was missed
            log.warning("%s; refusing request %s", exc, request_id)
            response = error_response(HttpError(503, headers=[("Retry-After", "1")]))
            # Missed: read the master key again at the next request. The data directory's
            # file holds the new key by now; a systemd credential only after a restart.
            self.master_keys = None
            self._service = None
        except sqlite3.OperationalError:  # SQLite's own word for it: locked, or I/O failing
            log.exception("database unavailable; refusing request %s", request_id)
            response = error_response(HttpError(503, headers=[("Retry-After", "5")]))
        except Exception:
            log.exception("internal error in request %s", request_id)
            response = error_response(HttpError(500))
        headers = [
            *BASE_HEADERS,
            ("Content-Type", response.content_type),
            ("Content-Length", str(len(response.body))),
            ("X-Request-Id", request_id),
            *(response.headers or []),
        ]
        start_response(STATUS_TEXT[response.status], headers)
        if self.metrics is not None:
            route = str(environ.get(ROUTE_NAME, "none"))
            self.metrics.observe_request(route, response.status, time.perf_counter() - started)
        return [response.body]

    def _handle(self, environ: Environ, request_id: str) -> Response:
        method = environ.get("REQUEST_METHOD", "")
        path = environ.get("PATH_INFO", "")
        if environ.get("QUERY_STRING"):
            raise HttpError(400, "query strings are not accepted")
        route = self._route(method, path)
        environ[ROUTE_NAME] = getattr(route, "func", route).__name__
        caller = self._caller(environ, request_id)
        service, limiter = self._resources()
        self._rate_limit(service, limiter, caller)
        try:
            return route(service, caller, environ)
        except validate.InvalidInput as exc:
            raise HttpError(400, str(exc)) from None
        except protocol.KeyMaterialError as exc:
            raise HttpError(400, str(exc)) from None
        except Denied:
            raise HttpError(403) from None
        except Conflict:
            raise HttpError(409) from None

    def _route(self, method: str, path: str) -> Callable[[KeyService, Caller, Environ], Response]:
        """The handler of the one route that PATH and METHOD name; 405 (with Allow) for a
        known path asked with another method, 404 for any other path."""
        allowed: list[str] = []
        for route in self.routes:
            match = route.path.fullmatch(path)
            if match is None:
                continue
            if route.method == method:
                return functools.partial(route.handler, match=match)
            allowed.append(route.method)
        if allowed:
            raise HttpError(405, headers=[("Allow", ", ".join(dict.fromkeys(allowed)))])
        raise HttpError(404)

    def _caller(self, environ: Environ, request_id: str) -> Caller:
        der = environ.get(PEER_CERTIFICATE)
        if not isinstance(der, bytes) or not der:
            # Unreachable behind our TLS layer (it requires a certificate); fail closed anyway.
            raise HttpError(403)
        return Caller(
            hashlib.sha256(der).hexdigest(), str(environ.get("REMOTE_ADDR", "")), request_id
        )

    def _rate_limit(self, service: KeyService, limiter: RateLimiter, caller: Caller) -> None:
        wait = service.arrive(caller, limiter.charge_of("cert", caller.fingerprint))
        if not wait and service.known_host(caller) is None:
            wait = limiter.charge("addr", caller.source_ip)
        if wait:
            service.audit.write(
                {
                    "event": "rate_limited",
                    "decision": "deny",
                    "reason": "rate_limited",
                    "cert_fp": caller.fingerprint,
                    "source_ip": caller.source_ip,
                    "request_id": caller.request_id,
                },
                durable=False,  # a flood must not turn into a flood of disk syncs
            )
            raise HttpError(429, headers=[("Retry-After", retry_after_header(wait))])


# Body parsing


def json_body(environ: Environ) -> Any:
    content_type = str(environ.get("CONTENT_TYPE", "")).split(";")[0].strip().lower()
    if content_type != "application/json":
        raise HttpError(415, "Content-Type must be application/json")
    accepted = {
        part.split(";")[0].strip().lower()
        for part in str(environ.get("HTTP_ACCEPT", "*/*")).split(",")
    }
    if not accepted & {"application/json", "application/*", "*/*"}:
        raise HttpError(406)
    length_text = environ.get("CONTENT_LENGTH")
    if not length_text:
        raise HttpError(411, "Content-Length is required")
    try:
        length = int(length_text)
    except ValueError:
        raise HttpError(400, "bad Content-Length") from None
    if length < 0:
        raise HttpError(400, "bad Content-Length")
    if length > protocol.MAX_BODY_BYTES:
        raise HttpError(413)
    try:
        raw = environ["wsgi.input"].read(length)
    except OSError:  # the client stalled past io_timeout, or went away, mid-body
        raise HttpError(400, "truncated body") from None
    if len(raw) != length:
        raise HttpError(400, "truncated body")
    try:
        return json.loads(raw.decode("utf-8"), object_pairs_hook=_object_without_repeats)
    except RepeatedMember:
        raise HttpError(400, "body repeats a member name") from None
    except (UnicodeDecodeError, ValueError, RecursionError):  # RecursionError: deep nesting
        raise HttpError(400, "body is not valid JSON") from None


class RepeatedMember(ValueError):
    """A JSON object names a member twice."""


def _object_without_repeats(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # json.loads keeps the last of repeated names, while other parsers keep the first:
    # the value a proxy or the agent checked need not be the one used here. Called for
    # every object, nested ones too, with the names already unescaped.
    members = dict(pairs)
    if len(members) != len(pairs):
        raise RepeatedMember
    return members


# Routes: each takes the service, the caller, the WSGI environ and its path's match.


def checkin(
    service: KeyService, caller: Caller, environ: Environ, match: re.Match[str]
) -> Response:
    body = _fields(json_body(environ), {"machine_id"}, {"pins"})
    machine_id = validate.machine_id(body["machine_id"])
    held = tlspins.check_reported(body["pins"]) if "pins" in body else None
    issuer = hostca.issuer_key_id(environ.get(PEER_CERTIFICATE) or b"")
    host = service.checkin(caller, machine_id, held, issuer)
    current, upcoming = service.announced_pins()
    return json_response(
        200,
        {
            "host": host.name,
            "deadman_timeout": service.deadman_timeout(host),
            # The server pins to trust (tls next, tls activate), told inside the pinned
            # channel: agents keep them beside agent.toml's and report them back.
            "pins": {"current": current, "next": upcoming},
            # During a CA rollover (ca next): renew this certificate under the next CA.
            "renew": service.renewal_wanted(issuer),
            # Datasets whose key the daemon is to rotate (key rotate, max_key_age_days).
            "rotate": [
                {"pool_guid": r.pool_guid, "dataset_guid": r.dataset_guid}
                for r in service.rotations_due(host)
            ],
        },
    )


def renew(service: KeyService, caller: Caller, environ: Environ, match: re.Match[str]) -> Response:
    body = _fields(json_body(environ), {"machine_id", "csr"})
    machine_id = validate.machine_id(body["machine_id"])
    csr = body["csr"]
    if not isinstance(csr, str) or not 0 < len(csr) <= protocol.MAX_CSR_CHARS:
        raise validate.InvalidInput(
            f"csr must be PEM text of at most {protocol.MAX_CSR_CHARS} characters"
        )
    try:
        pki.load_csr(csr.encode("ascii"))  # refused here, before anything is audited
    except (DataError, UnicodeEncodeError):
        raise validate.InvalidInput("csr is not a valid PEM certificate signing request") from None
    cert_pem = service.renew(caller, machine_id, csr.encode("ascii"))
    return json_response(200, {"certificate": cert_pem.decode("ascii")})


def host_status(
    service: KeyService, caller: Caller, environ: Environ, match: re.Match[str]
) -> Response:
    body = _fields(json_body(environ), {"machine_id"})
    status = service.host_status(caller, validate.machine_id(body["machine_id"]))
    host = status.host
    return json_response(
        200,
        {
            "host": host.name,
            "enabled": host.enabled,
            "disabled_reason": host.disabled_reason if not host.enabled else "",
            "machine_id_matches": status.machine_id_matches,
            "source_ip": caller.source_ip,
            "address_allowed": status.address_allowed,
            "any_pool": not host.pools,
            "pools": list(host.pools),
            "certificate_not_after": status.certificate_not_after,
            "deadman_timeout": status.deadman_timeout,
            "server_time": status.server_time,
        },
    )


def release_batch(
    service: KeyService, caller: Caller, environ: Environ, match: re.Match[str]
) -> Response:
    body = _fields(json_body(environ), {"machine_id", "datasets"}, {"nonce"})
    machine_id = validate.machine_id(body["machine_id"])
    items = body["datasets"]
    if not isinstance(items, list) or not 1 <= len(items) <= protocol.MAX_BATCH:
        raise validate.InvalidInput(f"datasets must be a list of 1 to {protocol.MAX_BATCH}")
    refs = [_dataset_ref(item) for item in items]
    if len(set(refs)) != len(refs):
        raise validate.InvalidInput("datasets must not repeat")
    nonce = validate.nonce(body["nonce"]) if "nonce" in body else ""
    result = service.release(caller, machine_id, refs, nonce=nonce)
    answer: dict[str, Any] = {
        "keys": [key_json(r) for r in result.released],
        # Beside "keys", so that agents written before rotation existed ignore them.
        "next_keys": [key_json(r) for r in result.upcoming],
        "denied": [_ref_json(d) for d in result.denied],
    }
    if result.waiting is not None:  # only for agents that sent a nonce: they know it
        answer["pending"] = {
            "id": result.waiting.request.id,
            "retry_after": result.waiting.retry_after,
            "expires_in": max(0, result.waiting.request.expires_at - int(time.time())),
            "datasets": [_ref_json(r) for r in result.waiting.refs],
        }
    return json_response(200, answer)


def _ref_json(ref: DatasetRef) -> dict[str, str]:
    return {"pool_guid": ref.pool_guid, "dataset_guid": ref.dataset_guid}


def release_one(
    service: KeyService, caller: Caller, environ: Environ, match: re.Match[str]
) -> Response:
    machine_id = validate.machine_id(match.group(1))
    ref = DatasetRef(validate.guid(match.group(2)), validate.guid(match.group(3)))
    result = service.release(caller, machine_id, [ref], with_next=False)
    if not result.released:
        raise Denied("see audit")
    return json_response(200, key_json(result.released[0]))


def release_legacy(
    service: KeyService, caller: Caller, environ: Environ, match: re.Match[str]
) -> Response:
    machine_id = validate.machine_id(match.group(1))
    pool = validate.guid(match.group(2))
    name = validate.label(match.group(3))
    released = service.release_legacy(caller, machine_id, pool, name)
    return Response(200, released.material, content_type="application/octet-stream")


def enroll(service: KeyService, caller: Caller, environ: Environ, match: re.Match[str]) -> Response:
    body = _fields(
        json_body(environ),
        {"machine_id", "pool_guid", "dataset_guid", "dataset", "keyformat"},
        {"key"},
    )
    machine_id = validate.machine_id(body["machine_id"])
    ref = DatasetRef(
        validate.guid(body["pool_guid"], "pool_guid"),
        validate.guid(body["dataset_guid"], "dataset_guid"),
    )
    dataset = validate.dataset_name(body["dataset"])
    keyformat = _keyformat(body["keyformat"])
    imported = _decode_key(body["key"]) if "key" in body else None
    if imported is None and keyformat == "passphrase":
        raise validate.InvalidInput("a passphrase key must be imported (field 'key')")
    if imported is not None:
        protocol.check_key_material(imported, keyformat)  # before any state is looked at
    released, created = service.enroll(caller, machine_id, ref, dataset, keyformat, imported)
    return json_response(201 if created else 200, key_json(released))


def next_key(
    service: KeyService, caller: Caller, environ: Environ, match: re.Match[str]
) -> Response:
    body = _fields(json_body(environ), {"machine_id", "pool_guid", "dataset_guid"})
    released, created = service.next_key(
        caller,
        validate.machine_id(body["machine_id"]),
        DatasetRef(
            validate.guid(body["pool_guid"], "pool_guid"),
            validate.guid(body["dataset_guid"], "dataset_guid"),
        ),
    )
    return json_response(201 if created else 200, key_json(released))


def activate(
    service: KeyService, caller: Caller, environ: Environ, match: re.Match[str]
) -> Response:
    body = _fields(json_body(environ), {"machine_id", "pool_guid", "dataset_guid", "key_id"})
    record = service.activate(
        caller,
        validate.machine_id(body["machine_id"]),
        DatasetRef(
            validate.guid(body["pool_guid"], "pool_guid"),
            validate.guid(body["dataset_guid"], "dataset_guid"),
        ),
        validate.key_id(body["key_id"]),
    )
    return json_response(200, record_json(record))


class RouteHandler(Protocol):
    def __call__(
        self, service: KeyService, caller: Caller, environ: Environ, match: re.Match[str]
    ) -> Response: ...


@dataclass(frozen=True)
class Route:
    method: str
    path: re.Pattern[str]  # matched against the whole path; its groups go to the handler
    handler: RouteHandler


def _exactly(path: str) -> re.Pattern[str]:
    return re.compile(re.escape(path))


_RELEASE_ONE = re.compile(r"/v1/hosts/([0-9a-f]{32})/keys/([0-9]{1,20})/([0-9]{1,20})")
# SimpleZFSKeySystem's layout, /MACHINE_ID/POOL_GUID/NAME; the name is never "." or "..".
_SIMPLEZFS = re.compile(r"/([0-9a-f]{32})/([0-9]{1,20})/(?!\.\.?\Z)([A-Za-z0-9_.:-]{1,255})")

# Every route the server answers, one row each (method, path, handler); any other path
# is 404, a listed path asked with another method 405.
ROUTES: tuple[Route, ...] = (
    Route("POST", _exactly(protocol.ROUTE_CHECKIN), checkin),
    Route("POST", _exactly(protocol.ROUTE_HOST_STATUS), host_status),
    Route("POST", _exactly(protocol.ROUTE_RENEW), renew),
    Route("POST", _exactly(protocol.ROUTE_ENROLL), enroll),
    Route("POST", _exactly(protocol.ROUTE_ACTIVATE), activate),
    Route("POST", _exactly(protocol.ROUTE_NEXT_KEY), next_key),
    Route("POST", _exactly(protocol.ROUTE_RELEASE_BATCH), release_batch),
    Route("GET", _RELEASE_ONE, release_one),
)
SIMPLEZFS_ROUTE = Route("GET", _SIMPLEZFS, release_legacy)  # only with simplezfs_route = true


def _decode_key(value: Any) -> bytes:
    if not isinstance(value, str) or len(value) > 1024:
        raise validate.InvalidInput("key must be base64 of the key bytes")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise validate.InvalidInput("key must be base64 of the key bytes") from None


def build_app(data_dir: Path, config: ServerConfig) -> KeyServerApp:
    return KeyServerApp(Layout(data_dir), config)
