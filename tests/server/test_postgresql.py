"""The key server on PostgreSQL: what only a shared database has, on a real server.

Each test has a database of its own on the run's cluster (tests/postgres.py), or a
cluster of its own when it stops or damages the server. The behaviour both stores share
(releases, admin changes, audit, durability) is tested on both in test_release.py,
test_admin_audit.py, test_storage.py and test_durability.py.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import gzip
import hashlib
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from bench import postgres
from bench.common import free_port
from tests.keyserver import SERVER_BIN, HostCreds, KeyServer, enroll, release, run_serve
from zfs_unlock_server.errors import (
    EX_CANTCREAT,
    EX_CONFIG,
    EX_DATAERR,
    EX_NOPERM,
    EX_UNAVAILABLE,
    EX_USAGE,
    Conflict,
)
from zfs_unlock_server.pgstore import EXPORT_BATCH, PRUNE_LOCK, PgStore
from zfs_unlock_server.schema import POSTGRESQL
from zfs_unlock_server.schema import statements as schema_statements

POOL = "5555555555555555555"
NO_RATE_LIMITS = {
    "per_certificate_burst": 100000,
    "per_certificate_rate": 10000.0,
    "per_address_burst": 100000,
    "per_address_rate": 10000.0,
}


def new_database(cluster: postgres.Cluster) -> str:
    return cluster.new_database("t_" + os.urandom(8).hex())


@pytest.fixture
def pg_server(tmp_path: Path, pg_cluster: postgres.Cluster) -> Iterator[KeyServer]:
    server = KeyServer(tmp_path, database_url=new_database(pg_cluster))
    server.configure(rate_limits=NO_RATE_LIMITS)
    yield server
    server.stop()


def enrolled(server: KeyServer, host: HostCreds, guid: str) -> bytes:
    with server.session(host) as session:
        response = enroll(session, server, host, POOL, guid)
    assert response.status_code == 201, response.text
    return base64.b64decode(response.json()["key"])


def released(server: KeyServer, host: HostCreds, guid: str) -> tuple[int, bytes]:
    with server.session(host) as session:
        response = release(session, server, host, POOL, guid)
    key = base64.b64decode(response.json()["key"]) if response.status_code == 200 else b""
    return response.status_code, key


def init(data_dir: Path, url: str) -> tuple[int, str]:
    err = subprocess.run(
        [str(SERVER_BIN), "--data-dir", str(data_dir), "init", "--database", url],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    return err.returncode, err.stderr


# Setting up


def test_init_puts_every_row_in_the_database_and_nothing_in_the_directory(
    pg_server: KeyServer,
) -> None:
    names = {p.name for p in pg_server.data_dir.iterdir()}
    assert not names & {"keys.db", "audit.log", "ratelimit.db"}
    assert pg_server.sql("SELECT version FROM schema_version") == [(len(POSTGRESQL),)]
    assert sorted(pg_server.sql("SELECT name FROM meta")) == [
        ("master_key_check",),
        ("master_key_ring",),
    ]
    assert [r["event"] for r in pg_server.audit_records()] == ["init"]
    code, _, err = pg_server.admin("migrate")
    assert code == 0 and "nothing to do" in err


def test_init_refuses_a_database_that_holds_another_deployment(
    pg_server: KeyServer, tmp_path: Path
) -> None:
    pg_server.add_host("existing")
    code, err = init(tmp_path / "second", pg_server.database_url)
    assert code == EX_CANTCREAT, err
    assert "already holds a deployment" in err and "Traceback" not in err
    assert not (tmp_path / "second").exists()
    assert [h.split()[0] for h in pg_server.must("host", "list").splitlines()[1:]] == ["existing"]


def test_a_password_in_the_url_is_refused(pg_cluster: postgres.Cluster, tmp_path: Path) -> None:
    url = new_database(pg_cluster).replace("tests@", f"tests:{postgres.PASSWORD}@")
    code, err = init(tmp_path / "data", url)
    assert code == EX_CONFIG, err
    assert "has a password in it" in err and postgres.PASSWORD not in err
    assert not (tmp_path / "data").exists()


def test_serve_refuses_a_password_written_into_server_toml(pg_server: KeyServer) -> None:
    config = pg_server.data_dir / "server.toml"
    text = config.read_text()
    config.write_text(text.replace("tests@", f"tests:{postgres.PASSWORD}@"))
    code, err, _ = run_serve(pg_server)
    assert code == EX_CONFIG, err
    assert "has a password in it" in err and postgres.PASSWORD not in err


def test_a_wrong_password_is_refused_at_start(
    pg_server: KeyServer, pg_cluster: postgres.Cluster, tmp_path: Path
) -> None:
    wrong = tmp_path / "wrong-pgpass"
    wrong.write_text(f"127.0.0.1:{pg_cluster.port}:*:*:not-the-password\n")
    wrong.chmod(0o600)
    config = pg_server.data_dir / "server.toml"
    config.write_text(config.read_text().replace(str(pg_cluster.passfile), str(wrong)))
    code, err, elapsed = run_serve(pg_server)
    assert code == EX_NOPERM, err
    assert "password authentication failed" in err and "Traceback" not in err
    assert elapsed < 10
    assert pg_server.admin("host", "list")[0] == EX_NOPERM


def test_an_unreachable_database_is_an_error_at_start(pg_server: KeyServer) -> None:
    config = pg_server.data_dir / "server.toml"
    port = str(free_port())
    text = config.read_text()
    url = pg_server.database_url
    moved = url.replace(url.split("@127.0.0.1:")[1].split("/")[0], port)
    config.write_text(text.replace(url, moved))
    code, err, elapsed = run_serve(pg_server)
    assert code == EX_UNAVAILABLE, err
    assert f"127.0.0.1:{port}" in err and "Traceback" not in err
    assert elapsed < 10


def test_a_database_at_a_newer_schema_is_refused(pg_server: KeyServer) -> None:
    pg_server.sql("UPDATE schema_version SET version = version + 1")
    newer = len(POSTGRESQL) + 1
    for code, err in (run_serve(pg_server)[:2], pg_server.admin("host", "list")[::2]):
        assert code == EX_CONFIG, err
        assert f"schema {newer} is newer than this server's" in err
    code, _, err = pg_server.admin("migrate")
    assert code == EX_CONFIG and "newer" in err
    assert pg_server.sql("SELECT version FROM schema_version") == [(newer,)]  # never backwards


def test_an_empty_database_is_refused_until_migrated(
    pg_server: KeyServer, pg_cluster: postgres.Cluster
) -> None:
    """A database made by hand for the server: serve names the command that fills it."""
    empty = new_database(pg_cluster)
    config = pg_server.data_dir / "server.toml"
    config.write_text(config.read_text().replace(pg_server.database_url, empty))
    code, err, _ = run_serve(pg_server)
    assert code == EX_CONFIG, err
    assert "schema 0 is older than this server's" in err and "zfs-unlock-server migrate" in err
    code, _, err = pg_server.admin("migrate")
    assert code == 0 and f"migrated from 0 to {len(POSTGRESQL)}" in err


def test_a_schema_1_database_gains_rotation_with_its_rows_intact(
    pg_cluster: postgres.Cluster,
) -> None:
    url = new_database(pg_cluster)
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("CREATE TABLE schema_version (version INTEGER NOT NULL)")
        conn.execute("INSERT INTO schema_version VALUES (1)")
        for statement in schema_statements(POSTGRESQL[0]):
            conn.execute(statement)
        conn.execute(
            "INSERT INTO hosts (name, machine_id, created_at, last_seen)"
            " VALUES ('old', '0123456789abcdef0123456789abcdef', 1, 1)"
        )
        conn.execute(
            "INSERT INTO keys (key_id, host_id, pool_guid, dataset_guid, dataset, keyformat,"
            " state, origin, sealed, created_at, updated_at) SELECT 'k-1', id, '1', '2',"
            " 'tank/a', 'raw', 'active', 'generated', '\\x00', 1, 1 FROM hosts"
        )
    store = PgStore(url, migrate=True)
    try:
        assert store.migrated == (1, len(POSTGRESQL))
        old = store.key_for_dataset(store.host_by_name("old").id, "1", "2")
        assert old is not None and (old.key_id, old.state, old.sealed) == ("k-1", "active", b"\0")
        store.insert_key(dataclasses.replace(old, key_id="k-2", state="next"))
        with pytest.raises(Conflict):  # one next key per dataset
            store.insert_key(dataclasses.replace(old, key_id="k-3", state="next"))
        store.promote_next("k-1", "k-2", 50)
        assert store.key_by_id("k-1").state == "retired"
        assert store.delete_retired(old.host_id, 51) == ["k-1"]
    finally:
        store.close()


def test_nodes_migrating_at_once_take_turns(pg_cluster: postgres.Cluster, tmp_path: Path) -> None:
    url = new_database(pg_cluster)
    nodes = []
    for number in range(4):
        data_dir = tmp_path / f"node{number}"
        data_dir.mkdir()
        (data_dir / "server.toml").write_text(f'[database]\nurl = "{url}"\n')
        nodes.append(data_dir)
    runs = [
        subprocess.Popen(
            [str(SERVER_BIN), "--data-dir", str(d), "migrate"],
            stderr=subprocess.PIPE,
            text=True,
        )
        for d in nodes
    ]
    said = [(run.wait(timeout=60), run.communicate()[1]) for run in runs]
    assert [code for code, _ in said] == [0, 0, 0, 0], said
    assert sum("migrated from 0" in err for _, err in said) == 1, said
    assert sum("nothing to do" in err for _, err in said) == 3, said
    with psycopg.connect(url) as conn:
        assert conn.execute("SELECT version FROM schema_version").fetchall() == [(len(POSTGRESQL),)]


def test_the_password_file_can_come_as_a_systemd_credential(
    pg_server: KeyServer, pg_cluster: postgres.Cluster, tmp_path: Path
) -> None:
    config = pg_server.data_dir / "server.toml"
    config.write_text(config.read_text().replace(f"?passfile={pg_cluster.passfile}", ""))
    credentials = tmp_path / "credentials"
    credentials.mkdir(mode=0o700)
    shutil.copy(pg_cluster.passfile, credentials / "pgpass")
    environment = {k: v for k, v in os.environ.items() if k != "PGPASSFILE"}
    listed = subprocess.run(
        [str(SERVER_BIN), "--data-dir", str(pg_server.data_dir), "host", "list"],
        capture_output=True,
        text=True,
        env={**environment, "CREDENTIALS_DIRECTORY": str(credentials)},
        check=False,
    )
    assert listed.returncode == 0, listed.stderr
    without = subprocess.run(
        [str(SERVER_BIN), "--data-dir", str(pg_server.data_dir), "host", "list"],
        capture_output=True,
        text=True,
        env=environment,
        check=False,
    )
    assert without.returncode == EX_NOPERM, without.stderr


def test_backup_points_to_postgresqls_own_tools(pg_server: KeyServer, tmp_path: Path) -> None:
    code, _, err = pg_server.admin("backup", "--out", str(tmp_path / "b.tar"))
    assert code == EX_USAGE
    assert "pg_dump" in err and not (tmp_path / "b.tar").exists()


def test_the_audit_command_reads_the_audit_table(pg_server: KeyServer) -> None:
    pg_server.add_host("audited")
    out = pg_server.must("audit", "--host", "audited")
    assert "host_added" in out
    assert pg_server.sql(
        "SELECT count(*) FROM audit WHERE position('host_added' in record) > 0"
    ) == [(1,)]


# Several nodes on one database


def another_node(server: KeyServer, root: Path) -> KeyServer:
    """A further node: a copy of the first node's data directory, as the guide says."""
    data_dir = root / "data"
    shutil.copytree(server.data_dir, data_dir)
    return KeyServer.over(root, data_dir)


