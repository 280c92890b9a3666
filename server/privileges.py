"""Who the key server's processes run as.

`serve` never runs as root by accident: a worker that parses network input
should hold no privilege the data directory does not need. Admin commands that
root runs against a data directory owned by another user (the service's) become
that user for good before they open anything in it, so that every file they create
there (database journals, a recreated audit log, the rate-limit database) belongs to
the service, which could not otherwise read it. What their command line names is read
or opened as root first (datadir.py).
"""

from __future__ import annotations

import os
import pwd
from pathlib import Path

from zfs_unlock_server.errors import NotPermitted

# The real uid the command started with, once it has switched: the audit log names
# the admin who ran the command, not the account it became.
_invoker: int | None = None


def refuse_root(allow_root: bool) -> None:
    if os.geteuid() == 0 and not allow_root:
        raise NotPermitted(
            "refusing to serve as root: run it as the data directory's owner (the systemd"
            " unit runs it as the user zfs-unlock), or pass --allow-root"
        )


def owner_to_become(data_dir: Path) -> tuple[int, int] | None:
    """(uid, gid) of DATA_DIR's owner when root should switch to it, else None."""
    if os.geteuid() != 0:
        return None
    try:
        info = os.stat(data_dir)
    except FileNotFoundError:
        return None  # the command itself says the directory is missing
    if info.st_uid == 0:
        return None
    try:
        gid = pwd.getpwuid(info.st_uid).pw_gid
    except KeyError:
        gid = info.st_gid  # an owner without a passwd entry: the directory's group
    return info.st_uid, gid


def become_owner(data_dir: Path) -> bool:
    """As root, switch real, effective and saved ids to DATA_DIR's owner; True if switched.

    Permanent on purpose: nothing after this can act as root. The kernel also marks
    a process whose ids change not dumpable (while fs.suid_dumpable is 0, the
    default), so the owner cannot attach to it and read what root read before (a
    master key credential, say).
    """
    global _invoker  # noqa: PLW0603
    target = owner_to_become(data_dir)
    if target is None:
        return False
    uid, gid = target
    invoker = os.getuid()
    os.setgroups([])
    os.setresgid(gid, gid, gid)
    os.setresuid(uid, uid, uid)
    _invoker = invoker
    return True


def invoking_uid() -> int:
    return os.getuid() if _invoker is None else _invoker
