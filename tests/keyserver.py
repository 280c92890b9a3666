"""A real key server for tests: its own data directory, real gunicorn, real TLS on 127.0.0.1."""

from __future__ import annotations

import base64
import contextlib
import io
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import requests

# One definition of each, shared with the benchmarks.
from bench.common import free_port, machine_id_for
from tests.pinned_requests import pinned_session
from zfs_unlock_common import pinning
from zfs_unlock_common.csr import new_key_and_csr
from zfs_unlock_server import admin, cli, database
from zfs_unlock_server import config as server_config
from zfs_unlock_server.config import Layout

SERVER_BIN = Path(sys.executable).with_name("zfs-unlock-server")
# The suite runs as root on throw-away data directories; serve refuses root without it.
ROOT_ONLY = ("--allow-root",) if os.geteuid() == 0 else ()


@dataclass(frozen=True)
class HostCreds:
    name: str
    machine_id: str
    cert: Path
    key: Path


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    return repr(value)


class KeyServer:
    def __init__(
        self,
        root: Path,
        server_names: Sequence[str] = ("localhost", "127.0.0.1"),
        database_url: str = "",
    ) -> None:
        """A new data directory under ROOT; SERVER_NAMES go into the server certificate's
        subject alternative names (a client that checks them, such as libcurl, needs the
        address it connects to among them). DATABASE_URL: PostgreSQL instead of SQLite."""
        self.root = root
        self.data_dir = root / "data"
        self.hosts_dir = root / "hosts"
        self.hosts_dir.mkdir(parents=True)
        self.database_url = database_url
        self.settings: dict[str, Any] = {}  # what configure() was last given
        self.pin = admin.init_data_dir(self.data_dir, list(server_names), database_url=database_url)
        self.port = 0
        self.process: subprocess.Popen[bytes] | None = None
        self.log_path = root / "server.log"

    @classmethod
    def over(cls, root: Path, data_dir: Path) -> KeyServer:
        """A KeyServer for an existing DATA_DIR (one `restore` made), its files under ROOT."""
        server = cls.__new__(cls)
        server.root, server.data_dir = root, data_dir
        server.hosts_dir = root / "hosts"
        server.hosts_dir.mkdir(parents=True, exist_ok=True)
        server.pin = admin.server_pin(Layout(data_dir))
        server.database_url = server_config.load(Layout(data_dir)).database.url
        server.settings = {}
        server.port = 0
        server.process = None
        server.log_path = root / "server.log"
        return server

    # Admin CLI, in-process (the same code path as the console script)

    def admin(self, *args: str, stdin: bytes = b"") -> tuple[int, str, str]:
        out, err = io.StringIO(), io.StringIO()
        fake_stdin = io.TextIOWrapper(io.BytesIO(stdin))
        saved = sys.stdin
        sys.stdin = fake_stdin
        try:
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                code = cli.main(["--data-dir", str(self.data_dir), *args])
        finally:
            sys.stdin = saved
        return code, out.getvalue(), err.getvalue()

    def must(self, *args: str, stdin: bytes = b"") -> str:
        code, out, err = self.admin(*args, stdin=stdin)
        assert code == 0, f"{args}: exit {code}: {err}"
        return out

    def configure(self, **settings: Any) -> None:
        """Rewrite server.toml with these settings (dicts become tables); the database
        stays the one it was made with unless SETTINGS name one."""
        self.settings = settings
        if self.database_url:
            settings = {"database": {"url": self.database_url}, **settings}
        lines = [f"{k} = {toml_value(v)}" for k, v in settings.items() if not isinstance(v, dict)]
        for table, values in settings.items():
            if isinstance(values, dict):
                lines.append(f"[{table}]")
                lines += [f"{k} = {toml_value(v)}" for k, v in values.items()]
        (self.data_dir / "server.toml").write_text("\n".join(lines) + "\n")

    def add_host(self, name: str, *options: str, machine_id: str | None = None) -> HostCreds:
        """Enroll a host the way an operator would: the host makes a CSR, the server signs it."""
        machine_id = machine_id or machine_id_for(name)
        host_dir = self.hosts_dir / name
        host_dir.mkdir()
        key_pem, csr_pem = new_key_and_csr(name)
        key = host_dir / "client.key"
        key.write_bytes(key_pem)
        key.chmod(0o400)
        (host_dir / "client.csr").write_bytes(csr_pem)
        cert = host_dir / "client.crt"
        self.must(
            "host",
            "add",
            name,
            "--machine-id",
            machine_id,
            "--csr",
            str(host_dir / "client.csr"),
            "--cert-out",
            str(cert),
            *options,
        )
        return HostCreds(name, machine_id, cert, key)

    # The server process

    def start(
        self,
        workers: int = 2,
        env: dict[str, str] | None = None,
        timeout: float = 20,
        launcher: Sequence[str] = (),
    ) -> None:
        """Serve on a free port of 127.0.0.1 until stop(); LAUNCHER goes before the command
        (something that sets up the process, then executes its arguments)."""
        self.port = self.port or free_port()
        notify_path = self.root / "notify.sock"
        notify_path.unlink(missing_ok=True)
        notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        notify.bind(str(notify_path))
        notify.settimeout(timeout)
        environment = {**os.environ, **(env or {}), "NOTIFY_SOCKET": str(notify_path)}
        log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            [
                *launcher,
                str(SERVER_BIN),
                "--data-dir",
                str(self.data_dir),
                "serve",
                "--listen",
                f"127.0.0.1:{self.port}",
                "--workers",
                str(workers),
                *ROOT_ONLY,
            ],
            stdout=log,
            stderr=log,
            env=environment,
            start_new_session=True,
        )
        log.close()
        try:
            message = notify.recv(4096)
        except TimeoutError:
            self.stop()
            raise RuntimeError(
                f"server did not become ready:\n{self.log_path.read_text()}"
            ) from None
        finally:
            notify.close()
        assert b"READY=1" in message, message

    def stop(self, sig: int = signal.SIGTERM) -> int:
        if self.process is None:
            return 0
        with contextlib.suppress(ProcessLookupError):
            if sig == signal.SIGKILL:
                os.killpg(self.process.pid, sig)  # the master and every worker at once
            else:
                self.process.send_signal(sig)
        code = self.process.wait(timeout=30)
        self.process = None
        return code

    def url(self, path: str) -> str:
        return f"https://127.0.0.1:{self.port}{path}"

    def session(self, host: HostCreds, source_address: str | None = None) -> requests.Session:
        return pinned_session(
            [pinning.parse_pin(self.pin)],
            host.cert,
            host.key,
            (source_address, 0) if source_address else None,
        )

    @property
    def shared_database(self) -> bool:
        return bool(self.database_url)

    def sql(self, statement: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        """Run STATEMENT (qmark placeholders) on the server's database behind its back, as
        an intruder or a broken disk would; return its rows."""
        if not self.database_url:
            with contextlib.closing(sqlite3.connect(self.data_dir / "keys.db")) as db, db:
                return db.execute(statement, params).fetchall()
        with psycopg.connect(self.database_url, autocommit=True) as conn:
            cursor = conn.execute(statement.replace("?", "%s").encode(), params)
            return cursor.fetchall() if cursor.description else []

    def break_audit(self) -> None:
        """Make every audit write fail as on a full disk: the log is /dev/full (ENOSPC), or
        the audit table's inserts fail with PostgreSQL's disk_full."""
        if not self.database_url:
            self.configure(**{**self.settings, "audit_log": "/dev/full"})
            return
        self.sql(
            "CREATE FUNCTION refuse_audit() RETURNS trigger LANGUAGE plpgsql"
            " AS $$ BEGIN RAISE EXCEPTION 'no room' USING ERRCODE = 'disk_full'; END $$"
        )
        self.sql(
            "CREATE TRIGGER refuse_audit BEFORE INSERT ON audit"
            " FOR EACH ROW EXECUTE FUNCTION refuse_audit()"
        )

    def mend_audit(self) -> None:
        """Undo break_audit()."""
        if not self.database_url:
            self.configure(**{k: v for k, v in self.settings.items() if k != "audit_log"})
            return
        self.sql("DROP TRIGGER refuse_audit ON audit")

    def audit_records(self) -> list[dict[str, Any]]:
        """The audit trail, wherever the server keeps it (audit.log, or its database)."""
        layout = Layout(self.data_dir)
        return list(database.read_audit(layout, server_config.load(layout)))


@contextlib.contextmanager
def running(server: KeyServer, **kwargs: Any) -> Iterator[KeyServer]:
    server.start(**kwargs)
    try:
        yield server
    finally:
        server.stop()


def enroll(
    session: requests.Session,
    server: KeyServer,
    host: HostCreds,
    pool: str,
    dataset_guid: str,
    dataset: str = "tank/data",
    keyformat: str = "raw",
    **extra: Any,
) -> requests.Response:
    return session.post(
        server.url("/v1/keys"),
        json={
            "machine_id": host.machine_id,
            "pool_guid": pool,
            "dataset_guid": dataset_guid,
            "dataset": dataset,
            "keyformat": keyformat,
            **extra,
        },
        timeout=10,
        allow_redirects=False,
    )


def activated_key(
    server: KeyServer,
    host: HostCreds,
    pool: str,
    dataset_guid: str,
    dataset: str = "tank/data",
    keyformat: str = "raw",
    **extra: Any,
) -> tuple[str, bytes]:
    """Enroll (EXTRA: more fields, such as an imported key) and activate a key for a
    dataset of HOST; return (key id, key bytes)."""
    with server.session(host) as session:
        response = enroll(session, server, host, pool, dataset_guid, dataset, keyformat, **extra)
        assert response.status_code == 201, response.text
        body = response.json()
        activated = session.post(
            server.url("/v1/keys/activate"),
            json={
                "machine_id": host.machine_id,
                "pool_guid": pool,
                "dataset_guid": dataset_guid,
                "key_id": body["key_id"],
            },
            timeout=10,
        )
        assert activated.status_code == 200, activated.text
        assert activated.json()["state"] == "active"
    return body["key_id"], base64.b64decode(body["key"])


def release(
    session: requests.Session,
    server: KeyServer,
    host: HostCreds,
    pool: str,
    dataset_guid: str,
    machine_id: str | None = None,
) -> requests.Response:
    return session.get(
        server.url(f"/v1/hosts/{machine_id or host.machine_id}/keys/{pool}/{dataset_guid}"),
        timeout=10,
        allow_redirects=False,
    )


def wait_for(predicate: Any, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not met")
        time.sleep(0.05)


def run_admin_line(server: KeyServer, line: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """A `zfs-unlock-server ...` line as an admin's shell runs it in CWD (redirections
    included), on SERVER's data directory."""
    command = line.replace("zfs-unlock-server ", f"{SERVER_BIN} --data-dir {server.data_dir} ", 1)
    return subprocess.run(
        ["bash", "-c", command], cwd=cwd, capture_output=True, text=True, timeout=60, check=False
    )


def run_serve(server: KeyServer, env: dict[str, str] | None = None) -> tuple[int, str, float]:
    """Run the real console script's `serve`; return (exit code, stderr, seconds taken)."""
    environment = {k: v for k, v in os.environ.items() if k != "CREDENTIALS_DIRECTORY"}
    process = subprocess.Popen(
        [
            str(SERVER_BIN),
            "--data-dir",
            str(server.data_dir),
            "serve",
            "--listen",
            f"127.0.0.1:{free_port()}",
            "--workers",
            "1",
            *ROOT_ONLY,
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env={**environment, **(env or {})},
        start_new_session=True,
    )
    started = time.monotonic()
    try:
        _, err = process.communicate(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.communicate()
        raise AssertionError("serve did not exit: it is serving") from None
    return process.returncode, err.decode(errors="replace"), time.monotonic() - started
