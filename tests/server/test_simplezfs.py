"""SimpleZFSKeySystem migration: importing its SQLite keys, and serving them where ZFS looks.

The proof of concept keeps its keys in a RedBeanPHP table `key` (name, machine,
pool, keyvalue, active) and answers GET /MACHINE_ID/POOL_GUID/NAME with the 32
ASCII hex characters of `bin2hex(openssl_random_pseudo_bytes(16))`, which the
datasets use as a keyformat=raw key. ZFS fetches that URL itself
(keylocation=https://), so the key server must answer it byte for byte, behind
the same checks as /v1.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import secrets
import shutil
import socket
import sqlite3
import ssl
import subprocess
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest
import requests

from tests.keyserver import SERVER_BIN, HostCreds, KeyServer
from zfs_unlock_server import simplezfs
from zfs_unlock_server.admin import Admin
from zfs_unlock_server.sealing import KeyContext, Sealer

MACHINE_ALPHA = "0a1b2c3d4e5f60718293a4b5c6d7e8f9"
MACHINE_BETA = "f9e8d7c6b5a4938271605f4e3d2c1b0a"
MACHINE_UNKNOWN = "00000000000000000000000000000abc"
POOL_A = "13416744104133899470"  # the article's example: above 2**63, so it must stay text
POOL_B = "1234567890123456789"


@dataclass(frozen=True)
class SeedKey:
    name: str
    machine: str
    pool: str
    keyvalue: str
    active: int | str = 1
    id: int | None = None  # None: the next one, as RedBean's AUTOINCREMENT gives it


def seed_keys() -> list[SeedKey]:
    """Keys for two machines over two pools; one of them switched off."""

    def new() -> str:
        return secrets.token_hex(16)  # bin2hex(openssl_random_pseudo_bytes(16))

    return [
        SeedKey("100", MACHINE_ALPHA, POOL_A, new()),
        SeedKey("101", MACHINE_ALPHA, POOL_A, new()),
        SeedKey("vm-200", MACHINE_ALPHA, POOL_B, new()),
        SeedKey("100", MACHINE_BETA, POOL_B, new()),
        SeedKey("retired", MACHINE_BETA, POOL_B, new(), active=0),
    ]


def write_seed(
    path: Path,
    rows: Sequence[SeedKey],
    column_types: dict[str, str] | None = None,
) -> Path:
    """Create the table the way RedBean does: an id column first, then one ALTER per field."""
    types = {"name": "TEXT", "machine": "TEXT", "pool": "TEXT", "keyvalue": "TEXT"}
    types["active"] = "INTEGER"
    types.update(column_types or {})
    db = sqlite3.connect(path)
    try:
        db.execute("CREATE TABLE `key` ( id INTEGER PRIMARY KEY AUTOINCREMENT )")
        for column, sql_type in types.items():
            db.execute(f"ALTER TABLE `key` ADD `{column}` {sql_type}")
        db.executemany(
            "INSERT INTO `key` (id, name, machine, pool, keyvalue, active)"
            " VALUES (?, ?, ?, ?, ?, ?)",
            [(r.id, r.name, r.machine, r.pool, r.keyvalue, r.active) for r in rows],
        )
        db.commit()
    finally:
        db.close()
    return path


def key_list(server: KeyServer) -> list[dict[str, Any]]:
    keys: list[dict[str, Any]] = json.loads(server.must("key", "list", "--json"))
    return keys


def imported_events(server: KeyServer) -> list[dict[str, Any]]:
    return [r for r in server.audit_records() if r.get("event") == "key_imported"]


def every_file_in(directory: Path) -> bytes:
    return b"".join(p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file())


def enroll_machines(server: KeyServer) -> dict[str, HostCreds]:
    return {
        MACHINE_ALPHA: server.add_host("alpha", machine_id=MACHINE_ALPHA),
        MACHINE_BETA: server.add_host("beta", machine_id=MACHINE_BETA),
    }


# Import


def test_import_takes_every_key_with_its_state(keyserver: KeyServer, tmp_path: Path) -> None:
    enroll_machines(keyserver)
    rows = seed_keys()
    seed = write_seed(tmp_path / "keys.db", rows)
    code, _, err = keyserver.admin("import-simplezfs", str(seed))
    assert code == 0, err
    assert "imported 5 key(s)" in err

    host_of = {MACHINE_ALPHA: "alpha", MACHINE_BETA: "beta"}
    listed = {(k["host"], k["pool_guid"], k["legacy_name"]): k for k in key_list(keyserver)}
    assert set(listed) == {(host_of[r.machine], r.pool, r.name) for r in rows}
    for row in rows:
        key = listed[(host_of[row.machine], row.pool, row.name)]
        assert key["state"] == ("active" if row.active else "revoked")
        assert key["keyformat"] == "raw"
        assert key["origin"] == "imported"
        assert key["dataset_guid"] is None and key["dataset"] == row.name

    text = keyserver.must("key", "list")
    assert text.count(" active ") == 4 and text.count(" revoked ") == 1
    assert text.count(" raw") == 5
    events = imported_events(keyserver)
    assert len(events) == 5 and {e["origin"] for e in events} == {"simplezfs"}

    # The key material is nowhere in the clear: not listed, not audited, not on disk.
    json_listing = keyserver.must("key", "list", "--json")
    on_disk = every_file_in(keyserver.data_dir)
    for row in rows:
        assert row.keyvalue not in text and row.keyvalue not in json_listing
        assert row.keyvalue.encode() not in on_disk


def test_redbean_column_types_are_read_as_text(keyserver: KeyServer, tmp_path: Path) -> None:
    """RedBean types a column by its first value: a numeric name becomes INTEGER, and so on."""
    keyserver.add_host("alpha", machine_id=MACHINE_ALPHA)
    rows = [
        SeedKey("100", MACHINE_ALPHA, POOL_B, secrets.token_hex(16), active="1"),
        SeedKey("101", MACHINE_ALPHA, POOL_B, secrets.token_hex(16), active="0"),
        SeedKey("102", MACHINE_ALPHA, POOL_B, secrets.token_hex(16), active=""),
    ]
    seed = write_seed(tmp_path / "keys.db", rows, {"name": "INTEGER", "active": "TEXT"})
    keyserver.must("import-simplezfs", str(seed))
    states = {k["legacy_name"]: k["state"] for k in key_list(keyserver)}
    assert states == {"100": "active", "101": "revoked", "102": "revoked"}


def test_second_import_of_the_same_file_conflicts_and_changes_nothing(
    keyserver: KeyServer, tmp_path: Path
) -> None:
    enroll_machines(keyserver)
    rows = seed_keys()
    seed = write_seed(tmp_path / "keys.db", rows)
    keyserver.must("import-simplezfs", str(seed))
    before = key_list(keyserver)

    code, _, err = keyserver.admin("import-simplezfs", str(seed))
    assert code == 65
    assert "imported before" in err
    assert key_list(keyserver) == before
    assert len(imported_events(keyserver)) == len(rows)

    # One new key next to an old one: the new one is not imported either.
    fresh = SeedKey("new-one", MACHINE_ALPHA, POOL_B, secrets.token_hex(16))
    mixed = write_seed(tmp_path / "mixed.db", [fresh, rows[0]])
    assert keyserver.admin("import-simplezfs", str(mixed))[0] == 65
    assert key_list(keyserver) == before


def poc_serves(seed: Path, machine: str, pool: str, name: str) -> str:
    """The key SimpleZFSKeySystem answers for MACHINE/POOL/NAME: keys.php looks it up with
    R::findOne('key', ' name = ? AND machine = ? AND pool = ? ', ...), which RedBean runs
    as this statement (findOne appends LIMIT 1)."""
    with contextlib.closing(sqlite3.connect(seed)) as db:
        row = db.execute(
            "SELECT `key`.* FROM `key` WHERE name = ? AND machine = ? AND pool = ? LIMIT 1",
            (name, machine, pool),
        ).fetchone()
    assert row is not None
    return str(row[4])  # id, name, machine, pool, keyvalue, active


def imported_keys(server: KeyServer) -> dict[tuple[str, str], tuple[bytes, str]]:
    """Each imported key's material (opened with the master key) and state,
    by (pool, name)."""
    sealer = Sealer((server.data_dir / "master.key").read_bytes())
    found = {}
    with contextlib.closing(sqlite3.connect(server.data_dir / "keys.db")) as db:
        for key in key_list(server):
            (sealed,) = db.execute(
                "SELECT sealed FROM keys WHERE key_id = ?", (key["key_id"],)
            ).fetchone()
            context = KeyContext(
                key["host"], key["pool_guid"], "", key["legacy_name"], key["key_id"], "raw"
            )
            material = sealer.open(sealed, context)
            found[(key["pool_guid"], key["legacy_name"])] = (material, key["state"])
    return found


def racing_seed(path: Path) -> tuple[Path, dict[int, SeedKey]]:
    """What first-time GETs that raced leave behind: two or three rows for one key.

    The ids are not in the file's order: a file restored or merged by hand need not keep
    its rows in id order, and the proof of concept's lookup goes by id (rowid), not by
    the order the rows were written in.
    """

    def new(name: str, pool: str, row_id: int, active: int = 1) -> SeedKey:
        return SeedKey(name, MACHINE_ALPHA, pool, secrets.token_hex(16), active, row_id)

    rows = [
        new("99", POOL_A, 1),
        new("100", POOL_A, 7),
        new("100", POOL_A, 3),
        new("100", POOL_A, 9),
        new("100", POOL_B, 4),  # the same name on another pool repeats nothing
        new("vm", POOL_B, 5, active=0),
        new("vm", POOL_B, 6),
    ]
    write_seed(path, rows)
    return path, {r.id: r for r in rows if r.id is not None}


def lines_about(err: str, row_id: int) -> list[str]:
    return [line for line in err.splitlines() if line.startswith(f"row {row_id} ")]


def test_repeated_rows_import_the_row_simplezfs_serves(
    keyserver: KeyServer, tmp_path: Path
) -> None:
    keyserver.add_host("alpha", machine_id=MACHINE_ALPHA)
    seed, rows = racing_seed(tmp_path / "keys.db")
    code, out, err = keyserver.admin("import-simplezfs", str(seed))
    assert code == 0, err
    assert "imported 4 key(s)" in err

    keys = imported_keys(keyserver)
    assert set(keys) == {(POOL_A, "99"), (POOL_A, "100"), (POOL_B, "100"), (POOL_B, "vm")}
    for (pool, name), (material, _) in keys.items():
        # What the proof of concept answers for that URL today is what was imported...
        assert material == poc_serves(seed, MACHINE_ALPHA, pool, name).encode()
    # ...which for a repeated key is the row with the lowest id, wherever it is in the file.
    assert keys[(POOL_A, "100")][0] == rows[3].keyvalue.encode()
    # The first "vm" row is switched off: the proof of concept refuses it, and so do we.
    assert keys[(POOL_B, "vm")] == (rows[5].keyvalue.encode(), "revoked")

    # Every row left out is named by its id, with the row imported in its place.
    for shadowed, chosen in ((7, 3), (9, 3), (6, 5)):
        [line] = lines_about(err, shadowed)
        assert f"row {chosen}" in line and f"--use-row {shadowed}" in line, line
    for imported in (1, 3, 4, 5):
        assert lines_about(err, imported) == []
    for row in rows.values():
        assert row.keyvalue not in err and row.keyvalue not in out


def test_use_row_imports_another_of_the_repeated_rows(keyserver: KeyServer, tmp_path: Path) -> None:
    keyserver.add_host("alpha", machine_id=MACHINE_ALPHA)
    seed, rows = racing_seed(tmp_path / "keys.db")
    code, _, err = keyserver.admin(
        "import-simplezfs", str(seed), "--use-row", "9", "--use-row", "6", "--use-row", "1"
    )
    assert code == 0, err
    keys = imported_keys(keyserver)
    assert keys[(POOL_A, "100")][0] == rows[9].keyvalue.encode()
    assert keys[(POOL_B, "vm")] == (rows[6].keyvalue.encode(), "active")
    assert keys[(POOL_A, "99")][0] == rows[1].keyvalue.encode()  # the only row anyway
    # Now the proof of concept's choices are the ones left out, and say which row won.
    for shadowed, chosen in ((3, 9), (7, 9), (5, 6)):
        [line] = lines_about(err, shadowed)
        assert f"row {chosen}" in line, line
    assert lines_about(err, 9) == [] and lines_about(err, 6) == []


@pytest.mark.parametrize(
    ("use_rows", "message"),
    [
        (("2",), "no row 2"),  # no such id
        (("7", "9"), "row 7 and row 9"),  # two choices for one key
    ],
)
def test_use_row_that_picks_nothing_or_twice_imports_nothing(
    keyserver: KeyServer, tmp_path: Path, use_rows: Sequence[str], message: str
) -> None:
    keyserver.add_host("alpha", machine_id=MACHINE_ALPHA)
    seed, _ = racing_seed(tmp_path / "keys.db")
    options = [part for row in use_rows for part in ("--use-row", row)]
    code, _, err = keyserver.admin("import-simplezfs", str(seed), *options)
    assert code == 65, err
    assert message in err
    assert key_list(keyserver) == []
    assert imported_events(keyserver) == []


def test_audit_names_only_the_keys_that_were_imported(keyserver: KeyServer, tmp_path: Path) -> None:
    keyserver.add_host("alpha", machine_id=MACHINE_ALPHA)
    seed, _ = racing_seed(tmp_path / "keys.db")
    keyserver.must("import-simplezfs", str(seed))
    records = [r for r in keyserver.audit_records() if "import" in str(r.get("event"))]
    imported = [r for r in records if r["event"] == "key_imported"]
    assert {r["decision"] for r in records} == {"allow"}
    assert sorted(str(r["key_id"]) for r in imported) == sorted(
        k["key_id"] for k in key_list(keyserver)
    )
    assert sorted(int(str(r["row"])) for r in imported) == [1, 3, 4, 5]
    [summary] = [r for r in records if r["event"] == "import_simplezfs"]
    assert summary["keys"] == 4 and summary["rows_left_out"] == "6,7,9"


def test_an_import_that_fails_in_its_transaction_marks_every_record_failed(
    keyserver: KeyServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Records come first (granting), so each allow record of a key that was then not
    stored is followed by its failed record: the log never shows a key as imported
    that is not there."""
    keyserver.add_host("alpha", machine_id=MACHINE_ALPHA)
    seed = write_seed(tmp_path / "keys.db", seed_keys()[:3])
    ops = Admin.open(keyserver.data_dir)

    def refuse(records: Sequence[object]) -> None:
        raise sqlite3.OperationalError("disk I/O error")

    monkeypatch.setattr(ops.store, "insert_keys", refuse)
    try:
        with pytest.raises(sqlite3.OperationalError):
            simplezfs.import_simplezfs(ops, seed)
    finally:
        ops.close()
    assert key_list(keyserver) == []
    records = [r for r in keyserver.audit_records() if "import" in str(r.get("event"))]
    allowed = [r for r in records if r["decision"] == "allow"]
    failed = [r for r in records if r["decision"] == "failed"]
    assert len(allowed) == len(failed) == 4  # three keys and the import itself
    assert {(r["event"], r.get("key_id")) for r in allowed} == {
        (r["event"], r.get("key_id")) for r in failed
    }
    assert {r["reason"] for r in failed} == {"OperationalError"}


