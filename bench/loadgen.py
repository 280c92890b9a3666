"""Runs the C load generator (bench/loadgen.c) and reads its one JSON line, with its CPU time."""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.common import BUILD

BINARY = BUILD / "loadgen"


@dataclass(frozen=True)
class Client:
    """A TLS client identity and the server pin it checks (hex SHA-256 of the SPKI)."""

    cert: Path
    key: Path
    pin_hex: str


@dataclass(frozen=True)
class Run:
    output: dict[str, Any]
    cpu_seconds: float  # the load generator's own user and system time
    wall_seconds: float


def binary() -> Path:
    if not os.access(BINARY, os.X_OK):
        raise RuntimeError(f"{BINARY} is missing: bench/prepare.sh builds it")
    return BINARY


def run(
    mode: str,
    port: int | Sequence[int],
    args: Sequence[str | Path | float | int],
    start_file: Path | None = None,
) -> Run:
    """PORT: one server; several (storm only): nodes each host tries in turn. START_FILE
    (storm only): where the storm's start is written, on time.monotonic()'s clock, once
    every host is loaded (which takes seconds for thousands)."""
    ports = ",".join(str(p) for p in ([port] if isinstance(port, int) else port))
    argv = [str(binary()), mode, "127.0.0.1", ports, *(str(a) for a in args)]
    env = {**os.environ, "LOADGEN_START_FILE": str(start_file)} if start_file else None
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        start = time.perf_counter()
        process = subprocess.Popen(argv, stdout=out, stderr=err, env=env)
        # wait4, not wait: the CPU time of this one child.
        _, status, usage = os.wait4(process.pid, 0)
        wall = time.perf_counter() - start
        process.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        text, problems = out.read().decode(), err.read().decode(errors="replace")
    if process.returncode != 0:
        raise RuntimeError(f"loadgen {mode} failed ({process.returncode}): {problems.strip()}")
    return Run(json.loads(text), usage.ru_utime + usage.ru_stime, wall)
