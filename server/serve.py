"""Run the key server on gunicorn: pre-forked workers, one TLS handshake each, hard time limits.

We hand gunicorn plain sockets and do the TLS handshake in our worker class, so
that the context is built once per worker (gunicorn builds one per connection),
the handshake has a deadline, and a failed handshake is audited.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import ssl
from typing import Any

from gunicorn.app.base import BaseApplication
from gunicorn.http import errors as http_errors
from gunicorn.workers.sync import SyncWorker

from zfs_unlock_server.app import KeyServerApp
from zfs_unlock_server.audit import AuditError
from zfs_unlock_server.tlsctx import server_context

log = logging.getLogger("zfs_unlock_server")


class KeyServerWorker(SyncWorker):  # type: ignore[misc]
    """gunicorn's sync worker with the TLS handshake done here."""

    def load_wsgi(self) -> None:
        super().load_wsgi()
        app: KeyServerApp = self.wsgi
        self.key_server = app
        self.tls = server_context(app.layout)

    def handle(self, listener: socket.socket, client: socket.socket, addr: Any) -> None:
        client.settimeout(self.key_server.config.io_timeout)
        try:
            tls_client = self.tls.wrap_socket(client, server_side=True)
        except (ssl.SSLError, OSError) as exc:
            self._handshake_failed(addr, exc)
            client.close()
            return
        super().handle(listener, tls_client, addr)

    def handle_error(self, req: Any, client: Any, addr: Any, exc: BaseException) -> None:
        """Requests gunicorn itself refuses get our fixed JSON body, never its HTML page
        (which quotes the request line back)."""
        status = error_status(exc)
        body = ('{"error":"%s"}' % ("internal" if status >= 500 else "bad_request")).encode()
        head = (
            f"HTTP/1.1 {status} {'Error' if status >= 500 else 'Bad Request'}\r\n"
            "Connection: close\r\nCache-Control: no-store\r\nX-Content-Type-Options: nosniff\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
        )
        if status >= 500:
            log.error("error handling a request from %s", addr, exc_info=exc)
        with contextlib.suppress(OSError):  # the client is gone; nothing to tell it
            client.sendall(head.encode("ascii") + body)

    def _handshake_failed(self, addr: Any, exc: Exception) -> None:
        peer = addr[0] if isinstance(addr, tuple) else str(addr)
        reason = getattr(exc, "reason", None) or type(exc).__name__
        try:
            self.key_server.audit_log().write(
                {
                    "event": "tls_handshake_failed",
                    "decision": "deny",
                    "source_ip": peer,
                    "reason": str(reason),
                },
                durable=False,
            )
        except AuditError:
            log.warning("could not audit a failed TLS handshake from %s", peer)


_CLIENT_ERRORS = tuple(
    getattr(http_errors, name)
    for name in (
        "InvalidRequestLine",
        "InvalidRequestMethod",
        "InvalidHTTPVersion",
        "InvalidHeader",
        "InvalidHeaderName",
        "InvalidSchemeHeaders",
        "InvalidChunkSize",
        "ChunkMissingTerminator",
        "InvalidChunkExtension",
        "ObsoleteFolding",
        "ExpectationFailed",
        "NoMoreData",
    )
    if hasattr(http_errors, name)  # the set varies between gunicorn releases
)


def error_status(exc: BaseException) -> int:
    if isinstance(exc, http_errors.LimitRequestLine):
        return 414
    if isinstance(exc, http_errors.LimitRequestHeaders):
        return 431
    if isinstance(exc, getattr(http_errors, "UnsupportedTransferCoding", ())):
        return 501
    if isinstance(exc, (*_CLIENT_ERRORS, ssl.SSLError)):
        return 400
    return 500


class KeyServerApplication(BaseApplication):  # type: ignore[misc]
    def __init__(self, app: KeyServerApp, options: dict[str, Any]) -> None:
        self._app = app
        self._options = options
        super().__init__()

    def load_config(self) -> None:
        for key, value in self._options.items():
            if key in self.cfg.settings:  # settings newer than the oldest gunicorn we support
                self.cfg.set(key, value)

    def load(self) -> KeyServerApp:
        return self._app


def default_workers() -> int:
    return 2 * (os.cpu_count() or 1)


def gunicorn_options(app: KeyServerApp, listen: list[str], workers: int) -> dict[str, Any]:
    config = app.config
    return {
        "bind": listen,
        "workers": workers or default_workers(),
        "worker_class": "zfs_unlock_server.serve.KeyServerWorker",
        "timeout": config.request_timeout,
        "graceful_timeout": 10,
        "keepalive": 0,
        # Requests are small and fixed in shape; anything larger is hostile.
        "limit_request_line": 1024,
        "limit_request_fields": 32,
        "limit_request_field_size": 4096,
        "accesslog": None,  # the audit log records every decision
        "errorlog": "-",
        "loglevel": "info",
        "proc_name": "zfs-unlock-server",
        "preload_app": False,
        "control_socket_disable": True,  # gunicorn 27+: no admin socket beside ours
    }


def run(app: KeyServerApp, listen: list[str], workers: int) -> None:
    """Serve until SIGTERM (graceful) or SIGINT. gunicorn sends READY=1 to systemd once bound."""
    KeyServerApplication(app, gunicorn_options(app, listen, workers)).run()
