"""What the key server keeps on disk, and what it refuses to do without it.

A stolen data directory (without the master key) reveals no key; a sealed value
moved to another row fails closed; the database runs in WAL mode with full
syncs; credential files others could read stop the server before it serves;
every decision is one JSON line, and when no line can be written no key leaves.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import hashlib
import itertools
import json
import os
import shutil
import sqlite3
import stat
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import pytest
import requests

from tests.keyserver import (
    HostCreds,
    KeyServer,
    enroll,
    release,
    run_serve,
)
from zfs_unlock_common.csr import new_key_and_csr
from zfs_unlock_server import audit, cli, sealing, secretfile
from zfs_unlock_server.config import Layout
from zfs_unlock_server.errors import (
    EX_CANTCREAT,
    EX_CONFIG,
    ConfigError,
    Conflict,
    IntegrityError,
)
from zfs_unlock_server.schema import SQLITE as MIGRATIONS
from zfs_unlock_server.sealing import KeyContext, Sealer
from zfs_unlock_server.sqlitestore import SqliteStore

# Every test here runs on SQLite and on PostgreSQL (tests/conftest.py), but for those
# marked sqlite_only: they read SQLite's file, or the audit log file, themselves.
BOTH_STORES = True

POOL = "3333333333333333333"
SCHEMA_VERSION = len(MIGRATIONS)
_guids = itertools.count(7000)

# Generous enough that no test here is ever rate limited.
NO_RATE_LIMITS = {
    "per_certificate_burst": 100000,
    "per_certificate_rate": 10000.0,
    "per_address_burst": 100000,
    "per_address_rate": 10000.0,
}

# Format byte, the sealing master key's id, nonce, GCM tag.
SEALED_OVERHEAD = 1 + sealing.KEY_ID_BYTES + sealing.NONCE_BYTES + 16


def new_guid() -> str:
    return str(next(_guids))


def configure(server: KeyServer, **settings: Any) -> None:
    server.configure(rate_limits=NO_RATE_LIMITS, **settings)


def enroll_key(
    server: KeyServer, host: HostCreds, keyformat: str = "raw", **extra: Any
) -> tuple[str, bytes]:
    """Enroll a (pending, releasable) key over HTTPS; return (dataset_guid, key bytes)."""
    dataset_guid = new_guid()
    with server.session(host) as session:
        response = enroll(
            session,
            server,
            host,
            POOL,
            dataset_guid,
            dataset=f"tank/ds{dataset_guid}",
            keyformat=keyformat,
            **extra,
        )
    assert response.status_code == 201, response.text
    return dataset_guid, base64.b64decode(response.json()["key"])


def import_key(server: KeyServer, host: str, keyformat: str, stdin: bytes) -> str:
    """`key create --import`, key material on stdin; return the dataset GUID."""
    dataset_guid = new_guid()
    server.must(
        "key",
        "create",
        "--host",
        host,
        "--pool-guid",
        POOL,
        "--dataset-guid",
        dataset_guid,
        "--dataset",
        f"tank/imported{dataset_guid}",
        "--keyformat",
        keyformat,
        "--import",
        stdin=stdin,
    )
    return dataset_guid


def release_batch(
    session: requests.Session, server: KeyServer, host: HostCreds, guids: Iterable[str]
) -> requests.Response:
    return session.post(
        server.url("/v1/keys/release"),
        json={
            "machine_id": host.machine_id,
            "datasets": [{"pool_guid": POOL, "dataset_guid": g} for g in guids],
        },
        timeout=10,
        allow_redirects=False,
    )


def db(server: KeyServer) -> contextlib.closing[sqlite3.Connection]:
    return contextlib.closing(sqlite3.connect(server.data_dir / "keys.db"))


def releases_of(server: KeyServer, dataset_guid: str) -> list[dict[str, Any]]:
    return [
        r
        for r in server.audit_records()
        if r.get("event") == "release" and r.get("dataset_guid") == dataset_guid
    ]


# Looking for key material


def key_spellings(key: bytes) -> set[bytes]:
    """KEY as stored bytes and, for a hex key, as the 32 bytes it stands for."""
    spellings = {key, key.lower(), key.upper()}
    with contextlib.suppress(ValueError, UnicodeDecodeError):
        spellings.add(bytes.fromhex(key.decode("ascii")))
    return spellings


def key_forms(key: bytes) -> set[bytes]:
    """Every form that would give KEY away: raw, hex in either case, base64 (any alignment)."""
    forms: set[bytes] = set()
    for spelling in key_spellings(key):
        forms |= {spelling, spelling.hex().encode(), spelling.hex().upper().encode()}
        for shift in range(3):
            # Inside any larger base64 text, KEY starts on a 3-byte boundary at one of
            # three shifts; the quanta that hold only key bytes are then fixed.
            tail = spelling[shift:]
            core = base64.b64encode(tail)[: len(tail) // 3 * 4]
            forms |= {core, core.replace(b"+", b"-").replace(b"/", b"_")}
    return forms


def leaked(data: bytes, keys: Iterable[bytes]) -> list[str]:
    """The keys (by their first bytes, hex) that DATA contains in any form."""
    return [key[:4].hex() for key in keys if any(form in data for form in key_forms(key))]


def search_data_dir(server: KeyServer, keys: Iterable[bytes]) -> tuple[set[str], dict[str, Any]]:
    """Search every file of the data directory and the server's log for every key."""
    keys = list(keys)
    searched: set[str] = set()
    found: dict[str, Any] = {}
    for path in [*sorted(server.data_dir.rglob("*")), server.log_path]:
        if not path.is_file():
            continue
        searched.add(path.name)
        hits = leaked(path.read_bytes(), keys)
        if hits:
            found[path.name] = hits
    return searched, found


