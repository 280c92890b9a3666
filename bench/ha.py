"""Part 2b: the reboot storm against several key-server nodes on one PostgreSQL database,
with every node up, and with one node killed (kill -9, master and workers) halfway.

The fleet is part 2's: its keys.db is loaded into a new database of a cluster started for
the run (bench/postgres.py), and each node is a copy of its data directory naming that
database, as docs/high-availability.md sets nodes up. Each host lists every node, in an
order rotated by its number (the load generator's storm with several ports), and walks
the list as the agent walks its [[server]] entries.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import psycopg

from bench import common, loadgen, postgres, storm
from bench.curlstorm import CurlStorm
from zfs_unlock_agent.config import DaemonSettings, NetworkSettings
from zfs_unlock_server import config as server_config
from zfs_unlock_server.config import Layout
from zfs_unlock_server.pgstore import PgStore
from zfs_unlock_server.sqlitestore import SqliteStore


@dataclass(frozen=True)
class AuditVolume:
    """What check-ins add to the audit trail: the agent's daemon checks in every 15 minutes."""

    checkins: int
    file_bytes: int  # SQLite server: audit.log's growth
    table_bytes: int  # PostgreSQL: pg_total_relation_size('audit')'s growth, indexes included

    def per_thousand_hosts_a_day(self, size: int) -> float:
        return size / self.checkins * CHECKINS_A_DAY * 1000 if self.checkins else 0.0


CHECKINS_A_DAY = int(86400 / DaemonSettings().checkin_interval)


@dataclass(frozen=True)
class HaStorm:
    nodes: int
    killed_at: float | None  # seconds after the storm's start when node 0 was killed
    hosts: int
    served: int
    failed: int
    late: int
    attempts: int
    makespan: float
    p50: float
    p99: float
    outcomes: dict[str, int]
    releases: int  # allowed release records in the audit table
    machine_cpu: float
    wall: float


def nodes_on(
    cluster: postgres.Cluster, flt: storm.Fleet, count: int, root: Path
) -> list[common.KeyServer]:
    """COUNT nodes of FLT's deployment on a new database of CLUSTER."""
    return copies_on(cluster, flt.server, count, root)


def copies_on(
    cluster: postgres.Cluster, server: common.KeyServer, count: int, root: Path
) -> list[common.KeyServer]:
    """COUNT nodes of SERVER's deployment (its keys.db loaded into a new database of
    CLUSTER, its data directory copied once per node, naming that database)."""
    url = cluster.new_database("bench_" + os.urandom(4).hex())
    source = SqliteStore(server.data / "keys.db")
    target = PgStore(url, migrate=True)
    try:
        target.load(source.snapshot(), [])
    finally:
        source.close()
        target.close()
    nodes = []
    config = (server.data / "server.toml").read_text()
    for number in range(count):
        node_root = root / f"node{number}"
        shutil.copytree(
            server.data,
            node_root / "data",
            ignore=shutil.ignore_patterns("keys.db*", "audit.log", "ratelimit.db*"),
        )
        (node_root / "data" / "server.toml").write_text(
            f"{config.rstrip()}\n\n[database]\nurl = {json.dumps(url)}\n"
        )
        nodes.append(common.KeyServer(node_root, reuse=True))
    return nodes


def releases_allowed(node: common.KeyServer) -> int:
    layout = Layout(node.data)
    store = PgStore(server_config.load(layout).database.url)
    try:
        return sum(
            1 for line in store.audit_lines() if '"event":"release"' in line and '"ok"' in line
        )
    finally:
        store.close()


def kill(node: common.KeyServer) -> None:
    if node.process is not None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(node.process.pid, signal.SIGKILL)


class Killer(threading.Thread):
    """Kills NODE AFTER seconds into the storm, by the start the load generator writes to
    START_FILE once its hosts are loaded (seconds after launch, for thousands)."""

    def __init__(self, node: common.KeyServer, start_file: Path, after: float) -> None:
        super().__init__(daemon=True)
        self.node, self.start_file, self.after = node, start_file, after
        self.killed_at: float | None = None  # seconds into the storm

    def run(self) -> None:
        deadline = time.monotonic() + 300
        while not self.start_file.exists():
            if time.monotonic() > deadline:
                return
            time.sleep(0.01)
        start = float(self.start_file.read_text())
        time.sleep(max(0.0, start + self.after - time.monotonic()))
        kill(self.node)
        self.killed_at = time.monotonic() - start


@contextlib.contextmanager
def serving(nodes: Sequence[common.KeyServer], workers: int) -> Iterator[list[int]]:
    with contextlib.ExitStack() as stack:
        ports = [stack.enter_context(node.serving(workers)).port for node in nodes]
        yield ports


