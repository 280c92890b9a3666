"""Run the key server on gunicorn: pre-forked workers, one TLS handshake each, hard time limits.

We hand gunicorn plain sockets and do the TLS handshake in our worker class, so
that the context is built once per worker (gunicorn builds one per connection),
the handshake has a deadline, and a failed handshake is audited. The request
itself is read by http1.py, not by gunicorn's parser: one small request per
connection is all our clients send, and the general parser cost more CPU than
the rest of a key release together.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import shutil
import socket
import ssl
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from gunicorn import glogging
from gunicorn import util as gunicorn_util
from gunicorn.app.base import BaseApplication
from gunicorn.workers.sync import SyncWorker

from zfs_unlock_server import http1
from zfs_unlock_server.app import PEER_CERTIFICATE, KeyServerApp
from zfs_unlock_server.audit import AuditError
from zfs_unlock_server.config import Layout, ServerConfig
from zfs_unlock_server.errors import ConfigError, DatabaseUnavailable, Unavailable
from zfs_unlock_server.tlsctx import server_context

log = logging.getLogger("zfs_unlock_server")


def _same_owner(uid: int, gid: int, initgroups: bool = False) -> None:
    """gunicorn's set_owner_process for a worker that keeps its parent's user and group."""


class KeyServerWorker(SyncWorker):  # type: ignore[misc]
    """gunicorn's sync worker, with the TLS handshake and our strict HTTP/1.1 (http1.py)
    in place of gunicorn's parser. gunicorn still forks, supervises and replaces workers."""

    def init_process(self) -> None:
        # The server starts as its own user and never changes it (it sets neither user nor
        # group). gunicorn 20.1, Debian 12's, calls setuid() all the same, even to the user
        # it already is, and the unit's system-call filter refuses that (EPERM): every
        # worker died at birth. Later gunicorns skip it when nothing changes; so does this
        # worker, on all of them.
        if (self.cfg.uid, self.cfg.gid) == (os.getuid(), os.getgid()):
            gunicorn_util.set_owner_process = _same_owner
        super().init_process()

    def load_wsgi(self) -> None:
        super().load_wsgi()
        app: KeyServerApp = self.wsgi
        self.key_server = app
        # The files' state first: one that changes while the context is made is looked
        # at again, instead of being taken as already in it.
        self._tls_files = _tls_files(app.layout)
        self.tls = server_context(app.layout)
        self._next_tls_check = time.monotonic() + TLS_CHECK_SECONDS

    def notify(self) -> None:
        super().notify()  # the heartbeat, before each accept and each idle wait
        app: KeyServerApp | None = getattr(self, "key_server", None)
        if app is not None:
            app.tick()
            if time.monotonic() >= self._next_tls_check:
                self._follow_tls_key(app)

    def _follow_tls_key(self, app: KeyServerApp) -> None:
        """`tls activate` replaces the key and certificate, `ca next` and `ca activate` the
        CAs trusted, while we serve: take them up within a second, without a restart.
        Between tls activate's two renames the pair does not match; the old context stays
        until they do."""
        self._next_tls_check = time.monotonic() + TLS_CHECK_SECONDS
        files = _tls_files(app.layout)
        if files == self._tls_files:
            return
        try:
            context = server_context(app.layout)
        except (OSError, ConfigError) as exc:  # ssl.SSLError is an OSError
            log.debug("the TLS key or certificate changed but cannot be used yet: %s", exc)
            return
        self.tls, self._tls_files = context, files
        log.info("the TLS key, certificate or trusted CAs changed: serving with them now")

    def handle(self, listener: socket.socket, client: socket.socket, addr: Any) -> None:
        self._follow_tls_key(self.key_server)  # a few stat() calls: each connection sees
        # the files an admin command just replaced
        timeout = self.key_server.config.io_timeout
        client.settimeout(timeout)
        if client_gone(client):
            # It waited in the listen queue past its own timeout and left: a handshake
            # now would be spent on nobody, and in a reboot storm such work snowballs.
            self._handshake_failed(addr, "closed_before_handshake")
            client.close()
            return
        try:
            tls_client = self.tls.wrap_socket(client, server_side=True)
        except (ssl.SSLError, OSError) as exc:
            self._handshake_failed(addr, str(getattr(exc, "reason", None) or type(exc).__name__))
            client.close()
            return
        complete = False
        try:
            response, complete = http1.serve_one(
                tls_client,
                self.key_server,
                {
                    "REMOTE_ADDR": addr[0] if isinstance(addr, tuple) else str(addr),
                    PEER_CERTIFICATE: tls_client.getpeercert(binary_form=True),
                },
            )
        except http1.RequestError as exc:
            response = http1.error_response(exc.status)
        except (EOFError, OSError):  # gone, or silent past io_timeout: nobody to answer
            tls_client.close()
            return
        except Exception:
            log.exception("error handling a request from %s", addr)
            response = http1.error_response(500)
        self.nr += 1
        if self.max_requests and self.nr >= self.max_requests:
            self.alive = False
        with contextlib.suppress(OSError):  # the client is gone; nothing to tell it
            tls_client.sendall(response)
        http1.close_after_response(tls_client, complete, min(timeout, 1.0))

    def _handshake_failed(self, addr: Any, reason: str) -> None:
        peer = addr[0] if isinstance(addr, tuple) else str(addr)
        try:
            self.key_server.audit_log().write(
                {
                    "event": "tls_handshake_failed",
                    "decision": "deny",
                    "source_ip": peer,
                    "reason": reason,
                },
                durable=False,
            )
        except (AuditError, DatabaseUnavailable):
            log.warning("could not audit a failed TLS handshake from %s", peer)