def test_the_search_finds_keys_in_every_form() -> None:
    """The leak detector itself: it must see a key hidden in any of the forms it claims."""
    raw, hex_key = os.urandom(32), os.urandom(32).hex().encode()
    for key in (raw, hex_key):
        for form in sorted(key_forms(key)):
            assert leaked(b"padding" + form + b"more", [key]) == [key[:4].hex()]
        for prefix in (b"", b"x", b"xy"):
            blob = base64.b64encode(prefix + key + b"trailer")
            assert leaked(b'{"key":"' + blob + b'"}', [key])
    assert leaked(bytes.fromhex(hex_key.decode()), [hex_key])
    assert leaked(hex_key.upper(), [hex_key])
    assert leaked(os.urandom(4096), [raw, hex_key]) == []


# A stolen data directory


@pytest.mark.sqlite_only  # its files; test_postgresql.py searches a PostgreSQL cluster's
def test_stolen_data_directory_reveals_no_key(keyserver: KeyServer) -> None:
    configure(keyserver)
    hosts = [keyserver.add_host("stolen-a"), keyserver.add_host("stolen-b")]
    expected: dict[str, dict[str, bytes]] = {h.name: {} for h in hosts}
    keyserver.start()
    # 44 keys enrolled over HTTPS: generated raw and hex keys, and two imported by the host.
    for number in range(44):
        host = hosts[number % 2]
        if number < 2:
            guid, key = enroll_key(
                keyserver, host, "raw", key=base64.b64encode(os.urandom(32)).decode()
            )
        else:
            guid, key = enroll_key(keyserver, host, "raw" if number % 3 else "hex")
        expected[host.name][guid] = key
    # Six imported by the admin CLI, the key on stdin.
    imports: list[tuple[str, bytes, bytes]] = [
        ("raw", os.urandom(32), b""),
        ("raw", os.urandom(31) + b"\n", b""),  # a raw key may end in a newline byte
        ("hex", os.urandom(32).hex().encode(), b""),
        ("hex", os.urandom(32).hex().upper().encode(), b"\n"),  # `zfs` strips one newline
        ("passphrase", base64.b64encode(os.urandom(30)), b"\n"),
        ("passphrase", base64.b64encode(os.urandom(36)), b""),
    ]
    for number, (keyformat, material, suffix) in enumerate(imports):
        host = hosts[number % 2]
        guid = import_key(keyserver, host.name, keyformat, material + suffix)
        expected[host.name][guid] = material
    assert sum(len(keys) for keys in expected.values()) == 50

    # Fetch them all: what the server releases is what we search for.
    keys: list[bytes] = []
    for host in hosts:
        with keyserver.session(host) as session:
            response = release_batch(session, keyserver, host, expected[host.name])
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["denied"] == []
        released = {k["dataset_guid"]: base64.b64decode(k["key"]) for k in body["keys"]}
        assert released == expected[host.name]
        assert len(leaked(response.content, released.values())) == len(released)  # detector works
        keys += released.values()
    assert len(set(keys)) == 50

    # While it runs: the write-ahead log holds the recent transactions.
    wal = keyserver.data_dir / "keys.db-wal"
    assert wal.is_file() and wal.stat().st_size > 0
    searched, found = search_data_dir(keyserver, keys)
    assert {"keys.db", "keys.db-wal", "keys.db-shm", "ratelimit.db", "audit.log"} <= searched
    assert found == {}

    assert keyserver.stop() == 0
    searched, found = search_data_dir(keyserver, keys)
    assert {"keys.db", "ratelimit.db", "audit.log", "server.log"} <= searched
    assert found == {}


def test_sealed_column_is_version_nonce_ciphertext_tag(keyserver: KeyServer) -> None:
    keyserver.add_host("sealer")
    materials = {
        "raw": os.urandom(32),
        "hex": os.urandom(32).hex().encode(),
        "passphrase": b"correct horse battery staple",
    }
    imported = {import_key(keyserver, "sealer", f, m): m for f, m in materials.items()}
    for keyformat in ("raw", "hex"):  # generated by the server
        keyserver.must(
            "key",
            "create",
            "--host",
            "sealer",
            "--pool-guid",
            POOL,
            "--dataset-guid",
            new_guid(),
            "--dataset",
            f"tank/generated-{keyformat}",
            "--keyformat",
            keyformat,
        )
    rows = keyserver.sql(
        "SELECT h.name, k.pool_guid, k.dataset_guid, k.legacy_name, k.key_id, k.keyformat,"
        " k.sealed FROM keys k JOIN hosts h ON h.id = k.host_id"
    )
    assert len(rows) == 5
    master = Sealer((keyserver.data_dir / "master.key").read_bytes())
    wrong = Sealer(sealing.new_master_key())
    nonces = set()
    for host, pool, dataset_guid, legacy_name, key_id, keyformat, sealed in rows:
        assert isinstance(sealed, bytes)
        context = KeyContext(host, pool, dataset_guid, legacy_name, key_id, keyformat)
        material = master.open(sealed, context)
        if dataset_guid in imported:
            assert material == imported[dataset_guid]
        else:
            assert len(material) == {"raw": 32, "hex": 64}[keyformat]
        assert sealed[:1] == b"\x02"
        assert sealed[1:9].hex() == master.own_id == sealing.key_id_of(master.master_key())
        assert len(sealed) == SEALED_OVERHEAD + len(material)
        nonces.add(sealed[9 : 9 + sealing.NONCE_BYTES])
        assert not leaked(sealed, [material])
        with pytest.raises(IntegrityError):
            wrong.open(sealed, context)
        # Every part counts: format, key id, nonce, ciphertext, tag; nothing may be cut off.
        for index in (0, 1, 8, 9, 20, 21, len(sealed) - 17, len(sealed) - 16, len(sealed) - 1):
            tampered = bytearray(sealed)
            tampered[index] ^= 0x01
            with pytest.raises(IntegrityError):
                master.open(bytes(tampered), context)
        for cut in (sealed[:-1], sealed[: SEALED_OVERHEAD - 1], b""):
            with pytest.raises(IntegrityError):
                master.open(cut, context)
    assert len(nonces) == len(rows)  # a fresh nonce for every seal


