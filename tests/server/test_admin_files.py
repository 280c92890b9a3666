"""Admin commands used as a library (the benchmarks enrol whole fleets this way) let go
of every file they open: a fleet of 10,000 hosts once ran out of file descriptors."""

from __future__ import annotations

import os
from pathlib import Path

from bench.common import machine_id_for
from tests.keyserver import KeyServer
from zfs_unlock_server import admin


def open_files() -> set[str]:
    found = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            found.add(os.readlink(f"/proc/self/fd/{fd}"))
        except OSError:
            continue
    return found


def test_adding_hosts_with_new_key_pairs_leaves_no_file_open(
    keyserver: KeyServer, tmp_path: Path
) -> None:
    ops = admin.Admin.open(keyserver.data_dir)
    try:
        ops.add_host("first", machine_id_for("first"), [], [], None, None, tmp_path / "first")
        before = open_files()
        for number in range(20):
            name = f"fleet{number}"
            ops.add_host(name, machine_id_for(name), [], [], None, None, tmp_path / name)
        left_open = {path for path in open_files() - before if str(tmp_path) in path}
    finally:
        ops.close()
    assert left_open == set()
    assert (tmp_path / "fleet19" / "client.key").stat().st_mode & 0o777 == 0o400
