"""A real key server for tests: its own data directory, real gunicorn, real TLS on 127.0.0.1."""

from __future__ import annotations

import contextlib
import io
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import requests

# One definition of each, shared with the benchmarks.
from bench.common import free_port, machine_id_for
from tests.pinned_requests import pinned_session
from zfs_unlock_common import pinning
from zfs_unlock_common.csr import new_key_and_csr
from zfs_unlock_server import admin, cli
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
        self, root: Path, server_names: Sequence[str] = ("localhost", "127.0.0.1")
    ) -> None:
        """A new data directory under ROOT; SERVER_NAMES go into the server certificate's
        subject alternative names (a client that checks them, such as libcurl, needs the
        address it connects to among them)."""
        self.root = root
        self.data_dir = root / "data"
        self.hosts_dir = root / "hosts"
        self.hosts_dir.mkdir(parents=True)
        self.pin = admin.init_data_dir(self.data_dir, list(server_names))
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
        """Rewrite server.toml with these settings (dicts become tables)."""
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

    def audit_records(self) -> list[dict[str, Any]]:
        from zfs_unlock_server import audit

        return list(audit.read(self.data_dir / "audit.log"))


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