def _tamper(server: KeyServer, tampering: str, source: str, victims: list[str]) -> None:
    def sealed_of(guid: str) -> bytes:
        value: bytes = server.sql("SELECT sealed FROM keys WHERE dataset_guid = ?", (guid,))[0][0]
        return value

    def set_sealed(guid: str, value: bytes) -> None:
        server.sql("UPDATE keys SET sealed = ? WHERE dataset_guid = ?", (value, guid))

    if tampering == "copied_from_another_host":
        set_sealed(victims[0], sealed_of(source))
    elif tampering == "swapped_within_a_host":
        first, second = sealed_of(victims[0]), sealed_of(victims[1])
        set_sealed(victims[0], second)
        set_sealed(victims[1], first)
    elif tampering == "keyformat_changed":
        server.sql("UPDATE keys SET keyformat = 'hex' WHERE dataset_guid = ?", (victims[0],))
    else:
        raise AssertionError(tampering)


@pytest.mark.parametrize(
    "tampering", ["copied_from_another_host", "swapped_within_a_host", "keyformat_changed"]
)
def test_sealed_value_moved_to_another_row_fails_closed(
    keyserver: KeyServer, tampering: str
) -> None:
    configure(keyserver)
    alice = keyserver.add_host("alice")
    bob = keyserver.add_host("bob")
    keyserver.start()
    alice_guid, alice_key = enroll_key(keyserver, alice)
    bob_keys = dict(enroll_key(keyserver, bob) for _ in range(3))
    bob_guids = list(bob_keys)
    victims = bob_guids[:2] if tampering == "swapped_within_a_host" else bob_guids[:1]
    intact = [g for g in bob_guids if g not in victims]
    _tamper(keyserver, tampering, alice_guid, victims)
    # Any key these rows could yield if the server opened them regardless.
    exposed = [alice_key, *(bob_keys[g] for g in victims)]

    with keyserver.session(bob) as session:
        for guid in victims:
            response = release(session, keyserver, bob, POOL, guid)
            assert response.status_code == 403
            assert response.json() == {"error": "forbidden"}
            assert leaked(response.content, exposed) == []
            record = releases_of(keyserver, guid)[-1]
            assert (record["decision"], record["reason"]) == ("deny", "integrity_failure")
        batch = release_batch(session, keyserver, bob, bob_guids)
    assert batch.status_code == 200
    body = batch.json()
    assert body["denied"] == [{"pool_guid": POOL, "dataset_guid": g} for g in victims]
    assert {k["dataset_guid"]: base64.b64decode(k["key"]) for k in body["keys"]} == {
        g: bob_keys[g] for g in intact
    }
    assert leaked(batch.content, exposed) == []
    for guid in victims:
        assert releases_of(keyserver, guid)[-1]["reason"] == "integrity_failure"
    # The source row is untouched: its owner still gets its key.
    with keyserver.session(alice) as session:
        response = release(session, keyserver, alice, POOL, alice_guid)
    assert base64.b64decode(response.json()["key"]) == alice_key
    assert leaked(json.dumps(keyserver.audit_records()).encode(), exposed) == []


# The database file


@pytest.mark.sqlite_only
def test_store_is_wal_with_full_sync_at_the_current_schema(keyserver: KeyServer) -> None:
    store = SqliteStore(Layout(keyserver.data_dir).database)
    try:
        assert store.pragma("journal_mode") == "wal"
        assert store.pragma("synchronous") == 2  # FULL
        assert store.pragma("user_version") == SCHEMA_VERSION
        assert store.pragma("foreign_keys") == 1
    finally:
        store.close()
    with db(keyserver) as conn:
        # WAL is recorded in the file itself, so every other connection uses it too.
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def selects_of(store: SqliteStore, action: Callable[[], object]) -> list[str]:
    """The SELECT statements ACTION runs on STORE, as SQLite expanded them."""
    statements: list[str] = []
    store._db.set_trace_callback(statements.append)
    try:
        action()
    finally:
        store._db.set_trace_callback(None)
    return [s for s in statements if s.lstrip().upper().startswith("SELECT")]


def query_plan(store: SqliteStore, statement: str) -> str:
    rows = store._db.execute("EXPLAIN QUERY PLAN " + statement)
    return " | ".join(str(row[-1]) for row in rows)


