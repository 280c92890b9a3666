"""Create and read files that hold credentials, refusing loose permissions."""

from __future__ import annotations

import os
import stat
import struct
from pathlib import Path

from zfs_unlock_common import privatefile
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


# The kernel's xattr form of an access ACL: a version word, then (tag, permissions, id) entries.
_ACL_XATTR = "system.posix_acl_access"
_ACL_VERSION = 2
_ACL_USER, _ACL_GROUP_OBJ, _ACL_GROUP, _ACL_OTHER = 0x02, 0x04, 0x08, 0x20
_ACL_READ = 0x04


def check_credential(path: Path) -> None:
    """check_private for a systemd credential: where the file system has ACLs, systemd
    leaves the file root's (0400) and lets the service's user read it through an ACL
    entry, whose mask then shows as the group's read bit. That bit is accepted when
    the ACL grants read to this process's user and to no one else."""
    reason = privatefile.problem(path)
    if reason is None:
        return
    try:
        info = os.stat(path)
    except OSError:
        info = None
    if (
        info is None
        or not stat.S_ISREG(info.st_mode)
        or stat.S_IMODE(info.st_mode) & 0o077 != 0o040
        or info.st_uid not in (0, os.geteuid())
        or not _acl_reads_only(path, os.geteuid())
    ):
        raise ConfigError(f"{path}: {reason}")


def _acl_reads_only(path: Path, uid: int) -> bool:
    """Whether PATH's ACL names no group, gives others nothing and UID at most read."""
    try:
        raw = os.getxattr(path, _ACL_XATTR)
    except OSError:
        return False
    if len(raw) < 4 or (len(raw) - 4) % 8 or struct.unpack_from("<I", raw)[0] != _ACL_VERSION:
        return False
    for offset in range(4, len(raw), 8):
        tag, perm, ident = struct.unpack_from("<HHI", raw, offset)
        if tag == _ACL_USER and (ident != uid or perm & ~_ACL_READ):
            return False
        if tag in (_ACL_GROUP_OBJ, _ACL_GROUP, _ACL_OTHER) and perm:
            return False
    return True