def test_an_admin_change_on_one_node_holds_on_every_node_at_the_next_request(
    pg_server: KeyServer, tmp_path: Path
) -> None:
    nodes = [pg_server, *(another_node(pg_server, tmp_path / f"n{i}") for i in (1, 2))]
    host = pg_server.add_host("roaming")
    for node in nodes:
        node.start(workers=1)
    key = enrolled(nodes[0], host, "1")
    assert [released(node, host, "1") for node in nodes] == [(200, key)] * 3

    nodes[1].must("host", "disable", "roaming")  # on node B
    assert [released(node, host, "1")[0] for node in nodes] == [403] * 3
    nodes[2].must("host", "enable", "roaming")  # on node C
    assert [released(node, host, "1") for node in nodes] == [(200, key)] * 3

    [record] = [k for k in nodes[0].sql("SELECT key_id FROM keys")]
    nodes[0].must("key", "revoke", record[0])  # on node A
    assert [released(node, host, "1")[0] for node in nodes] == [403] * 3
    # Every node wrote its decisions to the one audit trail.
    denials = [
        r for r in pg_server.audit_records() if r.get("reason") in ("host_disabled", "key_revoked")
    ]
    assert len(denials) == 6
    for node in nodes[1:]:
        node.stop()


def test_a_stopped_database_means_503_and_no_key_then_serving_again_without_a_restart(
    tmp_path: Path,
) -> None:
    with postgres.cluster() as own:
        server = KeyServer(tmp_path, database_url=new_database(own))
        server.configure(rate_limits=NO_RATE_LIMITS)
        host = server.add_host("patient")
        server.start(workers=2)
        try:
            keys = {guid: enrolled(server, host, guid) for guid in ("1", "2", "3")}
            pid = server.process.pid if server.process else 0
            own.stop()
            for guid, key in keys.items():
                with server.session(host) as session:
                    response = release(session, server, host, POOL, guid)
                assert response.status_code == 503, response.text
                assert response.headers["Retry-After"].isdigit()
                assert response.json() == {"error": "unavailable"}
                assert key not in response.content
                assert base64.b64encode(key) not in response.content
            own.start()
            assert {guid: released(server, host, guid) for guid in keys} == {
                guid: (200, key) for guid, key in keys.items()
            }
            assert server.process is not None and server.process.pid == pid
            assert server.process.poll() is None
        finally:
            server.stop()
        log = server.log_path.read_text()
        assert "database unavailable" in log and "Traceback" not in log


