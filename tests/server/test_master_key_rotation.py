"""`master-key rotate` against the real server, on both stores: every key stays releasable
while the master key changes under it, a kill -9 at any moment of the rotation loses
nothing, and the old key opens nothing once it is retired."""

from __future__ import annotations

import base64
import random
import signal
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import requests

from tests.keyserver import SERVER_BIN, HostCreds, KeyServer, release, run_serve
from zfs_unlock_common.protocol import DatasetRef
from zfs_unlock_server import admin, masterring, sealing
from zfs_unlock_server.errors import EX_CONFIG, IntegrityError, StaleMasterKey
from zfs_unlock_server.sealing import KeyContext, Ring, Sealer, key_id_of, sealed_by
from zfs_unlock_server.service import context_of
from zfs_unlock_server.store import KeyRecord

BOTH_STORES = True

POOL = "7777777777777777777"
FAST = {
    "request_timeout": 2,  # idle workers look at the ring every second
    "rate_limits": {
        "per_certificate_burst": 100000,
        "per_certificate_rate": 10000.0,
        "per_address_burst": 100000,
        "per_address_rate": 10000.0,
    },
}


def fill(server: KeyServer, host: str, count: int) -> dict[str, bytes]:
    """COUNT active keys for HOST, made in-process; dataset GUID -> key material."""
    ops = admin.Admin.open(server.data_dir)
    try:
        service = ops.service()
        record = ops.store.host_by_name(host)
        made = {}
        for n in range(count):
            guid = str(10_000 + n)
            _, material = service.create_key(
                record, DatasetRef(POOL, guid), f"tank/d{n}", "raw", None, "active"
            )
            made[guid] = material
        return made
    finally:
        ops.close()


def sealers(server: KeyServer) -> dict[str, int]:
    """Master key id -> how many sealed values (keys and the check value) name it."""
    rows = server.sql("SELECT sealed FROM keys")
    rows += server.sql("SELECT value FROM meta WHERE name = 'master_key_check'")
    found: dict[str, int] = {}
    for (value,) in rows:
        kid = sealed_by(bytes(value)) or "format 1"
        found[kid] = found.get(kid, 0) + 1
    return found


def ring_of(server: KeyServer) -> Ring:
    [(raw,)] = server.sql("SELECT value FROM meta WHERE name = 'master_key_ring'")
    return Ring.decode(bytes(raw))


def file_key_id(server: KeyServer) -> str:
    return key_id_of((server.data_dir / "master.key").read_bytes())


def release_all(server: KeyServer, host: HostCreds, keys: dict[str, bytes]) -> list[str]:
    """Release every key, each on its own connection; the GUIDs that failed or differed."""
    wrong = []
    for guid, material in keys.items():
        with server.session(host) as session:
            answer = release(session, server, host, POOL, guid)
        if answer.status_code != 200 or base64.b64decode(answer.json()["key"]) != material:
            wrong.append(f"{guid}: {answer.status_code}")
    return wrong


@dataclass
class Releaser:
    """Releases keys round and round on a thread, as a fleet rebooting would."""

    server: KeyServer
    host: HostCreds
    keys: dict[str, bytes]
    done: int = 0
    failures: list[str] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        guids = list(self.keys)
        while not self.stop.is_set():
            guid = guids[self.done % len(guids)]
            try:
                with self.server.session(self.host) as session:
                    answer = release(session, self.server, self.host, POOL, guid)
            except requests.RequestException as exc:
                self.failures.append(f"{guid}: {type(exc).__name__}")
                continue
            if answer.status_code != 200:
                self.failures.append(f"{guid}: {answer.status_code}")
            elif base64.b64decode(answer.json()["key"]) != self.keys[guid]:
                self.failures.append(f"{guid}: another key")
            self.done += 1


