"""Create and read files that hold credentials, refusing loose permissions."""

from __future__ import annotations

import os
from pathlib import Path

from zfs_unlock_agent import privatefile
from zfs_unlock_server.errors import ConfigError


def write_new(path: Path, data: bytes, mode: int = 0o400) -> None:
    """Create PATH with MODE atomically enough: O_EXCL, so nothing is ever overwritten."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


def check_private(path: Path) -> None:
    """Refuse a credential file that group or others may read, or that is not a file."""
    reason = privatefile.problem(path)
    if reason:
        raise ConfigError(f"{path}: {reason}")


def read_private(path: Path) -> bytes:
    check_private(path)
    return path.read_bytes()
