"""The baselines the key server and the agent are measured against, all Debian's own
packages on 127.0.0.1: nginx serving a static key over the same mutual TLS (the ceiling),
tangd answering Clevis's recovery request (the other network unlock), and clevis itself.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from bench.common import KeyServer, children_of, free_port, wait_for_port

NGINX = "/usr/sbin/nginx"
TANGD = "/usr/libexec/tangd"
TANGD_KEYGEN = "/usr/libexec/tangd-keygen"
# systemd's own per-connection launcher (package systemd), see tangd() for why.
SOCKET_ACTIVATE = "/usr/bin/systemd-socket-activate"
KEY_BODY_BYTES = 64


def _stop(process: subprocess.Popen[bytes], first_signal: int, timeout: float = 15) -> None:
    """FIRST_SIGNAL to the process group, SIGKILL if it is still there after TIMEOUT."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, first_signal)
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=timeout)


# nginx


@dataclass(frozen=True)
class Nginx:
    port: int
    master_pid: int
    body: bytes  # the static answer of GET /key

    def request(self) -> bytes:
        """One raw GET of the key; the connection closes after the answer."""
        return (
            "GET /key HTTP/1.1\r\nHost: 127.0.0.1\r\nAccept: */*\r\nConnection: close\r\n\r\n"
        ).encode("ascii")

    def worker_pids(self) -> list[int]:
        return children_of(self.master_pid)