def test_unenrolled_machine_fails_the_whole_import(keyserver: KeyServer, tmp_path: Path) -> None:
    keyserver.add_host("alpha", machine_id=MACHINE_ALPHA)
    rows = [*seed_keys(), SeedKey("7", MACHINE_UNKNOWN, POOL_A, secrets.token_hex(16))]
    seed = write_seed(tmp_path / "keys.db", rows)

    code, _, err = keyserver.admin("import-simplezfs", str(seed))
    assert code == 65
    assert MACHINE_BETA in err and MACHINE_UNKNOWN in err
    assert MACHINE_ALPHA not in err
    assert key_list(keyserver) == []  # not even alpha's keys
    assert imported_events(keyserver) == []

    # Once every machine is enrolled, the same file imports completely.
    keyserver.add_host("beta", machine_id=MACHINE_BETA)
    keyserver.add_host("gamma", machine_id=MACHINE_UNKNOWN)
    keyserver.must("import-simplezfs", str(seed))
    assert len(key_list(keyserver)) == len(rows)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("machine", "naib7KuoG8IeHahv2jieg1ieth8oQu4a"),  # the article's ACL example
        ("machine", MACHINE_ALPHA.upper()),
        ("machine", MACHINE_ALPHA[:-1]),
        ("pool", "0123"),
        ("pool", "-5"),
        ("pool", "bpool"),
        ("pool", str(2**64)),
        ("name", "../100"),
        ("name", ""),
        ("keyvalue", "abc1234"),  # 7 bytes: too short for a passphrase, not raw, not hex
        ("keyvalue", "a" * 513),  # longer than any passphrase ZFS accepts
    ],
)
def test_invalid_row_rejects_the_whole_file(
    keyserver: KeyServer, tmp_path: Path, field: str, value: str
) -> None:
    enroll_machines(keyserver)
    rows = seed_keys()
    changed: dict[str, Any] = {field: value}
    bad = replace(SeedKey("bad", MACHINE_ALPHA, POOL_A, secrets.token_hex(16)), **changed)
    seed = write_seed(tmp_path / "keys.db", [*rows, bad])

    code, out, err = keyserver.admin("import-simplezfs", str(seed))
    assert code == 65, err
    assert f"row {len(rows) + 1}" in err
    if field == "keyvalue":
        assert value not in err and value not in out  # never echo key material
    assert key_list(keyserver) == []
    assert imported_events(keyserver) == []


