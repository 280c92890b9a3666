"""docs/benchmarks.md from one run's Results: what ran, the machine, medians with min-max,
the ratios, each target of the suite met or missed, and what the numbers say about a fleet.

Ratios of a pair of servers are taken within each round (both measured minutes apart at
most) and then summarised, so a noisy neighbour that slows one round slows both sides.
"""

from __future__ import annotations

import math
import textwrap
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from bench import agent, curlstorm, ha, storm
from bench.common import REPO, ratio, summarize
from bench.results import Results
from bench.throughput import Window

CHANGES = REPO / "bench" / "changes.md"
VM_REPORT = "benchmarks-vm.md"  # the real-OpenZFS timing, beside this report in docs/
SYSTEMS = ("ours", "nginx", "tang")
# bench/pyfloor.py, measured at the highest concurrency only (runs saved before it was
# added have none): what Python's TLS and process model cost without the application.
FLOOR = "floor"
LABELS = {"ours": "key server", "nginx": "nginx", "tang": "tangd", FLOOR: "Python floor"}
FLEET = 100_000

# The targets the suite is held to (the Targets table of docs/benchmarks.md).
MIN_OURS_VS_NGINX = 0.8  # releases per second at the highest concurrency
MAX_P99_VS_NGINX = 2.0
MIN_OURS_VS_TANG = 3.0
MAX_STORM_VS_STEADY = 1.25  # storm makespan against hosts / steady throughput
MAX_STORM_CPU_VS_STEADY = 1.1  # the server's CPU per release, storm against steady
# One node on PostgreSQL against one on SQLite, at the highest concurrency (part 1).
PG = "pg"
MIN_PG_VS_SQLITE = 0.8
MAX_PG_P99_VS_SQLITE = 1.5


# Selections and arithmetic


def series(
    windows: Sequence[Window], system: str, concurrency: int, metric: Callable[[Window], float]
) -> list[float]:
    return [metric(w) for w in windows if w.system == system and w.concurrency == concurrency]


def round_ratios(
    windows: Sequence[Window],
    ours: str,
    baseline: str,
    concurrency: int,
    metric: Callable[[Window], float],
) -> list[float]:
    """METRIC of OURS over BASELINE within each round that measured both."""
    by_round: dict[int, dict[str, float]] = {}
    for w in windows:
        if w.concurrency == concurrency and w.system in (ours, baseline):
            by_round.setdefault(w.round, {})[w.system] = metric(w)
    return [
        ratio(pair[ours], pair[baseline])
        for _, pair in sorted(by_round.items())
        if ours in pair and baseline in pair
    ]


def rate(w: Window) -> float:
    return w.rate


def p50(w: Window) -> float:
    return w.p50_ms


def p99(w: Window) -> float:
    return w.p99_ms


def server_cpu_per_release(w: Window) -> float:
    if w.server_cpu is None or not w.all_ok:
        return math.nan
    return w.server_cpu / w.all_ok


def loadgen_cpu_per_release(w: Window) -> float:
    return w.loadgen_cpu / w.all_ok if w.all_ok else math.nan


def shares(w: Window, cores: int) -> tuple[float, float, float]:
    """How much of the machine's cores the server, the load generator and everything else
    (the kernel's loopback networking, other processes) kept busy during window W."""
    capacity = w.wall * cores
    server = (w.server_cpu or 0.0) / capacity
    loadgen = w.loadgen_cpu / capacity
    return server, loadgen, max(0.0, w.machine_cpu / capacity - server - loadgen)


def finite(values: Sequence[float]) -> list[float]:
    return [v for v in values if math.isfinite(v)]


def saturation(results: Results) -> int:
    """The highest concurrency measured: where the targets are judged."""
    return max(results.plan.concurrencies)


def systems(windows: Sequence[Window]) -> tuple[str, ...]:
    """The systems of part 1 in the report's order; the floor only if it was measured."""
    return SYSTEMS + ((FLOOR,) if any(w.system == FLOOR for w in windows) else ())


def median_or_nan(values: Sequence[float]) -> float:
    return summarize(values).median if values else math.nan


# Targets


@dataclass(frozen=True)
class Verdict:
    target: str
    measured: str
    met: bool


def storm_ideal(results: Results) -> float:
    """Seconds the storm's hosts take at the steady rate of the highest concurrency."""
    steady = summarize(series(results.windows, "ours", saturation(results), rate)).median
    return results.storms.agent[0].hosts / steady if steady else math.inf


def storm_rate(run: storm.Storm) -> float:
    """Hosts served per second of the storm."""
    return run.served / run.makespan if run.makespan > 0 else 0.0