TLS_CHECK_SECONDS = 1.0


def _tls_files(layout: Layout) -> tuple[tuple[int, int], ...]:
    """What identifies the present contents of the files the TLS context is made of."""
    found = []
    for path in (
        layout.server_cert,
        layout.server_key,
        layout.ca_cert,
        layout.next_ca_cert,
    ):
        try:
            stat = path.stat()
            found.append((stat.st_ino, stat.st_mtime_ns))
        except OSError:
            found.append((0, 0))
    return tuple(found)


_TCP_CLOSE_WAIT = 8  # tcp_states.h; the first byte of struct tcp_info is the state


def client_gone(sock: socket.socket) -> bool:
    """Has the peer already closed its side (the connection is in CLOSE_WAIT)?"""
    try:
        info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 8)
    except OSError:
        return False
    return info[0] == _TCP_CLOSE_WAIT


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


class KeyServerLogger(glogging.Logger):  # type: ignore[misc]
    """gunicorn's logger without its "Listening at: http://..." line: every socket here
    speaks TLS only, and announce() says so once gunicorn listens."""

    def info(self, msg: str, *args: Any, **kwargs: Any) -> None:
        if isinstance(msg, str) and msg.startswith("Listening at:"):
            return
        super().info(msg, *args, **kwargs)


SERVING = "serving HTTPS (TLS, client certificates required) on %s"


def https_url(sockname: Any) -> str:
    """The URL clients use for a listening socket's address (getsockname())."""
    if isinstance(sockname, tuple):
        host, port = sockname[0], sockname[1]
        return f"https://[{host}]:{port}" if ":" in host else f"https://{host}:{port}"
    return f"unix:{sockname}"


def announce(arbiter: Any) -> None:
    """gunicorn's when_ready hook: runs in the master once every listen socket is bound."""
    for listener in arbiter.LISTENERS:
        arbiter.log.info(SERVING, https_url(listener.getsockname()))


def check_listen(listen: Sequence[str]) -> None:
    """Bind each TCP address once, as gunicorn will, and let it go: a port in use is then
    one clear error (exit 69) instead of gunicorn's five attempts a second apart. A port
    taken between this check and gunicorn's bind still meets gunicorn's retries."""
    for address in listen:
        try:
            parsed = gunicorn_util.parse_address(address)
        except RuntimeError as exc:  # gunicorn's word for an unparsable address
            raise ConfigError(f"listen address {address!r}: {exc}") from None
        if isinstance(parsed, tuple):
            _try_bind(address, parsed)


def _try_bind(address: str, where: tuple[str, int]) -> None:
    family = socket.AF_INET6 if gunicorn_util.is_ipv6(where[0]) else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as gunicorn's own
        try:
            probe.bind(where)
        except OSError as exc:
            reason = (
                "address already in use"
                if exc.errno == errno.EADDRINUSE
                else (exc.strerror or str(exc)).lower()
            )
            raise Unavailable(f"cannot listen on {address}: {reason}") from None