@pytest.mark.sqlite_only
def test_release_lookups_use_an_index_not_a_scan_of_every_key(keyserver: KeyServer) -> None:
    """A release looks up one key; scanning the table made each release cost O(keys),
    which a reboot storm of 10,000 hosts turned into most of the server's time."""
    store = SqliteStore(Layout(keyserver.data_dir).database)
    try:
        lookups = selects_of(store, lambda: store.key_for_dataset(1, "1000", "2000"))
        lookups += selects_of(store, lambda: store.key_for_legacy_name(1, "1000", "name"))
        assert len(lookups) == 2
        for statement in lookups:
            plan = query_plan(store, statement)
            assert "SCAN" not in plan, plan
            assert "USING INDEX keys_" in plan, plan
    finally:
        store.close()


@pytest.mark.sqlite_only
def test_a_hosts_keys_are_found_through_an_index(keyserver: KeyServer) -> None:
    """key list --host and host remove ask for one host's keys; the partial unique indexes
    cannot answer that, so without keys_host each scanned every key."""
    store = SqliteStore(Layout(keyserver.data_dir).database)
    try:
        [lookup] = selects_of(store, lambda: store.keys(1))
        plan = query_plan(store, lookup)
        assert "USING INDEX keys_host" in plan, plan
        plan = query_plan(store, "SELECT count(*) FROM keys WHERE host_id = 1")
        assert "keys_host" in plan and "SCAN keys" not in plan, plan
    finally:
        store.close()


def write_old_database(path: Path, schema: int) -> None:
    """A database as an older server left it: the first SCHEMA migrations, one host, one key."""
    with contextlib.closing(sqlite3.connect(path)) as conn:
        conn.executescript("".join(MIGRATIONS[:schema]))
        conn.execute(
            "INSERT INTO hosts (id, name, machine_id, created_at, last_seen)"
            " VALUES (1, 'old', '0123456789abcdef0123456789abcdef', 1, 1)"
        )
        conn.execute(
            "INSERT INTO keys (key_id, host_id, pool_guid, dataset_guid, dataset, keyformat,"
            " state, origin, sealed, created_at, updated_at)"
            " VALUES ('k-1', 1, '1', '2', 'tank/a', 'raw', 'active', 'generated', x'00', 1, 1)"
        )
        conn.execute(f"PRAGMA user_version = {schema}")
        conn.commit()


def test_a_schema_1_database_is_migrated_with_its_rows_intact(tmp_path: Path) -> None:
    path = tmp_path / "keys.db"
    write_old_database(path, schema=1)
    store = SqliteStore(path, migrate=True)
    try:
        assert store.pragma("user_version") == SCHEMA_VERSION
        assert [k.key_id for k in store.keys(1)] == ["k-1"]
        names = {row[0] for row in store._db.execute("SELECT name FROM sqlite_master")}
        assert "keys_host" in names
    finally:
        store.close()


@pytest.mark.sqlite_only
def test_newer_schema_is_refused_with_a_clear_error(keyserver: KeyServer) -> None:
    with db(keyserver) as conn:
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    newer = rf"schema {SCHEMA_VERSION + 1} is newer than this server's \({SCHEMA_VERSION}\)"
    with pytest.raises(ConfigError, match=newer):
        SqliteStore(Layout(keyserver.data_dir).database)
    code, _, err = keyserver.admin("key", "list")
    assert code == EX_CONFIG
    assert "newer than this server" in err and "Traceback" not in err
    code, err, elapsed = run_serve(keyserver)
    assert code == EX_CONFIG, err
    assert "newer than this server" in err and "Traceback" not in err
    assert elapsed < 10
    with db(keyserver) as conn:  # refused, not "migrated" backwards
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION + 1


# Files and their modes


def file_modes(root: Path) -> dict[str, int]:
    return {p.name: stat.S_IMODE(p.stat().st_mode) for p in root.iterdir()}


def snapshot(root: Path) -> dict[str, tuple[int, int, str]]:
    """Every entry under ROOT (and ROOT itself): mode, mtime, content hash."""
    entries = {}
    for path in [root, *sorted(root.rglob("*"))]:
        info = path.lstat()
        digest = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else ""
        entries[str(path.relative_to(root))] = (info.st_mode, info.st_mtime_ns, digest)
    return entries


def test_init_creates_private_credentials_and_database(tmp_path: Path) -> None:
    root = tmp_path / "fresh"
    root.mkdir()
    root.chmod(0o755)  # an empty directory someone made beforehand
    with contextlib.redirect_stdout(None), contextlib.redirect_stderr(None):
        assert cli.main(["--data-dir", str(root), "init", "--server-name", "localhost"]) == 0
    assert stat.S_IMODE(root.stat().st_mode) == 0o700
    modes = file_modes(root)
    for name in ("master.key", "ca.key", "server.key"):
        assert modes[name] == 0o400, name
    assert modes["keys.db"] == 0o600
    assert modes["audit.log"] == 0o600
    assert len((root / "master.key").read_bytes()) == sealing.MASTER_KEY_BYTES


def test_init_refuses_a_non_empty_directory_and_changes_nothing(
    keyserver: KeyServer, tmp_path: Path
) -> None:
    before = snapshot(keyserver.data_dir)
    code, _, err = keyserver.admin("init")
    assert code == EX_CANTCREAT
    assert "not empty" in err
    assert snapshot(keyserver.data_dir) == before

    other = tmp_path / "somebody-elses"
    other.mkdir()
    (other / "notes.txt").write_text("mine\n")
    before = snapshot(other)
    with contextlib.redirect_stdout(None), contextlib.redirect_stderr(None):
        assert cli.main(["--data-dir", str(other), "init"]) == EX_CANTCREAT
    assert snapshot(other) == before


