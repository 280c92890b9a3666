"""Unlock, mount, verify and status against the real key server, with the fake zfs.

P11 (idempotent, minimal fetches, the "Key already loaded" race), P12 (a wrong key
is isolated per root), mounting the way `zfs mount -a` would, and the exit codes
the man page documents.
"""

from __future__ import annotations

import contextlib
import json
import os
import pty
import re
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from bench.common import free_port
from tests.agent.harness import AGENT_BIN, AgentHost
from tests.fakes import sha256
from tests.fakes.stub_https import self_signed_cert
from tests.keyserver import KeyServer
from zfs_unlock_agent import errors
from zfs_unlock_common import pinning

MAN_PAGE = Path(__file__).parents[2] / "docs" / "man" / "zfs-unlock-agent.8"


# Helpers


def release_records(server: KeyServer, host: AgentHost) -> list[dict[str, Any]]:
    return [
        r
        for r in server.audit_records()
        if r.get("event") == "release" and r.get("host") == host.creds.name
    ]


def fetches(server: KeyServer, host: AgentHost) -> int:
    """Release requests the server answered for HOST (a batch is one request)."""
    return len({r["request_id"] for r in release_records(server, host)})


def wrong_key_root(host: AgentHost, name: str, pool_guid: str, **extra: Any) -> str:
    """An encryption root for which the server holds a key other than the dataset's."""
    guid = host.zfs.add_encrypted(name, os.urandom(32), **extra)
    host.server_key(pool_guid, guid, name, "raw", os.urandom(32))
    return guid


def mount_calls(host: AgentHost) -> list[str]:
    return [c["argv"][-1] for c in host.zfs.calls("zfs", "mount")]


def load_key_calls(host: AgentHost) -> list[dict[str, Any]]:
    return host.zfs.calls("zfs", "load-key")


def mounted(host: AgentHost, name: str) -> bool:
    return bool(host.zfs.dataset(name)["mounted"])


def new_host(server: KeyServer, tmp_path: Path, name: str) -> tuple[AgentHost, str]:
    host = AgentHost.create(tmp_path, server, name)
    return host, host.zfs.add_pool("tank")


# Idempotence and minimal fetches (P11)


def test_available_roots_cost_no_fetch(shared_keyserver: KeyServer, tmp_path: Path) -> None:
    host, pool = new_host(shared_keyserver, tmp_path, "avail")
    host.encrypted_dataset("tank/secret", pool, keystatus="available")
    host.encrypted_dataset("tank/other", pool, keystatus="available")

    result = host.run("unlock")

    assert result.returncode == 0, result.stderr
    assert release_records(shared_keyserver, host) == []
    assert load_key_calls(host) == []


def test_unlock_twice_fetches_once(shared_keyserver: KeyServer, tmp_path: Path) -> None:
    host, pool = new_host(shared_keyserver, tmp_path, "twice")
    key_a = host.encrypted_dataset("tank/a", pool)
    key_b = host.encrypted_dataset("tank/b", pool)

    first = host.run("unlock")
    second = host.run("unlock")

    assert first.returncode == 0, first.stderr
    assert second.returncode == 0, second.stderr
    assert fetches(shared_keyserver, host) == 1
    assert len(release_records(shared_keyserver, host)) == 2  # both roots in that one batch
    loads = load_key_calls(host)
    assert sorted(c["argv"][-1] for c in loads) == ["tank/a", "tank/b"]
    digests = {c["argv"][-1]: c["stdin_sha256"] for c in loads}
    assert digests == {"tank/a": sha256(key_a), "tank/b": sha256(key_b)}
    assert host.zfs.keystatus("tank/a") == host.zfs.keystatus("tank/b") == "available"