def default_workers() -> int:
    return 2 * (os.cpu_count() or 1)


def prepare_metrics_directory(config: ServerConfig) -> Path | None:
    """With [metrics] listen, an empty directory for the workers' samples, named in
    PROMETHEUS_MULTIPROC_DIR: set before prometheus_client is first imported, which picks
    its storage then. $RUNTIME_DIRECTORY/metrics under systemd (RuntimeDirectory=), else a
    new temporary directory. What an earlier run left would be added to this one's."""
    if not config.metrics.listen:
        return None
    runtime = os.environ.get("RUNTIME_DIRECTORY")
    if runtime:
        path = Path(runtime.split(":")[0]) / "metrics"
        path.mkdir(mode=0o700, exist_ok=True)
        for stale in path.glob("*.db"):
            stale.unlink()
    else:
        path = Path(tempfile.mkdtemp(prefix="zfs-unlock-server-metrics-"))
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(path)
    return path


def gunicorn_options(app: KeyServerApp, listen: list[str], workers: int) -> dict[str, Any]:
    config = app.config
    return {
        "bind": listen,
        "workers": workers or default_workers(),
        "worker_class": "zfs_unlock_server.serve.KeyServerWorker",
        "timeout": config.request_timeout,
        "graceful_timeout": 10,
        "keepalive": 0,
        # A reboot storm queues here. Each SYN dropped on a full queue costs its host a
        # 1-3 s retransmission or a whole retry; a deeper queue served 10,000 hosts in
        # every storm tried, a shallower one not (docs/benchmarks.md). The kernel caps it
        # at net.core.somaxconn (4096 by default).
        "backlog": 4096,
        # Requests are small and fixed in shape; anything larger is hostile.
        "limit_request_line": 1024,
        "limit_request_fields": 32,
        "limit_request_field_size": 4096,
        "accesslog": None,  # the audit log records every decision
        "errorlog": "-",
        "loglevel": "info",
        "logger_class": "zfs_unlock_server.serve.KeyServerLogger",
        "when_ready": announce,
        "pre_fork": lambda _arbiter, _worker: follow_master_keys(app),
        "proc_name": "zfs-unlock-server",
        "preload_app": False,
        "control_socket_disable": True,  # gunicorn 27+: no admin socket beside ours
    }


def follow_master_keys(app: KeyServerApp) -> None:
    """gunicorn's pre_fork hook: a new worker inherits the ring as it is now."""
    try:
        app.follow_master_keys()
    except Exception as exc:  # noqa: BLE001 (the worker reads the ring itself when it can)
        log.warning("could not read the master key ring before starting a worker: %s", exc)


def run(
    app: KeyServerApp, listen: list[str], workers: int, metrics_directory: Path | None = None
) -> None:
    """Serve until SIGTERM (graceful) or SIGINT. gunicorn sends READY=1 to systemd once
    bound. With METRICS_DIRECTORY (prepare_metrics_directory), the metrics listener runs in
    this process, the master, from when gunicorn is ready; so does the approval page with
    [approval] page_listen."""
    options = gunicorn_options(app, listen, workers)
    listeners: list[Any] = []
    try:
        if metrics_directory is not None:
            from zfs_unlock_server.metricsserver import MetricsListener  # noqa: PLC0415

            metrics = MetricsListener(
                app.config.metrics.listen, metrics_directory, app.layout, app.config
            )
            listeners.append(metrics)
            options["child_exit"] = lambda _arbiter, worker: metrics.worker_exited(worker.pid)
        if app.config.approval.page_listen:
            from zfs_unlock_server.approvalpage import PageListener  # noqa: PLC0415

            listeners.append(PageListener(app.config.approval.page_listen, app.layout, app.config))

        def when_ready(arbiter: Any) -> None:
            announce(arbiter)
            for listener in listeners:
                listener.start()

        options["when_ready"] = when_ready
        KeyServerApplication(app, options).run()
    finally:
        for listener in listeners:
            listener.close()
        if metrics_directory is not None and not os.environ.get("RUNTIME_DIRECTORY"):
            shutil.rmtree(metrics_directory, ignore_errors=True)