def nginx_config(root: Path, port: int, server: KeyServer, body: bytes) -> str:
    """The same TLS terms as the key server: its certificate and key (so the same pin),
    client certificates from the project's CA, TLS 1.2 or newer with the same suites, no
    session tickets or cache (no client here resumes), one request per connection. One
    difference stays: nginx completes a handshake without a client certificate and then
    answers 400, where the key server fails the handshake; every benchmark client sends
    one, so it costs nothing here."""
    temp = root / "temp"
    temp_paths = "\n".join(
        f"    {kind}_temp_path {temp / kind};"
        for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    return f"""\
# Written by bench/baselines.py; nginx runs in the foreground under the benchmark.
daemon off;
master_process on;
worker_processes auto;
pid {root / "nginx.pid"};
error_log {root / "error.log"} warn;
events {{
    worker_connections 4096;
}}
http {{
    access_log off;  # the ceiling: no work beyond TLS and the answer
{temp_paths}
    keepalive_timeout 0;
    server {{
        listen 127.0.0.1:{port} ssl backlog=4096;
        ssl_certificate {server.server_cert};
        ssl_certificate_key {server.server_key};
        ssl_client_certificate {server.ca_cert};
        ssl_verify_client on;
        ssl_protocols TLSv1.2 TLSv1.3;
        ssl_ciphers ECDHE+AESGCM:ECDHE+CHACHA20;  # the key server's TLS 1.2 suites
        ssl_prefer_server_ciphers on;
        ssl_session_tickets off;
        ssl_session_cache off;
        # nginx 1.22 still sends two TLS 1.3 tickets with the two lines above.
        ssl_conf_command NumTickets 0;
        location = /key {{
            default_type application/octet-stream;
            return 200 "{body.decode("ascii")}";
        }}
        location / {{
            return 404;
        }}
    }}
}}
"""


@contextlib.contextmanager
def nginx(root: Path, server: KeyServer) -> Iterator[Nginx]:
    """Debian's nginx as its own instance (config, pid file, logs and temp paths under
    ROOT) on a free port of 127.0.0.1, serving a 64-byte body at /key; stopped gracefully
    (SIGQUIT) on exit."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "temp").mkdir(exist_ok=True)
    port = free_port()
    body = secrets.token_hex(KEY_BODY_BYTES // 2).encode("ascii")
    config = root / "nginx.conf"
    config.write_text(nginx_config(root, port, server, body))
    log = (root / "stderr.log").open("ab")
    # -e: the error log before the config is read (the built-in default is stderr).
    command = [NGINX, "-c", str(config), "-p", f"{root}/", "-e", str(root / "error.log")]
    check = subprocess.run([*command, "-t"], check=False, capture_output=True)
    if check.returncode != 0:
        log.close()
        raise RuntimeError(f"nginx -t: {check.stderr.decode(errors='replace')}")
    process = subprocess.Popen(command, stdout=log, stderr=log, start_new_session=True)
    log.close()
    try:
        wait_for_port(port)
        instance = Nginx(port, process.pid, body)
        _wait_for_workers(instance, os.cpu_count() or 1)
        yield instance
    finally:
        _stop(process, signal.SIGQUIT)


def _wait_for_workers(instance: Nginx, count: int, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while len(instance.worker_pids()) < count:
        if time.monotonic() > deadline:
            raise RuntimeError(f"nginx started {len(instance.worker_pids())} of {count} workers")
        time.sleep(0.02)


# Tang and Clevis


@dataclass(frozen=True)
class Tang:
    port: int
    database: Path
    thp: str  # the signing key's thumbprint (SHA-256), what clevis's "thp" pins
    exchange_thp: str  # the exchange key's, the path of the recovery request

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def recovery_request(self) -> bytes:
        """The POST /rec/ clevis decrypt sends: a P-521 public point (a JWK with alg ECMR),
        plain HTTP, the connection closed after the answer."""
        body = _public_ecmr_point()
        head = (
            f"POST /rec/{self.exchange_thp} HTTP/1.1\r\nHost: 127.0.0.1:{self.port}\r\n"
            "Accept: */*\r\nContent-Type: application/jwk+json\r\n"
            f"Connection: close\r\nContent-Length: {len(body)}\r\n\r\n"
        )
        return head.encode("ascii") + body


def _jose(*args: str, stdin: bytes = b"") -> bytes:
    return subprocess.run(["jose", *args], input=stdin, check=True, capture_output=True).stdout


def _public_ecmr_point() -> bytes:
    """A fresh P-521 public key as a JWK, as clevis's `jose jwk exc` result looks."""
    private = _jose("jwk", "gen", "-i", '{"alg":"ECMR","crv":"P-521"}')
    return _jose("jwk", "pub", "-i-", "-o-", stdin=private).strip()


def _key_thumbprints(database: Path) -> tuple[str, str]:
    """(signing, exchange) thumbprints of the keys tangd-keygen made."""
    found: dict[str, str] = {}
    for path in database.glob("*.jwk"):
        alg = json.loads(path.read_text()).get("alg", "")
        found[alg] = _jose("jwk", "thp", "-a", "S256", "-i", str(path)).decode().strip()
    if "ES512" not in found or "ECMR" not in found:
        raise RuntimeError(f"tangd-keygen made no signing and exchange key in {database}")
    return found["ES512"], found["ECMR"]


@contextlib.contextmanager
def tangd(root: Path) -> Iterator[Tang]:
    """Debian's tangd with fresh keys, one process per connection on a free port of
    127.0.0.1, as Debian's tangd.socket (Accept=yes, the socket on stdin and stdout).

    The launcher is systemd-socket-activate --accept --inetd: systemd's own
    implementation of exactly that contract, from Debian's systemd package, which execs
    tangd on the accepted socket with no relay process in between (socat's EXEC without
    nofork would add one) and listens with the kernel's full backlog (4096 here). Under
    PID 1 each connection would also start a tangd@ unit, so this is tangd's best case."""
    database = root / "tang-db"
    database.mkdir(parents=True, exist_ok=True)
    subprocess.run([TANGD_KEYGEN, str(database)], check=True, capture_output=True)
    thp, exchange_thp = _key_thumbprints(database)
    port = free_port()
    log = (root / "tangd.log").open("ab")
    command = [
        SOCKET_ACTIVATE,
        f"--listen=127.0.0.1:{port}",
        "--accept",
        "--inetd",
        TANGD,
        str(database),
    ]
    # The launcher logs every connection at info level; only problems are worth a line.
    env = {**os.environ, "SYSTEMD_LOG_LEVEL": "warning"}
    process = subprocess.Popen(command, stdout=log, stderr=log, env=env, start_new_session=True)
    log.close()
    try:
        wait_for_port(port)
        yield Tang(port, database, thp, exchange_thp)
    finally:
        _stop(process, signal.SIGTERM)


def clevis_bind(tang: Tang, secret: bytes, out: Path) -> None:
    """Encrypt SECRET to OUT (a compact JWE) with clevis's tang pin, trusting TANG's
    signing key by its thumbprint, as `clevis luks bind` or a ZFS boot script would."""
    config = json.dumps({"url": tang.url, "thp": tang.thp})
    jwe = subprocess.run(
        ["clevis", "encrypt", "tang", config], input=secret, check=True, capture_output=True
    ).stdout
    out.write_bytes(jwe)


def clevis_decrypt_argv() -> list[str]:
    """The unlock: `clevis decrypt`, the JWE on its standard input, the secret on its
    standard output (one POST /rec/ to tangd through curl, and jose)."""
    return ["clevis", "decrypt"]


def clevis_decrypt(jwe: Path) -> bytes:
    with jwe.open("rb") as stdin:
        return subprocess.run(
            clevis_decrypt_argv(), stdin=stdin, check=True, capture_output=True
        ).stdout