def test_key_loaded_meanwhile_counts_as_success(
    shared_keyserver: KeyServer, tmp_path: Path
) -> None:
    """zfs list says locked, but another process loads the key before our load-key runs."""
    host, pool = new_host(shared_keyserver, tmp_path, "race")
    host.encrypted_dataset("tank/secret", pool, loaded_after_list=True)
    host.zfs.add_child("tank/secret/child")

    result = host.run("unlock")

    assert result.returncode == 0, result.stderr
    assert fetches(shared_keyserver, host) == 1  # it did look locked
    assert [c["argv"][-1] for c in load_key_calls(host)] == ["tank/secret"]
    assert "ERROR" not in result.stderr
    assert host.zfs.keystatus("tank/secret") == "available"
    assert mounted(host, "tank/secret")
    assert mounted(host, "tank/secret/child")


# A wrong key is isolated per root (P12)


def test_one_wrong_key_is_a_partial_failure(shared_keyserver: KeyServer, tmp_path: Path) -> None:
    host, pool = new_host(shared_keyserver, tmp_path, "partial")
    host.encrypted_dataset("tank/a", pool)
    wrong_key_root(host, "tank/b", pool)
    host.encrypted_dataset("tank/c", pool)
    host.zfs.add_child("tank/a/data")
    host.zfs.add_child("tank/c/data")

    result = host.run("unlock")

    assert result.returncode == errors.EX_PARTIAL, result.stderr
    for good in ("tank/a", "tank/c"):
        assert host.zfs.keystatus(good) == "available"
        assert mounted(host, good)
        assert mounted(host, f"{good}/data")
    assert host.zfs.keystatus("tank/b") == "unavailable"
    assert not mounted(host, "tank/b")
    assert "tank/b/" not in " ".join(mount_calls(host))
    failure = [line for line in result.stderr.splitlines() if "tank/b" in line]
    assert failure, result.stderr
    assert "incorrect" in failure[0].lower()
    assert not any("tank/a" in line and "ERROR" in line for line in result.stderr.splitlines())
    # The server released B's key (the rejection is zfs's, not the server's).
    released = {
        r["dataset"] for r in release_records(shared_keyserver, host) if r["decision"] == "allow"
    }
    assert released == {"tank/a", "tank/b", "tank/c"}


def test_every_root_with_a_wrong_key_exits_79(shared_keyserver: KeyServer, tmp_path: Path) -> None:
    host, pool = new_host(shared_keyserver, tmp_path, "allwrong")
    wrong_key_root(host, "tank/a", pool)
    wrong_key_root(host, "tank/b", pool)

    result = host.run("unlock")

    assert result.returncode == errors.EX_BADKEY == 79, result.stderr
    assert host.zfs.keystatus("tank/a") == host.zfs.keystatus("tank/b") == "unavailable"
    assert mount_calls(host) == []


# Mounting


def test_mounts_what_zfs_mount_a_would(shared_keyserver: KeyServer, tmp_path: Path) -> None:
    host, pool = new_host(shared_keyserver, tmp_path, "mounts")
    host.write_config(zfs_settings={"zvol_dir": str(host.zfs.zvol_dir)})
    secret_key = host.encrypted_dataset("tank/secret", pool)
    host.zfs.add_child("tank/secret/normal")
    host.zfs.add_child("tank/secret/normal/deep")
    host.zfs.add_child("tank/secret/noauto", canmount="noauto")
    host.zfs.add_child("tank/secret/off", canmount="off")
    host.zfs.add_child("tank/secret/none", mountpoint="none")
    host.zfs.add_child("tank/secret/legacy", mountpoint="legacy")
    host.zfs.add_child("tank/secret/vol", type="volume")
    # A child with its own key, managed: a second root, unlocked with its own key.
    inner_key = host.encrypted_dataset("tank/secret/inner", pool)
    host.zfs.add_child("tank/secret/inner/data")
    # A child with its own key that is not managed: left alone, and no error.
    host.zfs.add_encrypted("tank/secret/foreign", os.urandom(32), managed=False)
    host.zfs.add_child("tank/secret/foreign/data")

    result = host.run("unlock")

    assert result.returncode == 0, result.stderr
    assert fetches(shared_keyserver, host) == 1
    loads = {c["argv"][-1]: c["stdin_sha256"] for c in load_key_calls(host)}
    assert loads == {"tank/secret": sha256(secret_key), "tank/secret/inner": sha256(inner_key)}
    assert sorted(mount_calls(host)) == [
        "tank/secret",
        "tank/secret/inner",
        "tank/secret/inner/data",
        "tank/secret/normal",
        "tank/secret/normal/deep",
    ]
    for name in ("noauto", "off", "none", "legacy"):
        assert not mounted(host, f"tank/secret/{name}")
    assert host.zfs.keystatus("tank/secret/foreign") == "unavailable"
    assert not mounted(host, "tank/secret/foreign/data")
    assert (host.zfs.zvol_dir / "tank/secret/vol").exists()