@pytest.mark.parametrize(
    ("name", "mode"),
    [("master.key", 0o644), ("server.key", 0o644), ("master.key", 0o640), ("server.key", 0o604)],
)
def test_serve_refuses_a_credential_others_can_read(
    keyserver: KeyServer, name: str, mode: int
) -> None:
    path = keyserver.data_dir / name
    path.chmod(mode)
    code, err, elapsed = run_serve(keyserver)
    assert code == EX_CONFIG, err
    assert str(path) in err and f"{mode:04o}" in err
    assert "Traceback" not in err and "Listening at" not in err
    assert elapsed < 10
    assert not [r for r in keyserver.audit_records() if r.get("event") == "server_start"]


def test_master_key_is_read_from_systemd_credentials(
    keyserver: KeyServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)
    configure(keyserver)
    host = keyserver.add_host("credentialed")
    material = os.urandom(32)
    guid = import_key(keyserver, host.name, "raw", material)
    # Move the master key into a credentials directory; leave a decoy in its place.
    credentials = tmp_path / "credentials"
    credentials.mkdir(mode=0o700)
    master = keyserver.data_dir / "master.key"
    master.rename(credentials / sealing.CREDENTIAL_NAME)
    secretfile.write_new(master, sealing.new_master_key(), 0o400)

    keyserver.start(env={"CREDENTIALS_DIRECTORY": str(credentials)})
    with keyserver.session(host) as session:
        response = release(session, keyserver, host, POOL, guid)
    keyserver.stop()
    assert response.status_code == 200
    assert base64.b64decode(response.json()["key"]) == material

    # Without credentials: the decoy, which opens nothing, so serve does not start.
    code, err, _ = run_serve(keyserver)
    assert code == EX_CONFIG, err
    assert str(master) in err


def test_master_key_falls_back_to_the_data_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    context = KeyContext("h", POOL, "1", "", "k-" + "0" * 24, "raw")
    data_key, credential_key = sealing.new_master_key(), sealing.new_master_key()
    data_path = tmp_path / "master.key"
    secretfile.write_new(data_path, data_key, 0o400)
    credentials = tmp_path / "credentials"
    credentials.mkdir()
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(credentials))
    sealed = Sealer(data_key).seal(b"k" * 32, context)
    assert sealing.load_master_key(data_path).open(sealed, context) == b"k" * 32
    credential = credentials / sealing.CREDENTIAL_NAME
    secretfile.write_new(credential, credential_key, 0o400)
    with pytest.raises(IntegrityError):
        sealing.load_master_key(data_path).open(sealed, context)
    credential.chmod(0o644)  # a credential is held to the same standard
    with pytest.raises(ConfigError, match=str(credential)):
        sealing.load_master_key(data_path)


# The master key must be the data directory's


def replace_master_key(server: KeyServer) -> bytes:
    """Put another master key where the data directory's was; return the original."""
    path = server.data_dir / "master.key"
    original = path.read_bytes()
    path.unlink()
    secretfile.write_new(path, sealing.new_master_key(), 0o400)
    return original


def restore_master_key(server: KeyServer, original: bytes) -> None:
    path = server.data_dir / "master.key"
    path.unlink()
    secretfile.write_new(path, original, 0o400)


def make_old(server: KeyServer) -> None:
    """What a data directory made before init wrote a master key check looks like, once
    `migrate` (which the unit runs before serve) has brought it to this schema."""
    with db(server) as conn:
        conn.execute("DROP TABLE IF EXISTS meta")
        # and what later steps add
        for table in ("host_reports", "approval_policies", "approvals", "silence_trips", "admins"):
            conn.execute(f"DROP TABLE IF EXISTS {table}")
        conn.execute("ALTER TABLE certificates DROP COLUMN replaces")
        conn.execute("ALTER TABLE certificates DROP COLUMN retire_at")
        conn.execute("PRAGMA user_version = 2")
        conn.commit()
    server.must("migrate")


def starts(server: KeyServer) -> int:
    return len([r for r in server.audit_records() if r.get("event") == "server_start"])


def assert_refused_before_binding(server: KeyServer, named: Path, env: dict[str, str]) -> str:
    """serve exits 78 naming NAMED (the master key it was given) before it binds."""
    started_before = starts(server)
    code, err, elapsed = run_serve(server, env)
    assert code == EX_CONFIG, err
    assert str(named) in err and "not the master key" in err
    assert "Traceback" not in err and "Listening at" not in err
    assert elapsed < 10
    assert starts(server) == started_before
    return err


def test_serve_refuses_a_master_key_that_is_not_the_data_directorys(
    keyserver: KeyServer, tmp_path: Path
) -> None:
    """Even with no key stored yet: init leaves a value sealed under the master key."""
    original = replace_master_key(keyserver)
    err = assert_refused_before_binding(keyserver, keyserver.data_dir / "master.key", {})
    assert sealing.CREDENTIAL_NAME in err  # where else a master key may come from

    # The same for a wrong credential, which is then what the message names.
    restore_master_key(keyserver, original)
    credentials = tmp_path / "credentials"
    credentials.mkdir(mode=0o700)
    credential = credentials / sealing.CREDENTIAL_NAME
    secretfile.write_new(credential, sealing.new_master_key(), 0o400)
    assert_refused_before_binding(
        keyserver, credential, {"CREDENTIALS_DIRECTORY": str(credentials)}
    )

    # The right one starts.
    keyserver.start(workers=1)
    assert keyserver.stop() == 0


