"""Enrollment against the real key server, with the fake zfs.

A dataset is moved to a server key (or, with --create, created with one; without it a
name that does not exist is refused), and an interruption at
any point leaves a key that opens the data: the old one before `change-key`, the
server's pending key after it.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.agent.harness import AgentHost
from tests.keyserver import KeyServer
from zfs_unlock_agent import errors
from zfs_unlock_agent.zfs import MANAGED_PROPERTIES, MANAGED_PROPERTY


def new_host(server: KeyServer, tmp_path: Path, name: str) -> AgentHost:
    host = AgentHost.create(tmp_path, server, name)
    host.zfs.add_pool("tank")
    return host


def server_keys(host: AgentHost) -> list[dict[str, Any]]:
    keys: list[dict[str, Any]] = json.loads(
        host.server.must("key", "list", "--host", host.creds.name, "--json")
    )
    return keys


def server_key_for(host: AgentHost, dataset: str) -> dict[str, Any]:
    (key,) = [k for k in server_keys(host) if k["dataset"] == dataset]
    return key


def unload_key(host: AgentHost, dataset: str) -> None:
    """What an operator (or a reboot) does: `zfs unload-key`, here on the fake."""
    subprocess.run(
        [host.zfs.zfs, "unload-key", dataset], check=True, capture_output=True, timeout=10
    )


def managed(host: AgentHost, dataset: str) -> str | None:
    """zfs-unlock-agent:managed, when DATASET also has every other managed-root property
    (org.openzfs.systemd:ignore=on: zfs-mount-generator makes it no units)."""
    props: dict[str, str] = host.zfs.dataset(dataset).get("props", {})
    others = {p: v for p, v in MANAGED_PROPERTIES.items() if p != MANAGED_PROPERTY}
    assert {p: props.get(p) for p in others} == others, props
    return props.get(MANAGED_PROPERTY)


def assert_boot_unlock_opens(host: AgentHost, dataset: str) -> None:
    """After the key is unloaded, a plain `unlock` (as at boot) opens and mounts it."""
    unload_key(host, dataset)
    assert host.zfs.keystatus(dataset) == "unavailable"
    result = host.run("unlock")
    assert result.returncode == 0, result.stderr
    assert host.zfs.keystatus(dataset) == "available"
    assert host.zfs.dataset(dataset)["mounted"]


def crashing_zfs(host: AgentHost, tmp_path: Path, after: str) -> None:
    """Point the agent at a zfs that dies right after running subcommand AFTER.

    The real (fake) command runs and takes effect; the agent sees a failure, as
    if the machine had stopped at that moment.
    """
    wrapper = tmp_path / "crash" / "zfs"
    wrapper.parent.mkdir()
    wrapper.write_text(
        "#!/bin/sh\n"
        f'"{host.zfs.zfs}" "$@"\n'
        "status=$?\n"
        f'if [ "$1" = "{after}" ]; then echo "simulated crash after $1" >&2; exit 1; fi\n'
        "exit $status\n"
    )
    wrapper.chmod(0o755)
    host.write_config(zfs_settings={"zfs": str(wrapper)})


def test_enroll_new_dataset(shared_keyserver: KeyServer, tmp_path: Path) -> None:
    host = new_host(shared_keyserver, tmp_path, "new")

    result = host.run("enroll", "--dataset", "tank/new", "--create")

    assert result.returncode == 0, result.stderr
    assert "tank/new: created and enrolled" in result.stdout
    ds = host.zfs.dataset("tank/new")
    assert (ds["encryptionroot"], ds["keyformat"], ds["keylocation"]) == (
        "tank/new",
        "raw",
        "prompt",
    )
    assert managed(host, "tank/new") == "on"
    key = server_key_for(host, "tank/new")
    assert (key["state"], key["keyformat"], key["dataset_guid"]) == ("active", "raw", ds["guid"])
    assert_boot_unlock_opens(host, "tank/new")
    assert host.run("verify").returncode == 0


def test_a_dataset_that_does_not_exist_is_not_created_without_create(
    shared_keyserver: KeyServer, tmp_path: Path
) -> None:
    """A typo must not make a new, empty dataset: the name is refused before the server is
    asked anything, and zfs only lists."""
    host = new_host(shared_keyserver, tmp_path, "typo")
    host.zfs.add_encrypted("tank/secret", os.urandom(32), keystatus="available", managed=False)
    before = host.zfs.load()

    result = host.run("enroll", "--dataset", "tank/secert")

    assert result.returncode == errors.EX_UNAVAILABLE == 69, result.stderr
    assert "tank/secert: no such dataset" in result.stderr
    assert "add --create to create it" in result.stderr
    assert host.zfs.load() == before
    assert host.zfs.calls("zfs", "create") == []
    assert {c["argv"][0] for c in host.zfs.calls("zfs")} == {"list"}
    assert server_keys(host) == []
    asked = [r for r in shared_keyserver.audit_records() if r.get("host") == "typo"]
    assert [r["event"] for r in asked] == ["host_added"]  # the harness enrolled the host


@pytest.mark.parametrize("keyformat", ["raw", "hex"])
def test_enroll_dataset_with_a_key_file(
    shared_keyserver: KeyServer, tmp_path: Path, keyformat: str
) -> None:
    host = new_host(shared_keyserver, tmp_path, f"keyfile-{keyformat}")
    key_file = tmp_path / "keys" / "data.key"
    key_file.parent.mkdir()
    key_file.write_bytes(os.urandom(32))
    host.zfs.add_encrypted(
        "tank/data", key_file.read_bytes(), managed=False, keylocation=f"file://{key_file}"
    )

    result = host.run("enroll", "--dataset", "tank/data", "--keyformat", keyformat)

    assert result.returncode == 0, result.stderr
    from_file = [c for c in host.zfs.calls("zfs", "load-key") if "-L" not in c["argv"]]
    assert [c["argv"] for c in from_file] == [["load-key", "tank/data"]]
    ds = host.zfs.dataset("tank/data")
    assert (ds["keyformat"], ds["keylocation"]) == (keyformat, "prompt")
    assert managed(host, "tank/data") == "on"
    assert server_key_for(host, "tank/data")["state"] == "active"
    assert_boot_unlock_opens(host, "tank/data")


def test_enroll_passes_the_https_keylocation_variables_to_load_key(
    shared_keyserver: KeyServer, tmp_path: Path
) -> None:
    """libzfs fetches a keylocation=https:// key with SSL_CA_CERT_FILE, SSL_CLIENT_CERT_FILE
    and SSL_CLIENT_KEY_FILE from its environment (the SimpleZFSKeySystem route needs a
    client certificate): `enroll` of a locked dataset passes them to that load-key only."""
    host = new_host(shared_keyserver, tmp_path, "https-env")
    key_file = tmp_path / "data.key"  # the fake reads file:// only; the environment is the point
    key_file.write_bytes(os.urandom(32))
    host.zfs.add_encrypted(
        "tank/data", key_file.read_bytes(), managed=False, keylocation=f"file://{key_file}"
    )
    ssl = {
        "SSL_CA_CERT_FILE": "/etc/ssl/server.crt",
        "SSL_CA_CERT_PATH": "/etc/ssl/certs",
        "SSL_CLIENT_CERT_FILE": "/etc/zfs-unlock-agent/client.crt",
        "SSL_CLIENT_KEY_FILE": "/etc/zfs-unlock-agent/client.key",
    }

    result = host.run("enroll", "--dataset", "tank/data", env={**ssl, "SSL_OTHER": "x"})

    assert result.returncode == 0, result.stderr
    (from_location,) = [c for c in host.zfs.calls("zfs", "load-key") if "-L" not in c["argv"]]
    assert {k: v for k, v in from_location["env"].items() if k.startswith("SSL_")} == ssl
    others = [c for c in host.zfs.calls("zfs") if c != from_location]
    assert others and not [c for c in others if any(k.startswith("SSL_") for k in c["env"])]


def test_enroll_loaded_passphrase_dataset(shared_keyserver: KeyServer, tmp_path: Path) -> None:
    host = new_host(shared_keyserver, tmp_path, "passphrase")
    host.zfs.add_encrypted(
        "tank/home", b"correct horse battery staple", "passphrase", "available", managed=False
    )

    result = host.run("enroll", "--dataset", "tank/home")

    assert result.returncode == 0, result.stderr
    ds = host.zfs.dataset("tank/home")
    assert (ds["keyformat"], ds["keylocation"]) == ("raw", "prompt")
    assert managed(host, "tank/home") == "on"
    assert server_key_for(host, "tank/home")["state"] == "active"
    assert_boot_unlock_opens(host, "tank/home")


def test_key_not_loaded_with_prompt_is_a_usage_error(
    shared_keyserver: KeyServer, tmp_path: Path
) -> None:
    host = new_host(shared_keyserver, tmp_path, "notloaded")
    host.zfs.add_encrypted("tank/home", b"correct horse battery staple", "passphrase")
    before = host.zfs.load()

    result = host.run("enroll", "--dataset", "tank/home")

    assert result.returncode == errors.EX_USAGE, result.stderr
    assert "tank/home" in result.stderr
    assert "not loaded" in result.stderr
    assert "zfs load-key tank/home" in result.stderr
    # keylocation=prompt may also mean an interrupted enrollment: say how to resume.
    assert "zfs-unlock-agent --dataset tank/home" in result.stderr
    assert host.zfs.load() == before
    assert server_keys(host) == []
    requests = [
        r
        for r in shared_keyserver.audit_records()
        if r.get("host") == "notloaded" and r.get("event") in ("enroll", "release", "activate")
    ]
    assert requests == []  # refused before the server was asked for anything


@pytest.mark.parametrize("crash_after", ["change-key", "set"])
def test_interrupted_enrolment_leaves_a_key_that_opens_the_data(
    shared_keyserver: KeyServer, tmp_path: Path, crash_after: str
) -> None:
    host = new_host(shared_keyserver, tmp_path, f"crash-unlock-{crash_after}")
    host.zfs.add_encrypted("tank/data", os.urandom(32), keystatus="available", managed=False)
    crashing_zfs(host, tmp_path, crash_after)

    crashed = host.run("enroll", "--dataset", "tank/data")

    assert crashed.returncode != 0
    assert "simulated crash" in crashed.stderr
    assert server_key_for(host, "tank/data")["state"] == "pending"
    assert host.zfs.dataset("tank/data")["keylocation"] == "prompt"  # change-key happened

    # The machine restarts: the pending server key must open the dataset.
    host.write_config()
    unload_key(host, "tank/data")
    result = host.run("--dataset", "tank/data")

    assert result.returncode == 0, result.stderr
    assert host.zfs.keystatus("tank/data") == "available"
    assert host.zfs.dataset("tank/data")["mounted"]
    # That unlock proved the key, so it completed the enrollment: active, and managed.
    assert server_key_for(host, "tank/data")["state"] == "active"
    assert managed(host, "tank/data") == "on"
    assert_boot_unlock_opens(host, "tank/data")


@pytest.mark.parametrize("crash_after", ["change-key", "set"])
def test_rerunning_an_interrupted_enrolment_completes_it(
    shared_keyserver: KeyServer, tmp_path: Path, crash_after: str
) -> None:
    host = new_host(shared_keyserver, tmp_path, f"crash-rerun-{crash_after}")
    host.zfs.add_encrypted("tank/data", os.urandom(32), keystatus="available", managed=False)
    crashing_zfs(host, tmp_path, crash_after)
    assert host.run("enroll", "--dataset", "tank/data").returncode != 0
    pending = server_key_for(host, "tank/data")
    assert pending["state"] == "pending"

    host.write_config()
    result = host.run("enroll", "--dataset", "tank/data")

    assert result.returncode == 0, result.stderr
    assert f"enrolled with key {pending['key_id']}" in result.stdout
    (key,) = server_keys(host)  # no second key was issued
    assert (key["key_id"], key["state"]) == (pending["key_id"], "active")
    assert len(host.zfs.calls("zfs", "change-key")) == 1  # the key was changed once only
    assert managed(host, "tank/data") == "on"
    assert_boot_unlock_opens(host, "tank/data")


def test_interrupted_creation_is_completed_by_boot_unlock(
    shared_keyserver: KeyServer, tmp_path: Path
) -> None:
    """A new dataset is managed from birth, so a plain unlock finishes its enrollment."""
    host = new_host(shared_keyserver, tmp_path, "crash-new")
    crashing_zfs(host, tmp_path, "change-key")
    assert host.run("enroll", "--dataset", "tank/new", "--create").returncode != 0

    host.write_config()
    assert_boot_unlock_opens(host, "tank/new")
    assert server_key_for(host, "tank/new")["state"] == "active"


def test_enrolling_twice_changes_nothing(shared_keyserver: KeyServer, tmp_path: Path) -> None:
    host = new_host(shared_keyserver, tmp_path, "twice")
    first = host.run("enroll", "--dataset", "tank/new", "--create")
    assert first.returncode == 0, first.stderr
    state, keys = host.zfs.load(), server_keys(host)
    changes = len(host.zfs.calls("zfs")) - len(host.zfs.calls("zfs", "list"))

    second = host.run("enroll", "--dataset", "tank/new", "--create")

    assert second.returncode == errors.EX_NOPERM, second.stderr
    assert "already holds" in second.stderr
    assert "tank/new" in second.stderr
    assert host.zfs.load() == state
    assert server_keys(host) == keys
    assert len(host.zfs.calls("zfs")) - len(host.zfs.calls("zfs", "list")) == changes