def test_mounts_parents_before_children_across_roots(
    shared_keyserver: KeyServer, tmp_path: Path
) -> None:
    host, pool = new_host(shared_keyserver, tmp_path, "mount-order")
    host.encrypted_dataset("tank/outer", pool, mountpoint="/srv")
    host.encrypted_dataset("tank/nested", pool, mountpoint="/srv/nested")
    result = host.run("unlock", "--dataset", "tank/nested", "--dataset", "tank/outer")
    assert result.returncode == 0, result.stderr
    assert mount_calls(host) == ["tank/outer", "tank/nested"]


def test_a_stale_include_entry_does_not_stop_the_others(
    shared_keyserver: KeyServer, tmp_path: Path
) -> None:
    host, pool = new_host(shared_keyserver, tmp_path, "stale-include")
    host.write_config(extra='[datasets]\ninclude = ["tank/gone", "tank", "tank/listed"]\n')
    host.encrypted_dataset("tank/listed", pool, managed=False)
    host.encrypted_dataset("tank/tagged", pool)
    result = host.run("unlock")
    assert result.returncode == 0, result.stderr
    assert "tank/gone: no such dataset" in result.stderr
    assert "tank: not encrypted" in result.stderr
    assert host.zfs.keystatus("tank/listed") == "available"
    assert host.zfs.keystatus("tank/tagged") == "available"


def test_volume_link_that_never_appears_fails_after_the_timeout(
    shared_keyserver: KeyServer, tmp_path: Path
) -> None:
    host, pool = new_host(shared_keyserver, tmp_path, "nolink")
    host.write_config(zfs_settings={"zvol_dir": str(host.zfs.zvol_dir), "volume_link_timeout": 0.6})
    host.encrypted_dataset("tank/vm", pool)
    host.zfs.add_child("tank/vm/disk0", type="volume")
    host.zfs.add_child("tank/vm/disk1", type="volume", no_link=True)

    started = time.monotonic()
    result = host.run("unlock")
    elapsed = time.monotonic() - started

    assert result.returncode == errors.EX_UNAVAILABLE, result.stderr
    assert "tank/vm/disk1" in result.stderr
    assert "tank/vm/disk0" not in result.stderr
    assert host.zfs.keystatus("tank/vm") == "available"  # the key did load
    assert (host.zfs.zvol_dir / "tank/vm/disk0").exists()
    assert 0.6 <= elapsed < 10


def test_no_mount_loads_keys_only(shared_keyserver: KeyServer, tmp_path: Path) -> None:
    host, pool = new_host(shared_keyserver, tmp_path, "nomount")
    host.encrypted_dataset("tank/secret", pool)
    host.zfs.add_child("tank/secret/child")

    result = host.run("unlock", "--no-mount")

    assert result.returncode == 0, result.stderr
    assert host.zfs.keystatus("tank/secret") == "available"
    assert mount_calls(host) == []
    assert not mounted(host, "tank/secret")
    assert not mounted(host, "tank/secret/child")


# Selecting roots


