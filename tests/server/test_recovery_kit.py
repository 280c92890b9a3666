"""master-key export and recovery-kit: real server data directory, real age, real SQLite."""

from __future__ import annotations

import base64
import os
import pty
import subprocess
from pathlib import Path

import pytest

from tests.agekeys import decrypt, new_identity
from tests.keyserver import SERVER_BIN, KeyServer
from zfs_unlock_server import admin
from zfs_unlock_server.sealing import Sealer
from zfs_unlock_server.service import context_of

POOL = "9461416713813557291"
KEYS = {
    ("web1", "1001", "tank/raw"): ("raw", os.urandom(32)),
    ("web1", "1002", "tank/hex"): ("hex", os.urandom(32).hex().encode()),
    ("web1", "1003", "tank/pass phrase"): ("passphrase", b"correct horse battery"),
    ("web2", "2001", "tank/other"): ("raw", os.urandom(32)),
}


@pytest.fixture
def server(tmp_path: Path) -> KeyServer:
    server = KeyServer(tmp_path / "srv")
    for host in ("web1", "web2"):
        server.add_host(host)
    for (host, guid, name), (keyformat, key) in KEYS.items():
        server.must(
            "key", "create", "--host", host, "--pool-guid", POOL, "--dataset-guid", guid,
            "--dataset", name, "--keyformat", keyformat, "--import", stdin=key,
        )  # fmt: skip
    return server


@pytest.fixture
def identity(tmp_path: Path) -> tuple[Path, str]:
    path = tmp_path / "identity.txt"
    return path, new_identity(path)


def key_id_of(server: KeyServer, dataset: str) -> str:
    ops = admin.Admin.open(server.data_dir)
    try:
        return next(k.key_id for k in ops.store.keys(None) if k.dataset == dataset)
    finally:
        ops.close()


def test_master_key_export_opens_with_age_and_opens_a_sealed_key(
    server: KeyServer, identity: tuple[Path, str], tmp_path: Path
) -> None:
    path, recipient = identity
    out = tmp_path / "master-key.age"
    code, stdout, err = server.admin(
        "master-key", "export", "--recipient", recipient, "--out", str(out)
    )
    assert code == 0, err
    assert stdout == ""
    assert f"written to {out}" in err
    assert out.stat().st_mode & 0o777 == 0o600
    master = decrypt(out, path)
    assert len(master) == 32
    assert master == (server.data_dir / "master.key").read_bytes()
    assert master not in out.read_bytes()
    ops = admin.Admin.open(server.data_dir)
    try:
        record = next(k for k in ops.store.keys(None) if k.dataset == "tank/raw")
    finally:
        ops.close()
    assert (
        Sealer(master).open(record.sealed, context_of(record))
        == KEYS[("web1", "1001", "tank/raw")][1]
    )
    (audited,) = [r for r in server.audit_records() if r["event"] == "master_key_exported"]
    assert audited["recipient"] == recipient
    assert audited["actor"].startswith("admin:")
    assert audited["decision"] == "allow"


def test_master_key_export_never_overwrites_without_force(
    server: KeyServer, identity: tuple[Path, str], tmp_path: Path
) -> None:
    path, recipient = identity
    out = tmp_path / "master-key.age"
    out.write_bytes(b"old")
    code, _, err = server.admin("master-key", "export", "--recipient", recipient, "--out", str(out))
    assert code == 73
    assert "exists; refusing to overwrite it" in err
    assert out.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    code, _, err = server.admin(
        "master-key", "export", "--recipient", recipient, "--out", str(out), "--force"
    )
    assert code == 0, err
    assert len(decrypt(out, path)) == 32
    assert out.stat().st_mode & 0o777 == 0o600


