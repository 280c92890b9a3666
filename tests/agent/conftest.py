"""Fixtures of the agent's tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.agent.daemon_harness import Daemons


@pytest.fixture
def daemons() -> Iterator[Daemons]:
    """Starts daemons for one test (Daemons.start) and stops every one afterwards."""
    started = Daemons()
    yield started
    started.stop_all()