def test_manual_mode_unlocks_only_that_datasets_root(
    shared_keyserver: KeyServer, tmp_path: Path
) -> None:
    host, pool = new_host(shared_keyserver, tmp_path, "manual")
    host.encrypted_dataset("tank/secret", pool, managed=False)
    host.zfs.add_child("tank/secret/child")
    other_guid = host.zfs.add_encrypted("tank/other", os.urandom(32))
    host.server_key(pool, other_guid, "tank/other", key=os.urandom(32))

    result = host.run("--dataset", "tank/secret/child")

    assert result.returncode == 0, result.stderr
    assert [c["argv"][-1] for c in load_key_calls(host)] == ["tank/secret"]
    assert host.zfs.keystatus("tank/secret") == "available"
    assert mounted(host, "tank/secret/child")
    assert host.zfs.keystatus("tank/other") == "unavailable"
    assert {r["dataset"] for r in release_records(shared_keyserver, host)} == {"tank/secret"}


def test_roots_on_two_pools(shared_keyserver: KeyServer, tmp_path: Path) -> None:
    host, tank = new_host(shared_keyserver, tmp_path, "twopools")
    backup = host.zfs.add_pool("backup")
    host.encrypted_dataset("tank/secret", tank)
    host.encrypted_dataset("backup/secret", backup)

    result = host.run("unlock")

    assert result.returncode == 0, result.stderr
    assert fetches(shared_keyserver, host) == 1
    pools = {r["dataset"]: r["pool"] for r in release_records(shared_keyserver, host)}
    assert pools == {"tank/secret": tank, "backup/secret": backup}
    for name in ("tank/secret", "backup/secret"):
        assert host.zfs.keystatus(name) == "available"
        assert mounted(host, name)


# verify and status


def key_state(host: AgentHost) -> dict[str, tuple[str, bool]]:
    state = host.zfs.load()["datasets"]
    return {
        name: (state[ds["encryptionroot"]]["keystatus"], bool(ds.get("mounted")))
        for name, ds in state.items()
        if ds.get("encryptionroot")
    }


def test_verify_proves_keys_and_changes_nothing(
    shared_keyserver: KeyServer, tmp_path: Path
) -> None:
    host, pool = new_host(shared_keyserver, tmp_path, "verify")
    host.encrypted_dataset("tank/locked", pool)
    host.encrypted_dataset("tank/open", pool, keystatus="available")
    host.zfs.add_child("tank/locked/child")
    before = key_state(host)

    result = host.run("verify")

    assert result.returncode == 0, result.stderr
    assert key_state(host) == before
    loads = load_key_calls(host)
    assert sorted(c["argv"][-1] for c in loads) == ["tank/locked", "tank/open"]
    assert all("-n" in c["argv"] for c in loads)
    assert mount_calls(host) == []


@pytest.mark.parametrize("keystatus", ["unavailable", "available"])
def test_verify_reports_a_wrong_key_and_changes_nothing(
    shared_keyserver: KeyServer, tmp_path: Path, keystatus: str
) -> None:
    host, pool = new_host(shared_keyserver, tmp_path, f"verify-wrong-{keystatus}")
    wrong_key_root(host, "tank/secret", pool, keystatus=keystatus)
    before = key_state(host)

    result = host.run("verify")

    assert result.returncode == errors.EX_BADKEY, result.stderr
    assert "tank/secret" in result.stderr
    assert "incorrect" in result.stderr.lower()
    assert key_state(host) == before
    assert host.zfs.keystatus("tank/secret") == keystatus
    loads = load_key_calls(host)
    assert loads
    assert all("-n" in c["argv"] for c in loads)


