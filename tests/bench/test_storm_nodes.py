"""Three key-server nodes on one PostgreSQL database take a reboot storm of 10,000 hosts,
and one of them is killed (kill -9, master and workers) halfway: every host is still
served within the boot budget, each walking its list of nodes as the agent walks its
[[server]] entries (bench/ha.py; the fleet is the benchmark's, cached in build/bench).
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest

from bench import common, ha, postgres, storm
from zfs_unlock_agent.config import NetworkSettings

HOSTS = 10_000
NODES = 3
WORKERS = 2  # per node: six on two cores, beside PostgreSQL and the load generator


@pytest.mark.slow
@pytest.mark.usefixtures("bench_prepared")  # gcc and OpenSSL's headers for the load generator
def test_every_host_is_served_when_a_node_dies_halfway_through_a_storm(tmp_path: Path) -> None:
    fleet = storm.fleet(HOSTS, common.BUILD / f"storm-{HOSTS}", reuse=True)
    # Replays a failed run's pauses: ZUA_STORM_SEED.
    seed = int(os.environ.get("ZUA_STORM_SEED") or random.SystemRandom().randrange(2**32))
    jitter = random.Random(seed).random  # noqa: S311 - backoff jitter, as the agent draws it
    network = NetworkSettings()
    with postgres.cluster("max_connections = 100\n") as cluster:
        nodes = ha.nodes_on(cluster, fleet, NODES, tmp_path)
        result = ha.run(
            fleet,
            nodes,
            lambda: storm.agent_pauses(network, storm.BOOT_BUDGET, jitter),
            tmp_path,
            network,
            kill_after=storm.BOOT_BUDGET * 0.4,
            workers=WORKERS,
        )
    print(f"\nseed {seed}: {result}")
    # Served means answered within the budget (the load generator counts a late answer as a
    # failure): no host fell back to its passphrase prompt.
    assert (result.served, result.failed, result.late) == (HOSTS, 0, 0), f"seed {seed}"
    assert result.releases == HOSTS
    # The node did die under the fleet: hosts met it refusing or cutting them off.
    assert result.outcomes["connect"] + result.outcomes["tls"] + result.outcomes["io"] > 0
