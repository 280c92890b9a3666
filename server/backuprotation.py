"""Backups in a directory (backup --dir): named by the time they were taken, the oldest
removed beyond a number to keep. Only names of that form are ever removed."""

from __future__ import annotations

import datetime
import re
from collections.abc import Iterable
from pathlib import Path

PREFIX = "zfs-unlock-server-"
SUFFIX = ".tar"
# Timestamps of one width sort as text in time order.
NAME = re.compile(re.escape(PREFIX) + r"\d{8}T\d{6}Z" + re.escape(SUFFIX))


def name_for(when: datetime.datetime) -> str:
    """The file name of a backup taken at WHEN (UTC): zfs-unlock-server-20250131T020304Z.tar."""
    return PREFIX + when.astimezone(datetime.UTC).strftime("%Y%m%dT%H%M%SZ") + SUFFIX


def to_prune(names: Iterable[str], keep: int) -> list[str]:
    """Of NAMES, the backups beyond the newest KEEP, oldest first; other names never."""
    if keep < 1:
        raise ValueError("keep at least one backup")
    backups = sorted(n for n in names if NAME.fullmatch(n))
    return backups[: max(len(backups) - keep, 0)]


def prune(directory: Path, keep: int) -> list[Path]:
    """Remove the backups in DIRECTORY beyond the newest KEEP; the paths removed."""
    removed = []
    for name in to_prune((p.name for p in directory.iterdir() if p.is_file()), keep):
        (directory / name).unlink()
        removed.append(directory / name)
    return removed
