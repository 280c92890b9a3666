"""Files the agent replaces whole and durably: a temporary file beside the target, synced,
renamed over it, and the directory synced, so that a crash leaves the old contents or the
new ones, never a mix (the learned pins, a renewed certificate)."""

from __future__ import annotations

import os
from pathlib import Path

from zfs_unlock_common.syncdir import sync_directory


def replace(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Make PATH hold DATA with MODE (whatever the umask). Raises OSError."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        descriptor = os.open(
            temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, mode
        )
        with os.fdopen(descriptor, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(temporary, mode)
        os.replace(temporary, path)
        sync_directory(path.parent)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