def rotate(server: KeyServer, *options: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [str(SERVER_BIN), "--data-dir", str(server.data_dir), "master-key", "rotate", *options],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


@pytest.mark.slow  # releases for seconds on end, on both stores
def test_rotation_while_serving_releases_every_key_throughout(keyserver: KeyServer) -> None:
    keyserver.configure(**FAST)
    host = keyserver.add_host("web1")
    keys = fill(keyserver, "web1", 300)
    old = file_key_id(keyserver)
    assert sealers(keyserver) == {old: 301}
    keyserver.start(workers=2)
    releaser = Releaser(keyserver, host, keys)
    thread = threading.Thread(target=releaser.run)
    thread.start()
    try:
        time.sleep(0.5)
        before = releaser.done
        process = rotate(keyserver, "--settle", "3")
        out, err = process.communicate(timeout=120)
        during = releaser.done - before
    finally:
        releaser.stop.set()
        thread.join()
    assert process.returncode == 0, err
    new = out.strip()
    assert new != old and new == file_key_id(keyserver)
    assert f"master key {old} retired: 301 value(s) re-sealed under {new}" in err
    assert releaser.failures == []
    assert during > 50  # the server kept releasing through the whole rotation
    assert sealers(keyserver) == {new: 301}
    assert ring_of(keyserver) == Ring(new, {new: b""})  # the old key is wrapped nowhere
    events = [r for r in keyserver.audit_records() if r["event"].startswith("master_key_")]
    assert [(r["event"], r["decision"], r["key_id"]) for r in events] == [
        ("master_key_rotation_started", "allow", new),
        ("master_key_retired", "allow", old),
    ]
    # A key enrolled now is sealed under the new key, by a server started with the old.
    more: dict[str, bytes] = {}
    with keyserver.session(host) as session:
        answer = session.post(
            keyserver.url("/v1/keys"),
            json={
                "machine_id": host.machine_id,
                "pool_guid": POOL,
                "dataset_guid": "99",
                "dataset": "tank/new",
                "keyformat": "raw",
            },
            timeout=10,
        )
    assert answer.status_code == 201, answer.text
    more["99"] = base64.b64decode(answer.json()["key"])
    assert sealers(keyserver) == {new: 302}
    keyserver.stop()

    keyserver.start(workers=2)  # now from the new key in the file
    assert release_all(keyserver, host, {**keys, **more}) == []


def test_the_retired_key_opens_nothing_and_serve_refuses_it(keyserver: KeyServer) -> None:
    keyserver.add_host("web1")
    fill(keyserver, "web1", 3)
    path = keyserver.data_dir / "master.key"
    old = path.read_bytes()
    keyserver.must("master-key", "rotate", "--settle", "0")
    new = path.read_bytes()
    assert new != old and path.stat().st_mode & 0o777 == 0o400
    path.unlink()
    path.write_bytes(old)
    path.chmod(0o400)
    code, err, _ = run_serve(keyserver)
    assert code == EX_CONFIG and "not the master key" in err and "rotate" in err
    ops = admin.Admin.open(keyserver.data_dir)
    try:
        stale = Sealer(old)
        masterring.refresh(stale, ops.store)
        record = ops.store.keys()[0]
        with pytest.raises(IntegrityError):
            stale.open(record.sealed, context_of(record))
    finally:
        ops.close()


def opened_with_the_file_key(server: KeyServer) -> dict[str, bytes]:
    """Every key, opened as a server started now would: with the key the file holds, and
    what it learns from the ring."""
    ops = admin.Admin.open(server.data_dir)
    try:
        sealer = ops.sealer()
        records = ops.store.keys()
        return {r.dataset_guid: sealer.open(r.sealed, context_of(r)) for r in records}
    finally:
        ops.close()


@pytest.mark.slow
def test_kill_9_at_any_moment_of_a_rotation_loses_no_key(keyserver: KeyServer) -> None:
    """Twelve rotations killed at random moments (publishing, writing the key file,
    re-sealing, settling, retiring) while the server runs: after each, the running server
    releases keys, and every key opens under the key the file then holds; every third
    round the server restarts from that file. Then one rotation is left to finish."""
    keyserver.configure(**FAST)
    host = keyserver.add_host("web1")
    keys = fill(keyserver, "web1", 1500)
    keyserver.start(workers=2)
    chance = random.Random(17)  # noqa: S311 (when to kill, not a secret)
    states = set()
    for round_number in range(12):
        process = rotate(keyserver, "--settle", "3")  # request_timeout/2 + 2 s of looks
        time.sleep(chance.uniform(0.05, 4.0))
        process.send_signal(signal.SIGKILL)
        process.communicate()
        ring = ring_of(keyserver)
        states.add("finished" if process.returncode == 0 else f"{len(ring.wrapped)} keys")
        sample = dict(chance.sample(sorted(keys.items()), 20))
        assert release_all(keyserver, host, sample) == [], round_number
        assert opened_with_the_file_key(keyserver) == keys, round_number
        if round_number % 3 == 2:
            keyserver.stop()
            keyserver.start(workers=2)  # from whatever key the file holds now
            assert release_all(keyserver, host, sample) == [], round_number
    assert "2 keys" in states  # some kills landed inside a rotation
    keyserver.must("master-key", "rotate", "--settle", "3")
    kept = file_key_id(keyserver)
    assert sealers(keyserver) == {kept: 1501}
    assert ring_of(keyserver) == Ring(kept, {kept: b""})
    assert opened_with_the_file_key(keyserver) == keys
    keyserver.stop()
    keyserver.start(workers=2)
    assert release_all(keyserver, host, dict(chance.sample(sorted(keys.items()), 100))) == []
    print(f"\nkill -9 during master-key rotate: 12 rounds, states after the kill: {states}")


def test_status_shows_the_ring_and_what_each_key_seals(keyserver: KeyServer) -> None:
    keyserver.add_host("web1")
    fill(keyserver, "web1", 2)
    old = file_key_id(keyserver)
    out = keyserver.must("master-key", "status")
    assert out.split("\n")[1].split() == [old, "sealing", "3"]
    keyserver.must("master-key", "rotate", "--settle", "0")
    new = file_key_id(keyserver)
    out = keyserver.must("master-key", "status")
    assert out.split("\n")[1].split() == [new, "sealing", "3"]
    assert old not in out


def test_a_value_sealed_under_a_retired_key_is_never_written(keyserver: KeyServer) -> None:
    """A node that sealed under the old key just as the rotation retired it: the insert is
    refused (503 for a host), so no key is left that no master key opens."""
    keyserver.add_host("web1")
    old = Sealer((keyserver.data_dir / "master.key").read_bytes())
    keyserver.must("master-key", "rotate", "--settle", "0")
    ops = admin.Admin.open(keyserver.data_dir)
    try:
        host = ops.store.host_by_name("web1")
        context = KeyContext("web1", POOL, "5", "", "k-000000000000000000000005", "raw")
        record = KeyRecord(
            key_id=context.key_id,
            host_id=host.id,
            host="web1",
            pool_guid=POOL,
            dataset_guid="5",
            legacy_name="",
            dataset="tank/late",
            keyformat="raw",
            state="active",
            origin="generated",
            sealed=old.seal(b"k" * 32, context),
            created_at=0,
            updated_at=0,
        )
        with pytest.raises(StaleMasterKey):
            ops.store.insert_key(record)
        assert ops.store.keys() == []
        # Retirement itself refuses while a value still needs the old key.
        ring = masterring.load(ops.store)
        assert ring is not None
        assert not ops.store.retire_master_keys(ring.encode(), Ring(old.own_id, {}))
    finally:
        ops.close()


def test_format_1_values_written_before_rotation_existed_open_and_are_resealed(
    keyserver: KeyServer,
) -> None:
    keyserver.add_host("web1")
    made = fill(keyserver, "web1", 2)
    given = Sealer((keyserver.data_dir / "master.key").read_bytes())
    # Rewrite both keys as the server wrote them before values named their master key.
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    ops = admin.Admin.open(keyserver.data_dir)
    try:
        records = ops.store.keys()
        for record in records:
            nonce = b"n" * sealing.NONCE_BYTES
            aad = sealing.FORMAT_V1 + context_of(record).associated_data()
            body = AESGCM(given.master_key()).encrypt(nonce, made[record.dataset_guid], aad)
            ops.store.replace_sealed(
                [(record.key_id, record.sealed, sealing.FORMAT_V1 + nonce + body)]
            )
    finally:
        ops.close()
    assert sealers(keyserver)["format 1"] == 2
    keyserver.must("master-key", "rotate", "--settle", "0")
    new = file_key_id(keyserver)
    assert sealers(keyserver) == {new: 3}
    ops = admin.Admin.open(keyserver.data_dir)
    try:
        sealer = ops.sealer()
        records = ops.store.keys()
        opened = {r.dataset_guid: sealer.open(r.sealed, context_of(r)) for r in records}
    finally:
        ops.close()
    assert opened == made


def test_rotation_writes_the_credential_when_the_key_is_kept_out_of_the_directory(
    tmp_path: Path, store_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    credentials = tmp_path / "credentials"
    credentials.mkdir()
    server = KeyServer(tmp_path / "server", database_url=store_url)
    master = server.data_dir / "master.key"
    (credentials / "master-key").write_bytes(master.read_bytes())
    (credentials / "master-key").chmod(0o400)
    master.unlink()
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(credentials))
    server.add_host("web1")
    keys = fill(server, "web1", 5)
    old = key_id_of((credentials / "master-key").read_bytes())
    new = server.must("master-key", "rotate", "--settle", "0").strip()
    assert key_id_of((credentials / "master-key").read_bytes()) == new != old
    assert not master.exists()  # nothing written into the data directory
    assert sealers(server) == {new: 6}
    ops = admin.Admin.open(server.data_dir)
    try:
        sealer = ops.sealer()
        records = ops.store.keys()
        assert {r.dataset_guid: sealer.open(r.sealed, context_of(r)) for r in records} == keys
    finally:
        ops.close()