def test_status_json(shared_keyserver: KeyServer, tmp_path: Path) -> None:
    host, pool = new_host(shared_keyserver, tmp_path, "status")
    host.encrypted_dataset("tank/secret", pool)
    host.zfs.add_child("tank/secret/child")
    host.zfs.add_child("tank/secret/legacy", mountpoint="legacy")
    host.zfs.add_encrypted("tank/foreign", os.urandom(32), managed=False)

    locked = host.run("status", "--json")

    assert locked.returncode == 3, locked.stderr  # documented: some managed root is locked
    rows = json.loads(locked.stdout)
    assert [r["encryption_root"] for r in rows] == ["tank/secret"]
    row = rows[0]
    assert row["pool_guid"] == pool
    assert row["dataset_guid"] == host.zfs.dataset("tank/secret")["guid"]
    assert (row["keystatus"], row["keyformat"], row["keylocation"]) == (
        "unavailable",
        "raw",
        "prompt",
    )
    assert row["mounted"] == []
    assert row["not_mounted"] == ["tank/secret", "tank/secret/child"]
    assert release_records(shared_keyserver, host) == []  # no network

    assert host.run("unlock").returncode == 0
    unlocked = host.run("status", "--json")

    assert unlocked.returncode == 0, unlocked.stderr
    row = json.loads(unlocked.stdout)[0]
    assert row["keystatus"] == "available"
    assert row["mounted"] == ["tank/secret", "tank/secret/child"]
    assert row["not_mounted"] == []


# A failure of the batch request is told once, not once per root


def stays_locked_lines(stderr: str) -> list[str]:
    return sorted(
        line.split(": ")[2]
        for line in stderr.splitlines()
        if "stays locked: no key from the server" in line
    )


def test_an_unreachable_server_is_reported_once_for_the_batch(
    shared_keyserver: KeyServer, tmp_path: Path
) -> None:
    host, pool = new_host(shared_keyserver, tmp_path, "once-down")
    for name in ("tank/a", "tank/b", "tank/c"):
        host.encrypted_dataset(name, pool)
    host.write_config(
        urls=[f"https://127.0.0.1:{free_port()}"],
        network={"deadline": 1, "connect_timeout": 0.5, "backoff_initial": 0.2},
    )

    result = host.run("unlock")

    assert result.returncode == errors.EX_TEMPFAIL, result.stderr
    assert result.stderr.count("no key server answered") == 1, result.stderr
    assert result.stderr.count("cannot connect (connection refused)") == 1, result.stderr
    assert stays_locked_lines(result.stderr) == ["tank/a", "tank/b", "tank/c"], result.stderr
    assert load_key_calls(host) == []


def run_on_a_terminal(host: AgentHost, *args: str) -> tuple[int, str]:
    """The agent with its standard error on a terminal, as when an admin runs it by hand."""
    main, terminal = pty.openpty()
    environment = {k: v for k, v in os.environ.items() if k != "JOURNAL_STREAM"}
    agent = subprocess.Popen(
        [str(AGENT_BIN), "-c", str(host.config_path), *args],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=terminal,
        env=environment,
    )
    os.close(terminal)
    chunks = []
    with contextlib.suppress(OSError):  # EIO once the agent has closed its end
        while data := os.read(main, 4096):
            chunks.append(data)
    os.close(main)
    return agent.wait(timeout=30), b"".join(chunks).decode()


RETRY_LINE = re.compile(
    r"INFO: https://127\.0\.0\.1:\d+: cannot connect \(connection refused\);"
    r" next try in \d+\.\d+ s \(deadline in \d+\.\d+ s\)"
)


def test_the_wait_for_a_server_is_shown_where_someone_watches(
    shared_keyserver: KeyServer, tmp_path: Path
) -> None:
    """A line per failed try on a terminal and with -v; none in a log file or the journal
    (they go out at DEBUG there), where a daemon would write them for every retry."""
    host, pool = new_host(shared_keyserver, tmp_path, "progress")
    host.encrypted_dataset("tank/a", pool)
    host.write_config(
        urls=[f"https://127.0.0.1:{free_port()}"],
        network={"deadline": 1.5, "connect_timeout": 0.5, "backoff_initial": 0.4},
    )

    code, on_terminal = run_on_a_terminal(host, "unlock")
    verbose = host.run("-v", "unlock")
    quiet = host.run("unlock")
    journal = host.run("unlock", env={"JOURNAL_STREAM": "8:1234"})

    assert code == verbose.returncode == quiet.returncode == journal.returncode == 75
    assert RETRY_LINE.search(on_terminal), on_terminal
    assert RETRY_LINE.search(verbose.stderr), verbose.stderr
    for logged in (quiet.stderr, journal.stderr):
        assert "next try in" not in logged, logged
        assert "no key server answered" in logged