@pytest.mark.parametrize(
    ("recipient", "code", "message"),
    [
        ("not-a-key", 64, "not an age recipient"),
        ("age1" + "q" * 58, 65, "invalid checksum"),  # the shape, but age refuses it
    ],
)
def test_a_bad_recipient_writes_nothing(
    server: KeyServer, tmp_path: Path, recipient: str, code: int, message: str
) -> None:
    for command in (["master-key", "export"], ["recovery-kit"]):
        out = tmp_path / "out.age"
        got, _, err = server.admin(*command, "--recipient", recipient, "--out", str(out))
        assert got == code, err
        assert message in err
        assert not out.exists()
        assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_master_key_export_to_stdout_but_never_a_terminal(
    server: KeyServer, identity: tuple[Path, str], tmp_path: Path
) -> None:
    path, recipient = identity
    command = [str(SERVER_BIN), "--data-dir", str(server.data_dir), "master-key", "export"]
    done = subprocess.run([*command, "--recipient", recipient], capture_output=True, check=False)
    assert done.returncode == 0, done.stderr
    (tmp_path / "piped.age").write_bytes(done.stdout)
    assert decrypt(tmp_path / "piped.age", path) == (server.data_dir / "master.key").read_bytes()
    main, terminal = pty.openpty()
    try:
        refused = subprocess.run(
            [*command, "--recipient", recipient], stdout=terminal, stderr=subprocess.PIPE,
            check=False,
        )  # fmt: skip
    finally:
        os.close(terminal)
        os.close(main)
    assert refused.returncode == 64
    assert b"refusing to write an age file (binary) to a terminal" in refused.stderr
    exported = [r for r in server.audit_records() if r["event"] == "master_key_exported"]
    assert len(exported) == 1  # the refused one was not exported


def kit_lines(text: str) -> tuple[list[str], list[list[str]]]:
    lines = text.split("\n")
    assert lines[-1] == ""
    comments = [line for line in lines[:-1] if line.startswith("#")]
    entries = [line.split("\t") for line in lines[:-1] if not line.startswith("#")]
    return comments, entries


def test_recovery_kit_of_every_host_follows_the_documented_format(
    server: KeyServer, identity: tuple[Path, str], tmp_path: Path
) -> None:
    path, recipient = identity
    revoked = key_id_of(server, "tank/other")
    server.must("key", "revoke", revoked)
    out = tmp_path / "kit.age"
    code, _, err = server.admin("recovery-kit", "--recipient", recipient, "--out", str(out))
    assert code == 0, err
    assert "recovery kit with 3 key(s)" in err
    assert out.stat().st_mode & 0o777 == 0o600
    comments, entries = kit_lines(decrypt(out, path).decode())
    assert comments[0] == "# zfs-unlock-recovery-kit version 1"
    assert comments[-1] == "# end of kit: 3 keys"
    assert all(len(e) == 9 for e in entries)
    machine_ids = {
        h: server.must("host", "show", h).split("machine-id:")[1].split()[0]
        for h in ("web1", "web2")
    }
    expected = {
        (
            host,
            machine_ids[host],
            POOL,
            guid,
            keyformat,
            key_id_of(server, name),
            "active",
            base64.b64encode(key).decode(),
            name,
        )
        for (host, guid, name), (keyformat, key) in KEYS.items()
        if name != "tank/other"  # revoked: left out
    }
    assert {tuple(e) for e in entries} == expected
    (audited,) = [r for r in server.audit_records() if r["event"] == "recovery_kit_exported"]
    assert audited["recipient"] == recipient
    assert audited["count"] == 3
    assert audited.get("host_filter") is None
    assert audited["actor"].startswith("admin:")
    stolen = out.read_bytes()
    for _, key in KEYS.values():
        for form in (key, key.hex().encode(), base64.b64encode(key)):
            assert form not in stolen


def test_recovery_kit_of_one_host_holds_its_pending_keys_too(
    server: KeyServer, identity: tuple[Path, str], tmp_path: Path
) -> None:
    path, recipient = identity
    ops = admin.Admin.open(server.data_dir)
    try:
        host = ops.store.host_by_name("web2")
        from zfs_unlock_common.protocol import DatasetRef

        ops.service().create_key(
            host,
            DatasetRef(POOL, "2002"),
            "tank/half",
            "raw",
            os.urandom(32),
            "pending",
            "k-" + "ab" * 12,
        )
    finally:
        ops.close()
    out = tmp_path / "web2.age"
    code, _, err = server.admin(
        "recovery-kit", "--recipient", recipient, "--host", "web2", "--out", str(out)
    )
    assert code == 0, err
    assert "recovery kit with 2 key(s) of host web2" in err
    _, entries = kit_lines(decrypt(out, path).decode())
    assert sorted((e[0], e[3], e[6], e[8]) for e in entries) == [
        ("web2", "2001", "active", "tank/other"),
        ("web2", "2002", "pending", "tank/half"),
    ]
    (audited,) = [r for r in server.audit_records() if r["event"] == "recovery_kit_exported"]
    assert (audited["host_filter"], audited["count"]) == ("web2", 2)
    code, _, err = server.admin(
        "recovery-kit",
        "--recipient",
        recipient,
        "--host",
        "nobody",
        "--out",
        str(tmp_path / "x.age"),
    )
    assert code == 65
    assert "no host named 'nobody'" in err
    assert not (tmp_path / "x.age").exists()
