"""The storm's precomputed pauses follow the agent's retry policy; its files are what the
load generator reads; its audit count starts where the storm started."""

from __future__ import annotations

import json
import random
from itertools import count
from pathlib import Path

import pytest

from bench import common, storm
from zfs_unlock_agent.config import NetworkSettings
from zfs_unlock_agent.keyclient import retry_delay


def test_agent_pauses_are_the_agents_backoff_with_the_drawn_jitter() -> None:
    network = NetworkSettings()
    draws = iter([0.5, 0.9, 0.1, 0.99, 0.7, 0.3, 0.8, 0.6, 0.2, 0.4, 0.5, 0.5, 0.5, 0.5])
    drawn: list[float] = []

    def jitter() -> float:
        drawn.append(next(draws))
        return drawn[-1]

    pauses = storm.agent_pauses(network, 30.0, jitter)
    assert pauses == [retry_delay(network, n + 1, j) for n, j in enumerate(drawn)]
    # Ceilings 0.5, 1, 2, 4, 8, 10, 10, ...; the tenth pause takes the sum past 30.
    assert pauses == pytest.approx([0.25, 0.9, 0.2, 3.96, 5.6, 3.0, 8.0, 6.0, 2.0, 4.0])
    assert sum(pauses) >= 30.0 > sum(pauses[:-1])


def test_agent_pauses_never_pass_backoff_max_and_cover_the_budget() -> None:
    network = NetworkSettings()
    jitter = random.Random(7).random  # noqa: S311 - not a secret
    for _ in range(200):
        pauses = storm.agent_pauses(network, 30.0, jitter)
        assert all(0 <= p <= network.backoff_max for p in pauses)
        assert sum(pauses) >= 30.0 > sum(pauses[:-1])


def test_the_ceiling_doubles_from_backoff_initial() -> None:
    network = NetworkSettings(backoff_initial=0.5, backoff_max=10.0)
    almost_one = storm.agent_pauses(network, 30.0, lambda: 0.999999)
    assert almost_one == pytest.approx([0.5, 1, 2, 4, 8, 10, 10], rel=1e-5)


def test_zero_jitter_ends_at_the_bound_instead_of_looping() -> None:
    assert storm.agent_pauses(NetworkSettings(), 30.0, lambda: 0.0) == [0.0] * storm.MAX_PAUSES


def test_fixed_pauses_cover_the_budget() -> None:
    assert storm.fixed_pauses(5.0, 30.0) == [5.0] * 7
    assert storm.fixed_pauses(5.0, 4.0) == [5.0]


def test_hosts_file_has_one_line_per_host_as_loadgen_reads_it(tmp_path: Path) -> None:
    hosts = [
        common.Host(
            name,
            common.machine_id_for(name),
            tmp_path / f"{name}.crt",
            tmp_path / f"{name}.key",
            (),
        )
        for name in ("a", "b")
    ]
    requests = [tmp_path / "a.http", tmp_path / "b.http"]
    numbers = count()
    path = storm.hosts_file(
        tmp_path / "plan", hosts, requests, lambda: [next(numbers) + 0.25, next(numbers) + 0.5]
    )
    lines = [line.split(" ") for line in path.read_text().splitlines()]
    assert lines == [
        [str(hosts[0].cert), str(hosts[0].key), str(requests[0]), "0.250,1.500"],
        [str(hosts[1].cert), str(hosts[1].key), str(requests[1]), "2.250,3.500"],
    ]


def test_audit_events_are_counted_from_the_offset(tmp_path: Path) -> None:
    log = tmp_path / "audit.log"
    before = json.dumps({"event": "release"}) + "\n"
    log.write_text(before)
    offset = log.stat().st_size
    with log.open("a") as handle:
        for event in ("release", "rate_limited", "release", "tls_handshake_failed"):
            handle.write(json.dumps({"event": event, "decision": "x"}) + "\n")
    assert storm.audit_events(log, offset) == {
        "release": 2,
        "rate_limited": 1,
        "tls_handshake_failed": 1,
    }