def test_a_stolen_database_cluster_reveals_no_key(tmp_path: Path) -> None:
    """Every file PostgreSQL keeps (tables, WAL, logs) holds sealed keys only."""
    with postgres.cluster() as own:
        server = KeyServer(tmp_path, database_url=new_database(own))
        server.configure(rate_limits=NO_RATE_LIMITS)
        host = server.add_host("stolen")
        server.start(workers=1)
        try:
            keys = [enrolled(server, host, str(guid)) for guid in range(1, 21)]
        finally:
            server.stop()
        own.psql("CHECKPOINT")
        forms = [form for key in keys for form in (key, base64.b64encode(key), key.hex().encode())]
        found = []
        for path in own.root.rglob("*"):
            if path.is_file():
                with contextlib.suppress(OSError):
                    data = path.read_bytes()
                    found += [str(path) for form in forms if form in data]
        assert found == []
        assert len(server.sql("SELECT sealed FROM keys")) == 20


def test_cli_maps_the_database_going_away_to_exit_69(tmp_path: Path) -> None:
    with postgres.cluster() as own:
        server = KeyServer(tmp_path, database_url=new_database(own))
        own.stop()
        code, _, err = server.admin("host", "list")
    assert code == EX_UNAVAILABLE, err
    assert "Traceback" not in err


