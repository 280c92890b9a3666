"""The agent waits for a release that a person must approve: it says which request, asks
again as the server says, takes the keys once approved, stops at a denial or its
deadline, and a late approval releases nothing. Real key server, fake zfs."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.agent.daemon_harness import Daemons
from tests.agent.harness import AGENT_BIN, AgentHost
from tests.agent.test_boot_race import PROMPT, Console, boot_unlock, finish, hex_root
from tests.agent.test_daemon import SHORT_NETWORK, new_host, wait_unlocked
from tests.fakes import sha256
from tests.keyserver import KeyServer, wait_for

EX_NOPERM, EX_TEMPFAIL = 77, 75
# They wait for the agent's polls and deadlines (about 50 s for the module); the agent's
# logic, not a dependency's version, is what they prove: not in `make unit` or the floor.
pytestmark = pytest.mark.slow


@pytest.fixture
def server(keyserver: KeyServer) -> Iterator[KeyServer]:
    """A server whose agents ask again every second while a request waits."""
    keyserver.configure(approval={"poll_seconds": 1})
    keyserver.start(workers=2)
    yield keyserver


def held_host(server: KeyServer, tmp_path: Path, name: str, deadline: float = 30) -> AgentHost:
    host = AgentHost.create(tmp_path, server, name)
    host.write_config(network={"deadline": deadline})
    server.must("host", "set", name, "--approval", "required")
    return host


def unlocking(host: AgentHost) -> subprocess.Popen[str]:
    environment = {k: v for k, v in os.environ.items() if k != "JOURNAL_STREAM"}
    return subprocess.Popen(
        [str(AGENT_BIN), "-c", str(host.config_path), "unlock", "--dataset", "tank/secret"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=environment,
    )


def waiting_request(server: KeyServer, host: str) -> dict[str, Any]:
    """The host's open request, once it is there."""
    found: list[dict[str, Any]] = []

    def listed() -> bool:
        found[:] = json.loads(server.must("approval", "list", "--json", "--host", host))
        return bool(found)

    wait_for(listed, timeout=20)
    [request] = found
    return request


def states(server: KeyServer, host: str) -> list[str]:
    return [
        r["state"]
        for r in json.loads(server.must("approval", "list", "--all", "--json", "--host", host))
    ]


def test_unlock_waits_says_which_request_and_loads_the_key_once_approved(
    server: KeyServer, tmp_path: Path
) -> None:
    host = held_host(server, tmp_path, "approved")
    pool = host.zfs.add_pool("tank")
    key = host.encrypted_dataset("tank/secret", pool)
    agent = unlocking(host)
    request = waiting_request(server, "approved")
    assert host.zfs.keystatus("tank/secret") == "unavailable"
    server.must("approval", "approve", request["id"])
    _, err = agent.communicate(timeout=30)
    assert agent.returncode == 0, err
    assert (
        f"the key server holds 1 key(s) until a person approves request {request['id']}"
        f" (on the key server: zfs-unlock-server approval approve {request['id']})"
    ) in err
    assert err.count(request["id"]) == 2, "said once, not at every ask"
    [loaded] = host.zfs.calls("zfs", "load-key")
    assert loaded["stdin_sha256"] == sha256(key)
    assert states(server, "approved") == ["released"]


def test_a_denial_ends_the_wait_with_a_refusal(server: KeyServer, tmp_path: Path) -> None:
    host = held_host(server, tmp_path, "refused")
    host.encrypted_dataset("tank/secret", host.zfs.add_pool("tank"))
    agent = unlocking(host)
    server.must("approval", "deny", waiting_request(server, "refused")["id"])
    _, err = agent.communicate(timeout=30)
    assert agent.returncode == EX_NOPERM, err
    assert "the key server refused to release its key" in err
    assert host.zfs.calls("zfs", "load-key") == []


def test_an_approval_after_the_agent_gave_up_releases_nothing(
    server: KeyServer, tmp_path: Path
) -> None:
    host = held_host(server, tmp_path, "gave-up", deadline=3)
    host.encrypted_dataset("tank/secret", host.zfs.add_pool("tank"))
    result = host.run("unlock", "--dataset", "tank/secret")
    assert result.returncode == EX_TEMPFAIL, result.stderr
    [request] = json.loads(server.must("approval", "list", "--json"))
    assert f"approval {request['id']} was not given in time" in result.stderr
    server.must("approval", "approve", request["id"])
    # The next run is a new request with a new nonce: the late approval is not its.
    again = host.run("unlock", "--dataset", "tank/secret")
    assert again.returncode == EX_TEMPFAIL, again.stderr
    assert host.zfs.calls("zfs", "load-key") == []
    assert sorted(states(server, "gave-up")) == ["approved", "pending"]


def test_at_the_console_a_pending_approval_never_blocks_a_person(
    server: KeyServer, tmp_path: Path
) -> None:
    console = Console()
    try:
        host = held_host(server, tmp_path, "console")
        key = hex_root(host)
        racing = boot_unlock(host, console, "--grace", "1")
        waiting_request(server, "console")
        console.wait_for(PROMPT)
        console.type(key + b"\n")
        code, err = finish(racing)
    finally:
        console.close()
    assert code == 0, err
    assert "tank/secret: unlocked with the typed key" in err
    assert "until a person approves request" in err


def test_in_the_race_an_approval_lets_the_server_win(server: KeyServer, tmp_path: Path) -> None:
    console = Console()
    try:
        host = held_host(server, tmp_path, "race-approved")
        key = hex_root(host)
        racing = boot_unlock(host, console, "--grace", "30")
        server.must("approval", "approve", waiting_request(server, "race-approved")["id"])
        code, err = finish(racing)
    finally:
        console.close()
    assert code == 0, err
    assert "tank/secret: unlocked with the key server's key" in err
    [loaded] = host.zfs.calls("zfs", "load-key")
    assert loaded["stdin_sha256"] == sha256(key)


def test_the_daemon_asks_for_the_same_request_across_its_passes(
    server: KeyServer, tmp_path: Path, daemons: Daemons
) -> None:
    host, pool = new_host(
        server,
        tmp_path,
        "daemon-held",
        {"boot_deadline": 2, "retry_initial": 1, "retry_max": 2, "rescan_interval": 3600},
        SHORT_NETWORK,
    )
    server.must("host", "set", "daemon-held", "--approval", "required")
    key = host.encrypted_dataset("tank/secret", pool)
    daemon = daemons.start(host)
    daemon.expect_ready()
    request = waiting_request(server, "daemon-held")
    # Several passes give up at their deadline and try again later, with the same nonce.
    daemon.wait_log(r"tank/secret: trying again in \d+ s", count=3, timeout=30)
    assert [r["id"] for r in json.loads(server.must("approval", "list", "--all", "--json"))] == [
        request["id"]
    ]
    assert f"approval {request['id']} was not given in time" in daemon.log()
    server.must("approval", "approve", request["id"])
    wait_unlocked(host, "tank/secret", daemon)
    [loaded] = [c for c in host.zfs.calls("zfs", "load-key") if c["stdin_sha256"] == sha256(key)]
    assert loaded
    assert daemon.terminate() == 0
