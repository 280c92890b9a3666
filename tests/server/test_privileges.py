"""Who the server runs as: serve refuses root; root's admin commands become the data
directory's owner, so the service can read every file they create.

Real processes throughout. The suite runs as root; a throw-away system user stands in
for the service's own (zfs-unlock) and is removed afterwards.
"""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import shutil
import signal
import socket
import sqlite3
import struct
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes

from bench.common import free_port
from tests.keyserver import SERVER_BIN, KeyServer
from tests.pinned_requests import pinned_session
from zfs_unlock_common import pinning
from zfs_unlock_common.csr import new_key_and_csr
from zfs_unlock_server import audit, privileges, secretfile
from zfs_unlock_server.config import DATA_DIR_ENV
from zfs_unlock_server.errors import ConfigError

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="switching users needs root")

EX_CANTCREAT = 73
EX_NOPERM = 77
EX_CONFIG = 78
MACHINE_ID = "0123456789abcdef0123456789abcdef"
POOL = "1234567890123456789"


@dataclass(frozen=True)
class Owned:
    """A data directory owned by the throw-away user, and a place only root may enter."""

    user: pwd.struct_passwd
    data: Path
    private: Path  # 0700 root: the admin's own files


@pytest.fixture(scope="module")
def service_user() -> Iterator[pwd.struct_passwd]:
    name = f"zua-test-{os.getpid()}"
    subprocess.run(
        [
            *("useradd", "--system", "--user-group", "--no-create-home"),
            *("--home-dir", "/nonexistent", "--shell", "/usr/sbin/nologin", name),
        ],
        check=True,
        capture_output=True,
    )
    try:
        yield pwd.getpwnam(name)
    finally:
        subprocess.run(["userdel", name], check=False, capture_output=True)


@pytest.fixture
def owned(service_user: pwd.struct_passwd) -> Iterator[Owned]:
    # Not under pytest's tmp_path: its root (pytest-of-root) is 0700, closed to the user.
    base = Path(tempfile.mkdtemp(prefix="zua-privileges-"))
    try:
        base.chmod(0o711)
        data = base / "data"
        data.mkdir(mode=0o700)
        os.chown(data, service_user.pw_uid, service_user.pw_gid)
        private = base / "private"
        private.mkdir(mode=0o700)
        yield Owned(service_user, data, private)
    finally:
        shutil.rmtree(base)