def test_a_file_that_is_not_a_seed_database_is_refused(
    keyserver: KeyServer, tmp_path: Path
) -> None:
    not_sqlite = tmp_path / "text.db"
    not_sqlite.write_text("hello\n" * 100)
    other_table = tmp_path / "other.db"
    db = sqlite3.connect(other_table)
    db.execute("CREATE TABLE keys (name TEXT)")
    db.close()
    for path in (not_sqlite, other_table, tmp_path / "missing.db"):
        code, _, err = keyserver.admin("import-simplezfs", str(path))
        assert code == 65, (path, err)
        assert str(path) in err
    assert key_list(keyserver) == []


def with_poc_tables(path: Path) -> Path:
    """The proof of concept's other tables (keys.php keeps acl, machine and pool beside
    key), filled enough that each has pages of its own."""
    with contextlib.closing(sqlite3.connect(path)) as db:
        for table, columns in (
            ("acl", ("ip", "machine", "pool")),
            ("machine", ("guid", "address")),
            ("pool", ("guid", "machine")),
        ):
            db.execute(f"CREATE TABLE `{table}` ( id INTEGER PRIMARY KEY AUTOINCREMENT )")
            for column in columns:
                db.execute(f"ALTER TABLE `{table}` ADD `{column}` TEXT")
            marks = ", ".join("?" * len(columns))
            names = ", ".join(columns)
            db.executemany(
                f"INSERT INTO `{table}` ({names}) VALUES ({marks})",  # noqa: S608
                [tuple(f"{column}-{n}" for column in columns) for n in range(40)],
            )
        db.commit()
    return path


