"""bench/agent.py and bench/fakezfs.c: the fake zfs answers exactly what the agent's
unlock asks, a real agent run loads every key through it, and the measurements and their
report hold what they say. The end-to-end run needs Debian's tang, clevis and GNU time."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from bench import agent, baselines, common


@pytest.fixture(scope="module")
def fakezfs(tmp_path_factory: pytest.TempPathFactory, bench_prepared: None) -> Path:
    # bench_prepared: bench/prepare.sh installs gcc and the baselines when missing.
    return agent.ensure_fakezfs(tmp_path_factory.mktemp("build"))


@pytest.fixture(scope="module")
def key_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[common.KeyServer]:
    server = common.KeyServer(tmp_path_factory.mktemp("keyserver"))
    with server.serving(workers=1):
        yield server


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return agent.ensure_installed_agent(tmp_path_factory.mktemp("build"))


def make_host(
    tmp_path: Path, server: common.KeyServer, fakezfs: Path, name: str, roots: int, python: Path
) -> agent.AgentHost:
    host = server.add_hosts([name], datasets_per_host=roots)[0]
    return agent.AgentHost.create(tmp_path / name, host, server, fakezfs, python)


def test_the_installed_agent_is_a_plain_copy_with_no_import_hook(installed: Path) -> None:
    code = "import site, zfs_unlock_agent as a; print(site.getsitepackages()[0], a.__file__)"
    found = subprocess.run(
        [installed.parent / "python", "-I", "-c", code], check=True, capture_output=True, text=True
    ).stdout.split()
    site_dir = Path(found[0])
    assert Path(found[1]).is_relative_to(site_dir)
    assert not list(site_dir.glob("*.pth"))
    assert sorted(p.name for p in site_dir.iterdir()) == ["zfs_unlock_agent", "zfs_unlock_common"]
    version = subprocess.run([installed, "--version"], check=True, capture_output=True, text=True)
    assert version.stdout.startswith("zfs-unlock-agent ")


def fake(
    host: agent.AgentHost, program: str, *args: str, stdin: bytes = b""
) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [str(host.directory / "bin" / program), *args],
        check=False,
        input=stdin,
        capture_output=True,
    )


def test_fakezfs_answers_the_lists_from_the_canned_files(
    tmp_path: Path, key_server: common.KeyServer, fakezfs: Path, installed: Path
) -> None:
    host = make_host(tmp_path, key_server, fakezfs, "fz-lists", 3, installed)
    pools = fake(host, "zpool", "list", "-H", "-p", "-o", "name,guid")
    assert pools.returncode == 0
    assert pools.stdout == b"pool1000\t1000\npool1001\t1001\npool1002\t1002\n"
    datasets = fake(host, "zfs", "list", "-H", "-p", "-t", "filesystem,volume", "-o", "name")
    assert datasets.returncode == 0
    first = datasets.stdout.decode().splitlines()[0].split("\t")
    assert first == [
        "pool1000/d000",
        "filesystem",
        "2000",
        "pool1000/d000",
        "unavailable",
        "raw",
        "prompt",
        "no",
        "on",
        "/pool1000/d000",
        "on",  # zfs-unlock-agent:managed
        "on",  # org.openzfs.systemd:ignore
    ]


def test_fakezfs_load_key_drains_stdin_and_checks_the_raw_length(
    tmp_path: Path, key_server: common.KeyServer, fakezfs: Path, installed: Path
) -> None:
    host = make_host(tmp_path, key_server, fakezfs, "fz-load", 1, installed)
    good = fake(host, "zfs", "load-key", "-L", "prompt", "pool1000/d000", stdin=bytes(32))
    assert good.returncode == 0
    short = fake(host, "zfs", "load-key", "-L", "prompt", "pool1000/d000", stdin=bytes(31))
    assert short.returncode == 255
    assert b"Raw key too short" in short.stderr
    assert host.take_calls()[-2:] == [
        f"{host.directory}/bin/zfs load-key -L prompt pool1000/d000 32",
        f"{host.directory}/bin/zfs load-key -L prompt pool1000/d000 31",
    ]


def test_fakezfs_refuses_what_it_does_not_know(
    tmp_path: Path, key_server: common.KeyServer, fakezfs: Path, installed: Path
) -> None:
    host = make_host(tmp_path, key_server, fakezfs, "fz-refuse", 1, installed)
    assert fake(host, "zfs", "mount", "pool1000/d000").returncode == 2
    assert fake(host, "zfs", "load-key", "pool1000/d000").returncode == 2
    assert fake(host, "zpool", "import", "tank").returncode == 2
    relative = subprocess.run(["zfs", "list"], check=False, executable=fakezfs, capture_output=True)
    assert relative.returncode == 2


def test_the_agent_unlock_makes_only_the_calls_the_fake_answers(
    tmp_path: Path, key_server: common.KeyServer, fakezfs: Path, installed: Path
) -> None:
    host = make_host(tmp_path, key_server, fakezfs, "fz-agent", 5, installed)
    result = subprocess.run(host.argv(), check=False, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    calls = [line.split(" ", 1)[1] for line in host.take_calls()]
    # The agent runs `zpool list` and `zfs list` at the same time: either may log first.
    inventory = sorted(calls[:2])
    assert inventory[0] == "list -H -p -o name,guid"
    assert inventory[1].startswith("list -H -p -t filesystem,volume -o name,type,guid,")
    assert sorted(calls[2:]) == [f"load-key -L prompt pool{1000 + i}/d{i:03d} 32" for i in range(5)]
    assert "unlocked" in result.stderr


def test_check_every_key_loaded_fails_when_a_root_was_skipped(
    tmp_path: Path, key_server: common.KeyServer, fakezfs: Path, installed: Path
) -> None:
    host = make_host(tmp_path, key_server, fakezfs, "fz-check", 2, installed)
    fake(host, "zfs", "load-key", "-L", "prompt", "pool1000/d000", stdin=bytes(32))
    with pytest.raises(RuntimeError, match="1 of 2 keys loaded"):
        host.check_every_key_loaded()
    fake(host, "zfs", "load-key", "-L", "prompt", "pool1000/d000", stdin=bytes(32))
    fake(host, "zfs", "load-key", "-L", "prompt", "pool1001/d001", stdin=bytes(32))
    host.check_every_key_loaded()


def test_curl_fetches_one_key_and_refuses_a_wrong_pin(
    tmp_path: Path, key_server: common.KeyServer
) -> None:
    host = key_server.add_hosts(["curl-check"])[0]
    body = tmp_path / "body.json"
    body.write_bytes(agent.release_body(host))
    argv = agent.curl_argv(key_server, host, body)
    fetched = subprocess.run(argv, check=False, capture_output=True, text=True)
    assert fetched.returncode == 0, fetched.stderr
    assert '"keys":[{' in fetched.stdout.replace(" ", "")
    wrong = [("sha256//" + "A" * 43 + "=") if a == key_server.pin else a for a in argv]
    assert subprocess.run(wrong, check=False, capture_output=True).returncode == 90  # pin mismatch


IMPORTTIME = """\
import time: self [us] | cumulative | imported package
import time:       100 |        100 |       urllib3.util
import time:       200 |        300 |     urllib3
import time:        50 |        350 |   requests
import time:        40 |        390 | zfs_unlock_agent.keyclient
import time:        10 |         10 |   json.decoder
import time:        20 |         30 | json
import time:       500 |        500 | site
"""


def test_top_imports_counts_each_package_where_another_imported_it() -> None:
    assert agent.top_imports(IMPORTTIME, count=3) == [
        ("site", 0.5),
        ("requests", 0.35),
        ("urllib3", 0.3),
    ]


def sample_results(agent_1: float) -> agent.AgentResults:
    results = agent.AgentResults(rounds=2, roots_many=100)
    results.agent_1 += [agent_1, agent_1]
    results.agent_many += [0.12, 0.12]
    results.agent_1_editable += [0.1, 0.1]
    results.clevis += [0.1, 0.1]
    results.curl += [0.01, 0.01]
    results.agent_rss += [20480, 20480]
    results.agent_many_rss += [21504, 21504]
    results.clevis_rss += [10240, 10240]
    results.curl_rss += [10240, 10240]
    results.python_start += [0.02, 0.02]
    results.agent_version += [0.05, 0.05]
    results.imports = [("ssl", 4.0)]
    results.process_start += [0.0004, 0.0004]
    return results


def test_the_report_gives_ratios_of_medians_against_the_targets() -> None:
    text = agent.render_markdown(sample_results(0.08))
    assert "| agent 1 root / clevis | 0.80 | <= 0.8: met |" in text
    assert "| agent 100 roots / agent 1 root | 1.50 | <= 1.3: **missed** |" in text
    assert "| agent 1 root / curl | 8.00 |" in text
    assert "| agent peak RSS | 20.0 MiB | <= 35 MiB: met |" in text
    assert "`ssl` 4.0 ms" in text
    # (0.12 - 0.08) s over 99 roots; 0.3 x 0.08 s over 99 roots allowed
    assert "Each root beyond the first costs the agent 0.40 ms" in text
    assert "takes 0.40 ms here" in text and "leaves 0.24 ms per root" in text
    assert "| agent 1 root / clevis | 1.20 | <= 0.8: **missed** |" in agent.render_markdown(
        sample_results(0.12)
    )


@pytest.mark.slow  # real waits of several seconds: left out of make unit
@pytest.mark.usefixtures("bench_prepared")  # Debian's tang, clevis, GNU time, gcc
def test_a_quick_run_measures_every_kind(tmp_path: Path) -> None:
    server = common.KeyServer(tmp_path / "keyserver")
    with baselines.tangd(tmp_path / "tang") as tang:
        results = agent.run(tmp_path / "agent", server, tang, quick=True)
    assert server.process is None  # it served for the run only
    rounds = agent.QUICK_ROUNDS
    measured = (results.agent_1, results.agent_1_editable, results.agent_many, results.clevis)
    for values in (*measured, results.curl):
        assert len(values) == rounds and all(0 < v < 30 for v in values)
    for sizes in (results.agent_rss, results.agent_many_rss, results.clevis_rss, results.curl_rss):
        assert len(sizes) == rounds and all(1024 < s < 1024 * 1024 for s in sizes)
    assert len(results.python_start) == len(results.agent_version) == rounds
    assert len(results.process_start) == rounds and all(0 < s < 1 for s in results.process_start)
    assert results.imports and all(ms > 0 for _, ms in results.imports)
    assert "| agent 1 root / clevis |" in agent.render_markdown(results)
