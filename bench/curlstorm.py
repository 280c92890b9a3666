"""Part 2c: the reboot storm driven by a load generator that is not ours: Debian's curl.

Each host is one transfer of curl's own parallel mode, with its client certificate and
key, the server's pin (--pinnedpubkey) and curl's own retry policy (--retry with
--retry-all-errors: a pause of 1 s doubling, Retry-After honoured), bounded by the boot
budget (--retry-max-time, --max-time). curl runs at most 300 transfers at once per
process, so the fleet is split over as many processes, all started together. What it
reports: how many transfers ended with 200, and when the last process finished: the
storm's length by a clock that owes nothing to bench/loadgen.c.

curl has one bound for an attempt's TCP connection and TLS handshake together
(--connect-timeout). The judged rounds give it the agent's: its TCP bound plus its
handshake bound (connect_timeout + read_timeout). One more round gives it 5 s, the
agent's TCP bound alone, to show what a client that gives up sooner costs: it is reported,
not judged.

Its baseline is curl itself, measured in the same run: the fleet's first hosts asking in
good order, 64 transfers at a time in one process (as part 1's c=64), each its own host
with its own certificate as in the storm. curl's own cost per transfer is then in both,
and the ratio of the two rates is what the storm costs the server.
"""

from __future__ import annotations

import json
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from bench import common, storm
from zfs_unlock_agent.config import NetworkSettings

PER_PROCESS = 300  # curl's most parallel transfers per process
STEADY_HOSTS = 2000  # the baseline's hosts, taken from the fleet's first
STEADY_PARALLEL = 64
AGENT_BOUND = NetworkSettings().connect_timeout + NetworkSettings().read_timeout
TIGHT_BOUND = NetworkSettings().connect_timeout


@dataclass(frozen=True)
class CurlRound:
    connect_timeout: float  # curl's --connect-timeout: TCP and TLS handshake together
    served: int  # transfers that ended with 200
    makespan: float  # seconds from the start until the last curl exited
    machine_cpu: float
    listen_overflows: int  # connections the kernel dropped from the full listen queue

    @property
    def rate(self) -> float:
        return self.served / self.makespan if self.makespan else 0.0

    @property
    def is_judged(self) -> bool:
        """Given the agent's bound: the target is judged on these rounds alone."""
        return self.connect_timeout == AGENT_BOUND


@dataclass(frozen=True)
class CurlStorm:
    hosts: int
    processes: int
    version: str
    steady_hosts: int = 0  # the baseline: hosts asked STEADY_PARALLEL at a time
    steady_served: int = 0
    steady_seconds: float = 0.0
    rounds: list[CurlRound] = field(default_factory=list)

    @property
    def steady_rate(self) -> float:
        """Hosts per second that curl had served in good order."""
        return self.steady_served / self.steady_seconds if self.steady_seconds else 0.0

    def judged(self) -> list[CurlRound]:
        """The rounds with the agent's bound."""
        return [r for r in self.rounds if r.is_judged]

    def vs_steady(self, run: CurlRound) -> float:
        """A storm's time per host served over the baseline's: at most 1.25 is the goal."""
        return self.steady_rate / run.rate if run.rate else float("inf")


def _quote(value: str | Path) -> str:
    return json.dumps(str(value))  # curl's config quoting: backslash escapes in quotes


def config(
    hosts: list[common.Host],
    port: int,
    server: common.KeyServer,
    work: Path,
    connect_timeout: float,
) -> str:
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
            f"connect-timeout = {connect_timeout:g}",
            "silent",
            'output = "/dev/null"',
            'write-out = "%{http_code}\\n"',
            "next",
        ]
    return "\n".join(lines[:-1]) + "\n"  # no `next` after the last


def run(flt: storm.Fleet, work: Path, rounds: int) -> CurlStorm:
    """ROUNDS storms with the agent's bound, one with the tight bound, then the baseline
    (its hosts have been seen by then, so the baseline skips their dead-man touch: if
    anything, it is favoured)."""
    version = subprocess.run(
        ["curl", "--version"], capture_output=True, text=True, check=True
    ).stdout.split()[1]
    common.raise_fd_limit()
    hosts = flt.hosts
    found = []
    processes = 0
    for index, bound in enumerate([AGENT_BOUND] * rounds + [TIGHT_BOUND]):
        overflows = common.listen_overflows()
        served, processes, makespan, machine_cpu = _transfers(
            flt, hosts, PER_PROCESS, bound, work / f"storm-{index}"
        )
        overflows = common.listen_overflows() - overflows
        found.append(CurlRound(bound, served, makespan, machine_cpu, overflows))
    steady = hosts[: min(STEADY_HOSTS, len(hosts))]
    steady_served, _, steady_seconds, _ = _transfers(
        flt, steady, STEADY_PARALLEL, AGENT_BOUND, work / "steady", processes=1
    )
    return CurlStorm(
        hosts=len(hosts),
        processes=processes,
        version=version,
        steady_hosts=len(steady),
        steady_served=steady_served,
        steady_seconds=steady_seconds,
        rounds=found,
    )


def _transfers(
    flt: storm.Fleet,
    hosts: list[common.Host],
    parallel: int,
    connect_timeout: float,
    work: Path,
    processes: int | None = None,
) -> tuple[int, int, float, float]:
    """HOSTS' transfers against a freshly started server: PARALLEL at a time in each
    curl, all at once over as many curls as they need (or PROCESSES). Returns the
    transfers that ended with 200, the curls, the seconds until the last exited, and the
    machine's CPU seconds meanwhile."""
    (work / "bodies").mkdir(parents=True, exist_ok=True)
    server = flt.server
    # Full rate-limit buckets, as after a restart of the server (as in storm.run).
    for stale in server.data.glob("ratelimit.db*"):
        stale.unlink()
    share = -(-len(hosts) // processes) if processes else parallel
    with server.serving() as serving:
        files = []
        for start in range(0, len(hosts), share):
            path = work / f"curl-{start:05d}.conf"
            path.write_text(
                config(hosts[start : start + share], serving.port, server, work, connect_timeout)
            )
            files.append(path)
        machine_before = common.machine_cpu_seconds()
        started = time.monotonic()
        running = [
            subprocess.Popen(
                [
                    "curl",
                    "--parallel",
                    "--parallel-immediate",
                    "--parallel-max",
                    str(parallel),
                    "--config",
                    str(path),
                ],
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,
            )
            for path in files
        ]
        outputs = [process.communicate(timeout=storm.BOOT_BUDGET * 4)[0] for process in running]
        seconds = time.monotonic() - started
        machine_cpu = common.machine_cpu_seconds() - machine_before
    return b"".join(outputs).split().count(b"200"), len(files), seconds, machine_cpu
