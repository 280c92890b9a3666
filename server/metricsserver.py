"""The metrics listener: plain HTTP beside the HTTPS listener, in the gunicorn master.

GET /metrics: every worker's counters (prometheus_client's multi-process collector over
the directory they write to) and the hosts by state, read from the database at scrape
time. GET /health: 200 when this node can open its database at its schema, else 503,
for a load balancer to take the node out. Nothing else is served; no key, no host name
and no certificate is in either answer.
"""

from __future__ import annotations

import contextlib
import http.server
import json
import logging
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest, multiprocess
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from zfs_unlock_server import database
from zfs_unlock_server.config import Layout, ServerConfig
from zfs_unlock_server.errors import ConfigError, ServerError, Unavailable

log = logging.getLogger("zfs_unlock_server")

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class HostsCollector(Collector):
    """zfs_unlock_hosts{state}: enrolled hosts, enabled or disabled (and why), read at each
    scrape. A database that cannot be read leaves the family out of that scrape."""

    def __init__(self, layout: Layout, config: ServerConfig) -> None:
        self._layout = layout
        self._config = config

    def collect(self) -> Iterator[GaugeMetricFamily]:
        try:
            store = database.open_store(self._layout, self._config)
        except ServerError:
            return
        try:
            states = store.host_states()
        except ServerError:
            return
        finally:
            store.close()
        family = GaugeMetricFamily(
            "zfs_unlock_hosts", "Enrolled hosts, by state (disabled: by whom)", labels=["state"]
        )
        for state in ("enabled", "disabled_admin", "disabled_deadman"):
            family.add_metric([state], states.get(state, 0))
        yield family


def health(layout: Layout, config: ServerConfig) -> tuple[int, dict[str, str]]:
    """Can this node open its database, at its schema, now?"""
    try:
        store = database.open_store(layout, config)
    except ServerError as exc:
        return 503, {"database": "unavailable", "detail": str(exc)}
    try:
        store.counts()
    except ServerError as exc:
        return 503, {"database": "unavailable", "detail": str(exc)}
    finally:
        store.close()
    return 200, {"database": "ok"}


def make_handler(
    registry: CollectorRegistry, layout: Layout, config: ServerConfig
) -> type[http.server.BaseHTTPRequestHandler]:
    class Handler(http.server.BaseHTTPRequestHandler):
        server_version = "zfs-unlock-server-metrics"
        sys_version = ""

        def do_GET(self) -> None:
            if self.path == "/metrics":
                self._answer(200, CONTENT_TYPE, generate_latest(registry))
            elif self.path == "/health":
                status, body = health(layout, config)
                self._answer(status, "application/json", json.dumps(body).encode() + b"\n")
            else:
                self._answer(404, "text/plain", b"not found\n")

        def _other(self) -> None:
            self._answer(405, "text/plain", b"method not allowed\n", [("Allow", "GET")])

        do_POST = do_PUT = do_DELETE = do_HEAD = do_PATCH = _other  # noqa: N815

        def _answer(self, status: int, content_type: str, body: bytes, extra: Any = ()) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")
            for name, value in extra:
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            """Scrapes are not logged."""

    return Handler


class MetricsListener:
    """Bound at once (a port in use is exit 69 before anything starts), served from a
    thread of the master once gunicorn is ready."""

    def __init__(self, listen: str, directory: Path, layout: Layout, config: ServerConfig):
        host, _, port = listen.rpartition(":")
        host = host.strip("[]")
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry, path=str(directory))  # type: ignore[no-untyped-call]
        registry.register(HostsCollector(layout, config))
        handler = make_handler(registry, layout, config)
        server_class = type(
            "Server",
            (http.server.ThreadingHTTPServer,),
            {"address_family": socket.AF_INET6 if ":" in host else socket.AF_INET},
        )
        try:
            self._server = server_class((host, int(port)), handler)
        except OSError as exc:
            raise Unavailable(f"cannot listen on [metrics] {listen}: {exc.strerror}") from None
        except ValueError:
            raise ConfigError(f"[metrics] listen {listen!r}: not ADDRESS:PORT") from None
        self._server.daemon_threads = True
        self.directory = directory
        self.address = self._server.server_address

    def start(self) -> None:
        threading.Thread(target=self._server.serve_forever, name="metrics", daemon=True).start()
        log.info("serving metrics and health (plain HTTP) on %s:%s", *self.address[:2])

    def worker_exited(self, pid: int) -> None:
        multiprocess.mark_process_dead(pid, str(self.directory))  # type: ignore[no-untyped-call]

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._server.server_close()