@pytest.mark.sqlite_only
def test_an_old_data_directory_is_checked_with_its_first_sealed_key(
    keyserver: KeyServer,
) -> None:
    keyserver.add_host("old")
    guid = import_key(keyserver, "old", "raw", b"o" * 32)
    import_key(keyserver, "old", "raw", b"p" * 32)
    make_old(keyserver)
    original = replace_master_key(keyserver)
    err = assert_refused_before_binding(keyserver, keyserver.data_dir / "master.key", {})
    [first] = [k for k in keys_listed(keyserver) if k["dataset_guid"] == guid]
    assert first["key_id"] in err  # the key it tried
    restore_master_key(keyserver, original)

    keyserver.start(workers=1)
    keyserver.stop()
    # Proven once, the key is remembered the way init does it now.
    with db(keyserver) as conn:
        assert sorted(conn.execute("SELECT name FROM meta").fetchall()) == [
            ("master_key_check",),
            ("master_key_ring",),
            ("tls_served_pins",),  # what serve registers at start (tlspins.py)
        ]
    replace_master_key(keyserver)
    with db(keyserver) as conn:
        conn.execute("DELETE FROM keys")  # now only the check value can tell
        conn.commit()
    assert_refused_before_binding(keyserver, keyserver.data_dir / "master.key", {})


@pytest.mark.sqlite_only
def test_an_old_data_directory_without_keys_takes_the_master_key_it_is_given(
    keyserver: KeyServer,
) -> None:
    """Nothing is sealed yet, so nothing can tell a wrong master key; the one it is first
    given is the one it keeps."""
    make_old(keyserver)
    replace_master_key(keyserver)
    keyserver.start(workers=1)
    keyserver.stop()
    with db(keyserver) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        # The check value, the ring naming the key it was given, and the served pin.
        assert conn.execute("SELECT count(*) FROM meta").fetchone()[0] == 3


@pytest.mark.parametrize("command", ["key create", "import-simplezfs"])
def test_commands_that_seal_refuse_a_master_key_that_is_not_the_data_directorys(
    keyserver: KeyServer, tmp_path: Path, command: str
) -> None:
    host = keyserver.add_host("sealer")
    seed = tmp_path / "seed.db"
    with contextlib.closing(sqlite3.connect(seed)) as conn:
        conn.execute(
            "CREATE TABLE key (id INTEGER PRIMARY KEY, name, machine, pool, keyvalue, active)"
        )
        conn.execute(
            "INSERT INTO key VALUES (1, 'old', ?, ?, ?, 1)", (host.machine_id, POOL, "ab" * 16)
        )
        conn.commit()
    replace_master_key(keyserver)
    before = keyserver.audit_records()
    args = {
        "key create": (
            "key",
            "create",
            "--host",
            "sealer",
            "--pool-guid",
            POOL,
            "--dataset-guid",
            "5",
            "--dataset",
            "tank/x",
        ),
        "import-simplezfs": ("import-simplezfs", str(seed)),
    }[command]
    code, out, err = keyserver.admin(*args)
    assert code == EX_CONFIG, err
    assert str(keyserver.data_dir / "master.key") in err and "not the master key" in err
    assert out == ""
    assert keys_listed(keyserver) == []
    assert keyserver.audit_records() == before  # not even a record


def test_a_schema_2_database_is_migrated_with_its_rows_intact(tmp_path: Path) -> None:
    path = tmp_path / "keys.db"
    write_old_database(path, schema=2)
    store = SqliteStore(path, migrate=True)
    try:
        assert store.pragma("user_version") == SCHEMA_VERSION == 6
        assert [k.key_id for k in store.keys(1)] == ["k-1"]
        assert store.master_key_check() is None  # nothing proven yet
        first = store.first_sealed_key()
        assert first is not None and first.key_id == "k-1"
    finally:
        store.close()


def test_a_schema_3_database_gains_next_and_retired_keys_with_its_rows_intact(
    tmp_path: Path,
) -> None:
    path = tmp_path / "keys.db"
    write_old_database(path, schema=3)
    store = SqliteStore(path, migrate=True)
    try:
        [old] = store.keys(1)
        assert (old.key_id, old.state, old.sealed, old.created_at) == ("k-1", "active", b"\0", 1)
        assert store.key_for_dataset(1, "1", "2") == old
        store.insert_key(dataclasses.replace(old, key_id="k-2", state="next"))
        assert store.next_key_for_dataset(1, "1", "2") == dataclasses.replace(
            old, key_id="k-2", state="next"
        )
        with pytest.raises(Conflict):  # one next key per dataset
            store.insert_key(dataclasses.replace(old, key_id="k-3", state="next"))
        with pytest.raises(Conflict):  # and still one current key
            store.insert_key(dataclasses.replace(old, key_id="k-4", state="pending"))
        store.promote_next("k-1", "k-2", 50)
        assert store.key_for_dataset(1, "1", "2") == dataclasses.replace(
            old, key_id="k-2", state="active", updated_at=50
        )
        assert store.key_by_id("k-1").state == "retired"
        assert store.delete_retired(1, 50) == []
        assert store.delete_retired(1, 51) == ["k-1"]
    finally:
        store.close()


def keys_listed(server: KeyServer) -> list[dict[str, Any]]:
    keys: list[dict[str, Any]] = json.loads(server.must("key", "list", "--json"))
    return keys


# The audit trail


