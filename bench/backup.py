"""Backup, verify and restore of a data directory with 10,000 keys: time and size.

    .venv/bin/python -m bench.backup [--keys N]

Builds the data directory through the admin API (100 hosts, keys sealed directly in one
transaction per host), then times each command as an admin runs it (the console script,
median of 3) and prints a table, with two baselines measured in the same run: GNU tar of
the same files (a plain, offline copy: what an admin would do without `backup`) and
`zfs-unlock-server --version` (what starting the command costs); each row's ratio is to
the tar.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.common import machine_id_for
from zfs_unlock_common.csr import new_key_and_csr
from zfs_unlock_common.protocol import DatasetRef
from zfs_unlock_server import admin
from zfs_unlock_server.service import new_key_id

SERVER_BIN = Path(sys.executable).with_name("zfs-unlock-server")
HOSTS = 100
# What a backup holds, as files of the data directory (the baseline copies them).
MEMBERS = ("keys.db", "ca.key", "ca.crt", "server.key", "server.crt", "server.toml")


def build(root: Path, keys: int) -> None:
    admin.init_data_dir(root, ["localhost"])
    ops = admin.Admin.open(root)
    try:
        _, csr = new_key_and_csr("bench")
        service = ops.service()
        for h in range(HOSTS):
            name = f"host{h:03d}"
            host, _ = ops.add_host(name, machine_id_for(name), [], [], None, csr, None)
            for k in range(h, keys, HOSTS):
                ref = DatasetRef("1" * 19, str(10_000 + k))
                service.create_key(host, ref, f"tank/d{k}", "raw", None, "active", new_key_id())
    finally:
        ops.close()


def timed(*args: str, program: str = str(SERVER_BIN)) -> float:
    started = time.perf_counter()
    subprocess.run([program, *args], check=True, capture_output=True)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keys", type=int, default=10_000)
    parser.add_argument("--runs", type=int, default=3)
    options = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        data = root / "data"
        started = time.perf_counter()
        build(data, options.keys)
        print(
            f"built {options.keys} keys on {HOSTS} hosts in {time.perf_counter() - started:.1f} s"
        )
        master = str(data / "master.key")
        rows: dict[str, list[float]] = {"tar (baseline)": [], "--version (baseline)": []}
        rows |= {"backup": [], "verify": [], "verify --master-key": [], "restore": []}
        size = 0
        for run in range(options.runs):
            rows["tar (baseline)"].append(
                timed("-cf", str(root / f"t{run}.tar"), "-C", str(data), *MEMBERS, program="tar")
            )
            rows["--version (baseline)"].append(timed("--version"))
            out = root / f"b{run}.tar"
            rows["backup"].append(timed("--data-dir", str(data), "backup", "--out", str(out)))
            size = out.stat().st_size
            rows["verify"].append(timed("backup", "verify", str(out)))
            rows["verify --master-key"].append(
                timed("backup", "verify", str(out), "--master-key", master)
            )
            rows["restore"].append(timed("--data-dir", str(root / f"r{run}"), "restore", str(out)))
        print(
            f"{'command':<22}{'median s':>10}{'x tar':>8}  (of {options.runs}; {options.keys} keys)"
        )
        tar = statistics.median(rows["tar (baseline)"])
        for name, seconds in rows.items():
            median = statistics.median(seconds)
            print(f"{name:<22}{median:>10.2f}{median / tar:>8.1f}")
        print(f"backup file: {size} bytes ({size / 1e6:.1f} MB), {os.cpu_count()} CPUs")


if __name__ == "__main__":
    main()