def verdicts(results: Results) -> list[Verdict]:
    top = saturation(results)
    vs_nginx = summarize(round_ratios(results.windows, "ours", "nginx", top, rate))
    p99_vs_nginx = summarize(round_ratios(results.windows, "ours", "nginx", top, p99))
    vs_tang = summarize(round_ratios(results.windows, "ours", "tang", top, rate))
    runs = results.storms.agent
    hosts = runs[0].hosts
    failed = sum(r.failed for r in runs)
    ideal = storm_ideal(results)
    slowdown = summarize([ratio(r.makespan, ideal) for r in runs]).median
    found = [
        Verdict(
            f"releases/s at c={top}: key server >= {MIN_OURS_VS_NGINX}x nginx",
            f"{vs_nginx.text('x', 2)}",
            vs_nginx.median >= MIN_OURS_VS_NGINX,
        ),
        Verdict(
            f"p99 latency at c={top}: key server <= {MAX_P99_VS_NGINX:g}x nginx",
            f"{p99_vs_nginx.text('x', 2)}",
            p99_vs_nginx.median <= MAX_P99_VS_NGINX,
        ),
        Verdict(
            f"releases/s at c={top}: key server >= {MIN_OURS_VS_TANG:g}x tangd",
            f"{vs_tang.text('x', 2)}",
            vs_tang.median >= MIN_OURS_VS_TANG,
        ),
        Verdict(
            f"storm of {hosts} hosts: every host served, none failed",
            "served " + ", ".join(str(r.served) for r in runs) + f" of {hosts}",
            failed == 0,
        ),
        Verdict(
            f"storm done within {MAX_STORM_VS_STEADY:g}x hosts / steady rate at c={top}",
            f"{over(runs, lambda r: r.makespan, ' s', 1)}"
            f" = {over(runs, lambda r: ratio(r.makespan, ideal), 'x', 2)} {ideal:.1f} s",
            failed == 0 and slowdown <= MAX_STORM_VS_STEADY,
        ),
    ]
    steady_cpu = median_or_nan(finite(series(results.windows, "ours", top, server_cpu_per_release)))
    storm_cpu = median_or_nan([r.server_cpu / r.served for r in runs if r.served])
    found.append(
        Verdict(
            f"server CPU per release in the storm <= {MAX_STORM_CPU_VS_STEADY:g}x steady (c={top})",
            f"{storm_cpu * 1000:.2f} ms against {steady_cpu * 1000:.2f} ms ="
            f" {ratio(storm_cpu, steady_cpu):.2f}x",
            ratio(storm_cpu, steady_cpu) <= MAX_STORM_CPU_VS_STEADY,
        )
    )
    found += ha_verdicts(results)
    found += agent_verdicts(results.agent)
    return found


def ha_verdicts(results: Results) -> list[Verdict]:
    if results.ha is None:
        return []
    top = saturation(results)
    vs = summarize(round_ratios(results.windows, PG, "ours", top, rate))
    p99_vs = summarize(round_ratios(results.windows, PG, "ours", top, p99))
    found = [
        Verdict(
            f"releases/s at c={top}: a node on PostgreSQL >= {MIN_PG_VS_SQLITE:g}x one on SQLite",
            vs.text("x", 2),
            vs.median >= MIN_PG_VS_SQLITE,
        ),
        Verdict(
            f"p99 latency at c={top}: on PostgreSQL <= {MAX_PG_P99_VS_SQLITE:g}x on SQLite",
            p99_vs.text("x", 2),
            p99_vs.median <= MAX_PG_P99_VS_SQLITE,
        ),
    ]
    curl = results.ha.curl
    if curl is not None and curl.judged():
        judged = curl.judged()
        served = min(r.served for r in judged)
        vs_curl = summarize([curl.vs_steady(r) for r in judged])
        found.append(
            Verdict(
                f"storm driven by curl: every host served, within {MAX_STORM_VS_STEADY:g}x"
                " hosts / curl's steady rate",
                f"{served} of {curl.hosts} served in the worst round, {vs_curl.text('x', 2)}",
                served == curl.hosts and vs_curl.median <= MAX_STORM_VS_STEADY,
            )
        )
    for run in results.ha.storms:
        how = "every node up" if run.killed_at is None else "one killed halfway"
        found.append(
            Verdict(
                f"storm of {run.hosts} hosts on {run.nodes} nodes, {how}: every host served",
                f"{run.served} of {run.hosts}, the last after {run.makespan:.1f} s",
                run.served == run.hosts and run.failed == 0,
            )
        )
    return found


def agent_verdicts(results: agent.AgentResults) -> list[Verdict]:
    one = summarize(results.agent_1).median
    many = summarize(results.agent_many).median
    clevis = summarize(results.clevis).median
    rss = summarize(results.agent_rss).median
    return [
        Verdict(
            f"cold unlock of 1 root: agent <= {agent.TARGET_VS_CLEVIS:g}x clevis",
            f"{ratio(one, clevis):.2f}x",
            ratio(one, clevis) <= agent.TARGET_VS_CLEVIS,
        ),
        Verdict(
            f"{results.roots_many} roots <= {agent.TARGET_MANY_VS_ONE:g}x 1 root",
            f"{ratio(many, one):.2f}x",
            ratio(many, one) <= agent.TARGET_MANY_VS_ONE,
        ),
        Verdict(
            f"agent peak RSS <= {agent.TARGET_RSS_KIB / 1024:g} MiB",
            f"{rss / 1024:.1f} MiB",
            rss <= agent.TARGET_RSS_KIB,
        ),
    ]


# Scale


@dataclass(frozen=True)
class Scale:
    cores: int
    rate: float  # median releases per second at the highest concurrency
    machine_cpu: float  # CPU seconds of the machine per release: cores / rate
    server_cpu: float  # of the key server's processes, measured
    loadgen_cpu: float  # of the load generator, measured
    dedicated_rate: float  # releases per second without the load generator's share
    storm_rate: float  # hosts served per second in the storm (median over rounds)
    storm_efficiency: float  # storm_rate / rate, at most 1 (see scale())
    budget: float
    hosts_per_server: int  # within the budget, in a storm like the one measured
    servers: int | None  # for FLEET hosts; None when a server served none
    storm_hosts: int
    storm_served: float  # median over rounds, within the budget, load generator included
    steady_busy: float  # share of the cores the server's processes used at saturation
    storm_busy: float  # and during the storms


