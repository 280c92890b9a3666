"""The approval page: the releases that wait for a person, and the hosts' state, on a
listener of its own ([approval] page_listen, 127.0.0.1:8444 in the examples), in
serve's master process beside the key server.

HTTPS with the server's certificate; the browser shows an admin certificate of the
admin CA (`admin add`), which must still be registered (`admin remove` ends it at
once). No JavaScript: the list is a page, each decision a form. Every form carries a
token bound to the admin's certificate and made by this listener (CSRF), and a POST
whose Origin or Sec-Fetch-Site names another site is refused. Decisions go through
the same checks and audit records as `approval approve` and `approval deny`, with
`web:NAME` as the actor. Nothing on the page is a key.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import html
import http.server
import logging
import os
import socket
import ssl
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from zfs_unlock_common import validate
from zfs_unlock_server import approval, approvaldecide, database, tlsctx
from zfs_unlock_server.approvalrows import HOST_WIDE, Approval
from zfs_unlock_server.audit import AuditSink
from zfs_unlock_server.config import Layout, ServerConfig
from zfs_unlock_server.errors import ConfigError, ServerError, Unavailable
from zfs_unlock_server.store import Host, Store

log = logging.getLogger("zfs_unlock_server")

IO_TIMEOUT = 10.0  # seconds for the handshake and each read or write
MAX_FORM = 4096  # bytes of a decision's form
TOKEN_LIFETIME = 12 * 3600  # seconds a page's forms stay good
RECENT = 7 * 86400  # closed requests the page still shows

STYLE = """
body{font:16px/1.4 system-ui,sans-serif;margin:0 auto;max-width:60em;padding:0 1em}
h1{font-size:1.4em}h2{font-size:1.1em;margin:.2em 0}
article{border:1px solid #999;border-radius:6px;padding:.6em;margin:.8em 0}
dl{display:grid;grid-template-columns:max-content auto;gap:.1em .8em;margin:.4em 0}
dt{font-weight:bold}dd{margin:0;overflow-wrap:anywhere}
form{display:flex;flex-wrap:wrap;gap:.4em;margin:.4em 0}
input[type=text]{flex:1 1 12em;font-size:1em;padding:.4em}
button{font-size:1em;padding:.4em 1.2em}
.approve{background:#1a7f37;color:#fff}.deny{background:#b42318;color:#fff}
.error{border-color:#b42318;background:#fdecea}
table{border-collapse:collapse;width:100%;display:block;overflow-x:auto}
td,th{border-bottom:1px solid #ccc;padding:.3em .5em;text-align:left;white-space:nowrap}
"""
_STYLE_HASH = base64.b64encode(hashlib.sha256(STYLE.encode()).digest()).decode()
HEADERS = (
    ("Cache-Control", "no-store"),
    ("X-Content-Type-Options", "nosniff"),
    ("X-Frame-Options", "DENY"),
    # Not no-referrer: under it a browser sends "Origin: null" with its own forms, and
    # _form refuses a null Origin (a sandboxed frame of another site sends that too).
    ("Referrer-Policy", "same-origin"),
    (
        "Content-Security-Policy",
        (
            f"default-src 'none'; style-src 'sha256-{_STYLE_HASH}'; form-action 'self';"
            " frame-ancestors 'none'; base-uri 'none'"
        ),
    ),
)


@dataclass
class Answer:
    status: int
    body: str = ""
    location: str = ""


class Refused(Exception):
    """A request the page answers with STATUS and a sentence, and nothing else."""

    def __init__(self, status: int, sentence: str) -> None:
        super().__init__(sentence)
        self.status = status
        self.sentence = sentence


def _e(value: object) -> str:
    return html.escape(str(value), quote=True)


def _when(stamp: int) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(stamp)) if stamp else "never"


class ApprovalPage:
    """What the page shows and does, over one store opened per request."""

    def __init__(self, layout: Layout, config: ServerConfig, secret: bytes) -> None:
        self.layout = layout
        self.config = config
        self._secret = secret

    @contextlib.contextmanager
    def opened(self) -> Iterator[tuple[Store, AuditSink]]:
        store = database.open_store(self.layout, self.config)
        try:
            audit = database.open_audit(self.layout, self.config, store)
            try:
                yield store, audit
            finally:
                audit.close()
        finally:
            store.close()

    # Tokens: a form is good for the certificate that loaded it, for TOKEN_LIFETIME.

    def token(self, fingerprint: str, now: int) -> str:
        mac = hmac.new(self._secret, f"{fingerprint}|{now}".encode(), "sha256").hexdigest()
        return f"{now}.{mac}"

    def token_good(self, token: str, fingerprint: str, now: int) -> bool:
        stamp, _, _ = token.partition(".")
        if not stamp.isdigit() or not 0 <= now - int(stamp) <= TOKEN_LIFETIME:
            return False
        return hmac.compare_digest(token, self.token(fingerprint, int(stamp)))

    # Routes

    def show(self, admin: str, fingerprint: str, form: dict[str, str]) -> Answer:
        now = int(time.time())
        with self.opened() as (store, _):
            hosts = store.hosts()
            requests = store.approvals()
            policies = {h: store.approval_policies(h.id) for h in hosts}
        return Answer(
            200, self._page(admin, self.token(fingerprint, now), hosts, requests, policies, now)
        )

    def approve(self, admin: str, fingerprint: str, form: dict[str, str]) -> Answer:
        return self._decide(
            form,
            fingerprint,
            lambda store, audit, request_id, note, now: approvaldecide.approve(
                store, audit, request_id, f"web:{admin}", note, now, self.config.deadman_timeout
            ),
        )

    def deny(self, admin: str, fingerprint: str, form: dict[str, str]) -> Answer:
        return self._decide(
            form,
            fingerprint,
            lambda store, audit, request_id, note, now: approvaldecide.deny(
                store, audit, request_id, f"web:{admin}", note, now
            ),
        )

    def _decide(
        self,
        form: dict[str, str],
        fingerprint: str,
        decide: Callable[[Store, AuditSink, str, str, int], Approval],
    ) -> Answer:
        now = int(time.time())
        if not self.token_good(form.get("csrf", ""), fingerprint, now):
            raise Refused(
                403, "This form is too old, or was not made by this page; load the page again."
            )
        try:
            request_id = validate.approval_id(form.get("id", ""))
        except validate.InvalidInput as exc:
            raise Refused(400, str(exc)) from None
        with self.opened() as (store, audit):
            try:
                decide(store, audit, request_id, form.get("reason", ""), now)
            except ServerError as exc:
                raise Refused(409, str(exc)) from None
        return Answer(303, location=f"/#{request_id}")

    # HTML

    def _page(
        self,
        admin: str,
        token: str,
        hosts: Sequence[Host],
        requests: Sequence[Approval],
        policies: dict[Host, dict[tuple[str, str], str]],
        now: int,
    ) -> str:
        open_ones = [r for r in requests if r.status(now) in ("pending", "approved")]
        closed = [r for r in requests if r not in open_ones and now - r.created_at <= RECENT]
        parts = [
            "<h1>Key releases waiting for approval</h1>",
            (
                f"<p>Signed in as <b>{_e(admin)}</b>. Server time {_e(_when(now))}."
                ' <a href="/">Refresh</a></p>'
            ),
            '<section id="open">',
        ]
        parts += [self._request(r, token, now) for r in open_ones] or [
            "<p>No release is waiting.</p>"
        ]
        parts.append('</section><section id="hosts"><h2>Hosts</h2>')
        parts.append(self._hosts(hosts, open_ones, policies, now))
        parts.append('</section><section id="recent"><h2>Decided in the last 7 days</h2>')
        parts.append(self._closed(closed, now))
        parts.append("</section>")
        return _document("Approvals", "".join(parts))

    def _request(self, request: Approval, token: str, now: int) -> str:
        names = ", ".join(d.dataset for d in request.datasets)
        status = request.status(now)
        facts = [
            ("Request", request.id),
            (
                "State",
                status
                if status == "pending"
                else f"approved by {request.decided_by}; waiting for its agent",
            ),
            ("Datasets", names),
            ("Why", ", ".join(request.reasons)),
            ("From", request.source_ip),
            ("Asked", _when(request.created_at)),
            ("Expires", f"{_when(request.expires_at)} (in {max(0, request.expires_at - now)} s)"),
            ("Certificate", request.cert_fp[:16] + "…"),
        ]
        forms = ""
        if status == "pending":
            forms += _form("/approve", "approve", "Approve", request.id, token)
        forms += _form("/deny", "deny", "Deny", request.id, token)
        return (
            f'<article id="{_e(request.id)}"><h2>{_e(request.host)}: {_e(names)}</h2>'
            f"{_facts(facts)}{forms}</article>"
        )

    def _hosts(
        self,
        hosts: Sequence[Host],
        open_ones: Sequence[Approval],
        policies: dict[Host, dict[tuple[str, str], str]],
        now: int,
    ) -> str:
        rows = []
        for host in hosts:
            own = policies[host].get(HOST_WIDE)
            policy = approval.from_text(own).describe() if own else "none"
            if len(policies[host]) > (1 if own else 0):
                policy += " (and datasets of their own)"
            state = "enabled" if host.enabled else f"disabled ({host.disabled_reason})"
            waiting = sum(1 for r in open_ones if r.host_id == host.id)
            rows.append(
                f"<tr><td>{_e(host.name)}</td><td>{_e(state)}</td>"
                f"<td>{_e(_when(host.last_seen))}</td><td>{_e(policy)}</td>"
                f"<td>{waiting}</td></tr>"
            )
        head = "<tr><th>Host</th><th>State</th><th>Last seen</th><th>Approval</th><th>Waiting</th></tr>"
        return f"<table>{head}{''.join(rows)}</table>" if rows else "<p>No hosts.</p>"

    def _closed(self, closed: Sequence[Approval], now: int) -> str:
        if not closed:
            return "<p>None.</p>"
        rows = [
            f"<tr><td>{_e(r.id)}</td><td>{_e(r.host)}</td><td>{_e(r.status(now))}</td>"
            f"<td>{_e(r.decided_by)}</td><td>{_e(r.note)}</td>"
            f"<td>{_e(', '.join(d.dataset for d in r.datasets))}</td></tr>"
            for r in reversed(closed)
        ]
        head = "<tr><th>Request</th><th>Host</th><th>State</th><th>By</th><th>Reason</th><th>Datasets</th></tr>"
        return f"<table>{head}{''.join(rows)}</table>"


def _facts(facts: Sequence[tuple[str, str]]) -> str:
    return "<dl>" + "".join(f"<dt>{_e(k)}</dt><dd>{_e(v)}</dd>" for k, v in facts) + "</dl>"


def _form(action: str, css: str, label: str, request_id: str, token: str) -> str:
    return (
        f'<form method="post" action="{action}">'
        f'<input type="hidden" name="id" value="{_e(request_id)}">'
        f'<input type="hidden" name="csrf" value="{_e(token)}">'
        f'<input type="text" name="reason" maxlength="200" placeholder="Reason (for the audit log)"'
        f' aria-label="Reason to {css}">'
        f'<button type="submit" class="{css}">{label}</button></form>'
    )


def _document(title: str, body: str) -> str:
    return (
        '<!doctype html><html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{_e(title)} · zfs-unlock-server</title><style>{STYLE}</style></head>"
        f"<body>{body}</body></html>"
    )


Handler = Callable[[ApprovalPage, str, str, dict[str, str]], Answer]
# Every route the page answers, one row each; any other path is 404, a listed path asked
# with another method 405.
ROUTES: tuple[tuple[str, str, Handler], ...] = (
    ("GET", "/", ApprovalPage.show),
    ("POST", "/approve", ApprovalPage.approve),
    ("POST", "/deny", ApprovalPage.deny),
)


def _make_handler(
    page: ApprovalPage, lock: threading.Lock
) -> type[http.server.BaseHTTPRequestHandler]:
    class PageHandler(http.server.BaseHTTPRequestHandler):
        server_version = "zfs-unlock-server"
        sys_version = ""
        protocol_version = "HTTP/1.0"  # one request per connection

        def do_GET(self) -> None:
            self._serve("GET")

        def do_POST(self) -> None:
            self._serve("POST")

        def _other(self) -> None:
            self._serve(self.command)

        do_PUT = do_DELETE = do_HEAD = do_PATCH = do_OPTIONS = _other  # noqa: N815

        def _serve(self, method: str) -> None:
            try:
                answer = self._answer(method)
            except Refused as refused:
                answer = Answer(
                    refused.status,
                    _document(
                        "Refused",
                        f'<article class="error"><p>{_e(refused.sentence)}</p><p><a href="/">Back to the list</a></p></article>',
                    ),
                )
            except Exception:
                log.exception("approval page: internal error")
                answer = Answer(
                    500, _document("Error", "<p>Internal error; see the server's log.</p>")
                )
            self._send(answer)

        def _answer(self, method: str) -> Answer:
            path, _, query = self.path.partition("?")
            if query:
                raise Refused(400, "This page takes no query string.")
            methods = [m for m, p, _ in ROUTES if p == path]
            if not methods:
                raise Refused(404, "There is no such page.")
            if method not in methods:
                raise Refused(405, "That method is not served here.")
            form = self._form() if method == "POST" else {}  # read first: see _form
            fingerprint, admin = self._admin()
            [handler] = [h for m, p, h in ROUTES if p == path and m == method]
            with lock:
                return handler(page, admin, fingerprint, form)

        def _admin(self) -> tuple[str, str]:
            der = self.connection.getpeercert(binary_form=True)
            if not der:
                raise Refused(
                    403,
                    "This page needs an admin certificate ('zfs-unlock-server admin add NAME'), shown by the browser.",
                )
            fingerprint = hashlib.sha256(der).hexdigest()
            with lock, page.opened() as (store, _):
                admin = store.admin_by_fingerprint(fingerprint)
            if admin is None:
                raise Refused(
                    403,
                    "This admin certificate is not registered (any more); ask for a new one ('zfs-unlock-server admin add NAME').",
                )
            return fingerprint, admin

        def _form(self) -> dict[str, str]:
            length = self.headers.get("Content-Length", "")
            if not length.isdigit() or int(length) > MAX_FORM:
                raise Refused(413, f"A form has a Content-Length of at most {MAX_FORM} bytes.")
            # Read before any refusal: a socket closed with unread data resets the
            # connection, and the browser would lose the answer.
            raw = self.rfile.read(int(length))
            site = self.headers.get("Sec-Fetch-Site", "same-origin")
            origin = self.headers.get("Origin")
            host = self.headers.get("Host", "")
            if site not in ("same-origin", "none") or (
                origin is not None and origin != f"https://{host}"
            ):
                raise Refused(403, "A form from another site is refused.")
            if self.headers.get_content_type() != "application/x-www-form-urlencoded":
                raise Refused(415, "A form is sent as application/x-www-form-urlencoded.")
            try:
                fields = urllib.parse.parse_qs(
                    raw.decode("utf-8"), strict_parsing=bool(raw), max_num_fields=8
                )
            except (UnicodeDecodeError, ValueError):
                raise Refused(400, "The form could not be read.") from None
            if any(len(values) != 1 for values in fields.values()):
                raise Refused(400, "The form names a field twice.")
            return {name: values[0] for name, values in fields.items()}

        def _send(self, answer: Answer) -> None:
            body = answer.body.encode()
            self.send_response(answer.status)
            for name, value in HEADERS:
                self.send_header(name, value)
            if answer.location:
                self.send_header("Location", answer.location)
            self.send_header("Content-Type", "text/html; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            log.debug("approval page: %s", format % args)

    return PageHandler


class _TLSServer(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(
        self, address: tuple[str, int], handler: Any, context: ssl.SSLContext, family: int
    ) -> None:
        self.address_family = family
        self.context = context
        super().__init__(address, handler)

    def finish_request(self, request: Any, client_address: Any) -> None:
        """The handshake in the connection's own thread, bounded: a client that stalls
        holds only its thread."""
        request.settimeout(IO_TIMEOUT)
        try:
            tls = self.context.wrap_socket(request, server_side=True)
        except (ssl.SSLError, OSError) as exc:
            log.info("approval page: TLS handshake with %s failed: %s", client_address[0], exc)
            return
        try:
            super().finish_request(tls, client_address)
        finally:
            with contextlib.suppress(OSError):
                tls.close()


class PageListener:
    """Bound at once (a port in use is exit 69 before anything starts), served from a
    thread of serve's master once it is ready."""

    def __init__(self, listen: str, layout: Layout, config: ServerConfig) -> None:
        host, _, port = listen.rpartition(":")
        host = host.strip("[]")
        page = ApprovalPage(layout, config, os.urandom(32))
        handler = _make_handler(page, threading.Lock())
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        try:
            self._server = _TLSServer(
                (host, int(port)), handler, tlsctx.admin_page_context(layout), family
            )
        except OSError as exc:
            raise Unavailable(
                f"cannot listen on [approval] page_listen {listen}: {exc.strerror}"
            ) from None
        except ValueError:
            raise ConfigError(f"[approval] page_listen {listen!r}: not ADDRESS:PORT") from None
        self.address = self._server.server_address

    def start(self) -> None:
        threading.Thread(
            target=self._server.serve_forever, name="approval-page", daemon=True
        ).start()
        log.info(
            "serving the approval page (HTTPS, admin certificates) on %s:%s", *self.address[:2]
        )

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._server.server_close()
