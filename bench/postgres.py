"""Throwaway PostgreSQL clusters for tests and benchmarks: Debian's server, started by the
caller itself.

`initdb` in a new temporary directory, as the unprivileged `postgres` user when the
suite runs as root (PostgreSQL refuses to run as root), listening on 127.0.0.1 and a
Unix socket in that directory only, with password (SCRAM) authentication over TCP,
and removed afterwards. Nothing here mocks the database.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from bench.common import free_port

SERVER_USER = "postgres"  # made by Debian's postgresql-common
ADMIN = "tests"  # the cluster's superuser, over the Unix socket only
PASSWORD = "test-password-" + os.urandom(6).hex()


def bindir() -> Path:
    """The newest of Debian's PostgreSQL server versions installed."""
    found = sorted(
        glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(p.split("/")[4])
    )
    if not found:
        raise RuntimeError(
            "no PostgreSQL server: install Debian's postgresql (scripts/test.sh does)"
        )
    return Path(found[-1]).parent


def _as_server_user() -> list[str]:
    return ["runuser", "-u", SERVER_USER, "--"] if os.geteuid() == 0 else []


class Cluster:
    """One running PostgreSQL server in its own directory."""

    def __init__(self, root: Path, port: int | None = None) -> None:
        self.root = root
        self.data = root / "data"
        self.socket_dir = root
        self.port = port or free_port()
        self.passfile = root / "pgpass"

    # Set-up

    def _run(self, *argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*_as_server_user(), *argv], capture_output=True, text=True, check=check, timeout=120
        )

    def init(self, extra_conf: str = "") -> None:
        password_file = self.root / "superuser-password"
        password_file.write_text(PASSWORD + "\n")
        self._chown(password_file)
        self._run(
            str(bindir() / "initdb"),
            "-D",
            str(self.data),
            "-U",
            ADMIN,
            "--auth-local=trust",
            "--auth-host=scram-sha-256",
            f"--pwfile={password_file}",
            "--no-instructions",
            "-E",
            "UTF8",
            "--locale=C.UTF-8",
        )
        password_file.unlink()
        with (self.data / "postgresql.conf").open("a") as conf:
            conf.write(
                f"listen_addresses = '127.0.0.1'\nport = {self.port}\n"
                f"unix_socket_directories = '{self.socket_dir}'\n"
                "fsync = on\nsynchronous_commit = on\nmax_connections = 200\n"
                "shared_buffers = 32MB\n" + extra_conf
            )
        self.write_passfile()

    def write_passfile(self) -> None:
        # libpq's password file (0600): the key server's URL names it with passfile=.
        # Any port: a URL naming two servers (a primary and its standby) needs both.
        self.passfile.write_text(f"127.0.0.1:*:*:*:{PASSWORD}\n")
        self.passfile.chmod(0o600)
        self._chown(self.passfile)  # pg_basebackup runs as the server's user

    def _chown(self, path: Path) -> None:
        if os.geteuid() == 0:
            entry = pwd.getpwnam(SERVER_USER)
            os.chown(path, entry.pw_uid, entry.pw_gid)

    # Running

    def start(self) -> None:
        log = self.root / "server.log"
        self._run(str(bindir() / "pg_ctl"), "-D", str(self.data), "-l", str(log), "-w", "start")

    def stop(self, mode: str = "fast") -> None:
        self._run(
            str(bindir() / "pg_ctl"), "-D", str(self.data), "-m", mode, "-w", "stop", check=False
        )

    def kill(self) -> None:
        """kill -9 the postmaster and every backend at once: the machine's crash, not a
        shutdown (a postmaster killed alone leaves backends that still answer)."""
        pid = int((self.data / "postmaster.pid").read_text().split()[0])
        for victim in [pid, *_children(pid)]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(victim, 9)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.05)
        raise TimeoutError("postmaster did not die")

    def promote(self) -> None:
        self._run(str(bindir() / "pg_ctl"), "-D", str(self.data), "-w", "promote")

    def standby_of(self, primary: Cluster, name: str) -> None:
        """Make this (not yet initialised) cluster a streaming standby of PRIMARY, named
        NAME for its synchronous_standby_names."""
        self.write_passfile()
        self._run(
            str(bindir() / "pg_basebackup"),
            "-d",
            f"host=127.0.0.1 port={primary.port} user={ADMIN} passfile={primary.passfile}"
            f" application_name={name}",
            "-D",
            str(self.data),
            "-R",  # standby.signal, and primary_conninfo as given
            "-X",
            "stream",
            "-c",
            "fast",
            "-w",  # never ask for a password: fail
        )
        with (self.data / "postgresql.conf").open("a") as conf:
            conf.write(
                f"port = {self.port}\nunix_socket_directories = '{self.socket_dir}'\n"
                "hot_standby = on\n"
            )

    def psql(self, sql: str, database: str = "postgres") -> str:
        result = self._run(
            str(bindir() / "psql"),
            "-h",
            str(self.socket_dir),
            "-p",
            str(self.port),
            "-U",
            ADMIN,
            "-d",
            database,
            "-v",
            "ON_ERROR_STOP=1",
            "-At",
            "-c",
            sql,
        )
        return result.stdout.strip()

    def new_database(self, name: str) -> str:
        """A new empty database owned by the superuser; return the key server's URL for it
        (over TCP with the password from the passfile, as a deployment would connect)."""
        self.psql(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def url(self, database: str) -> str:
        return f"postgresql://{ADMIN}@127.0.0.1:{self.port}/{database}?passfile={self.passfile}"


def _children(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            if int(fields[1]) == pid:
                found.append(int(stat.parent.name))
    return found


def _private_directory() -> Path:
    # Not under pytest's tmp_path: its parents are root's 0700, which the server's user
    # cannot cross.
    root = Path(tempfile.mkdtemp(prefix="zua-pg-"))
    if os.geteuid() == 0:
        entry = pwd.getpwnam(SERVER_USER)
        os.chown(root, entry.pw_uid, entry.pw_gid)
    return root


@contextlib.contextmanager
def cluster(extra_conf: str = "") -> Iterator[Cluster]:
    """A started cluster, stopped and removed afterwards."""
    root = _private_directory()
    running = Cluster(root)
    try:
        running.init(extra_conf)
        running.start()
        yield running
    finally:
        running.stop("immediate")
        shutil.rmtree(root, ignore_errors=True)


@contextlib.contextmanager
def replicated(standby_name: str = "standby1") -> Iterator[tuple[Cluster, Cluster]]:
    """A primary whose commits wait for a synchronous standby (remote flush), and that
    standby, streaming; both stopped and removed afterwards."""
    roots = [_private_directory(), _private_directory()]
    primary, standby = Cluster(roots[0]), Cluster(roots[1])
    try:
        primary.init(
            "wal_level = replica\nmax_wal_senders = 5\n"
            f"synchronous_standby_names = '{standby_name}'\nsynchronous_commit = on\n"
        )
        primary.start()
        standby.standby_of(primary, standby_name)
        standby.start()
        deadline = time.monotonic() + 60
        while primary.psql("SELECT sync_state FROM pg_stat_replication") != "sync":
            if time.monotonic() > deadline:
                raise TimeoutError("the standby did not become synchronous")
            time.sleep(0.1)
        yield primary, standby
    finally:
        for cluster in (standby, primary):
            cluster.stop("immediate")
        for root in roots:
            shutil.rmtree(root, ignore_errors=True)


def available() -> bool:
    try:
        bindir()
    except RuntimeError:
        return False
    return shutil.which("runuser") is not None or os.geteuid() != 0