# Audit retention


def age_audit(server: KeyServer, records: int, days: int) -> list[str]:
    """Make the oldest RECORDS audit rows DAYS days old; return them."""
    rows = server.sql("SELECT id, record FROM audit ORDER BY id LIMIT ?", (records,))
    server.sql(
        "UPDATE audit SET ts = ts - make_interval(days => ?) WHERE id <= ?", (days, rows[-1][0])
    )
    return [record for _, record in rows]


def retention(server: KeyServer, days: int) -> None:
    server.configure(
        rate_limits=NO_RATE_LIMITS,
        database={"url": server.database_url, "audit_retention_days": days},
    )


def test_audit_prune_exports_then_deletes_what_is_older_than_the_retention(
    pg_server: KeyServer, tmp_path: Path
) -> None:
    for name in ("a", "b", "c"):
        pg_server.add_host(name)
    old = age_audit(pg_server, 3, days=8)  # init and two host_added
    kept = pg_server.sql("SELECT record FROM audit WHERE id > (SELECT min(id) + 2 FROM audit)")
    code, _, err = pg_server.admin("audit-prune", "--export-dir", str(tmp_path))
    assert code == 0 and "nothing to do" in err and "is 0" in err  # retention off
    retention(pg_server, 7)
    code, out, err = pg_server.admin("audit-prune", "--export-dir", str(tmp_path))
    assert code == 0, err
    exported = Path(out.strip())
    assert exported.parent == tmp_path and exported.name.endswith(".jsonl.gz")
    assert exported.stat().st_mode & 0o777 == 0o600
    assert gzip.decompress(exported.read_bytes()).decode().splitlines() == old
    remaining = pg_server.sql("SELECT record FROM audit ORDER BY id")
    assert remaining[: len(kept)] == kept
    record = json.loads(remaining[-1][0])
    assert record["event"] == "audit_exported" and record["records"] == 3
    assert record["file"] == str(exported)
    assert record["sha256"] == hashlib.sha256(exported.read_bytes()).hexdigest()
    code, _, err = pg_server.admin("audit-prune", "--export-dir", str(tmp_path))
    assert code == 0 and "no audit record is older than 7 day(s)" in err


