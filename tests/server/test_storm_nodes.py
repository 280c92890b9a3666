"""A reboot storm against three key-server nodes on one PostgreSQL database, one of them
killed with kill -9 (its master and workers) while the storm runs: every host is still
served within the boot budget, by the nodes that remain.

The machinery is the benchmark's (bench/ha.py): each host is its own client certificate
and key over real mutual TLS, lists every node in an order rotated by its number, walks
the list as the agent walks its [[server]] entries, and pauses as the agent's retry
policy says after a round in which every node failed. The benchmark (part 2b) runs the
same storm with 10,000 hosts; on the two cores CI has, shared with PostgreSQL and the load
generator, that takes 24-26 s of the 30 s budget, too little room for a gate that must
not fail by chance. This test runs STORM_HOSTS of them: done in 10-11 s here.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from bench import common, ha, postgres, storm
from zfs_unlock_agent.config import NetworkSettings

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("bench_prepared")]

STORM_HOSTS = 5000
NODES = 3
WORKERS = 2  # per node, as in the benchmark
KILL_AFTER = 4.0  # seconds into the storm: node 0 still has most of its hosts queued


def test_every_host_is_served_by_the_nodes_left_after_one_is_killed(tmp_path: Path) -> None:
    fleet = storm.fleet(STORM_HOSTS, common.BUILD / f"storm-{STORM_HOSTS}", reuse=True)
    network = NetworkSettings()
    jitter = random.Random(STORM_HOSTS).random  # noqa: S311 - backoff jitter, as the agent's

    with postgres.cluster("max_connections = 100\n") as cluster:
        nodes = ha.nodes_on(cluster, fleet, NODES, tmp_path)
        result = ha.run(
            fleet,
            nodes,
            lambda: storm.agent_pauses(network, storm.BOOT_BUDGET, jitter),
            tmp_path,
            network,
            kill_after=KILL_AFTER,
            workers=WORKERS,
        )

    assert (result.served, result.failed, result.late) == (STORM_HOSTS, 0, 0), result
    assert result.makespan < storm.BOOT_BUDGET
    assert result.killed_at is not None and result.killed_at < result.makespan
    # Hosts queued at node 0 met it dead (a reset handshake or exchange, or a refused
    # connection) and went on to the next node.
    assert sum(result.outcomes[o] for o in ("tls", "io", "connect")) > 0, result.outcomes
    # Every host's release was audited; one whose answer was lost (with node 0, or after
    # it stopped waiting) asked again, so there may be a few more records than hosts.
    assert STORM_HOSTS <= result.releases <= result.attempts
