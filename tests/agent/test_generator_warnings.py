"""generator_warnings: which unlocked roots systemd may unmount again.

zfs-mount-generator makes mount units from /etc/zfs/zfs-list.cache/POOL, bound to a
zfs-load-key@ unit that never runs for a managed root; org.openzfs.systemd:ignore=on
(which enroll sets) keeps it away. The VM tier checks the warning on real ZFS.
"""

from __future__ import annotations

from pathlib import Path

from zfs_unlock_agent.unlock import generator_warnings
from zfs_unlock_agent.zfs import Dataset


def root(name: str, ignored: bool) -> Dataset:
    return Dataset(
        name, "filesystem", "1", name, "available", "raw", "prompt", True, "on", f"/{name}",
        managed=True, generator_ignored=ignored,
    )  # fmt: skip


def test_a_root_without_the_property_on_a_cached_pool_is_named(tmp_path: Path) -> None:
    (tmp_path / "tank").touch()

    warnings = generator_warnings([root("tank/old", False), root("tank/new", True)], tmp_path)

    expected = (
        f"tank/old: {tmp_path / 'tank'} has zfs-mount-generator make systemd units for it,"
        " which may unmount it; run: zfs set org.openzfs.systemd:ignore=on tank/old"
    )
    assert warnings == [expected]


def test_no_cache_file_for_the_pool_no_warning(tmp_path: Path) -> None:
    (tmp_path / "other").touch()

    assert generator_warnings([root("tank/old", False)], tmp_path) == []
    assert generator_warnings([root("tank/old", False)], tmp_path / "absent") == []