def test_audit_prune_exports_rows_beyond_one_fetch_in_order_and_deletes_those(
    pg_server: KeyServer, tmp_path: Path
) -> None:
    """More rows than one fetch of the server-side cursor (the export streams them):
    every one exported in order and deleted, and the newer ones kept."""
    retention(pg_server, 7)
    old = EXPORT_BATCH * 2 + 345
    pg_server.sql(
        "INSERT INTO audit (ts, record) SELECT now() - interval '9 days',"
        ' \'{"ts":"old","event":"checkin","n":\' || n || \'}\''
        " FROM generate_series(1, ?) n",
        (old,),
    )
    newer = pg_server.sql("SELECT count(*) FROM audit WHERE ts > now() - interval '7 days'")
    code, out, err = pg_server.admin("audit-prune", "--export-dir", str(tmp_path))
    assert code == 0, err
    lines = gzip.decompress(Path(out.strip()).read_bytes()).decode().splitlines()
    assert [json.loads(line)["n"] for line in lines] == list(range(1, old + 1))
    remaining = pg_server.sql("SELECT count(*) FROM audit WHERE ts < now() - interval '7 days'")
    assert remaining == [(0,)]
    exported = pg_server.sql("SELECT record FROM audit ORDER BY id DESC LIMIT 1")
    assert json.loads(exported[0][0])["records"] == old
    assert pg_server.sql("SELECT count(*) FROM audit") == [(newer[0][0] + 1,)]


def test_audit_prune_deletes_nothing_when_the_export_cannot_be_written(
    pg_server: KeyServer, tmp_path: Path
) -> None:
    retention(pg_server, 1)
    age_audit(pg_server, 1, days=2)
    before = pg_server.sql("SELECT id, record FROM audit ORDER BY id")
    code, _, err = pg_server.admin("audit-prune", "--export-dir", str(tmp_path / "missing"))
    assert code == EX_CANTCREAT, err
    assert pg_server.sql("SELECT id, record FROM audit ORDER BY id") == before


def test_one_node_at_a_time_prunes(pg_server: KeyServer, tmp_path: Path) -> None:
    retention(pg_server, 1)
    age_audit(pg_server, 1, days=2)
    exports = tmp_path / "exports"
    exports.mkdir()
    with psycopg.connect(pg_server.database_url, autocommit=True) as other_node:
        other_node.execute("SELECT pg_advisory_lock(%s)", (PRUNE_LOCK,))
        code, out, err = pg_server.admin("audit-prune", "--export-dir", str(exports))
    assert code == 0 and out == "" and "another node is pruning" in err
    assert list(exports.iterdir()) == []


def test_audit_prune_leaves_sqlites_audit_log_to_logrotate(
    keyserver: KeyServer, tmp_path: Path
) -> None:
    code, out, err = keyserver.admin("audit-prune", "--export-dir", str(tmp_path))
    assert code == 0 and out == "" and "logrotate" in err


# Moving a server from SQLite


def sqlite_server_with_history(root: Path) -> tuple[KeyServer, HostCreds, dict[str, bytes]]:
    """A SQLite server with two hosts (one with two certificates, one disabled), keys in
    every state and an audit log."""
    server = KeyServer(root)
    server.configure(rate_limits=NO_RATE_LIMITS)
    host = server.add_host("mover", "--pool", POOL, "--allow-ip", "127.0.0.0/8")
    server.add_host("parked")
    server.must("host", "disable", "parked")
    server.start(workers=1)
    keys = {guid: enrolled(server, host, guid) for guid in ("1", "2", "3")}
    key_ids = {
        k["dataset_guid"]: k["key_id"] for k in json.loads(server.must("key", "list", "--json"))
    }
    server.must("key", "revoke", key_ids["3"])
    # Approval policies, of a host and of a dataset, come along too.
    server.must("host", "set", "parked", "--approval", "required")
    server.must("key", "set", key_ids["3"], "--approval", "conditional", "--approval-silent", "600")
    server.stop()
    return server, host, keys


