"""The Debian package tier's session fixtures: the clean tree and the packages, each made
once per session for every module of the tier (test_install.py, test_readme_walk.py)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.deb.system import build_debs, build_tree, require_deb_tier


@pytest.fixture(scope="session")
def deb_tier() -> Iterator[None]:
    """Skips the tier when ZUA_SKIP_DEB=1, fails it without root; prints the tier's
    time (from its first test to the session's end) when the session ends."""
    require_deb_tier()
    started = time.monotonic()
    yield
    print(f"\ndeb tier: {time.monotonic() - started:.1f} s in all")


@pytest.fixture(scope="session")
def tree(deb_tier: None) -> Path:
    """The cached debootstrap of bookworm (build-tree.sh)."""
    return build_tree()


@pytest.fixture(scope="session")
def debs(deb_tier: None, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The three packages of this checkout (scripts/deb.sh), copied out of build/deb."""
    return build_debs(tmp_path_factory.mktemp("debs"))
