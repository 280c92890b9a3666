from __future__ import annotations

import subprocess

import pytest

from bench.common import REPO


@pytest.fixture(scope="session")
def bench_prepared() -> None:
    """What the benchmarks need, once per session: bench/prepare.sh installs Debian's
    baselines when they are missing (root on Debian, as in CI) and builds the C helpers."""
    subprocess.run(["bash", "bench/prepare.sh"], cwd=REPO, check=True)