def scale(results: Results) -> Scale:
    """Per release at saturation the machine spends cores / rate of CPU; take away the load
    generator's measured share and a server alone manages cores / that. A storm runs at
    some fraction of that rate (measured); within the budget that many hosts get keys."""
    top = saturation(results)
    steady = summarize(series(results.windows, "ours", top, rate)).median
    server_cpu = summarize(
        finite(series(results.windows, "ours", top, server_cpu_per_release)) or [math.nan]
    ).median
    loadgen_cpu = summarize(
        finite(series(results.windows, "ours", top, loadgen_cpu_per_release)) or [math.nan]
    ).median
    machine_cpu = results.cores / steady if steady else math.nan
    alone = machine_cpu - loadgen_cpu
    dedicated = results.cores / alone if alone > 0 else math.nan
    runs = results.storms.agent
    in_storm = summarize([storm_rate(r) for r in runs]).median
    # A small storm can finish faster than the steady windows ran (noise, an idle moment);
    # a storm is never planned to beat steady throughput.
    efficiency = min(1.0, ratio(in_storm, steady))
    budget = results.storms.budget
    per_server = int(dedicated * efficiency * budget) if math.isfinite(dedicated) else 0
    return Scale(
        cores=results.cores,
        rate=steady,
        machine_cpu=machine_cpu,
        server_cpu=server_cpu,
        loadgen_cpu=loadgen_cpu,
        dedicated_rate=dedicated,
        storm_rate=in_storm,
        storm_efficiency=efficiency,
        budget=budget,
        hosts_per_server=per_server,
        servers=math.ceil(FLEET / per_server) if per_server > 0 else None,
        storm_hosts=runs[0].hosts,
        storm_served=summarize([r.served for r in runs]).median,
        steady_busy=summarize(
            [
                shares(w, results.cores)[0]
                for w in results.windows
                if w.system == "ours" and w.concurrency == top
            ]
        ).median,
        storm_busy=summarize([storm_busy(r, results.cores) for r in runs]).median,
    )


def storm_busy(run: storm.Storm, cores: int) -> float:
    """The share of the cores the server's processes used while hosts were asking: from
    the start until the last host was served or gave up."""
    length = max(run.makespan, run.gave_up[2] if run.failed else 0.0)
    return run.server_cpu / (length * cores) if length > 0 else 0.0


# Rendering


def paragraph(text: str) -> str:
    return textwrap.fill(" ".join(text.split()), width=90, break_on_hyphens=False) + "\n"


def bullet(text: str) -> str:
    return (
        textwrap.fill(
            " ".join(text.split()),
            width=90,
            initial_indent="- ",
            subsequent_indent="  ",
            break_on_hyphens=False,
        )
        + "\n"
    )


