"""python -m bench [--quick] [--out PATH] | --render RESULTS_JSON [--out PATH]

Every benchmark on 127.0.0.1, then docs/benchmarks.md. bench/run.sh (make
bench) installs what this needs first; --quick is the smoke run CI makes.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import importlib.metadata
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from bench import (
    agent,
    baselines,
    common,
    curlstorm,
    ha,
    loadgen,
    memory,
    postgres,
    report,
    reseal,
    storm,
    throughput,
)
from bench.results import Results, load, save
from zfs_unlock_server.serve import default_workers

# Part 1 makes every request with one host's certificate: its bucket must not be what
# is measured. The limiter still runs (a shared SQLite update per request).
STEADY_LIMITS = {"per_certificate_burst": 1e6, "per_certificate_rate": 1e6}
PACKAGES = (
    "nginx",
    "tang",
    "clevis",
    "jose",
    "curl",
    "openssl",
    "libssl3",
    "systemd",
    "postgresql-15",
)
# Part 2b: nodes of one deployment on one PostgreSQL cluster, on this machine's cores.
HA_NODES = 3
HA_WORKERS = 2  # per node: six in all on two cores, beside PostgreSQL and the load generator
PG_CONF = "max_connections = 100\n"


@dataclass(frozen=True)
class Settings:
    quick: bool
    plan: throughput.Plan
    storm_hosts: int
    storm_rounds: int


FULL = Settings(False, throughput.Plan((1, 8, 64), rounds=3, warmup=1.0, duration=4.0), 10_000, 2)
QUICK = Settings(True, throughput.Plan((1, 8, 64), rounds=1, warmup=0.3, duration=1.0), 200, 1)
STARTED = time.monotonic()


def step(text: str) -> None:
    print(f"== [{time.monotonic() - STARTED:5.0f} s] {text}", file=sys.stderr, flush=True)


def versions() -> dict[str, str]:
    found = {
        "zfs-unlock-agent": f"{importlib.metadata.version('zfs-unlock-agent')} ({commit()})",
        "gunicorn": importlib.metadata.version("gunicorn"),
        "Python": sys.version.split()[0],
    }
    found.update(common.package_versions(PACKAGES))
    return found


def commit() -> str:
    def git(*args: str) -> str:
        return subprocess.run(
            ["git", "-C", str(common.REPO), *args], check=False, capture_output=True, text=True
        ).stdout.strip()

    head = git("rev-parse", "--short", "HEAD") or "unknown commit"
    return f"{head} with uncommitted changes" if git("status", "--porcelain") else head


def measure(settings: Settings, work: Path) -> Results:
    started = time.monotonic()
    date = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    ours = common.KeyServer(work / "keyserver", rate_limits=STEADY_LIMITS)
    host = ours.add_hosts(["steady"])[0]
    requests = work / "requests"
    requests.mkdir()
    client = loadgen.Client(host.cert, host.key, common.pin_hex(ours.pin))
    # One PostgreSQL cluster for the run: part 1's node on it, the audit volume, part 2b.
    with postgres.cluster(PG_CONF) as cluster:
        # The same deployment on PostgreSQL, one node: its keys.db loaded into a database.
        pg_node = ha.copies_on(cluster, ours, 1, work / "pg")[0]
        step(
            "part 1: releases per second (key server on SQLite and on PostgreSQL, nginx,"
            " tangd, Python floor, interleaved)"
        )
        with contextlib.ExitStack() as stack:
            serving = stack.enter_context(ours.serving())
            pg_serving = stack.enter_context(pg_node.serving())
            nginx = stack.enter_context(baselines.nginx(work / "nginx", ours))
            tang = stack.enter_context(baselines.tangd(work / "tang"))
            # As many workers as the key server runs by default (serving() passes none).
            floor_workers = default_workers()
            floor = stack.enter_context(
                throughput.python_floor(work / "floor", ours, floor_workers)
            )
            (requests / "ours.http").write_bytes(common.release_request(host))
            (requests / "nginx.http").write_bytes(nginx.request())
            (requests / "tang.http").write_bytes(tang.recovery_request())
            targets = [
                throughput.Target(
                    "ours", serving.port, requests / "ours.http", client, serving.pids
                ),
                throughput.Target(
                    "pg", pg_serving.port, requests / "ours.http", client, pg_serving.pids
                ),
                throughput.Target(
                    "nginx",
                    nginx.port,
                    requests / "nginx.http",
                    client,
                    lambda: [nginx.master_pid, *nginx.worker_pids()],
                ),
                throughput.Target("tang", tang.port, requests / "tang.http", None, list),
                # Only where the targets are judged: it explains a gap, it is not one of them.
                throughput.Target(
                    "floor",
                    floor.port,
                    requests / "nginx.http",  # it answers any request with 64 bytes
                    client,
                    floor.pids,
                    concurrencies=(max(settings.plan.concurrencies),),
                ),
            ]
            windows = throughput.measure(targets, settings.plan)
            workers = serving.worker_pids()
            step("part 3: peak memory of the server's and nginx's workers")
            peaks = memory.measure(workers, nginx.worker_pids())
            step("the agent: cold unlocks against clevis and curl")
            agent_results = agent.run(work / "agent", ours, tang, settings.quick)
        step("what check-ins add to the audit trail, in a file and in PostgreSQL")
        audit_volume = ha.audit_volume(ours, pg_node, host, work)
        step(f"part 2: reboot storm of {settings.storm_hosts} hosts")
        if settings.quick:
            fleet_root, reuse = work / "storm", False
        else:
            fleet_root, reuse = common.BUILD / f"storm-{settings.storm_hosts}", True
        cached = reuse and (fleet_root / "complete").exists()
        fleet = storm.fleet(settings.storm_hosts, fleet_root, reuse)
        seed = secrets.randbits(32)
        storms = storm.measure(fleet, work, seed, settings.storm_rounds)
        step("part 2c: the same storm driven by Debian's curl, on one node")
        curl_storm = curlstorm.run(fleet, work / "curl", settings.storm_rounds)
        step(f"part 2b: the storm against {HA_NODES} nodes on PostgreSQL, then one killed")
        ha_results = ha.measure(cluster, fleet, HA_NODES, HA_WORKERS, work / "ha", seed)
        ha_results = dataclasses.replace(ha_results, audit=audit_volume, curl=curl_storm)
    reseal_keys = 1_000 if settings.quick else 10_000
    step(f"master key rotation: re-sealing {reseal_keys} keys while releasing")
    reseal_results = reseal.run(work, reseal_keys, 1 if settings.quick else reseal.ROUNDS)
    cores = os.cpu_count() or 1
    return Results(
        quick=settings.quick,
        date=date,
        seconds=time.monotonic() - started,
        cores=cores,
        machine=common.machine(),
        versions=versions(),
        workers=len(workers),
        steady_limits=STEADY_LIMITS,
        storm_cached=cached,
        plan=settings.plan,
        windows=windows,
        memory=peaks,
        storms=storms,
        agent=agent_results,
        floor_workers=floor_workers,
        ha=ha_results,
        reseal=reseal_results,
    )


@contextlib.contextmanager
def work_directory(quick: bool) -> Iterator[Path]:
    """A full run keeps its files in build/bench/run for a look afterwards; a smoke run
    leaves nothing behind unless it failed."""
    if quick:
        work = Path(tempfile.mkdtemp(prefix="zua-bench-"))
        try:
            yield work
        except BaseException:
            step(f"failed; the servers' logs are in {work}")
            raise
        shutil.rmtree(work)
        return
    work = common.BUILD / "run"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    yield work


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="the smoke run: seconds, not minutes")
    parser.add_argument(
        "--out",
        type=Path,
        help="the report (default: docs/benchmarks.md;"
        " with --quick, build/bench/benchmarks-quick.md)",
    )
    parser.add_argument(
        "--render",
        type=Path,
        metavar="RESULTS_JSON",
        help="render the report of a saved run instead of measuring",
    )
    args = parser.parse_args(argv)
    if args.render:
        results = load(args.render)
    else:
        settings = QUICK if args.quick else FULL
        with work_directory(settings.quick) as work:
            results = measure(settings, work)
            save(results, work / "results.json")
    out = args.out or (
        common.BUILD / "benchmarks-quick.md"
        if results.quick
        else common.REPO / "docs" / "benchmarks.md"
    )
    report.write(results, out)
    step(f"wrote {out} ({results.seconds:.0f} s of measuring)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