def test_a_refusal_is_reported_once_and_points_at_the_audit_log(
    shared_keyserver: KeyServer, tmp_path: Path
) -> None:
    """403: the server never tells the host why; the message says where the admin reads it,
    with the name the host is enrolled under (its certificate's)."""
    host, pool = new_host(shared_keyserver, tmp_path, "once-refused")
    host.encrypted_dataset("tank/a", pool)
    host.encrypted_dataset("tank/b", pool)
    shared_keyserver.must("host", "disable", host.creds.name)

    result = host.run("unlock")

    assert result.returncode == errors.EX_NOPERM, result.stderr
    audit = "on the key server run 'zfs-unlock-server audit --host once-refused --last 5'"
    assert result.stderr.count("the key server refused (403)") == 1, result.stderr
    assert result.stderr.count(audit) == 1, result.stderr
    assert stays_locked_lines(result.stderr) == ["tank/a", "tank/b"], result.stderr
    # The command it names shows the reason.
    code, shown, _ = shared_keyserver.admin("audit", "--host", "once-refused", "--last", "5")
    assert code == 0
    assert "deny" in shown


def test_a_client_key_that_does_not_match_is_a_configuration_error(
    shared_keyserver: KeyServer, tmp_path: Path
) -> None:
    host, pool = new_host(shared_keyserver, tmp_path, "pair-mismatch")
    host.encrypted_dataset("tank/secret", pool)
    replace_client_key(host, self_signed_cert(tmp_path / "other", "other").key.read_bytes())

    result = host.run("unlock")

    assert result.returncode == errors.EX_CONFIG, result.stderr
    assert (
        f"client certificate {host.creds.cert} and client key {host.creds.key}:"
        " the key does not match the certificate"
    ) in result.stderr
    assert "internal error" not in result.stderr
    assert stays_locked_lines(result.stderr) == ["tank/secret"], result.stderr
    assert release_records(shared_keyserver, host) == []


# The documented exit codes, each reached in this tier


@dataclass(frozen=True)
class ExitCase:
    code: int
    name: str
    arrange: Callable[[AgentHost, str, Path], list[str]]


def _ok(host: AgentHost, pool: str, tmp: Path) -> list[str]:
    host.encrypted_dataset("tank/secret", pool)
    return ["unlock"]


def _partial(host: AgentHost, pool: str, tmp: Path) -> list[str]:
    host.encrypted_dataset("tank/a", pool)
    wrong_key_root(host, "tank/b", pool)
    return ["unlock"]


def _no_command(host: AgentHost, pool: str, tmp: Path) -> list[str]:
    return []


def _unknown_option(host: AgentHost, pool: str, tmp: Path) -> list[str]:
    return ["unlock", "--no-such-option"]


def _bad_dataset_name(host: AgentHost, pool: str, tmp: Path) -> list[str]:
    return ["--dataset", "tank//x;rm"]


def _keyformat_mismatch(host: AgentHost, pool: str, tmp: Path) -> list[str]:
    guid = host.zfs.add_encrypted("tank/secret", os.urandom(32), "raw")
    host.server_key(pool, guid, "tank/secret", "hex", os.urandom(32).hex().encode())
    return ["unlock"]


def _no_zpool(host: AgentHost, pool: str, tmp: Path) -> list[str]:
    host.encrypted_dataset("tank/secret", pool)
    host.write_config(zfs_settings={"zpool": str(tmp / "missing" / "zpool")})
    return ["unlock"]


def _no_dataset(host: AgentHost, pool: str, tmp: Path) -> list[str]:
    return ["--dataset", "tank/absent"]