def audit_lines(server: KeyServer) -> list[bytes]:
    """The audit trail, a record a line: the log file's, or the audit table's rows."""
    if server.shared_database:
        return [row[0].encode() for row in server.sql("SELECT record FROM audit ORDER BY id")]
    data = (server.data_dir / "audit.log").read_bytes()
    assert data.endswith(b"\n")
    return data.splitlines()


def audited(server: KeyServer, action: Callable[[], object]) -> list[tuple[str, str]]:
    """Run ACTION; return (event, decision) of each audit line it added."""
    before = len(audit_lines(server))
    action()
    records = [json.loads(line) for line in audit_lines(server)[before:]]
    for record in records:
        assert isinstance(record, dict) and record.get("ts"), record
    return [(r["event"], r.get("decision", "")) for r in records]


def test_every_decision_and_change_is_one_audit_line(keyserver: KeyServer) -> None:
    configure(keyserver)
    keyserver.start()
    hosts: list[HostCreds] = []
    assert audited(keyserver, lambda: hosts.append(keyserver.add_host("audited"))) == [
        ("host_added", "allow")
    ]
    me = hosts[0]
    guid = new_guid()
    key_ids: list[str] = []
    keys: list[bytes] = []

    def admin(*args: str) -> Callable[[], object]:
        return lambda: keyserver.must(*args)

    def post(session: requests.Session, path: str, **body: Any) -> Callable[[], object]:
        url, payload = keyserver.url(path), {"machine_id": me.machine_id, **body}
        return lambda: session.post(url, json=payload, timeout=10).status_code

    def enroll_once(session: requests.Session) -> Callable[[], object]:
        def action() -> None:
            response = enroll(session, keyserver, me, POOL, guid, dataset="tank/audited")
            assert response.status_code in {200, 201}
            key_ids.append(response.json()["key_id"])
            keys.append(base64.b64decode(response.json()["key"]))

        return action

    def get(
        session: requests.Session, dataset_guid: str, machine_id: str = ""
    ) -> Callable[[], int]:
        def action() -> int:
            response = release(session, keyserver, me, POOL, dataset_guid, machine_id or None)
            if response.status_code == 200:
                keys.append(base64.b64decode(response.json()["key"]))
            return response.status_code

        return action

    allow, deny = "allow", "deny"
    with keyserver.session(me) as session:
        assert audited(keyserver, post(session, "/v1/checkin")) == [("checkin", allow)]
        assert audited(keyserver, enroll_once(session)) == [("enroll", allow)]
        assert audited(keyserver, enroll_once(session)) == [("enroll", allow)]  # a retry
        activation = {"pool_guid": POOL, "dataset_guid": guid, "key_id": key_ids[0]}
        assert audited(keyserver, post(session, "/v1/keys/activate", **activation)) == [
            ("activate", allow)
        ]
        assert audited(keyserver, get(session, guid)) == [("release", allow)]
        assert audited(keyserver, get(session, new_guid())) == [("release", deny)]
        assert audited(keyserver, get(session, guid, "e" * 32)) == [("release", deny)]
        batch = [{"pool_guid": POOL, "dataset_guid": g} for g in (guid, new_guid())]
        assert audited(keyserver, post(session, "/v1/keys/release", datasets=batch)) == [
            ("release", allow),
            ("release", deny),
        ]

        # Admin changes, each seen by the running server on the next request.
        made = new_guid()
        create = ("key", "create", "--host", "audited", "--pool-guid", POOL)
        assert audited(keyserver, admin(*create, "--dataset-guid", made, "--dataset", "t/m")) == [
            ("key_created", allow)
        ]
        assert audited(keyserver, get(session, made)) == [("release", allow)]
        assert audited(keyserver, lambda: import_key(keyserver, "audited", "raw", b"a" * 32)) == [
            ("key_created", allow)
        ]
        assert audited(keyserver, admin("key", "revoke", key_ids[0])) == [("key_revoked", allow)]
        assert audited(keyserver, get(session, guid)) == [("release", deny)]
        assert audited(keyserver, admin("key", "restore", key_ids[0])) == [("key_restored", allow)]
        assert audited(keyserver, admin("host", "disable", "audited")) == [("host_disabled", allow)]
        assert audited(keyserver, get(session, guid)) == [("release", deny)]
        assert audited(keyserver, post(session, "/v1/checkin")) == [("checkin", deny)]
        assert audited(keyserver, admin("host", "enable", "audited")) == [("host_enabled", allow)]
        csr = keyserver.hosts_dir / "renewal.csr"
        csr.write_bytes(new_key_and_csr("audited")[1])
        renew = ("host", "cert", "audited", "--csr", str(csr))
        cert_out = str(keyserver.hosts_dir / "renewal.crt")
        assert audited(keyserver, admin(*renew, "--cert-out", cert_out)) == [
            ("certificate_added", allow)
        ]
        keyserver.add_host("short-lived")
        assert audited(keyserver, admin("host", "remove", "short-lived")) == [
            ("host_removed", allow)
        ]

        # Hostile names are refused before they reach the log, and add nothing to it.
        forged = 'tank/x\n{"event":"fake"}'
        bad = {"pool_guid": POOL, "dataset_guid": new_guid(), "dataset": forged, "keyformat": "raw"}
        assert audited(keyserver, post(session, "/v1/keys", **bad)) == []
        evil = ("host", "add", 'evil\n{"event":"fake"}', "--machine-id", "f" * 32)
        issue = str(keyserver.hosts_dir / "evil")
        assert audited(keyserver, lambda: keyserver.admin(*evil, "--issue-key", issue)) == []

    lines = audit_lines(keyserver)
    assert all(line.startswith(b"{") and line.endswith(b"}") and line.isascii() for line in lines)
    events = {r.get("event") for r in keyserver.audit_records()}
    assert "fake" not in events and "unreadable_line" not in events
    assert len(set(keys)) == 2
    assert leaked(b"\n".join(lines), keys) == []


