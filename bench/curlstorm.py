"""Part 2c: the reboot storm driven by a load generator that is not ours: Debian's curl.

Each host is one transfer of curl's own parallel mode, with its client certificate and
key, the server's pin (--pinnedpubkey) and curl's own retry policy (--retry with
--retry-all-errors: a pause of 1 s doubling, Retry-After honoured), bounded by the boot
budget (--retry-max-time, --max-time). curl runs at most 300 transfers at once per
process, so the fleet is split over as many processes, all started together. What it
reports: how many transfers ended with 200, and when the last process finished: the
storm's length by a clock that owes nothing to bench/loadgen.c.
"""

from __future__ import annotations

import json
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from bench import common, storm

PER_PROCESS = 300  # curl's most parallel transfers per process


@dataclass(frozen=True)
class CurlStorm:
    hosts: int
    served: int  # transfers that ended with 200
    processes: int
    makespan: float  # seconds from the start until the last curl exited
    machine_cpu: float
    version: str


def _quote(value: str | Path) -> str:
    return json.dumps(str(value))  # curl's config quoting: backslash escapes in quotes


def config(hosts: list[common.Host], port: int, server: common.KeyServer, work: Path) -> str:
    """One config file's transfers: for each host, its options and `next`."""
    lines = []
    for host in hosts:
        body = work / "bodies" / f"{host.name}.json"
        body.write_bytes(common.release_request(host).split(b"\r\n\r\n", 1)[1])
        lines += [
            f"url = {_quote(f'https://127.0.0.1:{port}/v1/keys/release')}",
            f"cert = {_quote(host.cert)}",
            f"key = {_quote(host.key)}",
            f"cacert = {_quote(server.server_cert)}",
            f"pinnedpubkey = {_quote(server.pin)}",
            f"data-binary = {_quote('@' + str(body))}",
            'header = "Content-Type: application/json"',
            'header = "Accept: application/json"',
            "retry = 1000",
            "retry-all-errors",
            f"retry-max-time = {storm.BOOT_BUDGET:g}",
            f"max-time = {storm.BOOT_BUDGET:g}",
            "connect-timeout = 5",
            "silent",
            'output = "/dev/null"',
            'write-out = "%{http_code}\\n"',
            "next",
        ]
    return "\n".join(lines[:-1]) + "\n"  # no `next` after the last


def run(flt: storm.Fleet, work: Path) -> CurlStorm:
    work.mkdir(parents=True, exist_ok=True)
    (work / "bodies").mkdir(exist_ok=True)
    server = flt.server
    version = subprocess.run(
        ["curl", "--version"], capture_output=True, text=True, check=True
    ).stdout.split()[1]
    common.raise_fd_limit()
    with server.serving() as serving:
        files = []
        for start in range(0, len(flt.hosts), PER_PROCESS):
            path = work / f"curl-{start:05d}.conf"
            path.write_text(
                config(flt.hosts[start : start + PER_PROCESS], serving.port, server, work)
            )
            files.append(path)
        machine_before = common.machine_cpu_seconds()
        started = time.monotonic()
        processes = [
            subprocess.Popen(
                [
                    "curl",
                    "--parallel",
                    "--parallel-immediate",
                    "--parallel-max",
                    str(PER_PROCESS),
                    "--config",
                    str(path),
                ],
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,
            )
            for path in files
        ]
        outputs = [process.communicate(timeout=storm.BOOT_BUDGET * 4)[0] for process in processes]
        makespan = time.monotonic() - started
        machine_cpu = common.machine_cpu_seconds() - machine_before
    codes = b"".join(outputs).split()
    return CurlStorm(
        hosts=len(flt.hosts),
        served=codes.count(b"200"),
        processes=len(files),
        makespan=makespan,
        machine_cpu=machine_cpu,
        version=version,
    )