def test_migrate_store_copies_checks_and_switches(
    pg_cluster: postgres.Cluster, tmp_path: Path
) -> None:
    server, host, keys = sqlite_server_with_history(tmp_path / "sqlite")
    listed = server.must("key", "list", "--json")
    hosts = server.must("host", "list", "--json")
    audit_before = server.audit_records()
    url = new_database(pg_cluster)

    code, out, err = server.admin("migrate-store", "--to", url)
    assert code == 0, err
    table = [line.split() for line in out.splitlines()[1:8]]
    assert table == [
        ["hosts", "2", "2"],
        ["certificates", "2", "2"],
        ["keys", "3", "3"],
        ["approval", "policies", "2", "2"],
        ["approval", "page", "admins", "0", "0"],
        ["tripped", "silence", "conditions", "0", "0"],
        ["audit", "records", str(len(audit_before)), str(len(audit_before))],
    ]
    assert "keys that open under the master key in PostgreSQL: 3 of 3" in out
    assert "server.toml now names" in err

    # The same server, now on PostgreSQL: same hosts, same keys, same bytes.
    moved = KeyServer.over(tmp_path / "pg", server.data_dir)
    assert moved.database_url == url
    assert moved.must("key", "list", "--json") == listed
    assert moved.must("host", "list", "--json") == hosts
    records = moved.audit_records()
    assert records[: len(audit_before)] == audit_before
    assert records[-1]["event"] == "store_migrated"
    moved.start(workers=1)
    assert [released(moved, host, guid) for guid in ("1", "2")] == [
        (200, keys["1"]),
        (200, keys["2"]),
    ]
    assert released(moved, host, "3")[0] == 403  # revoked stays revoked
    new_host = moved.add_host("after-the-move")  # ids go on after the copied ones
    assert enrolled(moved, new_host, "9")
    moved.stop()


def test_migrate_store_refuses_a_database_that_is_not_empty(
    pg_server: KeyServer, tmp_path: Path
) -> None:
    server, _, _ = sqlite_server_with_history(tmp_path / "sqlite")
    before = (server.data_dir / "server.toml").read_text()
    code, _, err = server.admin("migrate-store", "--to", pg_server.database_url)
    assert code == EX_CANTCREAT, err
    assert "empty database only" in err
    assert (server.data_dir / "server.toml").read_text() == before
    assert pg_server.sql("SELECT count(*) FROM hosts") == [(0,)]


def test_migrate_store_refuses_a_server_already_on_postgresql(
    pg_server: KeyServer, pg_cluster: postgres.Cluster
) -> None:
    code, _, err = pg_server.admin("migrate-store", "--to", new_database(pg_cluster))
    assert code == EX_USAGE and "already names a PostgreSQL database" in err


def test_migrate_store_does_not_switch_when_a_copied_key_does_not_open(
    pg_cluster: postgres.Cluster, tmp_path: Path
) -> None:
    """A key row moved to another dataset in keys.db is copied as it is, found not to open
    under the master key, and the server stays on SQLite."""
    server, _, _ = sqlite_server_with_history(tmp_path / "sqlite")
    sealed = dict(server.sql("SELECT dataset_guid, sealed FROM keys"))
    server.sql("UPDATE keys SET sealed = ? WHERE dataset_guid = '1'", (sealed["2"],))
    before = (server.data_dir / "server.toml").read_text()
    code, out, err = server.admin("migrate-store", "--to", new_database(pg_cluster))
    assert code == EX_DATAERR, err
    assert "keys that open under the master key in PostgreSQL: 2 of 3" in out
    assert "does not match" in err
    assert (server.data_dir / "server.toml").read_text() == before


MDWE_SCRIPT = """
import ctypes, sys
from zfs_unlock_server.pgstore import PgStore
libc = ctypes.CDLL(None, use_errno=True)
# PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN: what the unit's MemoryDenyWriteExecute=yes enforces.
if libc.prctl(65, 1, 0, 0, 0) != 0:
    sys.exit(f"prctl: errno {ctypes.get_errno()}")
store = PgStore(sys.argv[1], migrate=True)
print(store.counts(), store.host_states())
store._connection().execute("DO $$ BEGIN RAISE NOTICE 'a notice: a callback'; END $$")
store.close()
"""


def test_the_postgresql_store_works_where_memory_may_not_be_writable_and_executable(
    pg_cluster: postgres.Cluster,
) -> None:
    """The unit sets MemoryDenyWriteExecute=yes; Debian's psycopg calls libpq through ctypes
    (scripts/floor.sh runs this on it), whose callbacks must not need such memory."""
    done = subprocess.run(
        [sys.executable, "-c", MDWE_SCRIPT, new_database(pg_cluster)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "(0, 0) {}"
