"""Write a file whole or not at all: a temporary file beside it, synced, then linked in.

A reader never sees half a file, a crash leaves at most the temporary file (a dot-name),
and a full disk or an I/O error leaves nothing.
"""

from __future__ import annotations

import contextlib
import errno
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path

from zfs_unlock_common.syncdir import sync_directory
from zfs_unlock_server.errors import CannotCreate, WriteFailed


def write_whole(
    path: Path, data: bytes | Iterable[bytes], mode: int = 0o600, replace: bool = False
) -> None:
    """Create PATH with DATA (bytes, or chunks of them as they are made) and MODE; an
    existing PATH is refused unless REPLACE."""
    directory = path.parent
    try:
        fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=directory)
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise WriteFailed(f"{path}: {exc.strerror}; nothing was written") from None
        raise CannotCreate(f"cannot create {path}: {directory}: {exc.strerror}") from None
    temporary = Path(name)
    try:
        try:
            os.fchmod(fd, mode)  # whatever the umask
            for chunk in [data] if isinstance(data, bytes) else data:
                view = memoryview(chunk)
                while view:
                    view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        if replace:
            os.replace(temporary, path)
        else:
            try:
                os.link(temporary, path)  # fails if PATH appeared meanwhile: never overwrite
            except FileExistsError:
                raise CannotCreate(f"{path} exists; refusing to overwrite it") from None
            temporary.unlink()
        sync_directory(directory)
    except OSError as exc:
        with contextlib.suppress(OSError):
            temporary.unlink()
        raise WriteFailed(f"{path}: {exc.strerror}; nothing was written") from None
    except BaseException:
        with contextlib.suppress(OSError):
            temporary.unlink()
        raise
