"""`recover`: unlock with a recovery kit instead of the key server (docs/recovery-kit.md).

The kit is decrypted with `age` into memory only. Its keys are matched to this host's
encryption roots by pool GUID and dataset GUID (the dataset name is informational: a
renamed dataset still matches, a key of another pool or host never does) and handed to
the Unlocker, which loads and mounts them as it does the server's.
"""

from __future__ import annotations

import base64
import binascii
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from zfs_unlock_agent.errors import EX_DATAERR, BadKit, InputMissing, KitRefused, ToolMissing
from zfs_unlock_agent.keyclient import ReleasedKey
from zfs_unlock_agent.secret import Secret
from zfs_unlock_agent.unlock import RootResult
from zfs_unlock_agent.zfs import Dataset, Inventory
from zfs_unlock_common import age, protocol, validate
from zfs_unlock_common.protocol import DatasetRef

MAGIC = b"# zfs-unlock-recovery-kit version "
VERSION = b"1"
COLUMNS = 9  # host machine_id pool_guid dataset_guid keyformat key_id state key_base64 dataset
_END = re.compile(rb"# end of kit: (\d+) keys")
_GUID = re.compile(rb"\d{1,20}")


@dataclass(frozen=True)
class KitKey:
    host: str
    pool_guid: str
    dataset_guid: str  # "-" for a key imported by name only (SimpleZFSKeySystem)
    keyformat: str
    key_id: str
    state: str
    dataset: str
    encoded: bytearray  # the key, base64; wiped by Kit.wipe()

    def matches(self, pool_guid: str, root: Dataset) -> bool:
        if self.pool_guid != pool_guid:
            return False
        if self.dataset_guid == "-":
            return self.dataset == root.name  # as the key server matches such keys
        return self.dataset_guid == root.guid


@dataclass
class Kit:
    path: Path
    keys: list[KitKey] = field(default_factory=list)

    def find(self, pool_guid: str, root: Dataset, next_key: bool = False) -> KitKey | None:
        """ROOT's key; with NEXT_KEY, the next key of a rotation begun when the kit was made."""
        return next(
            (
                k
                for k in self.keys
                if k.matches(pool_guid, root) and (k.state == "next") == next_key
            ),
            None,
        )

    def wipe(self) -> None:
        for key in self.keys:
            key.encoded[:] = bytes(len(key.encoded))

    def source(
        self, inventory: Inventory, locked: Sequence[Dataset], results: dict[str, RootResult]
    ) -> dict[str, ReleasedKey]:
        """The Unlocker's KeySource: each locked root's key from the kit, checked against
        the root's keyformat as the server's keys are; why a root got none, in RESULTS."""
        keys: dict[str, ReleasedKey] = {}
        for root in locked:
            pool_guid = inventory.pool_guids.get(root.pool, "")
            entry = self.find(pool_guid, root)
            if entry is None:
                results[root.name] = RootResult(
                    root.name,
                    "failed",
                    EX_DATAERR,
                    f"{self.path} holds no key for it (pool GUID {pool_guid or '?'},"
                    f" dataset GUID {root.guid})",
                )
                continue
            problem, secret = _checked(entry, root)
            if secret is None:
                results[root.name] = RootResult(root.name, "failed", EX_DATAERR, problem)
                continue
            ref = DatasetRef(pool_guid, root.guid)
            key = ReleasedKey(ref, entry.key_id, entry.keyformat, entry.state, secret)
            upcoming = self.find(pool_guid, root, next_key=True)
            if upcoming is not None:  # tried when the key before it does not open the root
                _, next_secret = _checked(upcoming, root)
                if next_secret is not None:
                    next_key = ReleasedKey(
                        ref, upcoming.key_id, upcoming.keyformat, "next", next_secret
                    )
                    key = key._replace(next=next_key)
            keys[root.name] = key
        return keys


def _checked(entry: KitKey, root: Dataset) -> tuple[str, Secret | None]:
    """ENTRY's key for ROOT, or why it must not go to zfs."""
    where = f"the kit's key {entry.key_id}"
    if entry.keyformat != root.keyformat:
        return f"{where} is {entry.keyformat} but the dataset's keyformat is {root.keyformat}", None
    try:
        secret = Secret(base64.b64decode(entry.encoded, validate=True))
    except binascii.Error:
        return f"{where} is not valid base64", None
    try:
        protocol.check_key_material(secret.buffer(), root.keyformat)
    except protocol.KeyMaterialError as exc:
        secret.wipe()
        return f"{where} does not fit: {exc}", None
    return "", secret


def read_kit(path: Path, identity: Path) -> Kit:
    """Decrypt PATH with IDENTITY (age) and parse it; the plaintext is wiped here."""
    for name, file in (("--kit", path), ("--identity", identity)):
        if not os.access(file, os.R_OK) or not file.is_file():
            raise InputMissing(f"{name} {file}: cannot be read")
    try:
        plaintext = age.decrypt(path, identity)
    except age.AgeFailed as exc:
        if exc.reason == "missing":
            raise ToolMissing(str(exc)) from None
        if exc.reason == "identity":
            raise KitRefused(f"{identity} does not open {path}: {exc}") from None
        raise BadKit(f"{path}: cannot be decrypted, damaged or truncated? ({exc})") from None
    except OSError as exc:
        raise InputMissing(f"--kit {path}: {exc.strerror}") from None
    try:
        return parse(path, plaintext)
    finally:
        plaintext[:] = bytes(len(plaintext))


def parse(path: Path, plaintext: bytearray) -> Kit:
    lines = plaintext.split(b"\n")
    try:
        return _parse(path, lines)
    finally:
        for line in lines:
            line[:] = bytes(len(line))


def _parse(path: Path, lines: list[bytearray]) -> Kit:
    first = bytes(lines[0]) if lines else b""
    if not first.startswith(MAGIC):
        raise BadKit(f"{path}: not a zfs-unlock recovery kit")
    version = first.removeprefix(MAGIC)
    if version != VERSION:
        shown = version.decode("ascii", "replace")[:20]
        raise BadKit(
            f"{path}: kit format version {shown} is not supported (this agent reads version 1)"
        )
    if lines[-1] or len(lines) < 2:
        raise BadKit(f"{path}: truncated (no end line)")
    end = _END.fullmatch(bytes(lines[-2]))
    kit = Kit(path)
    for number, line in enumerate(lines[1:-2], start=2):
        if line.startswith(b"#"):
            continue
        kit.keys.append(_entry(path, number, line))
    if end is None or int(end[1]) != len(kit.keys):
        kit.wipe()
        raise BadKit(f"{path}: truncated or damaged (its end line does not count its keys)")
    return kit


def _entry(path: Path, number: int, line: bytearray) -> KitKey:
    fields = line.split(b"\t")
    try:
        if len(fields) != COLUMNS:
            raise ValueError
        host, _, pool, dataset_guid, keyformat, key_id, state, encoded, dataset = fields
        if not _GUID.fullmatch(pool) or not (dataset_guid == b"-" or _GUID.fullmatch(dataset_guid)):
            raise ValueError
        text = [bytes(f).decode("ascii") for f in (host, pool, dataset_guid, keyformat, key_id)]
        if text[3] not in protocol.KEY_FORMATS:
            raise ValueError
        name = validate.dataset_name(bytes(dataset).decode("utf-8"))
        return KitKey(
            text[0], text[1], text[2], text[3], text[4], bytes(state).decode(), name, encoded
        )
    except (ValueError, validate.InvalidInput):
        for f in fields:
            f[:] = bytes(len(f))
        raise BadKit(f"{path}: line {number} is not a kit entry") from None
