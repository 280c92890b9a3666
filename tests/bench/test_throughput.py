"""Part 1's schedule: every server in turn within each concurrency and round, a target
limited to some concurrencies measured only there (no load generator runs here)."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench import throughput


def test_a_target_limited_to_the_top_concurrency_is_interleaved_there_only(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    measured: list[tuple[int, int, str]] = []

    def fake(
        target: throughput.Target, concurrency: int, round_: int, plan: throughput.Plan
    ) -> throughput.Window:
        measured.append((round_, concurrency, target.name))
        return throughput.Window(
            target.name, concurrency, round_, 1.0, 1.0, 1.0, 1, 0, 1, 0.0, None, 0.0, 1.0
        )

    monkeypatch.setattr(throughput, "measure_window", fake)
    request = Path("request.http")
    targets = [
        throughput.Target("ours", 1, request, None, list),
        throughput.Target("nginx", 2, request, None, list),
        throughput.Target("floor", 3, request, None, list, concurrencies=(64,)),
    ]
    windows = throughput.measure(targets, throughput.Plan((1, 64), 2, 0.0, 0.0))
    assert measured == [
        (1, 1, "ours"),
        (1, 1, "nginx"),
        (1, 64, "ours"),
        (1, 64, "nginx"),
        (1, 64, "floor"),
        (2, 1, "ours"),
        (2, 1, "nginx"),
        (2, 64, "ours"),
        (2, 64, "nginx"),
        (2, 64, "floor"),
    ]
    assert len(windows) == len(measured)
