from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from bench import postgres
from bench.common import REPO
from tests.keyserver import KeyServer

# The key server's two stores. A test module that sets BOTH_STORES = True runs each of
# its tests that take `store_url` (the keyserver fixture does) once on each, except those
# marked sqlite_only (they read SQLite's own file).
STORES = ("sqlite", "postgresql")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "sqlite_only: reads SQLite's file itself; not run on PostgreSQL"
    )


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    both = getattr(metafunc.module, "BOTH_STORES", False)
    if not both or metafunc.definition.get_closest_marker("sqlite_only") is not None:
        return
    for name, scope in (("store_url", "function"), ("shared_store_url", "module")):
        if name in metafunc.fixturenames:
            metafunc.parametrize(name, STORES, indirect=True, scope=scope)  # type: ignore[arg-type]


@pytest.fixture(scope="session")
def bench_prepared() -> None:
    """What the benchmarks' machinery needs, once per session: bench/prepare.sh installs
    Debian's baselines when they are missing (root on Debian, as in CI) and builds the C
    helpers (the load generator among them)."""
    subprocess.run(["bash", "bench/prepare.sh"], cwd=REPO, check=True)


@pytest.fixture(scope="session")
def pg_cluster() -> Iterator[postgres.Cluster]:
    """One PostgreSQL server for the whole run; each test gets a database of its own."""
    with postgres.cluster() as cluster:
        yield cluster


def _database_url(request: pytest.FixtureRequest) -> str:
    if getattr(request, "param", "sqlite") == "sqlite":
        return ""
    cluster: postgres.Cluster = request.getfixturevalue("pg_cluster")
    return cluster.new_database("t_" + os.urandom(8).hex())


@pytest.fixture
def store_url(request: pytest.FixtureRequest) -> str:
    """The [database] url of a test's key server: '' (SQLite) or a new PostgreSQL database."""
    return _database_url(request)


@pytest.fixture(scope="module")
def shared_store_url(request: pytest.FixtureRequest) -> str:
    """store_url for a module's shared_keyserver."""
    return _database_url(request)


@pytest.fixture
def keyserver(tmp_path: Path, store_url: str) -> Iterator[KeyServer]:
    """A fresh data directory; the test starts the server when it is configured."""
    server = KeyServer(tmp_path, database_url=store_url)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def shared_keyserver(
    tmp_path_factory: pytest.TempPathFactory, shared_store_url: str
) -> Iterator[KeyServer]:
    """One running server for a module's tests; each test uses its own hosts."""
    server = KeyServer(tmp_path_factory.mktemp("keyserver"), database_url=shared_store_url)
    server.start()
    yield server
    server.stop()
