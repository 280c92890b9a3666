"""Make a rename or a new name durable: fsync the directory that holds it. Shared by the
agent (its state, configuration and certificate) and the key server (its data files)."""

from __future__ import annotations

import os


def sync_directory(path: os.PathLike[str] | str) -> None:
    """fsync the directory PATH (OSError when it cannot be opened or synced)."""
    descriptor = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
