"""Part 2: the reboot storm. Every host of a fleet, each enrolled with its own client
certificate and key, asks for its key at the same moment, over real TLS, and retries as
the agent does (or as a fixed 5-second loop does) until the boot budget runs out.

Each host's pauses are drawn here from the agent's own policy (keyclient.retry_delay,
config.NetworkSettings's defaults, random jitter); the load generator honours Retry-After on top,
as KeyClient.call does.
"""

from __future__ import annotations

import hashlib
import json
import random
import shutil
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench import common, loadgen
from zfs_unlock_agent.config import DaemonSettings, NetworkSettings
from zfs_unlock_agent.keyclient import retry_delay

# The boot waits this long for keys before it falls back to a prompt: the daemon's
# boot_deadline, and the initramfs hook's --deadline.
BOOT_BUDGET = DaemonSettings().boot_deadline
CLEVIS_PAUSE = 5.0  # a fixed retry loop, as Clevis's unlockers run
MAX_PAUSES = 1000  # bounds the list if jitter keeps drawing (almost) zero

# The code that shapes an enrolled data directory: a cached fleet made by other code is
# made again.
_FLEET_CODE = (
    "store.py",
    "sqlitestore.py",
    "schema.py",
    "admin.py",
    "pki.py",
    "sealing.py",
    "config.py",
)


# Pauses


def agent_pauses(
    network: NetworkSettings, budget: float, jitter: Callable[[], float]
) -> list[float]:
    """The pauses after failed attempts 1, 2, ... of one host, until together they pass
    BUDGET (no host can use more: attempts take time too)."""
    pauses: list[float] = []
    while sum(pauses) < budget and len(pauses) < MAX_PAUSES:
        pauses.append(retry_delay(network, len(pauses) + 1, jitter()))
    return pauses