def damage_table(path: Path, table: str, where: str) -> None:
    """Overwrite part of TABLE's root page: its b-tree header and cell pointers, which
    SQLite then cannot even walk, or the end of its cell area, which it can."""
    with contextlib.closing(sqlite3.connect(path)) as db:
        (page_size,) = db.execute("PRAGMA page_size").fetchone()
        (root,) = db.execute(
            "SELECT rootpage FROM sqlite_master WHERE name = ?", (table,)
        ).fetchone()
    start = (root - 1) * page_size
    with path.open("r+b") as handle:
        handle.seek(start if where == "header" else start + page_size - 200)
        handle.write(b"\xff" * (64 if where == "header" else 200))


@pytest.mark.parametrize("where", ["header", "cells"])
def test_a_damaged_seed_database_is_refused_and_nothing_changes(
    keyserver: KeyServer, tmp_path: Path, where: str
) -> None:
    enroll_machines(keyserver)
    rows = seed_keys()
    seed = with_poc_tables(write_seed(tmp_path / "keys.db", rows))
    damage_table(seed, "machine", where)
    with contextlib.closing(sqlite3.connect(seed)) as db:
        # The damage is out of the key table's way: reading the keys alone does not see it.
        keys = db.execute("SELECT name, machine, pool, keyvalue, active FROM key").fetchall()
        assert len(keys) == len(rows)
        with contextlib.suppress(sqlite3.DatabaseError):  # or SQLite refuses to look at all
            assert db.execute("PRAGMA integrity_check").fetchall() != [("ok",)]
    before = hashlib.sha256(seed.read_bytes()).hexdigest()

    code, out, err = keyserver.admin("import-simplezfs", str(seed))
    assert code == 65, err
    assert str(seed) in err and "damaged" in err and "integrity_check" in err
    assert "Traceback" not in err
    for row in rows:
        assert row.keyvalue not in err and row.keyvalue not in out
    assert key_list(keyserver) == []
    assert [r for r in keyserver.audit_records() if "import" in str(r.get("event"))] == []
    assert hashlib.sha256(seed.read_bytes()).hexdigest() == before


