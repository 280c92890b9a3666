"""Dataset key rotation against the real key server, with the fake zfs.

`zfs-unlock-agent rotate` asks the server for the dataset's next key, re-wraps the dataset
with it (`zfs change-key`), proves it (`zfs load-key -n`) and has the server make it
active, retiring the key before. Interrupted at any point, the dataset opens with whatever
the server releases: the active key before `change-key`, the next one after, and the
unlock that opens it with the next key finishes the rotation.
"""

from __future__ import annotations

import base64
import json
import random
import subprocess
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from tests.agent.daemon_harness import Daemons
from tests.agent.harness import AGENT_BIN, AgentHost
from tests.agent.test_daemon import new_host as new_daemon_host
from tests.agent.test_enroll import assert_boot_unlock_opens, unload_key
from tests.fakes.fake_zfs import key_digest
from tests.keyserver import KeyServer
from zfs_unlock_agent import errors


def new_host(server: KeyServer, tmp_path: Path, name: str) -> tuple[AgentHost, str]:
    host = AgentHost.create(tmp_path, server, name)
    return host, host.zfs.add_pool("tank")


def keys_of(host: AgentHost, dataset: str) -> list[dict[str, Any]]:
    listed: list[dict[str, Any]] = json.loads(
        host.server.must("key", "list", "--host", host.creds.name, "--json")
    )
    return [k for k in listed if k["dataset"] == dataset]


def states(host: AgentHost, dataset: str) -> dict[str, str]:
    return {k["key_id"]: k["state"] for k in keys_of(host, dataset)}


def zfs_wrapper(host: AgentHost, tmp_path: Path, script: str) -> None:
    """Point the agent at a zfs that runs SCRIPT (sh) around the fake; $REAL is the fake."""
    wrapper = tmp_path / "wrapped" / "zfs"
    wrapper.parent.mkdir(exist_ok=True)
    wrapper.write_text(f'#!/bin/sh\nREAL="{host.zfs.zfs}"\n{script}\n')
    wrapper.chmod(0o755)
    host.write_config(zfs_settings={"zfs": str(wrapper)})


def released_next(host: AgentHost, pool: str, guid: str) -> list[dict[str, Any]]:
    with host.server.session(host.creds) as session:
        answer = session.post(
            host.server.url("/v1/keys/release"),
            json={
                "machine_id": host.creds.machine_id,
                "datasets": [{"pool_guid": pool, "dataset_guid": guid}],
            },
            timeout=10,
        )
    assert answer.status_code == 200, answer.text
    items: list[dict[str, Any]] = answer.json()["next_keys"]
    return items


@pytest.mark.parametrize("keyformat", ["raw", "hex", "passphrase"])
def test_rotate_rewraps_the_dataset_and_retires_the_old_key(
    shared_keyserver: KeyServer, tmp_path: Path, keyformat: str
) -> None:
    host, pool = new_host(shared_keyserver, tmp_path, f"rot-{keyformat}")
    host.encrypted_dataset("tank/data", pool, keyformat, keystatus="available", mounted=True)
    host.zfs.add_child("tank/data/child", mounted=True)
    [old] = states(host, "tank/data")
    assert states(host, "tank/data")[old] == "active"

    result = host.run("rotate", "--dataset", "tank/data")

    assert result.returncode == 0, result.stderr
    current = {k["state"]: k for k in keys_of(host, "tank/data")}
    assert set(current) == {"active", "retired"} and current["retired"]["key_id"] == old
    new = current["active"]["key_id"]
    assert f"tank/data: key rotated; {new} is now active" in result.stdout
    ds = host.zfs.dataset("tank/data")
    assert (ds["keyformat"], ds["keylocation"], ds["keystatus"]) == (
        keyformat,
        "prompt",
        "available",
    )
    assert host.zfs.dataset("tank/data/child")["mounted"]  # in use throughout
    # The dataset's key is the server's new one: it alone opens it from now on.
    released = host.run("verify")
    assert released.returncode == 0, released.stderr
    assert_boot_unlock_opens(host, "tank/data")
    # Each zfs call had the key on stdin, never in argv.
    for call in host.zfs.calls("zfs", "change-key"):
        assert call["stdin_len"] > 0 and not any(len(a) >= 64 for a in call["argv"])


