"""Backups: taken while serve releases keys, checked byte for byte, restored into a data
directory that serves the same keys under the same pin; refused when damaged, misplaced
or written where it cannot be; and never holding a key in the clear."""

from __future__ import annotations

import base64
import contextlib
import datetime
import io
import json
import os
import subprocess
import tarfile
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.keyserver import SERVER_BIN, HostCreds, KeyServer, release, running
from zfs_unlock_server import backupformat, backuprotation

EX_USAGE, EX_DATAERR, EX_CANTCREAT, EX_IOERR, EX_TEMPFAIL, EX_CONFIG = 64, 65, 73, 74, 75, 78
POOL = "5555555555555555555"


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    environment = {k: v for k, v in os.environ.items() if k != "CREDENTIALS_DIRECTORY"}
    return subprocess.run(
        [str(SERVER_BIN), *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env={**environment, **(env or {})},
    )


def create_keys(server: KeyServer, host: str, count: int) -> dict[str, bytes]:
    """COUNT raw keys imported for HOST (so the test knows them), by dataset GUID."""
    keys = {}
    for index in range(count):
        guid, key = str(7000 + index), os.urandom(32)
        server.must(
            "key", "create", "--host", host, "--pool-guid", POOL, "--dataset-guid", guid,
            "--dataset", f"tank/d{index}", "--import", stdin=key,
        )  # fmt: skip
        keys[guid] = key
    return keys


def released(server: KeyServer, host: HostCreds, guids: list[str]) -> dict[str, bytes]:
    with server.session(host) as session:
        out = {}
        for guid in guids:
            response = release(session, server, host, POOL, guid)
            assert response.status_code == 200, response.text
            out[guid] = base64.b64decode(response.json()["key"])
        return out


def restored_server(root: Path, data_dir: Path, pin: str) -> KeyServer:
    """A KeyServer on DATA_DIR (made by restore, not init)."""
    server = KeyServer.__new__(KeyServer)
    root.mkdir(parents=True, exist_ok=True)
    server.root, server.data_dir, server.hosts_dir = root, data_dir, root / "hosts"
    server.pin, server.port, server.process = pin, 0, None
    server.log_path = root / "server.log"
    return server


@pytest.fixture
def enrolled(tmp_path: Path) -> tuple[KeyServer, HostCreds, dict[str, bytes]]:
    server = KeyServer(tmp_path / "origin")
    host = server.add_host("web1")
    server.add_host("web2")
    keys = create_keys(server, "web1", 3)
    keys.update(create_keys_for_web2(server))
    return server, host, keys


def create_keys_for_web2(server: KeyServer) -> dict[str, bytes]:
    key = os.urandom(32)
    server.must(
        "key", "create", "--host", "web2", "--pool-guid", POOL, "--dataset-guid", "9100",
        "--dataset", "tank/w2", "--import", stdin=key,
    )  # fmt: skip
    return {"9100": key}


@pytest.fixture
def backup_file(enrolled: tuple[KeyServer, HostCreds, dict[str, bytes]], tmp_path: Path) -> Path:
    server = enrolled[0]
    out = tmp_path / "backup.tar"
    done = run("--data-dir", str(server.data_dir), "backup", "--out", str(out))
    assert done.returncode == 0, done.stderr
    return out


def listing(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


# Online backup, verify, restore, serve again


def test_backup_while_serving_then_restore_serves_the_same_keys_under_the_same_pin(
    enrolled: tuple[KeyServer, HostCreds, dict[str, bytes]], tmp_path: Path
) -> None:
    server, host, keys = enrolled
    web1 = [g for g in keys if g != "9100"]
    out = tmp_path / "online.tar"
    statuses: list[int] = []
    stop = threading.Event()
    with running(server):

        def release_in_a_loop() -> None:
            with server.session(host) as session:
                while not stop.is_set():
                    statuses.append(release(session, server, host, POOL, web1[0]).status_code)

        loop = threading.Thread(target=release_in_a_loop)
        loop.start()
        try:
            done = run("--data-dir", str(server.data_dir), "backup", "--out", str(out))
        finally:
            stop.set()
            loop.join()
        assert done.returncode == 0, done.stderr
        before = released(server, host, web1)
    assert statuses and set(statuses) == {200}  # releases went on while it ran
    assert done.stdout == f"{out}\n"
    assert "4 key(s)" in done.stderr and "the master key is not in it" in done.stderr
    assert out.stat().st_mode & 0o777 == 0o600

    master = server.data_dir / "master.key"
    verified = run("backup", "verify", str(out), "--master-key", str(master))
    assert verified.returncode == 0, verified.stderr
    assert f"{out}: intact, SHA-256 " in verified.stdout
    assert "host web1: 3 key(s) open" in verified.stdout
    assert "host web2: 1 key(s) open" in verified.stdout
    assert "every key opens" in verified.stdout

    # The audit log names who took it, the file, the counts and the checksum.
    (record,) = [r for r in server.audit_records() if r["event"] == "backup"]
    checksum = verified.stdout.split("SHA-256 ", 1)[1].split()[0]
    assert record["actor"].startswith("admin:") and record["file"] == str(out)
    assert (record["hosts"], record["keys"], record["checksum"]) == (2, 4, checksum)

    new = tmp_path / "elsewhere" / "data"
    restored = run("--data-dir", str(new), "restore", str(out), "--master-key", str(master))
    assert restored.returncode == 0, restored.stderr
    assert restored.stdout.strip() == server.pin
    assert "master key checked and placed" in restored.stderr
    modes = {p.name: oct(p.stat().st_mode & 0o777) for p in new.iterdir()}
    assert {k: modes[k] for k in ("keys.db", "master.key", "ca.key", "server.key")} == {
        "keys.db": "0o600",
        "master.key": "0o400",
        "ca.key": "0o400",
        "server.key": "0o400",
    }
    assert new.stat().st_mode & 0o777 == 0o700
    for name in ("server.key", "server.crt", "ca.key", "ca.crt", "server.toml"):
        assert (new / name).read_bytes() == (server.data_dir / name).read_bytes(), name
    again = restored_server(tmp_path / "elsewhere", new, server.pin)
    with running(again):
        assert again.port != server.port
        assert released(again, host, web1) == before == {g: keys[g] for g in web1}


def test_restore_checks_the_credential_and_serve_takes_it(
    backup_file: Path, enrolled: tuple[KeyServer, HostCreds, dict[str, bytes]], tmp_path: Path
) -> None:
    server, host, keys = enrolled
    credentials = tmp_path / "credentials"
    credentials.mkdir(mode=0o700)
    (credentials / "master-key").write_bytes((server.data_dir / "master.key").read_bytes())
    (credentials / "master-key").chmod(0o400)
    env = {"CREDENTIALS_DIRECTORY": str(credentials)}
    new = tmp_path / "new"
    done = run("--data-dir", str(new), "restore", str(backup_file), env=env)
    assert done.returncode == 0, done.stderr
    assert "master key checked: the credential master-key" in done.stderr
    assert not (new / "master.key").exists()
    again = restored_server(tmp_path / "srv", new, server.pin)
    with running(again, env=env):
        assert released(again, host, ["7000"]) == {"7000": keys["7000"]}


def test_restore_without_a_master_key_says_how_serve_gets_it(
    backup_file: Path, tmp_path: Path
) -> None:
    done = run("--data-dir", str(tmp_path / "new"), "restore", str(backup_file))
    assert done.returncode == 0, done.stderr
    assert "master key not checked: serve needs it as the credential master-key" in done.stderr


# What a backup holds, and never


def test_a_stolen_backup_holds_no_key_in_the_clear(
    backup_file: Path, enrolled: tuple[KeyServer, HostCreds, dict[str, bytes]]
) -> None:
    server, _, keys = enrolled
    master = (server.data_dir / "master.key").read_bytes()
    raw = backup_file.read_bytes()
    with tarfile.open(backup_file) as tar:
        names = tar.getnames()
        members = [tar.extractfile(m).read() for m in tar.getmembers()]  # type: ignore[union-attr]
    assert names == ["manifest.json", *backupformat.MEMBERS, "SHA256"]
    assert "master.key" not in names
    for secret in [master, *keys.values()]:
        forms = [secret, secret.hex().encode(), secret.hex().upper().encode()]
        forms += [base64.b64encode(secret), base64.urlsafe_b64encode(secret).rstrip(b"=")]
        for form in forms:
            assert form not in raw
            assert not any(form in member for member in members)


def test_the_manifest_names_the_server_and_counts(
    backup_file: Path, enrolled: tuple[KeyServer, HostCreds, dict[str, bytes]]
) -> None:
    with tarfile.open(backup_file) as tar:
        manifest = json.loads(tar.extractfile("manifest.json").read())  # type: ignore[union-attr]
    assert manifest["format"] == "zfs-unlock-server-backup" and manifest["version"] == 1
    assert manifest["server_pin"] == enrolled[0].pin and manifest["server_name"]
    assert (manifest["hosts"], manifest["keys"]) == (2, 4)
    assert {m["name"]: m["mode"] for m in manifest["members"]}["ca.key"] == "0400"


# Damage


def damaged(tmp_path: Path, data: bytes, name: str) -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


@pytest.mark.parametrize("where", ["first", "header", "manifest", "keys.db", "pad", "sum", "end"])
def test_a_flipped_bit_anywhere_is_found_and_restore_writes_nothing(
    backup_file: Path, tmp_path: Path, where: str
) -> None:
    data = bytearray(backup_file.read_bytes())
    with tarfile.open(backup_file) as tar:
        entries = {m.name: m for m in tar.getmembers()}
    last = entries["SHA256"]
    position = {
        "first": 0,
        "header": entries["ca.key"].offset + 100,  # a later member's header (its mode)
        "manifest": entries["manifest.json"].offset_data + 20,
        "keys.db": entries["keys.db"].offset_data + 5000,
        "pad": entries["ca.key"].offset_data + entries["ca.key"].size + 3,  # block padding
        "sum": last.offset_data + 10,
        "end": len(data) - 1,
    }[where]
    data[position] ^= 0x10
    file = damaged(tmp_path, bytes(data), f"flip-{where}.tar")
    verified = run("backup", "verify", str(file))
    assert verified.returncode == EX_DATAERR, (where, verified.stdout, verified.stderr)
    assert "intact" not in verified.stdout
    assert any(
        word in verified.stderr for word in ("checksum mismatch", "damaged", "not a backup")
    ), verified.stderr
    target = tmp_path / "restored"
    restored = run("--data-dir", str(target), "restore", str(file))
    assert restored.returncode == EX_DATAERR, restored.stderr
    assert not target.exists()


def test_a_bit_flip_in_the_archive_says_checksum_mismatch(
    backup_file: Path, tmp_path: Path
) -> None:
    data = bytearray(backup_file.read_bytes())
    data[3000] ^= 0x01
    done = run("backup", "verify", str(damaged(tmp_path, bytes(data), "x.tar")))
    assert done.returncode == EX_DATAERR
    assert "checksum mismatch: the archive is damaged" in done.stderr


@pytest.mark.parametrize("keep", [0, 100, 511, 5000, -1024, -512, -1])
def test_a_truncated_file_is_refused(backup_file: Path, tmp_path: Path, keep: int) -> None:
    data = backup_file.read_bytes()
    file = damaged(tmp_path, data[:keep], "cut.tar")
    done = run("backup", "verify", str(file))
    assert done.returncode == EX_DATAERR, (keep, done.stderr)
    expected = "empty" if keep == 0 else ("truncated" if keep > 511 or keep < 0 else "")
    assert expected in done.stderr, done.stderr
    target = tmp_path / "restored"
    assert run("--data-dir", str(target), "restore", str(file)).returncode == EX_DATAERR
    assert not target.exists()


def test_a_wrong_master_key_is_refused_at_verify_and_restore(
    backup_file: Path, tmp_path: Path
) -> None:
    other = tmp_path / "other.key"
    other.write_bytes(os.urandom(32))
    other.chmod(0o400)
    done = run("backup", "verify", str(backup_file), "--master-key", str(other))
    assert done.returncode == EX_CONFIG
    assert f"{other} is not the master key of {backup_file}" in done.stderr
    assert "open" not in done.stdout.split("SHA-256", 1)[1].split("\n", 2)[2]
    target = tmp_path / "restored"
    restored = run(
        "--data-dir", str(target), "restore", str(backup_file), "--master-key", str(other)
    )
    assert restored.returncode == EX_CONFIG and "is not the master key" in restored.stderr
    assert not target.exists()


def test_restore_refuses_a_directory_that_is_not_empty(backup_file: Path, tmp_path: Path) -> None:
    target = tmp_path / "busy"
    target.mkdir()
    (target / "keep-me").write_text("mine")
    done = run("--data-dir", str(target), "restore", str(backup_file))
    assert done.returncode == EX_CANTCREAT
    assert f"{target} exists and is not empty; refusing to overwrite it" in done.stderr
    assert listing(target) == ["keep-me"]


# Where it is written


def test_an_existing_out_is_kept_unless_force(
    enrolled: tuple[KeyServer, HostCreds, dict[str, bytes]], tmp_path: Path
) -> None:
    data = str(enrolled[0].data_dir)
    out = tmp_path / "b.tar"
    out.write_bytes(b"older")
    done = run("--data-dir", data, "backup", "--out", str(out))
    assert done.returncode == EX_CANTCREAT
    assert f"{out} exists; refusing to overwrite it (--force replaces it)" in done.stderr
    assert out.read_bytes() == b"older"
    assert run("--data-dir", data, "backup", "--out", str(out), "--force").returncode == 0
    assert run("backup", "verify", str(out)).returncode == 0
    assert listing(tmp_path).count("b.tar") == 1 and not [
        n for n in listing(tmp_path) if n.endswith(".tmp")
    ]


def test_a_backup_during_a_ca_rollover_is_refused_until_it_is_finished(
    enrolled: tuple[KeyServer, HostCreds, dict[str, bytes]], tmp_path: Path
) -> None:
    server = enrolled[0]
    server.must("ca", "next")
    out = tmp_path / "during.tar"
    refused = run("--data-dir", str(server.data_dir), "backup", "--out", str(out))
    assert refused.returncode == EX_TEMPFAIL, refused.stderr
    assert "a CA rollover is under way" in refused.stderr and not out.exists()
    server.must("ca", "activate", "--force")
    assert run("--data-dir", str(server.data_dir), "backup", "--out", str(out)).returncode == 0


def test_out_and_dir_go_apart(enrolled: tuple[KeyServer, HostCreds, dict[str, bytes]]) -> None:
    data = str(enrolled[0].data_dir)
    assert run("--data-dir", data, "backup").returncode == EX_USAGE
    assert run("--data-dir", data, "backup", "--out", "x", "--keep", "2").returncode == EX_USAGE
    assert run("--data-dir", data, "backup", "--dir", ".", "--force").returncode == EX_USAGE


@contextlib.contextmanager
def mounted(*args: str) -> Iterator[None]:
    target = args[-1]
    done = subprocess.run(["mount", *args], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        pytest.skip(f"cannot mount here: {done.stderr.strip()}")
    try:
        yield
    finally:
        subprocess.run(["umount", target], check=True)


def read_only_directory(tmp_path: Path) -> Iterator[Path]:
    directory = tmp_path / "ro"
    directory.mkdir()
    if os.geteuid() != 0:
        directory.chmod(0o500)
        yield directory
        return
    # Root writes anywhere its mode says not to: a read-only bind mount stops it.
    with mounted("--bind", "-o", "ro", str(directory), str(directory)):
        yield directory


def test_an_unwritable_target_fails_73_and_leaves_nothing(
    enrolled: tuple[KeyServer, HostCreds, dict[str, bytes]], tmp_path: Path
) -> None:
    data = str(enrolled[0].data_dir)
    for directory in read_only_directory(tmp_path):
        out = directory / "b.tar"
        done = run("--data-dir", data, "backup", "--out", str(out))
        assert done.returncode == EX_CANTCREAT, done.stderr
        assert f"cannot create {out}: {directory}:" in done.stderr
        assert listing(directory) == []
    done = run("--data-dir", data, "backup", "--out", "/proc/b.tar")
    assert done.returncode == EX_CANTCREAT and "cannot create /proc/b.tar" in done.stderr


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a small tmpfs needs root")
def test_a_full_disk_fails_74_and_leaves_nothing(
    enrolled: tuple[KeyServer, HostCreds, dict[str, bytes]], tmp_path: Path
) -> None:
    small = tmp_path / "small"
    small.mkdir()
    with mounted("-t", "tmpfs", "-o", "size=32k", "tmpfs", str(small)):
        out = small / "b.tar"
        done = run("--data-dir", str(enrolled[0].data_dir), "backup", "--out", str(out))
        assert done.returncode == EX_IOERR, done.stderr
        assert f"{out}: No space left on device; nothing was written" in done.stderr
        assert listing(small) == []
    records = [r for r in enrolled[0].audit_records() if r["event"] == "backup"]
    assert [r["decision"] for r in records] == ["allow", "failed"]


# --dir and --keep


def test_to_prune_keeps_the_newest_and_touches_no_other_name() -> None:
    names = [
        backuprotation.name_for(datetime.datetime(2025, 1, day, 2, tzinfo=datetime.UTC))
        for day in (3, 1, 2, 5, 4)
    ]
    other = ["notes.txt", "zfs-unlock-server-2025.tar", "zfs-unlock-server-20250101T020000Z.tar.1"]
    assert backuprotation.to_prune(names + other, 2) == sorted(names)[:3]
    assert backuprotation.to_prune(names, 5) == [] == backuprotation.to_prune(names, 9)
    assert backuprotation.to_prune(other, 1) == []
    assert names[0] == "zfs-unlock-server-20250103T020000Z.tar"
    with pytest.raises(ValueError):
        backuprotation.to_prune(names, 0)


def test_backup_dir_names_by_time_and_keeps_the_newest_n(
    enrolled: tuple[KeyServer, HostCreds, dict[str, bytes]], tmp_path: Path
) -> None:
    directory = tmp_path / "backups"
    directory.mkdir()
    old = [f"zfs-unlock-server-2020010{d}T000000Z.tar" for d in range(1, 5)]
    for name in [*old, "README"]:
        (directory / name).write_text("x")
    data = str(enrolled[0].data_dir)
    done = run("--data-dir", data, "backup", "--dir", str(directory), "--keep", "3")
    assert done.returncode == 0, done.stderr
    new = Path(done.stdout.strip())
    assert new.parent == directory and backuprotation.NAME.fullmatch(new.name)
    assert f"removed 2 older backup(s) from {directory}, keeping 3" in done.stderr
    assert listing(directory) == sorted(["README", *old[2:], new.name])
    assert run("backup", "verify", str(new)).returncode == 0
    assert run("--data-dir", data, "backup", "--dir", str(directory), "--keep", "0").returncode == (
        EX_USAGE
    )


def test_verify_without_a_master_key_says_the_keys_were_not_opened(backup_file: Path) -> None:
    done = run("backup", "verify", str(backup_file))
    assert done.returncode == 0, done.stderr
    assert "2 host(s), 4 key(s)" in done.stdout
    assert "keys not opened: no master key given" in done.stdout


def test_a_file_that_is_not_a_backup_is_refused(tmp_path: Path) -> None:
    other = io.BytesIO()
    with tarfile.open(fileobj=other, mode="w") as tar:
        info = tarfile.TarInfo("hello")
        tar.addfile(info, io.BytesIO(b""))
    done = run("backup", "verify", str(damaged(tmp_path, other.getvalue(), "plain.tar")))
    assert done.returncode == EX_DATAERR
    assert "ends before its checksum" in done.stderr