def _no_server(host: AgentHost, pool: str, tmp: Path) -> list[str]:
    host.encrypted_dataset("tank/secret", pool)
    host.write_config(
        urls=[f"https://127.0.0.1:{free_port()}"],
        network={"deadline": 1, "connect_timeout": 0.5, "read_timeout": 0.5},
    )
    return ["unlock"]


def _pin_mismatch(host: AgentHost, pool: str, tmp: Path) -> list[str]:
    host.encrypted_dataset("tank/secret", pool)
    host.write_config(pins=[pinning.format_pin(bytes(range(32)))])
    return ["unlock"]


def _no_server_key(host: AgentHost, pool: str, tmp: Path) -> list[str]:
    host.zfs.add_encrypted("tank/secret", os.urandom(32))
    return ["unlock"]


def _loose_client_key(host: AgentHost, pool: str, tmp: Path) -> list[str]:
    host.encrypted_dataset("tank/secret", pool)
    host.creds.key.chmod(0o644)
    return ["unlock"]


def _wrong_key(host: AgentHost, pool: str, tmp: Path) -> list[str]:
    wrong_key_root(host, "tank/secret", pool)
    return ["unlock"]


def replace_client_key(host: AgentHost, pem: bytes) -> None:
    host.creds.key.chmod(0o600)
    host.creds.key.write_bytes(pem)
    host.creds.key.chmod(0o400)


def _client_key_of_another_pair(host: AgentHost, pool: str, tmp: Path) -> list[str]:
    host.encrypted_dataset("tank/secret", pool)
    replace_client_key(host, self_signed_cert(tmp / "other", "other").key.read_bytes())
    return ["unlock"]


EXIT_CASES = [
    ExitCase(0, "ok", _ok),
    ExitCase(1, "partial", _partial),
    ExitCase(64, "no-command", _no_command),
    ExitCase(64, "unknown-option", _unknown_option),
    ExitCase(64, "bad-dataset-name", _bad_dataset_name),
    ExitCase(65, "keyformat-mismatch", _keyformat_mismatch),
    ExitCase(69, "no-zpool-binary", _no_zpool),
    ExitCase(69, "no-such-dataset", _no_dataset),
    ExitCase(75, "no-server-answers", _no_server),
    ExitCase(77, "pin-mismatch", _pin_mismatch),
    ExitCase(77, "server-has-no-key", _no_server_key),
    ExitCase(78, "loose-client-key", _loose_client_key),
    ExitCase(78, "client-key-of-another-pair", _client_key_of_another_pair),
    ExitCase(79, "wrong-key", _wrong_key),
]


@pytest.mark.parametrize("case", EXIT_CASES, ids=lambda c: f"{c.code}-{c.name}")
def test_exit_codes(shared_keyserver: KeyServer, tmp_path: Path, case: ExitCase) -> None:
    host, pool = new_host(shared_keyserver, tmp_path, f"exit-{case.name}")
    args = case.arrange(host, pool, tmp_path)

    started = time.monotonic()
    result = host.run(*args, timeout=30)

    assert result.returncode == case.code, result.stderr
    assert time.monotonic() - started < 10
    assert "Traceback" not in result.stderr
    assert "internal error" not in result.stderr
    if case.code not in (errors.EX_OK, errors.EX_PARTIAL):
        assert result.stderr.strip(), "a failure must say why"
    if case.code in (errors.EX_DATAERR, errors.EX_TEMPFAIL, errors.EX_NOPERM, errors.EX_CONFIG):
        assert not [c for c in load_key_calls(host) if "-n" not in c["argv"]]


def test_exit_code_table_matches_the_man_page() -> None:
    """Every code the table pins is documented, and every documented code is a constant."""
    text = MAN_PAGE.read_text()
    section = text.split(".SH EXIT STATUS", 1)[1].split(".SH ", 1)[0]
    documented = {int(code) for code in re.findall(r"^\.B (\d+)$", section, re.MULTILINE)}
    constants = {
        value
        for name, value in vars(errors).items()
        if name.startswith("EX_") and isinstance(value, int)
    }
    assert {case.code for case in EXIT_CASES} <= documented
    assert documented == constants
