"""The installed command exits without the interpreter's teardown (cli.run): what it
printed must still arrive whole, and output it could not write must not pass unnoticed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.agent.harness import AGENT_BIN, AgentHost
from tests.keyserver import KeyServer

ROOTS = 3  # a listing that fits in the output buffer: nothing of it is written before the flush


def test_output_through_a_pipe_arrives_whole(shared_keyserver: KeyServer, tmp_path: Path) -> None:
    host = AgentHost.create(tmp_path, shared_keyserver, "entry-pipe")
    pool = host.zfs.add_pool("tank")
    for index in range(ROOTS):
        host.zfs.add_encrypted(f"tank/r{index:02d}", bytes(32))
    # As the initramfs runs it, and as the installed command runs it.
    argv = ["-c", str(host.config_path), "status", "--json"]
    buffered = {**os.environ, "PYTHONUNBUFFERED": ""}  # empty is unset: output waits for a flush
    module = subprocess.run(
        [sys.executable, "-I", "-m", "zfs_unlock_agent", *argv],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env=buffered,
    )
    command = host.run("status", "--json", env={"PYTHONUNBUFFERED": ""})
    for result in (module, command):
        assert result.returncode == 3, result.stderr  # every managed root is locked
        rows = json.loads(result.stdout)
        assert [row["encryption_root"] for row in rows] == [f"tank/r{i:02d}" for i in range(ROOTS)]
        assert all(row["pool_guid"] == pool for row in rows)


@pytest.mark.parametrize("buffered", [True, False], ids=["buffered", "unbuffered"])
def test_output_that_cannot_be_written_exits_74(
    shared_keyserver: KeyServer, tmp_path: Path, buffered: bool
) -> None:
    """Buffered, the write fails at the flush before the exit; unbuffered
    (PYTHONUNBUFFERED), at once."""
    host = AgentHost.create(tmp_path, shared_keyserver, f"entry-full-{buffered}")
    environment = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    if not buffered:
        environment["PYTHONUNBUFFERED"] = "1"
    host.zfs.add_pool("tank")
    host.zfs.add_encrypted("tank/secret", bytes(32))
    with open("/dev/full", "w") as full:  # every write fails with ENOSPC
        result = subprocess.run(
            [str(AGENT_BIN), "-c", str(host.config_path), "status", "--json"],
            stdout=full,
            stderr=subprocess.PIPE,
            text=True,
            env=environment,
            timeout=60,
            check=False,
        )
    # Not 3 (a root is locked): the listing that status promised never got out.
    assert result.returncode == 74, result.stderr
    assert "cannot write the output: No space left on device" in result.stderr
