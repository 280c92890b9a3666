"""The one rule for files that hold credentials: a regular file nobody else may read.

Shared by the agent (client key) and the key server (master, CA and TLS keys).
"""

from __future__ import annotations

import os
import stat
from pathlib import Path


def problem(path: Path) -> str | None:
    """Why PATH is not acceptable as a credential file, or None when it is."""
    try:
        info = os.stat(path)
    except FileNotFoundError:
        return "missing"
    except PermissionError:
        return "not readable"
    if not stat.S_ISREG(info.st_mode):
        return "not a regular file"
    if info.st_mode & 0o077:
        return f"permissions {stat.S_IMODE(info.st_mode):04o} are too open; use chmod 0400"
    return None
