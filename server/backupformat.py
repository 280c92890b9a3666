"""The backup file's format: one tar archive that any byte's damage shows in, without
the master key.

Its members, in this order:

  manifest.json  format name and version, when, the server's name and public-key pin,
                 the counts of hosts and keys, and each member's name, size, mode and
                 SHA-256
  keys.db, ca.key, ca.crt, server.key, server.crt, server.toml
  SHA256         the SHA-256 (hex) of every byte of the archive before this member

then tar's end: zero blocks up to a whole record. The checksum covers the manifest and
every member with their headers and padding; SHA256's own header carries tar's header
checksum; what follows its data must be zeros. So a flipped bit anywhere, or a cut at any
point, is found. It shows damage, not tampering: who can write the file can rewrite the
checksum too (the sealed keys still open only under the master key).
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from zfs_unlock_server.errors import DataError

FORMAT = "zfs-unlock-server-backup"
VERSION = 1
MANIFEST = "manifest.json"
CHECKSUM = "SHA256"
# The data directory's files a backup holds, with the modes init gives them.
MEMBERS: Mapping[str, int] = {
    "keys.db": 0o600,
    "ca.key": 0o400,
    "ca.crt": 0o644,
    "server.key": 0o400,
    "server.crt": 0o644,
    "server.toml": 0o644,
}


@dataclass(frozen=True)
class Archive:
    """A backup file that passed every check."""

    manifest: Mapping[str, Any]
    members: Mapping[str, bytes]
    checksum: str


def _add(tar: tarfile.TarFile, name: str, data: bytes, mode: int, mtime: int) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = len(data), mode, mtime
    tar.addfile(info, io.BytesIO(data))


def build(
    facts: Mapping[str, Any], members: Mapping[str, bytes], created: int
) -> tuple[Archive, bytes]:
    """The archive of MEMBERS (MEMBERS' names, all of them) with FACTS in its manifest,
    and its bytes."""
    if set(members) != set(MEMBERS):
        raise ValueError(f"a backup holds exactly {sorted(MEMBERS)}")
    manifest = {
        "format": FORMAT,
        "version": VERSION,
        **facts,
        "members": [
            {
                "name": name,
                "size": len(members[name]),
                "mode": f"{mode:04o}",
                "sha256": hashlib.sha256(members[name]).hexdigest(),
            }
            for name, mode in MEMBERS.items()
        ],
    }
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        _add(tar, MANIFEST, json.dumps(manifest, indent=1).encode() + b"\n", 0o600, created)
        for name, mode in MEMBERS.items():
            _add(tar, name, members[name], mode, created)
        checksum = hashlib.sha256(buffer.getvalue()).hexdigest()
        _add(tar, CHECKSUM, checksum.encode() + b"\n", 0o600, created)
    return Archive(manifest, members, checksum), buffer.getvalue()


def parse(data: bytes, where: str) -> Archive:
    """DATA as a backup archive, every byte checked; DataError (65) saying what is wrong."""
    if not data:
        raise DataError(f"{where}: empty, not a backup")
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
            entries = tar.getmembers()
    except tarfile.TarError as exc:
        raise DataError(f"{where}: not a backup archive, or damaged at its start ({exc})") from None
    if not entries or entries[-1].name != CHECKSUM or not entries[-1].isfile():
        raise DataError(
            f"{where}: damaged or truncated: the archive ends before its checksum"
            f" ({len(entries)} member(s) readable)"
        )
    last = entries[-1]
    stored = data[last.offset_data : last.offset_data + last.size].decode("ascii", "replace")
    computed = hashlib.sha256(data[: last.offset]).hexdigest()
    if stored.strip() != computed:
        raise DataError(
            f"{where}: checksum mismatch: the archive is damaged (its bytes hash to"
            f" {computed}, its checksum says {stored.strip()[:64]!r})"
        )
    tail = data[last.offset_data + last.size :]
    if len(tail) < 2 * tarfile.BLOCKSIZE or len(data) % tarfile.RECORDSIZE or tail.strip(b"\0"):
        raise DataError(f"{where}: damaged or truncated after its checksum (at its end)")
    members = {
        e.name: data[e.offset_data : e.offset_data + e.size] for e in entries[:-1] if e.isfile()
    }
    names = [e.name for e in entries[:-1]]
    if names != [MANIFEST, *MEMBERS]:
        raise DataError(f"{where}: unexpected members {names}: not a backup of this format")
    try:
        manifest = json.loads(members.pop(MANIFEST))
    except ValueError:
        raise DataError(f"{where}: {MANIFEST} is not JSON") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise DataError(f"{where}: not a {FORMAT} file")
    if manifest.get("version") != VERSION:
        raise DataError(
            f"{where}: format version {manifest.get('version')!r}; this server reads {VERSION}"
        )
    _check_members(manifest, members, where)
    return Archive(manifest, members, computed)


def _check_members(manifest: Mapping[str, Any], members: Mapping[str, bytes], where: str) -> None:
    listed = {m.get("name"): m for m in manifest.get("members", []) if isinstance(m, dict)}
    if set(listed) != set(MEMBERS):
        raise DataError(f"{where}: its manifest lists {sorted(map(str, listed))}")
    for name, data in members.items():
        entry = listed[name]
        if (
            entry.get("size") != len(data)
            or entry.get("sha256") != hashlib.sha256(data).hexdigest()
        ):
            raise DataError(f"{where}: {name} does not match its manifest's size and SHA-256")