def run(
    flt: storm.Fleet,
    nodes: Sequence[common.KeyServer],
    pauses: Callable[[], Sequence[float]],
    work: Path,
    network: NetworkSettings,
    kill_after: float | None,
    workers: int,
) -> HaStorm:
    """One storm of every host of FLT against NODES; with KILL_AFTER, node 0 is killed
    that many seconds after the storm's start."""
    plan = storm.hosts_file(work / "storm-ha.hosts", flt.hosts, flt.requests, pauses)
    before = releases_allowed(nodes[0])
    common.raise_fd_limit()
    start_file = work / "storm-ha.start"
    start_file.unlink(missing_ok=True)
    killer = Killer(nodes[0], start_file, kill_after) if kill_after is not None else None
    with serving(nodes, workers) as ports:
        if killer is not None:
            killer.start()
        machine_before = common.machine_cpu_seconds()
        result = loadgen.run(
            "storm",
            ports,
            [
                plan,
                network.connect_timeout,
                network.read_timeout,
                storm.BOOT_BUDGET,
                common.pin_hex(flt.server.pin),
            ],
            start_file=start_file,
        )
        machine_cpu = common.machine_cpu_seconds() - machine_before
        if killer is not None:
            killer.join()
    killed_at = None if killer is None else killer.killed_at
    return HaStorm(
        nodes=len(nodes),
        killed_at=killed_at,
        **storm.counts(result.output),
        releases=releases_allowed(nodes[0]) - before,
        machine_cpu=machine_cpu,
        wall=result.wall_seconds,
    )


@dataclass(frozen=True)
class HaResults:
    nodes: int
    workers: int  # per node
    storms: list[HaStorm]  # every node up; then one killed halfway through
    audit: AuditVolume
    curl: CurlStorm | None = None  # part 2c: the one-node storm, driven by curl


def checkin_request(host: common.Host) -> bytes:
    body = json.dumps({"machine_id": host.machine_id}, separators=(",", ":")).encode()
    head = (
        "POST /v1/checkin HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        "Content-Type: application/json\r\nAccept: application/json\r\n"
        f"Connection: close\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    return head.encode("ascii") + body


def audit_volume(
    sqlite_server: common.KeyServer, pg_node: common.KeyServer, host: common.Host, work: Path
) -> AuditVolume:
    """Check-ins of one host for a few seconds against each store; the bytes they added."""
    request = work / "checkin.http"
    request.write_bytes(checkin_request(host))
    client: list[str | Path] = [host.cert, host.key, common.pin_hex(sqlite_server.pin)]
    log = sqlite_server.data / "audit.log"
    before = log.stat().st_size
    with sqlite_server.serving() as serving:
        done = loadgen.run("steady", serving.port, [8, 0.0, 2.0, request, *client])
    file_checkins = int(done.output["all_ok"])
    file_bytes = log.stat().st_size - before
    url = server_config.load(Layout(pg_node.data)).database.url
    with psycopg.connect(url, autocommit=True) as conn:
        size = "SELECT pg_total_relation_size('audit')"
        table_before = int(conn.execute(size).fetchone()[0])  # type: ignore[index]
        with pg_node.serving() as serving:
            done = loadgen.run("steady", serving.port, [8, 0.0, 2.0, request, *client])
        table_checkins = int(done.output["all_ok"])
        table_bytes = int(conn.execute(size).fetchone()[0]) - table_before  # type: ignore[index]
    # Per check-in on each side, expressed for the file's count.
    per_row = table_bytes / table_checkins if table_checkins else 0.0
    return AuditVolume(file_checkins, file_bytes, round(per_row * file_checkins))


def measure(
    cluster: postgres.Cluster, flt: storm.Fleet, count: int, workers: int, work: Path, seed: int
) -> HaResults:
    """Two storms of FLT against COUNT nodes: every node up, then node 0 killed at half
    the first storm's length. The audit volume is measured apart (audit_volume)."""
    network = NetworkSettings()
    jitter = random.Random(seed).random  # noqa: S311 - backoff jitter, as the agent draws it
    work.mkdir(parents=True, exist_ok=True)
    nodes = nodes_on(cluster, flt, count, work)

    def pauses() -> list[float]:
        return storm.agent_pauses(network, storm.BOOT_BUDGET, jitter)

    runs = [run(flt, nodes, pauses, work, network, None, workers)]
    halfway = (runs[0].makespan or storm.BOOT_BUDGET) / 2
    runs.append(run(flt, nodes, pauses, work, network, halfway, workers))
    for result in runs:
        print(
            f"   {count} nodes{'' if result.killed_at is None else ', one killed'}:"
            f" {result.served} of {result.hosts} served, the last after {result.makespan:.1f} s",
            file=sys.stderr,
        )
    return HaResults(count, workers, runs, AuditVolume(0, 0, 0))