def fixed_pauses(pause: float, budget: float) -> list[float]:
    count = max(1, int(budget // pause) + 1)
    return [pause] * count


# The fleet


@dataclass(frozen=True)
class Fleet:
    server: common.KeyServer
    hosts: list[common.Host]
    requests: list[Path]  # each host's raw release request, in host order


def host_names(count: int) -> list[str]:
    return [f"storm{index:05d}" for index in range(count)]


def code_stamp() -> str:
    digest = hashlib.sha256()
    for name in _FLEET_CODE:
        digest.update((common.REPO / "server" / name).read_bytes())
    digest.update((common.REPO / "bench" / "common.py").read_bytes())
    return digest.hexdigest()


def fleet(count: int, root: Path, reuse: bool) -> Fleet:
    """COUNT enrolled hosts under ROOT. With REUSE, an enrollment an earlier run finished
    there with the same code is taken as it is; anything else is made afresh."""
    stamp_file = root / "complete"
    names = host_names(count)
    requests_dir = root / "requests"
    if reuse and stamp_file.exists() and stamp_file.read_text() == code_stamp():
        server = common.KeyServer(root, reuse=True)
        hosts = [server.host(name) for name in names]
        print(f"   reusing the {count} hosts enrolled in {root}", file=sys.stderr)
    else:
        if root.exists():
            shutil.rmtree(root)
        server = common.KeyServer(root)
        print(f"   enrolling {count} hosts in {root}", file=sys.stderr)
        hosts = server.add_hosts(names)
        requests_dir.mkdir()
        for host in hosts:
            (requests_dir / f"{host.name}.http").write_bytes(common.release_request(host))
        stamp_file.write_text(code_stamp())
    return Fleet(server, hosts, [requests_dir / f"{host.name}.http" for host in hosts])


# The storm


@dataclass(frozen=True)
class Storm:
    policy: str
    hosts: int
    served: int  # within the budget
    failed: int  # gave up, or answered after the budget (late)
    late: int
    attempts: int
    makespan: float  # seconds from the start to the last host served
    p50: float  # seconds until half the hosts were served
    p99: float
    gave_up: tuple[float, float, float]  # min, median, max second a failed host gave up
    outcomes: dict[str, int]  # every attempt's outcome, as the load generator names them
    audit: dict[str, int]  # the server's audit events during the storm
    worker_peak_kib: list[int]  # VmHWM of each server worker afterwards
    server_cpu: float  # seconds: the server's master and workers
    loadgen_cpu: float  # seconds: the load generator, loading 'hosts' identities included
    machine_cpu: float  # seconds the whole machine was busy meanwhile, all cores
    wall: float


def hosts_file(
    path: Path,
    hosts: Sequence[common.Host],
    requests: Sequence[Path],
    pauses: Callable[[], Sequence[float]],
) -> Path:
    """The load generator's plan: per host its certificate, key, request and pauses."""
    lines = [
        f"{host.cert} {host.key} {request} {','.join(f'{p:.3f}' for p in pauses())}"
        for host, request in zip(hosts, requests, strict=True)
    ]
    path.write_text("\n".join(lines) + "\n")
    return path


def audit_events(log: Path, offset: int) -> dict[str, int]:
    counts: dict[str, int] = {}
    with log.open("rb") as handle:
        handle.seek(offset)
        for line in handle:
            event = str(json.loads(line).get("event", "?"))
            counts[event] = counts.get(event, 0) + 1
    return counts


def counts(out: dict[str, Any]) -> dict[str, Any]:
    """The load generator's answer to a storm, as the fields Storm and ha.HaStorm share."""
    return {
        "hosts": int(out["hosts"]),
        "served": int(out["served"]),
        "failed": int(out["failed"]),
        "late": int(out["late"]),
        "attempts": int(out["attempts"]),
        "makespan": float(out["makespan_s"]),
        "p50": float(out["p50_s"]),
        "p99": float(out["p99_s"]),
        "outcomes": {k: int(v) for k, v in out["outcomes"].items()},
    }


def run(
    flt: Fleet,
    policy: str,
    pauses: Callable[[], Sequence[float]],
    work: Path,
    network: NetworkSettings,
) -> Storm:
    server = flt.server
    # Each storm starts with full rate-limit buckets, as after a restart of the server.
    for stale in server.data.glob("ratelimit.db*"):
        stale.unlink()
    audit_log = server.data / "audit.log"
    offset = audit_log.stat().st_size if audit_log.exists() else 0
    plan = hosts_file(work / f"storm-{policy}.hosts", flt.hosts, flt.requests, pauses)
    common.raise_fd_limit()
    with server.serving() as serving:
        pids = serving.pids()
        before = common.cpu_seconds(pids)
        machine_before = common.machine_cpu_seconds()
        result = loadgen.run(
            "storm",
            serving.port,
            [
                plan,
                network.connect_timeout,
                network.read_timeout,
                BOOT_BUDGET,
                common.pin_hex(server.pin),
            ],
        )
        machine_cpu = common.machine_cpu_seconds() - machine_before
        server_cpu = common.cpu_seconds(pids) - before
        peaks = [common.peak_rss_kib(pid) for pid in serving.worker_pids()]
    out = result.output
    return Storm(
        policy=policy,
        **counts(out),
        gave_up=(
            float(out["gave_up_min_s"]),
            float(out["gave_up_p50_s"]),
            float(out["gave_up_max_s"]),
        ),
        audit=audit_events(audit_log, offset),
        worker_peak_kib=peaks,
        server_cpu=server_cpu,
        loadgen_cpu=result.cpu_seconds,
        machine_cpu=machine_cpu,
        wall=result.wall_seconds,
    )


@dataclass(frozen=True)
class Storms:
    agent: list[Storm]  # one per round
    fixed: list[Storm]
    seed: int  # of the jitter, so a run's pauses can be drawn again
    budget: float = BOOT_BUDGET
    network: NetworkSettings = field(default_factory=NetworkSettings)


def measure(flt: Fleet, work: Path, seed: int, rounds: int) -> Storms:
    """ROUNDS storms of each policy, interleaved (agent, fixed, agent, ...)."""
    network = NetworkSettings()
    jitter = random.Random(seed).random  # noqa: S311 - backoff jitter, as the agent draws it
    agent: list[Storm] = []
    fixed: list[Storm] = []
    for number in range(1, rounds + 1):
        agent.append(
            run(flt, "agent", lambda: agent_pauses(network, BOOT_BUDGET, jitter), work, network)
        )
        fixed.append(
            run(flt, "fixed", lambda: fixed_pauses(CLEVIS_PAUSE, BOOT_BUDGET), work, network)
        )
        for result in (agent[-1], fixed[-1]):
            print(
                f"   round {number} {result.policy:<6} {result.served} of {result.hosts} served,"
                f" the last after {result.makespan:.1f} s",
                file=sys.stderr,
            )
    return Storms(agent, fixed, seed)