def test_a_crash_after_change_key_is_finished_by_the_next_unlock(
    shared_keyserver: KeyServer, tmp_path: Path
) -> None:
    host, pool = new_host(shared_keyserver, tmp_path, "rot-crash-after")
    host.encrypted_dataset("tank/data", pool, keystatus="available", mounted=True)
    [old] = states(host, "tank/data")
    zfs_wrapper(
        host,
        tmp_path,
        '"$REAL" "$@"; status=$?\n'
        'if [ "$1" = change-key ]; then echo "simulated crash" >&2; exit 1; fi\nexit $status',
    )
    result = host.run("rotate", "--dataset", "tank/data")
    assert result.returncode != 0
    [upcoming] = [k for k in states(host, "tank/data") if k != old]
    assert states(host, "tank/data") == {old: "active", upcoming: "next"}
    assert [
        k["key_id"] for k in released_next(host, pool, host.zfs.dataset("tank/data")["guid"])
    ] == [upcoming]
    host.write_config()  # the machine restarts with a working zfs

    assert_boot_unlock_opens(host, "tank/data")  # the active key fails, the next one opens

    assert states(host, "tank/data") == {old: "retired", upcoming: "active"}
    audit = [r for r in shared_keyserver.audit_records() if r.get("key_id") == upcoming]
    assert ("activate", "rotated") in [(r["event"], r.get("reason")) for r in audit]


def test_a_crash_before_change_key_leaves_the_active_key_and_a_rerun_finishes(
    shared_keyserver: KeyServer, tmp_path: Path
) -> None:
    host, pool = new_host(shared_keyserver, tmp_path, "rot-crash-before")
    key = host.encrypted_dataset("tank/data", pool, keystatus="available", mounted=True)
    [old] = states(host, "tank/data")
    zfs_wrapper(
        host,
        tmp_path,
        'if [ "$1" = change-key ]; then echo "simulated crash" >&2; exit 1; fi\nexec "$REAL" "$@"',
    )
    assert host.run("rotate", "--dataset", "tank/data").returncode != 0
    assert host.zfs.dataset("tank/data")["key"] == key_digest(key, "raw")  # untouched
    [upcoming] = [k for k in states(host, "tank/data") if k != old]
    host.write_config()
    assert_boot_unlock_opens(host, "tank/data")  # with the active key
    assert states(host, "tank/data") == {old: "active", upcoming: "next"}

    assert host.run("rotate", "--dataset", "tank/data").returncode == 0
    assert states(host, "tank/data") == {old: "retired", upcoming: "active"}  # the same next key


def test_rotate_refuses_a_locked_dataset_and_asks_the_server_nothing(
    shared_keyserver: KeyServer, tmp_path: Path
) -> None:
    host, pool = new_host(shared_keyserver, tmp_path, "rot-locked")
    host.encrypted_dataset("tank/data", pool)
    before = states(host, "tank/data")
    result = host.run("rotate", "--dataset", "tank/data")
    assert result.returncode == errors.EX_USAGE, result.stderr
    assert "its key is not loaded; unlock it first" in result.stderr
    assert states(host, "tank/data") == before
    assert host.zfs.calls("zfs", "change-key") == []


def test_rotate_all_rotates_every_managed_root(shared_keyserver: KeyServer, tmp_path: Path) -> None:
    host, pool = new_host(shared_keyserver, tmp_path, "rot-all")
    for name in ("tank/a", "tank/b"):
        host.encrypted_dataset(name, pool, keystatus="available", mounted=True)
    result = host.run("rotate", "--all")
    assert result.returncode == 0, result.stderr
    for name in ("tank/a", "tank/b"):
        assert sorted(states(host, name).values()) == ["active", "retired"]


