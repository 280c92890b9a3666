"""bench/vm.py, docs/benchmarks-vm.md's renderer, on made-up timings (no guest, fast)."""

from __future__ import annotations

from typing import Any

import pytest

from bench import vm

MACHINE = vm.Machine("6.1.0-x", "zfs-2.3.2", 2, "a CPU", "2026-01-01")


def sample() -> dict[str, Any]:
    return {
        "roots": 20,
        "rounds": 3,
        "native_all": "zfs load-key -a",
        "trust_store": "/etc/ssl/certs/ca-certificates.crt",
        "trust_store_certificates": 140,
        "datasets": 50,
        "cpus": 2,
        "python": "3.11.2",
        "setup_seconds": {"legacy_imports": 3.0, "native_create": 17.0, "agent_import": 15.0},
        "seconds": {
            "native_1": [0.7, 0.6, 0.8],
            "agent_1": [4.0, 4.2, 4.4],
            "native_20": [8.6, 8.4, 9.0],
            "agent_20": [5.9, 6.1, 5.8],
            "python_start": [0.1, 0.1, 0.2],
            "agent_start": [2.3, 2.4, 2.2],
        },
    }


def test_medians_ranges_and_ratios() -> None:
    text = vm.render(sample(), MACHINE)
    assert "| 1 | 0.70 s (0.60-0.80) | 4.20 s (4.00-4.40) | 6.00 |" in text
    assert "| 20 | 8.60 s (8.40-9.00) | 5.90 s (5.80-6.10) | 0.69 |" in text
    assert "| native_1 | 0.700 | 0.600 | 0.800 |" in text
    prose = " ".join(text.split())  # the renderer wraps paragraphs
    assert "lines cross at about 12 roots" in prose  # 1 + 3.5 / (7.9/19 - 1.7/19)
    assert "TCG" in text and "`bench/`" in text
    assert all(len(line) <= 90 for line in text.splitlines() if not line.startswith("|"))


def test_no_crossing_when_the_agent_is_not_cheaper_per_root() -> None:
    data = sample()
    data["seconds"]["agent_20"] = [20.0, 20.0, 20.0]
    prose = " ".join(vm.render(data, MACHINE).split())
    assert "native stays faster" in prose and "lines cross" not in prose


def test_missing_timings_are_an_error() -> None:
    data = sample()
    data["seconds"]["agent_20"] = [5.9]
    with pytest.raises(ValueError, match="agent_20"):
        vm.render(data, MACHINE)