def run(
    owned: Owned, *args: str, stdin: bytes = b"", env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """The console script as root runs it, against OWNED's data directory."""
    environment = {
        k: v for k, v in os.environ.items() if k not in {DATA_DIR_ENV, "CREDENTIALS_DIRECTORY"}
    }
    result = subprocess.run(
        [str(SERVER_BIN), "--data-dir", str(owned.data), *args],
        input=stdin,
        capture_output=True,
        env={**environment, **(env or {})},
        cwd=owned.private,
        timeout=60,
        check=False,
    )
    return subprocess.CompletedProcess(
        result.args, result.returncode, result.stdout.decode(), result.stderr.decode()
    )


def must(owned: Owned, *args: str, **kwargs: Any) -> str:
    result = run(owned, *args, **kwargs)
    assert result.returncode == 0, f"{args}: exit {result.returncode}: {result.stderr}"
    return result.stdout


def strangers(directory: Path, uid: int) -> list[str]:
    """Entries under DIRECTORY (itself included) that UID does not own."""
    return [str(p) for p in [directory, *directory.rglob("*")] if p.lstat().st_uid != uid]


def init_with_master_key_out(owned: Owned) -> Path:
    """init as root into the user's empty directory, the master key kept apart."""
    credentials = owned.private / "credentials"
    result = run(
        owned,
        "init",
        "--server-name",
        "127.0.0.1",
        "--master-key-out",
        str(credentials / "master-key"),
    )
    assert result.returncode == 0, result.stderr
    return credentials


def add_host(owned: Owned, name: str = "web1") -> tuple[Path, Path]:
    """Enroll a host from a CSR only root can read; the certificate comes on stdout."""
    key_pem, csr_pem = new_key_and_csr(name)
    key, csr, cert = (owned.private / f"{name}.{ext}" for ext in ("key", "csr", "crt"))
    secretfile.write_new(key, key_pem, 0o400)
    secretfile.write_new(csr, csr_pem, 0o600)
    cert.write_bytes(
        must(owned, "host", "add", name, "--machine-id", MACHINE_ID, "--csr", str(csr)).encode()
    )
    return cert, key


def admin_actors(owned: Owned) -> set[str]:
    return {str(r.get("actor")) for r in audit.read(owned.data / "audit.log") if "actor" in r}


# serve never runs as root by accident


def test_serve_refuses_root_with_exit_77_and_touches_nothing(keyserver: KeyServer) -> None:
    before = sorted(p.name for p in keyserver.data_dir.iterdir())
    result = subprocess.run(
        [str(SERVER_BIN), "--data-dir", str(keyserver.data_dir), "serve", "--workers", "1"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == EX_NOPERM
    assert "refusing to serve as root" in result.stderr and "--allow-root" in result.stderr
    assert "Traceback" not in result.stderr
    assert sorted(p.name for p in keyserver.data_dir.iterdir()) == before  # no database opened


def test_serve_refuses_root_also_for_another_users_directory(owned: Owned) -> None:
    must(owned, "init")
    result = run(owned, "serve", "--workers", "1")
    assert result.returncode == EX_NOPERM, result.stderr
    assert not strangers(owned.data, owned.user.pw_uid)


# Root's admin commands become the data directory's owner


def test_init_as_root_into_the_users_directory_makes_every_file_the_users(owned: Owned) -> None:
    credentials = init_with_master_key_out(owned)
    master = credentials / "master-key"
    info = master.stat()
    assert (info.st_uid, info.st_mode & 0o7777, info.st_size) == (0, 0o400, 32)
    assert (credentials.stat().st_mode & 0o7777) == 0o700
    assert not (owned.data / "master.key").exists()
    assert {"keys.db", "server.key", "ca.key", "audit.log"} <= {
        p.name for p in owned.data.iterdir()
    }
    assert not strangers(owned.data, owned.user.pw_uid)
    assert admin_actors(owned) == {"admin:root"}  # the admin, not the account it became


def test_init_refuses_a_master_key_out_that_exists_or_sits_in_the_data_directory(
    owned: Owned,
) -> None:
    taken = owned.private / "master-key"
    taken.write_bytes(b"x")
    result = run(owned, "init", "--master-key-out", str(taken))
    assert result.returncode == EX_CANTCREAT, result.stderr
    assert taken.read_bytes() == b"x"
    inside = run(owned, "init", "--master-key-out", str(owned.data / "master-key"))
    assert inside.returncode == 65 and "outside the data directory" in inside.stderr
    assert not any(owned.data.iterdir())


def test_admin_commands_as_root_leave_only_files_the_owner_owns(owned: Owned) -> None:
    credentials = init_with_master_key_out(owned)
    add_host(owned)
    must(owned, "host", "list")
    # key create seals: the credential in root's directory is read before the switch.
    key_id = must(
        owned,
        "key",
        "create",
        "--host",
        "web1",
        "--pool-guid",
        POOL,
        "--dataset-guid",
        "42",
        "--dataset",
        "tank/a",
        env={"CREDENTIALS_DIRECTORY": str(credentials)},
    ).strip()
    must(owned, "key", "revoke", key_id)
    legacy = owned.private / "simplezfs.db"
    db = sqlite3.connect(legacy)
    with db:
        db.execute("CREATE TABLE key (name, machine, pool, keyvalue, active)")
        db.execute("INSERT INTO key VALUES ('old', ?, ?, ?, 1)", (MACHINE_ID, POOL, "ab" * 16))
    db.close()
    legacy.chmod(0o600)
    must(owned, "import-simplezfs", str(legacy), env={"CREDENTIALS_DIRECTORY": str(credentials)})
    assert "host_added" in must(owned, "audit")
    assert not strangers(owned.data, owned.user.pw_uid)
    assert admin_actors(owned) == {"admin:root"}


def test_a_file_an_admin_command_creates_belongs_to_the_owner(owned: Owned) -> None:
    must(owned, "init")
    add_host(owned)
    (owned.data / "audit.log").unlink()  # rotated away: the next record makes a new one
    must(owned, "host", "disable", "web1")
    log = (owned.data / "audit.log").stat()
    assert (log.st_uid, log.st_gid, log.st_mode & 0o777) == (
        owned.user.pw_uid,
        owned.user.pw_gid,
        0o600,
    )
    assert not strangers(owned.data, owned.user.pw_uid)


# What the command line names to write is the admin's, written where only the admin may


def test_cert_out_and_issue_key_in_roots_own_directory(owned: Owned) -> None:
    must(owned, "init")
    _, csr_pem = new_key_and_csr("web1")
    csr = owned.private / "web1.csr"
    csr.write_bytes(csr_pem)
    cert = owned.private / "web1.crt"
    result = run(
        owned,
        *("host", "add", "web1", "--machine-id", MACHINE_ID, "--csr", str(csr)),
        *("--cert-out", str(cert)),
    )
    assert (result.returncode, result.stdout) == (0, ""), result.stderr
    assert f"client certificate written to {cert}" in result.stderr
    assert cert.stat().st_uid == 0
    shown = json.loads(must(owned, "host", "show", "web1", "--json"))
    issued = x509.load_pem_x509_certificate(cert.read_bytes())
    fingerprint = issued.fingerprint(hashes.SHA256()).hex()
    assert [c["sha256"] for c in shown["certificates"]] == [fingerprint]

    bundle, also = owned.private / "web2", owned.private / "web2.crt"
    result = run(
        owned,
        *("host", "add", "web2", "--machine-id", "f" * 32, "--issue-key", str(bundle)),
        *("--cert-out", str(also)),
    )
    assert result.returncode == 0, result.stderr
    assert also.read_bytes() == (bundle / "client.crt").read_bytes()
    # The host's private key is root's (0400), not the service's: it leaves for the host.
    key = (bundle / "client.key").stat()
    assert (key.st_uid, key.st_mode & 0o777) == (0, 0o400)
    assert all(p.stat().st_uid == 0 for p in (bundle, bundle / "client.crt", also))
    assert not strangers(owned.data, owned.user.pw_uid)


def test_a_refused_command_leaves_no_output_where_the_owner_could_not_remove_it(
    owned: Owned,
) -> None:
    must(owned, "init")
    add_host(owned)  # web1
    _, csr_pem = new_key_and_csr("again")
    csr = owned.private / "again.csr"
    csr.write_bytes(csr_pem)
    kept = owned.private / "kept.crt"
    kept.write_text("the admin's own file\n")
    for out in (owned.private / "new.crt", kept):
        result = run(
            owned,
            *("host", "add", "web1", "--machine-id", "e" * 32, "--csr", str(csr)),
            *("--cert-out", str(out)),
        )
        assert result.returncode == 65 and "already exists" in result.stderr, result.stderr
    bundle = owned.private / "deep" / "web1"
    result = run(owned, "host", "add", "web1", "--machine-id", "e" * 32, "--issue-key", str(bundle))
    assert result.returncode == 65, result.stderr
    assert sorted(p.name for p in owned.private.iterdir()) == [
        "again.csr",
        "kept.crt",
        "web1.crt",
        "web1.csr",
        "web1.key",
    ]
    assert kept.read_text() == "the admin's own file\n"
    # An output even root cannot create is refused before anything is done or recorded.
    before = must(owned, "audit", "--json")
    missing = run(
        owned,
        *("host", "add", "web3", "--machine-id", "d" * 32, "--csr", str(csr)),
        *("--cert-out", str(owned.private / "nowhere" / "web3.crt")),
    )
    assert missing.returncode == EX_CANTCREAT and "--cert-out" in missing.stderr
    assert must(owned, "audit", "--json") == before


def test_commands_that_seal_say_where_a_moved_master_key_comes_from(owned: Owned) -> None:
    init_with_master_key_out(owned)
    add_host(owned)
    result = run(
        owned,
        "key",
        "create",
        "--host",
        "web1",
        "--pool-guid",
        POOL,
        "--dataset-guid",
        "42",
        "--dataset",
        "tank/a",
    )
    assert result.returncode == EX_CONFIG, result.stderr
    assert "CREDENTIALS_DIRECTORY=/etc/zfs-unlock-server" in result.stderr
    assert must(owned, "key", "list") == ""


def test_nothing_switches_for_a_root_owned_or_missing_directory(tmp_path: Path) -> None:
    assert privileges.owner_to_become(tmp_path) is None
    assert privileges.owner_to_become(tmp_path / "missing") is None


# The service user serves with the master key as a credential


@pytest.fixture
def runs_as_user(owned: Owned) -> Owned:
    """OWNED, when its user can start this interpreter (not one under root's 0700 home)."""
    try:
        subprocess.run(
            [sys.executable, "-c", ""],
            user=owned.user.pw_uid,
            group=owned.user.pw_gid,
            extra_groups=[],
            cwd="/",
            check=True,
            timeout=60,
        )
    except (PermissionError, subprocess.CalledProcessError):
        pytest.skip(f"{owned.user.pw_name} cannot run {sys.executable}")
    return owned


@contextlib.contextmanager
def serving_as(owned: Owned, credentials: Path | None) -> Iterator[int]:
    """`serve` as the owner, the way the unit runs it; yields the port once READY=1 came."""
    port = free_port()
    notify_path = owned.data.parent / "notify.sock"
    environment = {
        k: v for k, v in os.environ.items() if k not in {DATA_DIR_ENV, "CREDENTIALS_DIRECTORY"}
    }
    if credentials is not None:
        environment["CREDENTIALS_DIRECTORY"] = str(credentials)
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify:
        notify.bind(str(notify_path))
        notify_path.chmod(0o777)  # the user must be able to send to it
        notify.settimeout(30)
        process = subprocess.Popen(
            [
                *(str(SERVER_BIN), "--data-dir", str(owned.data), "serve", "--workers", "1"),
                *("--listen", f"127.0.0.1:{port}"),
            ],
            env={**environment, "NOTIFY_SOCKET": str(notify_path)},
            user=owned.user.pw_uid,
            group=owned.user.pw_gid,
            extra_groups=[],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            cwd="/",
            start_new_session=True,
        )
        try:
            try:
                ready = notify.recv(4096)
            except TimeoutError:
                ready = b""
            if b"READY=1" not in ready:
                process.kill()
                raise AssertionError(process.communicate(timeout=30)[1].decode())
            yield port
        finally:
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(signal.SIGTERM)
            process.communicate(timeout=30)  # also closes the stderr pipe


def test_the_owner_serves_with_the_master_key_as_a_credential(runs_as_user: Owned) -> None:
    owned = runs_as_user
    credentials = init_with_master_key_out(owned)
    cert, key = add_host(owned)
    # What systemd's LoadCredential= hands the service: a private copy it can read.
    delivered = owned.data.parent / "run-credentials"
    delivered.mkdir(mode=0o500)
    shutil.copy(credentials / "master-key", delivered / "master-key")
    for path in (delivered / "master-key", delivered):
        os.chown(path, owned.user.pw_uid, owned.user.pw_gid)
    pin = must(owned, "pin").strip()
    with serving_as(owned, delivered) as port:
        session = pinned_session([pinning.parse_pin(pin)], cert, key, None)
        enrolled = session.post(
            f"https://127.0.0.1:{port}/v1/keys",
            json={
                "machine_id": MACHINE_ID,
                "pool_guid": POOL,
                "dataset_guid": "7",
                "dataset": "tank/b",
                "keyformat": "raw",
            },
            timeout=20,
        )
        assert enrolled.status_code == 201, enrolled.text
        released = session.get(
            f"https://127.0.0.1:{port}/v1/hosts/{MACHINE_ID}/keys/{POOL}/7", timeout=20
        )
        assert released.status_code == 200, released.text
        session.close()
    assert (owned.data / "ratelimit.db").exists()
    assert not strangers(owned.data, owned.user.pw_uid)


def test_serve_without_the_moved_master_key_fails_with_the_way_to_give_it(
    runs_as_user: Owned,
) -> None:
    owned = runs_as_user
    init_with_master_key_out(owned)
    result = subprocess.run(
        [str(SERVER_BIN), "--data-dir", str(owned.data), "serve", "--workers", "1"],
        user=owned.user.pw_uid,
        group=owned.user.pw_gid,
        extra_groups=[],
        env={k: v for k, v in os.environ.items() if k != "CREDENTIALS_DIRECTORY"},
        cwd="/",
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == EX_CONFIG
    assert "master.key: missing" in result.stderr and "credential master-key" in result.stderr


# The credential where the file system has ACLs (systemd then adds one for the user)

ACL_USER_OBJ, ACL_USER, ACL_GROUP_OBJ, ACL_GROUP, ACL_MASK, ACL_OTHER = 1, 2, 4, 8, 16, 32
UNDEFINED_ID = 0xFFFFFFFF


def acl(*entries: tuple[int, int, int]) -> bytes:
    """The xattr form; the kernel wants entries ordered by tag, then id."""
    ordered = sorted(entries, key=lambda e: (e[0], e[2]))
    return struct.pack("<I", 2) + b"".join(struct.pack("<HHI", *e) for e in ordered)


def credential_with(tmp_path: Path, *named: tuple[int, int, int], group: int = 0) -> Path:
    path = tmp_path / "master-key"
    path.unlink(missing_ok=True)
    secretfile.write_new(path, os.urandom(32), 0o400)
    entries = [
        (ACL_USER_OBJ, 4, UNDEFINED_ID),
        *named,
        (ACL_GROUP_OBJ, group, UNDEFINED_ID),
        (ACL_MASK, 4, UNDEFINED_ID),
        (ACL_OTHER, 0, UNDEFINED_ID),
    ]
    try:
        os.setxattr(path, "system.posix_acl_access", acl(*entries))
    except OSError as exc:
        pytest.skip(f"no ACLs on {tmp_path}: {exc.strerror}")
    return path


def test_a_credential_readable_through_an_acl_for_this_user_only_is_accepted(
    tmp_path: Path,
) -> None:
    path = credential_with(tmp_path, (ACL_USER, 4, os.geteuid()))
    assert path.stat().st_mode & 0o777 == 0o440  # the mask shows as the group's bits
    secretfile.check_credential(path)
    with pytest.raises(ConfigError, match="too open"):
        secretfile.check_private(path)  # files in the data directory keep the strict rule


@pytest.mark.parametrize(
    ("named", "group"),
    [
        ((ACL_USER, 4, 4242), 0),  # another user may read it
        ((ACL_USER, 6, 0), 0),  # write access
        ((ACL_GROUP, 4, 4242), 0),  # a named group
        ((ACL_USER, 4, 0), 4),  # the owning group
    ],
)
def test_a_credential_others_may_read_is_refused(
    tmp_path: Path, named: tuple[int, int, int], group: int
) -> None:
    path = credential_with(tmp_path, named, group=group)
    with pytest.raises(ConfigError, match="too open"):
        secretfile.check_credential(path)