def test_an_agent_that_knows_no_rotation_still_gets_its_active_key(
    shared_keyserver: KeyServer, tmp_path: Path
) -> None:
    """The next key travels beside the answer's keys, so an older agent, which reads only
    'keys' and 'denied', is unaffected while a rotation is half done."""
    host, pool = new_host(shared_keyserver, tmp_path, "rot-old-agent")
    key = host.encrypted_dataset("tank/data", pool, keystatus="available", mounted=True)
    guid = host.zfs.dataset("tank/data")["guid"]
    zfs_wrapper(
        host,
        tmp_path,
        'if [ "$1" = change-key ]; then exit 1; fi\nexec "$REAL" "$@"',
    )
    host.run("rotate", "--dataset", "tank/data")  # the next key exists, unused
    with host.server.session(host.creds) as session:
        batch = session.post(
            host.server.url("/v1/keys/release"),
            json={
                "machine_id": host.creds.machine_id,
                "datasets": [{"pool_guid": pool, "dataset_guid": guid}],
            },
            timeout=10,
        ).json()
        one = session.get(
            host.server.url(f"/v1/hosts/{host.creds.machine_id}/keys/{pool}/{guid}"), timeout=10
        ).json()
    assert [base64.b64decode(k["key"]) for k in batch["keys"]] == [key]
    assert [k["state"] for k in batch["next_keys"]] == ["next"]
    assert base64.b64decode(one["key"]) == key and one["state"] == "active"
    unload_key(host, "tank/data")


def test_the_daemon_rotates_what_the_admin_asks_for_at_its_check_in(
    shared_keyserver: KeyServer, tmp_path: Path, daemons: Daemons
) -> None:
    host, pool = new_daemon_host(shared_keyserver, tmp_path, "rot-daemon", {"checkin_interval": 1})
    host.encrypted_dataset("tank/a", pool)
    host.encrypted_dataset("tank/b", pool)
    guid_a = host.zfs.dataset("tank/a")["guid"]
    [old_a] = states(host, "tank/a")
    [old_b] = states(host, "tank/b")
    daemon = daemons.start(host)
    daemon.expect_ready()
    asked = shared_keyserver.must("key", "rotate", "--host", host.creds.name, "--dataset", guid_a)
    assert asked.split() == [old_a]

    daemon.wait_log(r"tank/a: key rotated; k-[0-9a-f]+ is now active")
    assert states(host, "tank/a")[old_a] == "retired"
    assert states(host, "tank/b") == {old_b: "active"}  # not asked for
    daemon.terminate()
    assert_boot_unlock_opens(host, "tank/a")


@pytest.mark.slow
def test_kill_9_at_any_moment_of_a_rotation_loses_no_key(
    shared_keyserver: KeyServer, tmp_path: Path
) -> None:
    """Twelve rotations killed at random moments (each zfs call takes 0.2 s, so that the
    kills spread over asking for the next key, changing the key, proving it and
    activating it), each followed by what a reboot does: the key unloaded, then `unlock`.
    The dataset opens every time, and the last rotation, left to finish, leaves one active
    key that is the dataset's."""
    host, pool = new_host(shared_keyserver, tmp_path, "rot-kill")
    host.encrypted_dataset("tank/data", pool, keystatus="available", mounted=True)
    zfs_wrapper(host, tmp_path, 'sleep 0.2\nexec "$REAL" "$@"')
    chance = random.Random(23)  # noqa: S311 (when to kill, not a secret)
    seen: Counter[str] = Counter()
    for round_number in range(12):
        process = subprocess.Popen(
            [str(AGENT_BIN), "-c", str(host.config_path), "rotate", "--dataset", "tank/data"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        time.sleep(chance.uniform(0.2, 2.0))
        process.kill()
        process.wait()
        now = sorted(states(host, "tank/data").values())
        seen["half done" if "next" in now else "untouched or done"] += 1
        unload_key(host, "tank/data")
        result = host.run("unlock")
        assert result.returncode == 0, (round_number, result.stderr)
        assert host.zfs.keystatus("tank/data") == "available", round_number
        if "rotation completed" in result.stderr:
            seen["finished by unlock"] += 1
    assert seen["half done"] >= 1, seen
    assert host.run("rotate", "--dataset", "tank/data").returncode == 0
    assert sorted(set(states(host, "tank/data").values())) == ["active", "retired"]
    assert_boot_unlock_opens(host, "tank/data")
    print(f"\nkill -9 during zfs-unlock-agent rotate, 12 rounds: {dict(seen)}")