def test_audit_record_values_cannot_forge_a_line(tmp_path: Path) -> None:
    record = {
        "event": "release",
        "host": 'evil\n{"event":"fake"}',
        "dataset": 'tank\r\n{"event":"fake","decision":"allow"}\u2028\u0085\x00',
        "reason": "ok",
    }
    line = audit.encode(record)
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    assert b"\r" not in line and line.isascii()
    decoded = json.loads(line)
    assert {k: decoded[k] for k in record} == record
    path = tmp_path / "audit.log"
    log = audit.AuditLog(path)
    log.write(record, {"event": "next"})
    log.close()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    records = list(audit.read(path))
    assert [r["event"] for r in records] == ["release", "next"]
    assert records[0]["host"] == record["host"] and records[0]["dataset"] == record["dataset"]


def assert_unavailable(response: requests.Response, keys: Iterable[bytes]) -> None:
    assert response.status_code == 503, response.text
    assert response.json() == {"error": "unavailable"}
    assert response.headers["Retry-After"] == "30"
    assert leaked(response.content, keys) == []


def test_unwritable_audit_log_means_no_key_is_released(keyserver: KeyServer) -> None:
    configure(keyserver)
    host = keyserver.add_host("unaudited")
    keyserver.start()
    owned = dict(enroll_key(keyserver, host, f) for f in ("raw", "hex"))
    keyserver.stop()

    keyserver.break_audit()  # every write fails, as on a full disk
    keyserver.start()  # a full disk is not a reason to stay down; answering is the server's job
    with keyserver.session(host) as session:
        for guid in owned:
            assert_unavailable(release(session, keyserver, host, POOL, guid), owned.values())
        assert_unavailable(release_batch(session, keyserver, host, owned), owned.values())
        assert_unavailable(enroll(session, keyserver, host, POOL, new_guid()), owned.values())
        checkin = session.post(
            keyserver.url("/v1/checkin"), json={"machine_id": host.machine_id}, timeout=10
        )
        assert_unavailable(checkin, owned.values())
    keyserver.stop()
    log = keyserver.log_path.read_text()
    # Said at start, and on every refusal.
    said = "cannot write the audit trail" if keyserver.shared_database else "/dev/full"
    assert said in log and "audit log unwritable; refusing request" in log

    # The refusals were the audit log's doing: with a log again, the keys come back.
    keyserver.mend_audit()
    keyserver.start()
    with keyserver.session(host) as session:
        response = release_batch(session, keyserver, host, owned)
    got = {k["dataset_guid"]: base64.b64decode(k["key"]) for k in response.json()["keys"]}
    assert got == owned


@pytest.mark.sqlite_only
@pytest.mark.parametrize("damage", ["removed", "made_a_file"])
def test_audit_directory_lost_while_serving_means_no_key_is_released(
    keyserver: KeyServer, damage: str
) -> None:
    audit_dir = keyserver.root / "audit"
    audit_dir.mkdir()
    configure(keyserver, audit_log=str(audit_dir / "audit.log"))
    host = keyserver.add_host("dirlost")
    # One worker, so the worker that opened the log is the one asked afterwards.
    keyserver.start(workers=1)
    guid, key = enroll_key(keyserver, host)
    with keyserver.session(host) as session:
        assert release(session, keyserver, host, POOL, guid).status_code == 200
        shutil.rmtree(audit_dir)
        if damage == "made_a_file":
            audit_dir.write_text("not a directory\n")
        for _ in range(3):
            assert_unavailable(release(session, keyserver, host, POOL, guid), [key])
        assert_unavailable(release_batch(session, keyserver, host, [guid]), [key])
        # Once it is back, releases resume without a restart, into the new file.
        audit_dir.unlink(missing_ok=True)
        audit_dir.mkdir()
        response = release(session, keyserver, host, POOL, guid)
    assert response.status_code == 200
    assert base64.b64decode(response.json()["key"]) == key
    records = list(audit.read(audit_dir / "audit.log"))
    assert [(r["event"], r["decision"], r["dataset_guid"]) for r in records] == [
        ("release", "allow", guid)
    ]


@pytest.mark.sqlite_only
def test_audit_log_moved_away_continues_in_a_new_file(keyserver: KeyServer) -> None:
    """Rotation by rename: the next record goes to the configured path, not the old file."""
    configure(keyserver)
    host = keyserver.add_host("rotated")
    keyserver.start(workers=1)
    guid, key = enroll_key(keyserver, host)
    log_path = keyserver.data_dir / "audit.log"
    rotated = log_path.with_name("audit.log.1")
    log_path.rename(rotated)
    with keyserver.session(host) as session:
        response = release(session, keyserver, host, POOL, guid)
    assert response.status_code == 200
    assert base64.b64decode(response.json()["key"]) == key
    records = list(audit.read(log_path))
    assert [(r["event"], r["dataset_guid"]) for r in records] == [("release", guid)]
    assert stat.S_IMODE(log_path.stat().st_mode) == 0o600
    assert not [r for r in audit.read(rotated) if r.get("event") == "release"]
