"""The report's arithmetic and rendering, on made-up results (no servers, fast)."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import pytest

from bench import report
from bench.agent import AgentResults
from bench.curlstorm import AGENT_BOUND, TIGHT_BOUND, CurlRound, CurlStorm
from bench.ha import AuditVolume, HaResults, HaStorm
from bench.memory import Memory
from bench.reseal import ResealResults
from bench.results import Results, load, save
from bench.storm import Storm, Storms
from bench.throughput import Plan, Window
from tests.bench.markdown import table_after

# Releases per second by system and concurrency, one value per round.
RATES = {
    "ours": {1: [400, 420, 410], 8: [700, 720, 710], 64: [800, 600, 700]},
    "nginx": {1: [800, 800, 800], 8: [1000, 1000, 1000], 64: [1000, 500, 1000]},
    "tang": {1: [150, 150, 150], 8: [200, 200, 200], 64: [250, 250, 200]},
    "floor": {64: [900, 800, 950]},  # bench/pyfloor.py: at the top concurrency only
}
P99 = {"ours": 100.0, "nginx": 40.0, "tang": 300.0, "floor": 60.0}
# Server CPU seconds per release (tangd's is not measured).
CPU = {"ours": 0.001, "nginx": 0.0004, "tang": None, "floor": 0.0006}


def window(system: str, concurrency: int, round_: int, rate: float) -> Window:
    duration = 5.0
    ok = int(rate * duration)
    return Window(
        system=system,
        concurrency=concurrency,
        round=round_,
        rate=rate,
        p50_ms=P99[system] / 2,
        p99_ms=P99[system] * (1 + round_ / 10),
        ok=ok,
        failed=0,
        all_ok=2 * ok,
        loadgen_cpu=2 * ok * 0.0005,  # 0.5 ms per release
        server_cpu=None if (cpu := CPU[system]) is None else 2 * ok * cpu,
        machine_cpu=0.9 * 2 * 6.2,  # 90% of both cores
        wall=6.2,
    )


def storm_run(policy: str, served: int, makespan: float) -> Storm:
    return Storm(
        policy=policy,
        hosts=10_000,
        served=served,
        failed=10_000 - served,
        late=0,
        attempts=12_000,
        makespan=makespan,
        p50=makespan / 2,
        p99=makespan * 0.99,
        gave_up=(20.5, 24.0, 29.0),
        outcomes={"ok": served, "timeout": 2_000, "tls": 0},
        audit={"release": served, "server_start": 1},
        worker_peak_kib=[30_000, 31_000, 32_000, 33_000],
        server_cpu=20.0,
        loadgen_cpu=10.0,
        machine_cpu=45.0,
        wall=40.0,
    )


def agent_results() -> AgentResults:
    return AgentResults(
        rounds=3,
        roots_many=100,
        agent_1=[0.10, 0.12, 0.11],
        agent_many=[0.13, 0.14, 0.12],
        clevis=[0.10, 0.10, 0.10],
        curl=[0.01, 0.01, 0.01],
        agent_rss=[30_000, 30_000, 30_000],
        agent_many_rss=[31_000, 31_000, 31_000],
        curl_rss=[10_000, 10_000, 10_000],
        clevis_rss=[8_000, 8_000, 8_000],
        python_start=[0.02, 0.02, 0.02],
        agent_version=[0.08, 0.08, 0.08],
        imports=[("zfs_unlock_agent.cli", 60.0), ("site", 9.0)],
    )


def sample(agent_served: int = 10_000, agent_makespan: float = 16.0) -> Results:
    windows = [
        window(system, concurrency, round_ + 1, rate)
        for system, by_concurrency in RATES.items()
        for concurrency, rates in by_concurrency.items()
        for round_, rate in enumerate(rates)
    ]
    return Results(
        quick=False,
        date="2026-01-01 00:00 UTC",
        seconds=480.0,
        cores=2,
        machine={"cpu": "2 x A CPU", "memory": "4.0 GiB"},
        versions={"nginx": "1.22.1", "gunicorn": "27.0.1"},
        workers=4,
        steady_limits={"per_certificate_burst": 1e6, "per_certificate_rate": 1e6},
        storm_cached=True,
        plan=Plan((1, 8, 64), rounds=3, warmup=1.0, duration=5.0),
        windows=windows,
        memory=Memory([30_720, 31_744, 32_768, 30_720], [10_240, 11_264]),
        storms=Storms(
            [storm_run("agent", agent_served, agent_makespan)],
            [storm_run("fixed", 9_000, 29.0)],
            seed=42,
        ),
        agent=agent_results(),
        floor_workers=4,
        reseal=ResealResults(
            keys=10_001,
            concurrency=8,
            reseal_alone=0.25,
            reseal_loaded=[0.3, 0.28, 0.32],
            window=0.25,
            rounds=3,
            idle_rate=800.0,
            during_rate=720.0,
            during_failed=0,
        ),
    )


def without_floor(results: Results) -> Results:
    """RESULTS as a run saved before the Python floor was measured."""
    windows = [w for w in results.windows if w.system != "floor"]
    return dataclasses.replace(results, windows=windows, floor_workers=0)


def test_ratios_are_taken_within_each_round_then_summarised() -> None:
    results = sample()
    ratios = report.round_ratios(results.windows, "ours", "nginx", 64, report.rate)
    assert ratios == pytest.approx([0.8, 1.2, 0.7])  # not 700 / 1000 from the medians


def test_a_round_missing_one_side_gives_no_ratio() -> None:
    windows = [w for w in sample().windows if not (w.system == "nginx" and w.round == 2)]
    ratios = report.round_ratios(windows, "ours", "nginx", 64, report.rate)
    assert ratios == pytest.approx([0.8, 0.7])


def verdict(results: Results, start: str) -> report.Verdict:
    found = [v for v in report.verdicts(results) if v.target.startswith(start)]
    assert len(found) == 1, start
    return found[0]


def test_verdicts_of_the_throughput_targets() -> None:
    results = sample()
    # Per-round ratios at c=64: 0.8, 1.2, 0.7 -> median 0.8, exactly the target.
    vs_nginx = verdict(results, "releases/s at c=64: key server >= 0.8x nginx")
    assert vs_nginx.met and vs_nginx.measured == "0.80x (0.70-1.20)"
    # p99 ours / nginx is 100/40 = 2.5 in every round.
    assert not verdict(results, "p99 latency at c=64").met
    # ours / tang at c=64: 3.2, 2.4, 3.5 -> median 3.2.
    assert verdict(results, "releases/s at c=64: key server >= 3x tangd").met


def test_storm_verdicts_compare_with_the_steady_rate_of_the_same_run() -> None:
    # 10,000 hosts at the median c=64 rate of 700/s: 14.3 s; 1.25 of it is 17.9 s.
    assert verdict(sample(agent_makespan=17.5), "storm done within").met
    late = verdict(sample(agent_makespan=18.6), "storm done within")
    assert not late.met and late.measured == "18.6 s = 1.30x 14.3 s"
    assert verdict(sample(), "storm of 10000 hosts: every host served").met
    partial = sample(agent_served=9_999, agent_makespan=10.0)
    assert not verdict(partial, "storm of 10000 hosts: every host served").met
    assert not verdict(partial, "storm done within").met  # fast, but one host failed


def test_storm_rounds_are_all_judged_and_summarised() -> None:
    results = sample(agent_makespan=14.0)
    second = storm_run("agent", 9_990, 20.0)
    results = dataclasses.replace(
        results, storms=dataclasses.replace(results.storms, agent=[*results.storms.agent, second])
    )
    served = verdict(results, "storm of 10000 hosts: every host served")
    assert not served.met and served.measured == "served 10000, 9990 of 10000"
    done = verdict(results, "storm done within")
    assert not done.met  # the median is 17.0 s (1.19x), but a host failed
    assert done.measured == "17.0 s (14.0-20.0) = 1.19x (0.98-1.40) 14.3 s"
    text = report.render(results, "")
    assert "| failed (a prompt at boot) | 5 (0-10) | 1000 |" in text
    assert "| failed hosts gave up after | -; 24.0 s (20.5-29.0) |" in text
    assert "| key server, after the storms | 4 | 30.8 MiB (29.3-32.2) | 123.0 MiB |" in text


def test_agent_verdicts_use_the_agent_parts_targets() -> None:
    results = sample()
    assert not verdict(results, "cold unlock of 1 root").met  # 0.11 / 0.10
    assert verdict(results, "100 roots").met  # 0.13 / 0.11 = 1.18
    memory = verdict(results, "agent peak RSS")
    assert memory.met and memory.measured == "29.3 MiB"


def test_scale_from_the_cpu_per_release_and_the_storms_efficiency() -> None:
    scale = report.scale(sample(agent_makespan=20.0))
    assert scale.rate == 700
    assert scale.machine_cpu == pytest.approx(2 / 700)  # cores / throughput
    assert scale.server_cpu == pytest.approx(0.001)
    assert scale.loadgen_cpu == pytest.approx(0.0005)
    # Without the load generator's 0.5 ms: 2 / (2.857 - 0.5) ms = 848.5 per second.
    assert scale.dedicated_rate == pytest.approx(2 / (2 / 700 - 0.0005))
    assert scale.storm_rate == pytest.approx(500)  # 10,000 hosts in 20 s
    assert scale.storm_efficiency == pytest.approx(500 / 700)
    assert scale.hosts_per_server == 18_181  # 848.5 x 0.714 x 30 s
    assert scale.servers == 6  # 100,000 / 18,181, rounded up
    assert scale.storm_served == 10_000
    assert scale.steady_busy == pytest.approx(7 / 12.4)  # median round: 7 s of CPU in 6.2 s x 2
    assert scale.storm_busy == pytest.approx(20 / 40)  # 20 s of server CPU in 20 s x 2


def test_a_storm_with_failures_lasts_until_the_last_host_gave_up() -> None:
    run = dataclasses.replace(storm_run("agent", 9_000, 25.0), gave_up=(20.0, 28.0, 31.0))
    assert report.storm_busy(run, cores=2) == pytest.approx(20 / 62)


def test_cpu_shares_of_a_window() -> None:
    w = window("ours", 64, 1, 500.0)  # 5,000 releases in all; 6.2 s on 2 cores
    server, loadgen, rest = report.shares(w, cores=2)
    assert server == pytest.approx(5.0 / 12.4)
    assert loadgen == pytest.approx(2.5 / 12.4)
    assert rest == pytest.approx(0.9 - 7.5 / 12.4)


def test_the_storm_table_says_when_failed_hosts_gave_up_and_who_used_the_cpu() -> None:
    text = report.render(sample(agent_served=9_990), "")
    assert "| failed hosts gave up after | 24.0 s (20.5-29.0) | 24.0 s (20.5-29.0) |" in text
    assert "| CPU: everything else on the machine | 15.0 s | 15.0 s |" in text
    served = report.render(sample(), "")
    assert "| failed hosts gave up after | - | 24.0 s (20.5-29.0) |" in served


def test_a_storm_faster_than_steady_load_is_planned_at_the_steady_rate() -> None:
    scale = report.scale(sample(agent_makespan=5.0))  # 2,000 hosts/s against 700/s steady
    assert scale.storm_efficiency == 1.0
    assert scale.hosts_per_server == 25_454  # 848.5 x 30 s


def test_a_storm_that_served_nobody_says_so() -> None:
    results = sample(agent_served=0, agent_makespan=0.0)
    assert report.scale(results).servers is None
    text = report.render(results, "x")
    assert "nothing can be said about a fleet" in " ".join(text.split())


SECTIONS = [
    "# Benchmarks",
    "## Targets",
    "## Key releases per second, a new mutual-TLS connection per request",
    "## Reboot storm",
    "## Master key rotation",
    "## Server memory",
    "## Unlocking: the agent against clevis and curl",
    "## Scale beyond one machine",
    "## Changes made for these numbers",
    "## What ran",
    "## The machine",
    "## Real OpenZFS in a VM",
]


def test_render_has_every_section_in_order_with_medians_ranges_and_ratios() -> None:
    text = report.render(sample(), "- The lead's note, verbatim.\n")
    positions = [text.index(heading + "\n") for heading in SECTIONS]
    assert positions == sorted(positions)
    assert (
        "| 64 | 700 (600-800) | 1000 (500-1000) | 250 (200-250) | 900 (800-950)"
        " | 0.80 (0.70-1.20) |"
    ) in text
    assert "| served within the budget | 10000 | 9000 |" in text
    assert "| nginx, after part 1 | 2 | 10.5 MiB (10.0-11.0) | 21.0 MiB |" in text
    assert "- The lead's note, verbatim.\n" in text
    assert "[benchmarks-vm.md](benchmarks-vm.md)" in text
    assert "A smoke run" not in text
    prose = " ".join(text.split())
    assert "holding 10,001 sealed keys" in prose and "took 0.25 s with nothing else" in prose
    assert "720 keys a second, against 800" in prose and "0.90x, with 0 failed" in prose
    fleet = " ".join(report.render(sample(agent_makespan=20.0), "").split())
    assert "about 848 x 0.71 x 30 s = 18,181 hosts" in fleet
    assert "needs 100,000 / 18,181 = 6 servers of this size" in fleet
    assert "nan" not in prose and "inf" not in prose.replace("info", "")


def test_a_quick_run_says_it_is_not_for_quoting() -> None:
    text = report.render(dataclasses.replace(sample(), quick=True), "")
    assert "A smoke run" in text and "not for quoting" in text


def test_prose_lines_stay_short() -> None:
    text = report.render(sample(), "")
    start = text.index("## Targets")
    end = text.index("## Unlocking")  # the agent part renders its own section
    long = [
        line
        for line in text[start:end].splitlines() + text[text.index("## Scale") :].splitlines()
        if len(line) > 90 and not line.startswith("|")
    ]
    assert long == []


def test_results_survive_a_save_and_load(tmp_path: Path) -> None:
    results = sample()
    path = tmp_path / "results.json"
    save(results, path)
    loaded = load(path)
    assert loaded == results
    assert report.render(loaded, "x") == report.render(results, "x")


def test_write_copies_the_changes_file(tmp_path: Path) -> None:
    changes = tmp_path / "changes.md"
    changes.write_text("- Workers keep their SQLite connections.\n")
    out = tmp_path / "docs" / "benchmarks.md"
    report.write(sample(), out, changes)
    text = out.read_text()
    assert re.search(r"## Changes made for these numbers\n\n- Workers keep", text)


def test_the_python_floor_has_a_column_with_values_at_the_top_concurrency_only() -> None:
    text = report.render(sample(), "")
    rates = table_after(text, "## Key releases per second")
    column = rates[0].index("Python floor, requests/s")
    assert [row[column] for row in rates[1:]] == ["-", "-", "900 (800-950)"]
    latencies = table_after(text, "| clients | key server p50 ms")
    p99 = latencies[0].index("Python floor p99 ms")
    assert [row[p99] for row in latencies[1:]] == ["-", "-", "72.0 (66.0-78.0)"]
    assert "Python floor 0 of 13250" in " ".join(text.split())  # 900, 800, 950/s for 5 s


def test_where_the_time_goes_splits_the_gap_to_nginx_at_the_floor() -> None:
    prose = " ".join(report.render(sample(), "").split())
    section = prose[prose.index("### Where the time goes") : prose.index("## Reboot storm")]
    assert (
        "nginx's processes used 0.40 ms of CPU, the Python floor's 0.60 ms and the key"
        " server's 1.00 ms"
    ) in section
    # Per round at c=64, floor / nginx: 0.9, 1.6, 0.95; key server / floor: 0.89, 0.75, 0.74.
    assert "The floor answered 0.95x (0.90-1.60) nginx's requests per second" in section
    assert "the key server 0.75x (0.74-0.89) the floor's and 0.80x (0.70-1.20) nginx's" in section
    # 1 - 0.80 = 0.20 of nginx's rate in all; 1 - 0.95 = 0.05 of it below nginx already.
    assert "fell short of nginx by 0.20 of nginx's rate" in section
    assert "0.05 (25%; 0.20 ms more CPU per request than nginx) is Python's TLS" in section
    assert "The other 0.15 (75%; 0.40 ms more CPU per request than the floor)" in section
    assert "in 4 pre-forked processes" in section


def test_no_gap_to_split_when_the_key_server_keeps_up_with_nginx() -> None:
    results = sample()
    faster = [
        dataclasses.replace(w, rate=w.rate * 3) if w.system == "ours" else w
        for w in results.windows
    ]
    prose = " ".join(report.render(dataclasses.replace(results, windows=faster), "").split())
    assert "there is no gap to split" in prose
    assert "fell short" not in prose


def test_the_floor_changes_no_target() -> None:
    assert report.verdicts(sample()) == report.verdicts(without_floor(sample()))


def test_a_run_without_the_floor_renders_without_it() -> None:
    text = report.render(without_floor(sample()), "")
    assert "Python floor" not in text and "pyfloor" not in text
    assert "### Where the time goes" not in text
    assert "| 64 | 700 (600-800) | 1000 (500-1000) | 250 (200-250) | 0.80 (0.70-1.20) |" in text
    assert "nginx and tangd in turn" in " ".join(text.split())


def test_a_results_file_saved_before_the_floor_still_renders(tmp_path: Path) -> None:
    path = tmp_path / "results.json"
    save(without_floor(sample()), path)
    saved = json.loads(path.read_text())
    del saved["floor_workers"]  # what such a file lacks
    path.write_text(json.dumps(saved))
    old = load(path)
    assert old == without_floor(sample())
    assert report.render(old, "x") == report.render(without_floor(sample()), "x")


# Several nodes on PostgreSQL


def with_ha(results: Results, pg_rates: list[float], killed_served: int = 10_000) -> Results:
    """RESULTS with a node on PostgreSQL at c=64 (PG_RATES per round, p99 as SQLite's x2)
    and part 2b's two storms."""
    pg = [
        dataclasses.replace(window("ours", 64, round_ + 1, rate), system="pg")
        for round_, rate in enumerate(pg_rates)
    ]
    pg = [dataclasses.replace(w, p99_ms=w.p99_ms * 2) for w in pg]

    def ha_storm(killed_at: float | None, served: int) -> HaStorm:
        return HaStorm(3, killed_at, 10_000, served, 10_000 - served, 0, 15_000, 26.0, 14.0,
                       25.0, {"ok": served, "connect": 900}, served, 50.0, 40.0)  # fmt: skip

    ha_results = HaResults(
        3,
        2,
        [ha_storm(None, 10_000), ha_storm(13.0, killed_served)],
        AuditVolume(1000, 240_000, 400_000),
    )
    return dataclasses.replace(results, windows=[*results.windows, *pg], ha=ha_results)


def test_postgresql_is_judged_against_sqlite_in_each_round() -> None:
    # SQLite's rates at c=64 are 800, 600, 700: ratios 0.75, 1.0, 0.857 -> median 0.857.
    verdicts = {v.target: v for v in report.verdicts(with_ha(sample(), [600, 600, 600]))}
    rate = verdicts["releases/s at c=64: a node on PostgreSQL >= 0.8x one on SQLite"]
    assert rate.met and rate.measured.startswith("0.86x")
    p99 = verdicts["p99 latency at c=64: on PostgreSQL <= 1.5x on SQLite"]
    assert not p99.met and p99.measured.startswith("2.00x")
    killed = verdicts["storm of 10000 hosts on 3 nodes, one killed halfway: every host served"]
    assert killed.met
    missed = report.verdicts(with_ha(sample(), [400, 400, 400], killed_served=9_990))
    assert [v.met for v in missed if "on 3 nodes" in v.target] == [True, False]


def test_the_storms_cpu_per_release_is_judged_against_steady() -> None:
    # Storm: 20 s of server CPU for 10,000 hosts = 2 ms; steady at c=64: 1 ms.
    [verdict] = [v for v in report.verdicts(sample()) if "CPU per release" in v.target]
    assert verdict.measured == "2.00 ms against 1.00 ms = 2.00x" and not verdict.met


def test_the_postgresql_section_has_both_stores_the_storms_and_the_audit_volume() -> None:
    text = report.render(with_ha(sample(), [600, 600, 600]), "")
    section = text.split("## Several nodes on PostgreSQL")[1].split("\n## ")[0]
    assert "| 64 | 700 (600-800) | 600 (600-600) | 0.86 (0.75-1.00) |" in section
    assert "| after 13.0 s | 10000 of 10000 |" in section
    prose = " ".join(section.split())
    assert "240 bytes each to audit.log and 400 bytes each to the audit table" in prose
    assert "96,000 records, 23.0 MB of audit.log or 38.4 MB of table" in prose
    assert "## Several nodes on PostgreSQL" not in report.render(sample(), "")


def with_curl(results: Results, judged_served: list[int], makespans: list[float]) -> Results:
    """RESULTS with part 2c: judged rounds of JUDGED_SERVED hosts in MAKESPANS seconds,
    a tight round that served 4,000 in 40 s, and a baseline of 2,000 hosts in 5 s."""
    assert results.ha is not None
    rounds = [
        CurlRound(AGENT_BOUND, served, seconds, 50.0, 1000)
        for served, seconds in zip(judged_served, makespans, strict=True)
    ]
    curl = CurlStorm(10_000, 34, "7.88.1", 2000, 2000, 5.0,
                     [*rounds, CurlRound(TIGHT_BOUND, 4000, 40.0, 60.0, 100_000)])  # fmt: skip
    return dataclasses.replace(results, ha=dataclasses.replace(results.ha, curl=curl))


def test_the_curl_storm_is_judged_on_the_agents_bound_alone() -> None:
    # Baseline 400 hosts/s: 25 s for 10,000 is 1.0x, 30 s 1.2x, 35 s 1.4x; the tight
    # round's 10x does not count.
    def verdict(served: list[int], makespans: list[float]) -> report.Verdict:
        found = report.verdicts(with_curl(with_ha(sample(), [600] * 3), served, makespans))
        [curl] = [v for v in found if "driven by curl" in v.target]
        return curl

    met = verdict([10_000, 10_000, 10_000], [25.0, 30.0, 35.0])
    assert met.met and met.measured == "10000 of 10000 served in the worst round, 1.20x (1.00-1.40)"
    assert not verdict([10_000, 10_000], [35.0, 36.0]).met
    assert not verdict([10_000, 9_999], [25.0, 25.0]).met
    text = report.render(with_curl(with_ha(sample(), [600] * 3), [10_000], [30.0]), "")
    assert "| 15 s | 10000 of 10000 | 30.0 s | 333 | 1.20x | 1,000 |" in text
    assert "| 5 s (not judged) | 4000 of 10000 | 40.0 s | 100 | 4.00x | 100,000 |" in text


def test_results_with_postgresql_survive_a_save_and_load(tmp_path: Path) -> None:
    results = with_curl(with_ha(sample(), [600, 600, 600]), [10_000], [30.0])
    save(results, tmp_path / "results.json")
    assert load(tmp_path / "results.json") == results