def table(head: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def verdict_word(met: bool) -> str:
    return "met" if met else "**missed**"


def summary_or_dash(values: Sequence[float], unit: str = "", digits: int = 1) -> str:
    return summarize(values).text(unit, digits) if values else "-"


def header(results: Results) -> str:
    minutes = results.seconds / 60
    text = [
        "# Benchmarks\n",
        (
            "<!-- Generated by `make bench` (bench/report.py); the run's raw numbers are in\n"
            "     build/bench/run/results.json. Edit bench/, or bench/changes.md for the\n"
            "     section on changes, not this file. -->\n"
        ),
    ]
    if results.quick:
        text.append(
            "> **A smoke run** (`make bench-quick`): windows of about a second, one round, a"
            " small storm. It proves the harness works; its numbers are not for quoting.\n"
        )
    text.append(
        paragraph(
            f"Measured {results.date} on {results.machine['cpu']} ({results.cores} cores) in"
            f" {minutes:.1f} minutes, set-up included. Everything ran on 127.0.0.1 of this one"
            " machine, with the load generator on the same cores as the server it loads, and"
            " the machine was shared: read the ratios, not the absolute numbers. Each value is"
            " the median over interleaved rounds, with the minimum and maximum in brackets."
        )
    )
    return "\n".join(text)


def targets_section(results: Results) -> str:
    rows = [[v.target, v.measured, verdict_word(v.met)] for v in verdicts(results)]
    return "## Targets\n\n" + table(["target", "measured", "verdict"], rows)


def what_ran_section(results: Results) -> str:
    plan = results.plan
    limits = ", ".join(f"{k} = {v:g}" for k, v in results.steady_limits.items())
    net = results.storms.network
    concurrencies = ", ".join(str(c) for c in plan.concurrencies)
    floor = FLOOR in systems(results.windows)
    also_floor = f" (and, at c={saturation(results)} only, the Python floor)" if floor else ""
    bullets = [
        (
            "`make bench` runs `bench/run.sh`: the project's virtual environment"
            " (`scripts/bootstrap.sh`), Debian's nginx, tang, clevis, jose, curl and the C"
            " helpers (`bench/prepare.sh`), then `python -m bench`. `make bench-quick` is the"
            " smoke run CI makes (`tests/bench/test_smoke.py`)."
        ),
        (
            "The load generator is `bench/loadgen.c` (C, OpenSSL, one thread per client): a new"
            " TCP connection, a full TLS handshake and one request per exchange, as booting hosts"
            " make them. Over TLS it presents a client certificate, checks the server's key"
            " against its pin (SHA-256 of the SubjectPublicKeyInfo) after the handshake, as the"
            " agent does, and neither side resumes a session (no tickets, no cache)."
        ),
        (
            "Certificates: EC P-256 throughout, from the project's own CA (`zfs-unlock-server"
            " init`); nginx serves the key server's own certificate and key, so the pin is the"
            " same, and requires client certificates from the same CA (`ssl_verify_client on`)."
        ),
        (
            f"Part 1, each window: `loadgen steady 127.0.0.1 PORT C {plan.warmup:g}"
            f" {plan.duration:g} REQUEST CERT KEY PIN` (tangd: without CERT KEY PIN), C in"
            f" {concurrencies}: {plan.warmup:g} s of warm-up, then {plan.duration:g} s counted;"
            f" {plan.rounds} rounds, each running every concurrency against the key server,"
            f" nginx and tangd{also_floor} in turn."
        ),
        (
            "Key server: `zfs-unlock-server --data-dir DIR serve --listen 127.0.0.1:PORT`"
            f" ({results.workers} workers, its default of two per core). The request is the"
            " agent's batch release, `POST /v1/keys/release` for one raw 32-byte key; the server"
            " checks the certificate, the host and its key, writes (and syncs) the audit record"
            " and answers. For part 1 one host's certificate makes every request, so its"
            f" per-certificate rate limit is raised in server.toml ({limits}); the limiter still"
            " runs, with its shared SQLite bucket update per request. The storm runs on the"
            " defaults."
        ),
        (
            "nginx: Debian's, `worker_processes auto`, `GET /key` answering a static 64-byte body,"
            " `keepalive_timeout 0`, `access_log off`, TLS 1.2 and 1.3 with the key server's"
            " suites, session tickets and cache off (bench/baselines.py). It does no work but"
            " TLS and the answer: the ceiling."
        ),
        *(
            [
                (
                    "Python floor: `python -m bench.pyfloor DATA_DIR PORT"
                    f" {results.floor_workers}` (bench/pyfloor.py), with the key server's data"
                    " directory and its default number of workers: pre-forked processes that"
                    " each accept a connection, complete the same mutual-TLS handshake with the"
                    " key server's own SSLContext (`tlsctx.server_context`), read the request"
                    " head and answer 64 bytes; the request is nginx's. No HTTP parser, rate"
                    " limit, database or audit record: what the key server's TLS and process"
                    " model cost in Python, a diagnostic with no target of its own."
                )
            ]
            if floor
            else []
        ),
        (
            "tangd: Debian's, one process per connection as Debian's tangd.socket runs it"
            " (`systemd-socket-activate --accept --inetd`), plain HTTP, clevis's recovery"
            " request `POST /rec/KID` with a P-521 key."
        ),
        (
            f"Part 2, the storm: `loadgen storm 127.0.0.1 PORT HOSTS_FILE {net.connect_timeout:g}"
            f" {net.read_timeout:g} {results.storms.budget:g} PIN`: one thread per host, each"
            " with its own enrolled certificate and key, all released at once."
        ),
    ]
    versions = ", ".join(f"{name} {version}" for name, version in results.versions.items())
    bullets.append(f"Versions: {versions}.")
    if results.storm_cached:
        bullets.append(
            "The storm's hosts were enrolled by an earlier run and reused from"
            " build/bench/ (enrolling is not what is measured; the cache is remade when the"
            " server's storage code changes)."
        )
    return "## What ran\n\n" + "".join(bullet(b) for b in bullets)


def machine_section(results: Results) -> str:
    rows = [[name, value] for name, value in results.machine.items()]
    return "## The machine\n\n" + table(["", ""], rows)


def throughput_section(results: Results) -> str:
    windows = results.windows
    concurrencies = results.plan.concurrencies
    shown = systems(windows)
    rate_rows = []
    latency_rows = []
    for c in concurrencies:
        rates = [summary_or_dash(series(windows, s, c, rate), "", 0) for s in shown]
        vs_nginx = summary_or_dash(round_ratios(windows, "ours", "nginx", c, rate), "", 2)
        vs_tang = summary_or_dash(round_ratios(windows, "ours", "tang", c, rate), "", 2)
        rate_rows.append([str(c), *rates, vs_nginx, vs_tang])
        latencies = []
        for s in shown:
            latencies.append(summary_or_dash(series(windows, s, c, p50), "", 1))
            latencies.append(summary_or_dash(series(windows, s, c, p99), "", 1))
        p99_ratio = summary_or_dash(round_ratios(windows, "ours", "nginx", c, p99), "", 2)
        latency_rows.append([str(c), *latencies, p99_ratio])
    failed = {s: sum(w.failed for w in windows if w.system == s) for s in shown}
    counted = {s: sum(w.ok for w in windows if w.system == s) for s in shown}
    failures = ", ".join(f"{LABELS[s]} {failed[s]} of {failed[s] + counted[s]}" for s in shown)
    names = [LABELS[s] for s in shown]
    top = concurrencies[-1]
    cpu = {
        s: summary_or_dash(
            [v * 1000 for v in finite(series(windows, s, top, server_cpu_per_release))], " ms", 2
        )
        for s in ("ours", "nginx")
    }
    loadgen_cpu = summary_or_dash(
        [v * 1000 for v in finite(series(windows, "ours", top, loadgen_cpu_per_release))],
        " ms",
        2,
    )
    busy = [
        shares(w, results.cores) for w in windows if w.system == "ours" and w.concurrency == top
    ]
    server_share, loadgen_share, rest_share = (
        summarize([b[i] * 100 for b in busy]).text("%", 0) for i in range(3)
    )
    return (
        "## Key releases per second, a new mutual-TLS connection per request\n\n"
        + table(
            [
                "clients",
                *(f"{n}, requests/s" for n in names),
                "key server / nginx",
                "key server / tangd",
            ],
            rate_rows,
        )
        + "\n"
        + table(
            [
                "clients",
                *(f"{n} {q} ms" for n in names for q in ("p50", "p99")),
                "p99 key server / nginx",
            ],
            latency_rows,
        )
        + "\n"
        + paragraph(
            "Latency is per exchange, from connect to the end of the answer, handshake"
            f" included. Failed exchanges in the counted windows: {failures}. CPU time per"
            f" request at c={top} (user and system, from /proc, warm-up included): key server"
            f" {cpu['ours']} (master and workers), nginx {cpu['nginx']} (master and"
            f" workers), the load generator {loadgen_cpu} against the key server. Of the"
            f" machine's {results.cores} cores, while the key server was loaded at c={top},"
            f" the server kept {server_share} busy, the load generator {loadgen_share}, and"
            f" everything else {rest_share} (the kernel's loopback networking, and other"
            " processes on this shared machine)."
        )
        + where_the_time_goes(results)
    )


def where_the_time_goes(results: Results) -> str:
    """The key server's gap to nginx at the highest concurrency, split at the Python floor:
    nginx to the floor is Python's TLS and process model, the floor to the key server is
    the release itself. Empty when the run measured no floor."""
    windows = results.windows
    top = saturation(results)
    if not series(windows, FLOOR, top, rate):
        return ""
    cpu = {
        s: median_or_nan(finite(series(windows, s, top, server_cpu_per_release))) * 1000
        for s in ("nginx", FLOOR, "ours")
    }
    floor_vs_nginx = round_ratios(windows, FLOOR, "nginx", top, rate)
    ours_vs_floor = round_ratios(windows, "ours", FLOOR, top, rate)
    ours_vs_nginx = round_ratios(windows, "ours", "nginx", top, rate)
    text = (
        f"At c={top}, per request, nginx's processes used {cpu['nginx']:.2f} ms of CPU, the"
        f" Python floor's {cpu[FLOOR]:.2f} ms and the key server's {cpu['ours']:.2f} ms"
        " (medians; user and system time of the master and the workers). The floor answered"
        f" {summary_or_dash(floor_vs_nginx, 'x', 2)} nginx's requests per second, the key"
        f" server {summary_or_dash(ours_vs_floor, 'x', 2)} the floor's and"
        f" {summary_or_dash(ours_vs_nginx, 'x', 2)} nginx's."
    )
    if floor_vs_nginx and ours_vs_nginx:
        python = 1 - median_or_nan(floor_vs_nginx)
        gap = 1 - median_or_nan(ours_vs_nginx)
        release = gap - python
        if gap > 0:
            text += (
                f" The key server fell short of nginx by {gap:.2f} of nginx's rate. Of that,"
                f" {python:.2f} ({ratio(python, gap):.0%}; {cpu[FLOOR] - cpu['nginx']:.2f} ms"
                " more CPU per request than nginx) is Python's TLS and process model, the"
                " floor against nginx: the same handshake through Python's ssl module in"
                f" {results.floor_workers} pre-forked processes. The other {release:.2f}"
                f" ({ratio(release, gap):.0%}; {cpu['ours'] - cpu[FLOOR]:.2f} ms more CPU per"
                " request than the floor) is the release itself, the key server against the"
                " floor: its HTTP reader, the rate limit, the database, unsealing the key and"
                " the durable audit record."
            )
        else:
            text += " The key server kept up with nginx in this run: there is no gap to split."
    return "\n### Where the time goes\n\n" + paragraph(text)


def over(
    runs: Sequence[storm.Storm],
    value: Callable[[storm.Storm], float],
    unit: str = "",
    digits: int = 0,
) -> str:
    """VALUE of one round, or its median (min-max) over several."""
    values = [value(r) for r in runs]
    if len(values) == 1:
        return f"{values[0]:.{digits}f}{unit}"
    return summarize(values).text(unit, digits)


def each(runs: Sequence[storm.Storm], value: Callable[[storm.Storm], str]) -> str:
    """VALUE of every round, in order, where a summary would hide what happened."""
    return "; ".join(value(r) for r in runs)


def storm_section(results: Results) -> str:
    storms = results.storms
    net = storms.network
    columns = [storms.agent, storms.fixed]
    ideal = storm_ideal(results)
    rounds = len(storms.agent)

    def row(name: str, value: Callable[[Sequence[storm.Storm]], str]) -> list[str]:
        return [name, *(value(runs) for runs in columns)]

    def events(r: storm.Storm) -> str:
        return ", ".join(f"{k} {v}" for k, v in sorted(r.audit.items())) or "-"

    def gave_up(r: storm.Storm) -> str:
        low, median, high = r.gave_up
        return f"{median:.1f} s ({low:.1f}-{high:.1f})" if r.failed else "-"

    def rest(r: storm.Storm) -> float:
        return max(0.0, r.machine_cpu - r.server_cpu - r.loadgen_cpu)

    def outcomes(r: storm.Storm) -> str:
        return ", ".join(f"{k} {v}" for k, v in sorted(r.outcomes.items()) if v) or "-"

    rows = [
        row("hosts", lambda runs: str(runs[0].hosts)),
        row("served within the budget", lambda runs: over(runs, lambda r: r.served)),
        row("failed (a prompt at boot)", lambda runs: over(runs, lambda r: r.failed)),
        row("of which answered after the budget", lambda runs: over(runs, lambda r: r.late)),
        row("attempts (connections)", lambda runs: over(runs, lambda r: r.attempts)),
        row("attempts' outcomes", lambda runs: each(runs, outcomes)),
        row("last host served after", lambda runs: over(runs, lambda r: r.makespan, " s", 1)),
        row("half the hosts served after", lambda runs: over(runs, lambda r: r.p50, " s", 1)),
        row("99% served after", lambda runs: over(runs, lambda r: r.p99, " s", 1)),
        row(
            "storm / (hosts / steady rate)",
            lambda runs: over(runs, lambda r: ratio(r.makespan, ideal), "", 2),
        ),
        row("failed hosts gave up after", lambda runs: each(runs, gave_up)),
        row("server's audit events", lambda runs: each(runs, events)),
        row("CPU: server", lambda runs: over(runs, lambda r: r.server_cpu, " s", 1)),
        row("CPU: load generator", lambda runs: over(runs, lambda r: r.loadgen_cpu, " s", 1)),
        row("CPU: everything else on the machine", lambda runs: over(runs, rest, " s", 1)),
    ]
    top = saturation(results)
    how_many = (
        "One storm of each."
        if rounds == 1
        else f"{rounds} storms of each, interleaved; median (min-max) over them, or each"
        " storm's value in turn, separated by semicolons."
    )
    return (
        "## Reboot storm\n\n"
        + paragraph(
            f"{storms.agent[0].hosts} hosts, each enrolled with its own client certificate"
            " and key, ask for their key at the same moment over real TLS and retry until the"
            f" boot budget of {storms.budget:g} s runs out; a host not served by then falls"
            " back to a passphrase prompt (failed), and so does one answered later. With the"
            " agent's policy each host pauses as `KeyClient.call` does:"
            " `keyclient.retry_delay` with `config.NetworkSettings`'s defaults (backoff from"
            f" {net.backoff_initial:g} s doubling to {net.backoff_max:g} s, full random"
            f" jitter, drawn per host from seed {storms.seed}), never shorter than"
            " Retry-After, giving up when the next pause would end past the budget; TCP"
            f" connect {net.connect_timeout:g} s, then {net.read_timeout:g} s for each wait on"
            " the server, the TLS handshake included, as the agent sets them. The fixed loop waits"
            f" {storm.CLEVIS_PAUSE:g} s after every failure, as Clevis's unlockers do, with"
            " the same timeouts. The server runs on its defaults (rate limits included),"
            f" started afresh for each storm. {how_many} Steady throughput at c={top} in this"
            f" run predicts {ideal:.1f} s for the whole storm."
        )
        + "\n"
        + table(["", "agent's retry policy", f"fixed {storm.CLEVIS_PAUSE:g} s loop"], rows)
    )


def kib_text(values: Sequence[int]) -> str:
    return summarize([v / 1024 for v in values]).text(" MiB") if values else "-"


def memory_section(results: Results) -> str:
    memory = results.memory
    runs = results.storms.agent
    storm_peaks = [kib for run in runs for kib in run.worker_peak_kib]
    rows = [
        [
            "key server, after part 1",
            str(len(memory.ours_kib)),
            kib_text(memory.ours_kib),
            f"{sum(memory.ours_kib) / 1024:.1f} MiB",
        ],
        [
            "key server, after the storm" + ("s" if len(runs) > 1 else ""),
            str(len(runs[0].worker_peak_kib)),
            kib_text(storm_peaks),
            f"{summarize([sum(r.worker_peak_kib) for r in runs]).median / 1024:.1f} MiB",
        ],
        [
            "nginx, after part 1",
            str(len(memory.nginx_kib)),
            kib_text(memory.nginx_kib),
            f"{sum(memory.nginx_kib) / 1024:.1f} MiB",
        ],
    ]
    per_worker = ratio(summarize(memory.ours_kib).median, summarize(memory.nginx_kib).median)
    return (
        "## Server memory\n\n"
        + table(["", "workers", "peak RSS per worker (VmHWM)", "sum over workers"], rows)
        + "\n"
        + paragraph(
            f"A key-server worker peaks at {per_worker:.1f} times an nginx worker's resident"
            " set. VmHWM counts pages shared with the parent (the interpreter and the modules"
            " gunicorn loaded before forking, nginx's binary and libraries) in every worker,"
            " so the sums overstate what the workers take together."
        )
    )


def scale_section(results: Results) -> str:
    s = scale(results)
    net = results.storms.network
    top = saturation(results)
    share = ratio(s.loadgen_cpu, s.machine_cpu)
    text = paragraph(
        f"At c={top} the key server released {s.rate:.0f} keys per second on {s.cores}"
        f" cores: {s.cores} / {s.rate:.0f} = {s.machine_cpu * 1000:.2f} ms of the machine's"
        " CPU per release. The load generator ran on the same cores and took"
        f" {s.loadgen_cpu * 1000:.2f} ms of it ({share:.0%}); the server's own processes"
        f" {s.server_cpu * 1000:.2f} ms (user and system time of the master and the workers"
        " from /proc); the rest is the kernel's loopback networking, idle moments and"
        " whatever else ran on the machine. Without the load generator, one server of this"
        f" size would release about {s.cores} / {(s.machine_cpu - s.loadgen_cpu) * 1000:.2f}"
        f" ms = {s.dedicated_rate:.0f} keys per second (at most {s.cores} /"
        f" {s.server_cpu * 1000:.2f} ms = {ratio(s.cores, s.server_cpu):.0f} if nothing but"
        " its own processes used the CPU)."
    )
    text += "\n" + paragraph(
        "A storm is not steady load: in the storms above the server served"
        f" {s.storm_rate:.0f} hosts per second, {s.storm_efficiency:.2f} of its steady rate"
        " (counted as at most 1). What a storm loses: connections refused while the listen"
        " queue is full (each costs its host a connect timeout and a pause), handshakes for"
        " hosts that have already given up, and the server idle while hosts sit out their"
        " backoff. Within the boot"
        f" budget of {s.budget:g} s one server of this size therefore unlocks about"
        f" {s.dedicated_rate:.0f} x {s.storm_efficiency:.2f} x {s.budget:g} s ="
        f" {s.hosts_per_server:,} hosts rebooting at once, with the agent's retry policy"
        f" (pauses from {net.backoff_initial:g} s doubling up to {net.backoff_max:g} s). The"
        f" storm itself, load generator included, had {s.storm_served:,.0f} of its"
        f" {s.storm_hosts:,} hosts served within the budget, and its server kept"
        f" {s.storm_busy:.0%} of the cores busy, against {s.steady_busy:.0%} at c={top}:"
        " in a storm it waits more than it computes, so taking the load generator away may"
        " buy less than this estimate assumes. Beyond the storm measured, this is a linear"
        " extrapolation: a larger storm queues longer, and more of its hosts time out and"
        " retry."
    )
    if s.servers is None:
        text += "\n" + paragraph(
            f"No host was served in the storm, so nothing can be said about a fleet of {FLEET:,}."
        )
    else:
        text += "\n" + paragraph(
            f"A fleet of {FLEET:,} hosts that all reboot at once (a power cut) so needs"
            f" {FLEET:,} / {s.hosts_per_server:,} = {s.servers} servers of this size to unlock"
            f" every host within {s.budget:g} s, and {s.servers + 1} to survive losing one."
            " Servers on SQLite do not share their state, so such a fleet is partitioned:"
            " each host is enrolled on one server. Nodes on one PostgreSQL database share it"
            " (below). This counts CPU only; the network and the disks that sync every audit"
            " record come on top."
        )
    text += ha_scale(results, s)
    return "## Scale beyond one machine\n\n" + text


def ha_scale(results: Results, s: Scale) -> str:
    """What nodes on PostgreSQL, and the database, a fleet of FLEET hosts needs, from the
    CPU per release that part 1 measured on PostgreSQL."""
    if results.ha is None:
        return ""
    top = saturation(results)
    windows = [w for w in results.windows if w.system == PG and w.concurrency == top]
    if not windows:
        return ""
    node_cpu = median_or_nan(finite([server_cpu_per_release(w) for w in windows]))
    # Everything the machine did per release but the node and the load generator: the
    # database's backends (and the kernel's loopback networking, counted with them).
    database_cpu = median_or_nan(
        finite(
            [(w.machine_cpu - (w.server_cpu or 0.0) - w.loadgen_cpu) / w.all_ok for w in windows]
        )
    )
    needed = FLEET / s.budget
    efficiency = s.storm_efficiency or 1.0
    node_cores = needed * node_cpu / efficiency
    database_cores = needed * database_cpu / efficiency
    nodes = math.ceil(node_cores / s.cores) + 1
    return "\n" + paragraph(
        f"On PostgreSQL, the fleet is one deployment. A node used {node_cpu * 1000:.2f} ms of"
        f" its own CPU per release at c={top}, and the database (with the kernel's loopback"
        f" networking) about {database_cpu * 1000:.2f} ms. {FLEET:,} hosts within"
        f" {s.budget:g} s are {needed:,.0f} releases per second; at the storm's efficiency of"
        f" {efficiency:.2f} that is {node_cores:.1f} cores of nodes and {database_cores:.1f}"
        f" cores of database: {nodes} nodes of {s.cores} cores (one more than needed, to"
        f" survive losing one), and a database server with {math.ceil(database_cores)} or more"
        " cores free for the key server, its synchronous standby beside it. The commits are"
        " small and group well; the disk of the primary and the standby's round trip decide"
        " whether it keeps up, which this machine does not measure."
    )


def ha_section(results: Results) -> str:
    """Part 1's node on PostgreSQL against the one on SQLite; part 2b's storms; the audit
    trail's volume."""
    if results.ha is None:
        return ""
    ha_results = results.ha

    def both(clients: int, metric: Callable[[Window], float], digits: int) -> list[str]:
        return [
            summary_or_dash(series(results.windows, "ours", clients, metric), "", digits),
            summary_or_dash(series(results.windows, PG, clients, metric), "", digits),
            summary_or_dash(round_ratios(results.windows, PG, "ours", clients, metric), "", 2),
        ]

    rows = [
        [str(clients), *both(clients, rate, 0), *both(clients, p99, 1)]
        for clients in results.plan.concurrencies
    ]
    top = saturation(results)
    pg_cpu = median_or_nan(finite(series(results.windows, PG, top, server_cpu_per_release)))
    sqlite_cpu = median_or_nan(finite(series(results.windows, "ours", top, server_cpu_per_release)))
    rest = summarize(
        [
            shares(w, results.cores)[2]
            for w in results.windows
            if w.system == PG and w.concurrency == top
        ]
    ).median
    text = "## Several nodes on PostgreSQL\n\n" + paragraph(
        "The same deployment as part 1's key server, its keys.db loaded into a PostgreSQL"
        " database of a cluster started for the run on this machine (Debian's server,"
        " fsync and synchronous_commit on), served by one node with the same number of"
        " workers, measured in the same interleaved rounds."
    )
    text += "\n" + table(
        [
            "clients",
            "SQLite, requests/s",
            "PostgreSQL, requests/s",
            "PostgreSQL / SQLite",
            "SQLite p99 ms",
            "PostgreSQL p99 ms",
            "p99 PostgreSQL / SQLite",
        ],
        rows,
    )
    text += "\n" + paragraph(
        f"At c={top} the node on PostgreSQL used {pg_cpu * 1000:.2f} ms of CPU per request in"
        f" its own processes, against {sqlite_cpu * 1000:.2f} ms on SQLite, and PostgreSQL's"
        " own backends ran on the same cores: everything but the two servers' and the load"
        f" generator's processes kept {rest:.0%} of the cores busy while the node was loaded."
        " Each request makes its round trips to the database (the rate-limit bucket"
        " charged and the host read in one statement, then the release's transaction:"
        " BEGIN, its keys, its audit record, COMMIT), each paid in CPU by the node's client"
        " library and by the database, where SQLite's are calls into the same process."
    )
    storm_rows = []
    for run in ha_results.storms:
        killed = "-" if run.killed_at is None else f"after {run.killed_at:.1f} s"
        outcomes = ", ".join(f"{k} {v}" for k, v in sorted(run.outcomes.items()) if v) or "-"
        storm_rows.append(
            [
                killed,
                f"{run.served} of {run.hosts}",
                str(run.failed),
                f"{run.makespan:.1f} s",
                f"{run.p50:.1f} s",
                f"{run.p99:.1f} s",
                str(run.attempts),
                outcomes,
                str(run.releases),
            ]
        )
    text += "\n" + paragraph(
        f"Part 2b: part 2's fleet against {ha_results.nodes} nodes of one deployment on one"
        f" database, {ha_results.workers} workers each, all on this machine's"
        f" {results.cores} cores with PostgreSQL and the load generator. Each host lists"
        " every node, in an order rotated by its number, and walks the list as the agent"
        " walks its [[server]] entries: a node that refuses or fails is followed by the next"
        " one at once, and the agent's pause comes after a round in which every node failed."
        " The second storm kills the first node (kill -9, its master and workers) half the"
        " first storm's length after the start."
    )
    text += "\n" + table(
        [
            "node killed",
            "served within the budget",
            "failed",
            "last served",
            "half served",
            "99% served",
            "attempts",
            "outcomes",
            "releases audited",
        ],
        storm_rows,
    )
    curl = ha_results.curl
    if curl is not None and curl.rounds:
        text += "\n" + paragraph(
            f"Part 2c: part 2's storm against the one node on SQLite, driven not by our load"
            f" generator but by Debian's curl {curl.version}: each host one transfer of curl's"
            f" parallel mode ({curl.processes} processes of at most {curlstorm.PER_PROCESS}"
            " transfers, started together) with its own certificate and key, the pin"
            " (--pinnedpubkey), and curl's own retries (--retry-all-errors: pauses of 1 s"
            " doubling, without jitter, Retry-After honoured) within the"
            f" {results.storms.budget:g} s budget. curl's --connect-timeout bounds an"
            " attempt's TCP connection and TLS handshake together; the judged rounds give it"
            f" the agent's bounds summed ({curlstorm.AGENT_BOUND:g} s), a last round"
            f" {curlstorm.TIGHT_BOUND:g} s. Its baseline is curl again, in the same run:"
            f" {curl.steady_hosts} of the fleet's hosts asked in good order,"
            f" {curlstorm.STEADY_PARALLEL} transfers at a time in one curl,"
            f" {curl.steady_served} served in {curl.steady_seconds:.1f} s"
            f" ({curl.steady_rate:.0f} a second)."
        )
        text += "\n" + table(
            [
                "--connect-timeout",
                "served",
                "last curl exited",
                "hosts/s",
                "time per host / baseline's",
                "listen queue overflows",
            ],
            [
                [
                    f"{r.connect_timeout:g} s" + ("" if r.is_judged else " (not judged)"),
                    f"{r.served} of {curl.hosts}",
                    f"{r.makespan:.1f} s",
                    f"{r.rate:.0f}",
                    f"{curl.vs_steady(r):.2f}x",
                    f"{r.listen_overflows:,}",
                ]
                for r in curl.rounds
            ],
        )
        text += "\n" + paragraph(
            "The kernel drops a connection when the server's listen queue (4096) is full"
            " (TcpExt ListenOverflows); the client's kernel sends its SYN again after 1, 3"
            " and 7 s. With the 5 s bound, every transfer not answered within 5 s of its"
            " start gives up, pauses 1 s and retries at the same moment as the others, and"
            " the server meanwhile spends handshakes on the queue's older connections, so"
            " the queue overflows again; the agent's jittered pauses and its 10 s handshake"
            " bound are what keep part 2's storm within its target."
        )
    volume = ha_results.audit
    if volume.checkins:
        per_file = volume.file_bytes / volume.checkins
        per_row = volume.table_bytes / volume.checkins
        day = ha.CHECKINS_A_DAY
        text += "\n" + paragraph(
            f"Audit volume: every check-in is an audit record, and the agent's daemon checks"
            f" in {day} times a day. {volume.checkins} check-ins added {per_file:.0f} bytes"
            f" each to audit.log and {per_row:.0f} bytes each to the audit table (its indexes"
            f" included): per 1,000 hosts a day, {day * 1000:,} records,"
            f" {volume.per_thousand_hosts_a_day(volume.file_bytes) / 1e6:.1f} MB of audit.log"
            f" or {volume.per_thousand_hosts_a_day(volume.table_bytes) / 1e6:.1f} MB of table;"
            f" for 10,000 hosts, {day * 10_000:,} records a day. logrotate rotates the file;"
            " audit_retention_days and audit-prune keep the table (docs/high-availability.md)."
        )
    return text


def reseal_section(results: Results) -> str:
    """`master-key rotate` on a running server (bench/reseal.py)."""
    found = results.reseal
    if found is None:
        return ""
    loaded = summarize(found.reseal_loaded)
    return "## Master key rotation\n\n" + paragraph(
        f"`master-key rotate` on a running server (SQLite, default workers) holding"
        f" {found.keys:,} sealed keys: re-sealing every one under the new key (from the new"
        f" key's publication to the last value re-sealed, 500 to a transaction) took"
        f" {found.reseal_alone:.2f} s with nothing else running, and {loaded.text(' s', 2)}"
        f" while the load generator released keys at c={found.concurrency}. Over"
        f" {found.rounds} windows of {found.window:.2f} s, each opened when a rotation"
        f" published its new key, the server released {found.during_rate:.0f} keys a"
        f" second, against {found.idle_rate:.0f} in as many windows of the same length"
        f" with no rotation, in the same run: {found.vs_idle:.2f}x, with"
        f" {found.during_failed} failed."
    )


def changes_section(changes: str) -> str:
    return "## Changes made for these numbers\n\n" + changes.strip() + "\n"


def vm_section() -> str:
    return "## Real OpenZFS in a VM\n\n" + paragraph(
        f"ZFS's own `keylocation=https://` against the agent on real OpenZFS 2.3, inside the"
        f" emulated test VM, is in [{VM_REPORT}]({VM_REPORT})."
    )


def render(results: Results, changes: str) -> str:
    sections = [
        header(results),
        targets_section(results),
        throughput_section(results),
        storm_section(results),
        ha_section(results),
        reseal_section(results),
        memory_section(results),
        agent.render_markdown(results.agent),
        scale_section(results),
        changes_section(changes),
        what_ran_section(results),
        machine_section(results),
        vm_section(),
    ]
    return "\n".join(s.rstrip("\n") + "\n" for s in sections)


def write(results: Results, out: Path, changes_file: Path = CHANGES) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(render(results, changes_file.read_text()))
