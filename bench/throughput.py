"""Part 1: releases per second with a new (mutual-TLS) connection per request.

Every server under test runs at once; rounds are interleaved (each concurrency, then each
server in turn, then the next round) so that a noisy neighbour hits all of them alike.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Collection, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from bench import common, loadgen


@dataclass(frozen=True)
class Target:
    name: str
    port: int
    request: Path  # the raw HTTP request each connection sends
    client: loadgen.Client | None  # None: plain HTTP (tangd)
    server_pids: Callable[[], list[int]]  # whose CPU time is counted; [] when unknown
    concurrencies: Collection[int] | None = None  # measured only at these; None: at all


@dataclass(frozen=True)
class Window:
    """One measured window of one server at one concurrency."""

    system: str
    concurrency: int
    round: int
    rate: float  # successful requests per second in the window
    p50_ms: float
    p99_ms: float
    ok: int
    failed: int  # every other outcome in the window
    all_ok: int  # warm-up included
    loadgen_cpu: float  # seconds, warm-up included
    server_cpu: float | None  # seconds, warm-up included; None when not measured
    machine_cpu: float  # seconds the whole machine was busy meanwhile, all cores
    wall: float


@dataclass(frozen=True)
class Plan:
    concurrencies: tuple[int, ...]
    rounds: int
    warmup: float
    duration: float


def measure_window(target: Target, concurrency: int, round_: int, plan: Plan) -> Window:
    args: list[str | Path | float | int] = [concurrency, plan.warmup, plan.duration, target.request]
    if target.client is not None:
        args += [target.client.cert, target.client.key, target.client.pin_hex]
    pids = target.server_pids()
    before = common.cpu_seconds(pids) if pids else None
    machine_before = common.machine_cpu_seconds()
    result = loadgen.run("steady", target.port, args)
    machine_cpu = common.machine_cpu_seconds() - machine_before
    server_cpu = None if before is None else common.cpu_seconds(pids) - before
    out = result.output
    outcomes: dict[str, int] = out["outcomes"]
    return Window(
        system=target.name,
        concurrency=concurrency,
        round=round_,
        rate=float(out["rate"]),
        p50_ms=float(out["p50_ms"]),
        p99_ms=float(out["p99_ms"]),
        ok=int(out["ok"]),
        failed=sum(v for k, v in outcomes.items() if k != "ok"),
        all_ok=int(out["all_ok"]),
        loadgen_cpu=result.cpu_seconds,
        server_cpu=server_cpu,
        machine_cpu=machine_cpu,
        wall=result.wall_seconds,
    )


def measure(targets: Sequence[Target], plan: Plan) -> list[Window]:
    windows = []
    for round_ in range(1, plan.rounds + 1):
        for concurrency in plan.concurrencies:
            for target in targets:
                if target.concurrencies is not None and concurrency not in target.concurrencies:
                    continue
                window = measure_window(target, concurrency, round_, plan)
                print(
                    f"   round {round_} c={concurrency:<3} {target.name:<6}"
                    f" {window.rate:8.1f}/s p99 {window.p99_ms:7.1f} ms"
                    + (f" ({window.failed} failed)" if window.failed else ""),
                    file=sys.stderr,
                )
                windows.append(window)
    return windows


@dataclass(frozen=True)
class Floor:
    port: int
    master_pid: int

    def pids(self) -> list[int]:
        return [self.master_pid, *common.children_of(self.master_pid)]


@contextlib.contextmanager
def python_floor(root: Path, server: common.KeyServer, workers: int) -> Iterator[Floor]:
    """bench/pyfloor.py on a free port of 127.0.0.1 with SERVER's data directory (its
    certificate, key and CA) and WORKERS processes; stopped with SIGTERM, which its master
    passes on to the workers."""
    root.mkdir(parents=True, exist_ok=True)
    port = common.free_port()
    command = [
        sys.executable,
        "-m",
        "bench.pyfloor",
        str(server.data),
        str(port),
        str(workers),
    ]
    log = (root / "stderr.log").open("ab")
    process = subprocess.Popen(
        command, cwd=common.REPO, stdout=log, stderr=log, start_new_session=True
    )
    log.close()
    try:
        common.wait_for_port(port)
        floor = Floor(port, process.pid)
        deadline = time.monotonic() + 10
        # The listener exists before the workers do: wait for all of them.
        while len(floor.pids()) < 1 + workers:
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the Python floor did not start {workers} workers")
            time.sleep(0.02)
        yield floor
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(process.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=15)
        # Whatever is left of its process group: a master that hung, or workers of one
        # that died before it could stop them.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=15)
