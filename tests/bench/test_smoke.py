"""The benchmark suite's smoke run (`make bench-quick`) for real, so the harness never rots:
Debian's baselines, the C helpers, every part, and a report with every section."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from bench.common import REPO
from tests.bench.markdown import table_after
from tests.bench.test_report import SECTIONS

pytestmark = pytest.mark.slow

SUMMARY = r"\d+(\.\d+)? \(\d+(\.\d+)?-\d+(\.\d+)?\)"  # median (min-max)


@pytest.mark.usefixtures("bench_prepared")
def test_the_quick_run_measures_every_part_and_renders_the_report(tmp_path: Path) -> None:
    out = tmp_path / "benchmarks.md"
    run = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--out", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert run.returncode == 0, run.stderr[-4000:]
    text = out.read_text()

    positions = [text.index(heading + "\n") for heading in SECTIONS]
    assert positions == sorted(positions)
    assert "A smoke run" in text
    prose = " ".join(text.split())
    assert not re.search(r"\b(nan|inf)\b", prose)

    rates = table_after(text, "## Key releases per second")[1:]
    assert [row[0] for row in rates] == ["1", "8", "64"]
    floor = 4  # the Python floor's column, measured at the top concurrency only
    for row in rates:
        cells = row[1:floor] + row[floor + 1 :]
        assert all(re.fullmatch(SUMMARY, cell) for cell in cells), row
        assert float(row[1].split()[0]) > 0  # the key server answered
    assert [row[floor] for row in rates[:-1]] == ["-", "-"]
    assert re.fullmatch(SUMMARY, rates[-1][floor]) and float(rates[-1][floor].split()[0]) > 0
    assert re.search(r"Python floor \d+ of [1-9]", prose)  # its exchanges are counted
    where = prose[prose.index("### Where the time goes") : prose.index("## Reboot storm")]
    assert re.search(r"the Python floor's \d+\.\d\d ms", where)
    assert re.search(r"The floor answered \d+\.\d\dx", where)

    storm = {row[0]: row[1:] for row in table_after(text, "## Reboot storm")[1:]}
    assert storm["hosts"] == ["200", "200"]
    assert storm["served within the budget"] == ["200", "200"]
    assert storm["failed (a prompt at boot)"] == ["0", "0"]
    assert "release 200" in storm["server's audit events"][0]

    verdicts = table_after(text, "## Targets")[1:]
    assert len(verdicts) == 14
    assert all(row[2] in {"met", "**missed**"} for row in verdicts)
    by_target = {row[0]: row[2] for row in verdicts}
    assert by_target["storm of 200 hosts: every host served, none failed"] == "met"
    # Several nodes on PostgreSQL: the node of part 1 measured, the storms served.
    ha_rates = table_after(text, "## Several nodes on PostgreSQL")[1:]
    assert re.fullmatch(SUMMARY, ha_rates[-1][2]) and float(ha_rates[-1][2].split()[0]) > 0
    on_nodes = [t for t in by_target if "on 3 nodes" in t]
    assert [by_target[t] for t in on_nodes] == ["met", "met"], on_nodes
    assert re.search(r"per 1,000 hosts a day, 96,000 records, \d+\.\d MB of audit.log", prose)
    # The storm driven by curl: a judged round with the agent's bound, then the tight one.
    assert re.search(r"^\| 15 s \| 200 of 200 \|", text, re.MULTILINE)
    assert re.search(r"^\| 5 s \(not judged\) \| \d+ of 200 \|", text, re.MULTILINE)
    # Master key rotation: 1,000 keys re-sealed under a running server, no release failed.
    assert re.search(r"holding 1,001 sealed keys: re-sealing .* took \d+\.\d\d s", prose)
    assert re.search(r"released \d+ keys a second, against \d+ .* \d\.\d\dx, with 0 failed", prose)