def test_a_seed_database_with_the_poc_tables_intact_imports(
    keyserver: KeyServer, tmp_path: Path
) -> None:
    enroll_machines(keyserver)
    seed = with_poc_tables(write_seed(tmp_path / "keys.db", seed_keys()))
    keyserver.must("import-simplezfs", str(seed))
    assert len(key_list(keyserver)) == len(seed_keys())


def test_help_says_which_row_is_imported_and_how_to_choose() -> None:
    result = subprocess.run(
        [str(SERVER_BIN), "import-simplezfs", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    text = " ".join(result.stdout.split())
    assert "--use-row ID" in text and "lowest id" in text and "integrity_check" in text


# The keylocation=https:// route


@dataclass(frozen=True)
class Legacy:
    server: KeyServer
    hosts: dict[str, HostCreds]
    rows: list[SeedKey]
    outsider: HostCreds  # enrolled, owns no legacy key

    def url(self, row: SeedKey, machine: str | None = None, pool: str | None = None) -> str:
        return self.server.url(f"/{machine or row.machine}/{pool or row.pool}/{row.name}")

    def get(self, who: HostCreds, url: str) -> requests.Response:
        with self.server.session(who) as session:
            return session.get(url, timeout=10, allow_redirects=False)

    def last_release(self) -> dict[str, Any]:
        return [r for r in self.server.audit_records() if r.get("event") == "release"][-1]


@pytest.fixture(scope="module")
def legacy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Legacy]:
    root = tmp_path_factory.mktemp("simplezfs")
    server = KeyServer(root)
    hosts = enroll_machines(server)
    outsider = server.add_host("outsider")
    rows = seed_keys()
    server.must("import-simplezfs", str(write_seed(root / "seed.db", rows)))
    server.configure(simplezfs_route=True)
    server.start()
    try:
        yield Legacy(server, hosts, rows, outsider)
    finally:
        server.stop()


def active_rows(legacy: Legacy) -> list[SeedKey]:
    return [r for r in legacy.rows if r.active]


def assert_forbidden(response: requests.Response) -> None:
    assert response.status_code == 403
    assert response.json() == {"error": "forbidden"}
    assert response.headers["Content-Type"] == "application/json"


def test_zfs_url_returns_exactly_the_stored_key_bytes(legacy: Legacy) -> None:
    for row in active_rows(legacy):
        response = legacy.get(legacy.hosts[row.machine], legacy.url(row))
        assert response.status_code == 200, response.text
        assert response.headers["Content-Type"] == "application/octet-stream"
        assert response.headers["Cache-Control"] == "no-store"
        # keyformat=raw reads exactly 32 bytes: the hex text itself, no newline.
        assert response.content == row.keyvalue.encode("ascii")
        assert len(response.content) == 32
        record = legacy.last_release()
        assert record["decision"] == "allow" and record["legacy_name"] == row.name
        assert record["pool"] == row.pool


def test_another_hosts_certificate_is_refused(legacy: Legacy) -> None:
    alphas = [r for r in active_rows(legacy) if r.machine == MACHINE_ALPHA]
    for thief in (legacy.outsider, legacy.hosts[MACHINE_BETA]):
        for row in alphas:
            # Presenting the owner's machine-id with its own certificate.
            assert_forbidden(legacy.get(thief, legacy.url(row)))
            assert legacy.last_release()["reason"] == "machine_id_mismatch"
            assert legacy.last_release()["host"] == thief.name
            # Its own machine-id with the owner's pool and name.
            assert_forbidden(legacy.get(thief, legacy.url(row, machine=thief.machine_id)))
            assert legacy.last_release()["reason"] == "no_such_key"


def test_machine_id_of_another_host_is_refused(legacy: Legacy) -> None:
    alpha = legacy.hosts[MACHINE_ALPHA]
    betas_key = next(r for r in active_rows(legacy) if r.machine == MACHINE_BETA)
    assert_forbidden(legacy.get(alpha, legacy.url(betas_key)))
    assert legacy.last_release()["reason"] == "machine_id_mismatch"


def test_wrong_pool_is_refused(legacy: Legacy) -> None:
    row = next(r for r in legacy.rows if r.machine == MACHINE_ALPHA and r.pool == POOL_A)
    for pool in (POOL_B, "42"):
        assert_forbidden(legacy.get(legacy.hosts[MACHINE_ALPHA], legacy.url(row, pool=pool)))
        assert legacy.last_release()["reason"] == "no_such_key"


def test_inactive_key_is_refused_until_restored(legacy: Legacy) -> None:
    row = next(r for r in legacy.rows if not r.active)
    owner = legacy.hosts[row.machine]
    assert_forbidden(legacy.get(owner, legacy.url(row)))
    assert legacy.last_release()["reason"] == "key_revoked"

    key_id = next(k["key_id"] for k in key_list(legacy.server) if k["legacy_name"] == row.name)
    legacy.server.must("key", "restore", key_id)
    try:
        response = legacy.get(owner, legacy.url(row))
        assert response.status_code == 200 and response.content == row.keyvalue.encode()
    finally:
        legacy.server.must("key", "revoke", key_id)
    assert_forbidden(legacy.get(owner, legacy.url(row)))


def test_other_methods_are_not_allowed(legacy: Legacy) -> None:
    row = active_rows(legacy)[0]
    with legacy.server.session(legacy.hosts[row.machine]) as session:
        response = session.post(legacy.url(row), data=b"", timeout=10)
    assert response.status_code == 405
    assert response.headers["Allow"] == "GET"
    assert row.keyvalue.encode() not in response.content


def test_no_client_certificate_gets_no_tls_session(legacy: Legacy) -> None:
    row = active_rows(legacy)[0]
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    request = f"GET /{row.machine}/{row.pool}/{row.name} HTTP/1.1\r\nHost: x\r\n\r\n"
    with pytest.raises((ssl.SSLError, ConnectionError)):
        with (
            socket.create_connection(("127.0.0.1", legacy.server.port), timeout=10) as raw,
            context.wrap_socket(raw) as tls,
        ):
            tls.sendall(request.encode())
            reply = tls.recv(4096)
        # TLS 1.3 reports the server's refusal on the first read at the latest.
        assert reply == b""
        raise ConnectionError("closed without a reply")


def curl(legacy: Legacy, url: str, *options: str) -> subprocess.CompletedProcess[bytes]:
    binary = shutil.which("curl")
    if binary is None:
        pytest.skip("the curl binary is not installed; libcurl is what ZFS's keylocation uses")
    return subprocess.run(
        [
            binary,
            *("--silent", "--show-error", "--fail", "--noproxy", "*", "--max-time", "10"),
            *("--output", "-", *options, url),
        ],
        capture_output=True,
        timeout=30,
        check=False,
    )


def test_curl_fetches_the_key_like_zfs_does(legacy: Legacy) -> None:
    """What libcurl does for keylocation=https://, with a client certificate."""
    row = active_rows(legacy)[0]
    host = legacy.hosts[row.machine]
    client = ("--cert", str(host.cert), "--key", str(host.key))

    pinned = curl(legacy, legacy.url(row), "--pinnedpubkey", legacy.server.pin, "-k", *client)
    assert pinned.returncode == 0, pinned.stderr
    assert pinned.stdout == row.keyvalue.encode("ascii")

    # ZFS verifies the server against a CA file (SSL_CA_CERT_FILE); the
    # self-signed server certificate names 127.0.0.1, so it can be its own CA.
    ca_file = str(legacy.server.data_dir / "server.crt")
    verified = curl(legacy, legacy.url(row), "--cacert", ca_file, *client)
    assert verified.returncode == 0, verified.stderr
    assert verified.stdout == row.keyvalue.encode("ascii")


def test_curl_gets_nothing_without_the_right_certificate_or_pin(legacy: Legacy) -> None:
    row = active_rows(legacy)[0]
    owner = legacy.hosts[row.machine]
    wrong_pin = "sha256//" + "A" * 43 + "="
    client = ("--cert", str(owner.cert), "--key", str(owner.key))
    outsider = ("--cert", str(legacy.outsider.cert), "--key", str(legacy.outsider.key))
    attempts = [
        # No client certificate: no TLS session, so no HTTP status either. Depending on
        # when the server's alert arrives, curl fails in the handshake (35), the
        # request's send (55) or the reply's read (56); 22 would mean an HTTP reply.
        ((35, 55, 56), ("--pinnedpubkey", legacy.server.pin, "-k")),
        # Someone else's server key: curl hangs up before sending the request.
        ((90,), ("--pinnedpubkey", wrong_pin, "-k", *client)),
        # An enrolled host that does not own the key: HTTP 403, which --fail makes exit 22.
        ((22,), ("--pinnedpubkey", legacy.server.pin, "-k", *outsider)),
    ]
    for expected, options in attempts:
        result = curl(legacy, legacy.url(row), *options)
        assert result.returncode in expected, (options, result.stderr)
        assert row.keyvalue.encode() not in result.stdout


def test_route_is_off_by_default(keyserver: KeyServer, tmp_path: Path) -> None:
    hosts = enroll_machines(keyserver)
    rows = seed_keys()
    keyserver.must("import-simplezfs", str(write_seed(tmp_path / "seed.db", rows)))
    keyserver.start(workers=1)
    row = rows[0]
    with keyserver.session(hosts[row.machine]) as session:
        response = session.get(keyserver.url(f"/{row.machine}/{row.pool}/{row.name}"), timeout=10)
    assert response.status_code == 404
    assert response.json() == {"error": "not_found"}
    assert row.keyvalue.encode() not in response.content
