from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.keyserver import KeyServer


@pytest.fixture
def keyserver(tmp_path: Path) -> Iterator[KeyServer]:
    """A fresh data directory; the test starts the server when it is configured."""
    server = KeyServer(tmp_path)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def shared_keyserver(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KeyServer]:
    """One running server for a module's tests; each test uses its own hosts."""
    server = KeyServer(tmp_path_factory.mktemp("keyserver"))
    server.start()
    yield server
    server.stop()
