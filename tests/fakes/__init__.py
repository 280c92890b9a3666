"""Test doubles for system commands: a stateful fake zfs/zpool (see fake_zfs.py)."""

from __future__ import annotations

import hashlib
import itertools
import json
import sys
from pathlib import Path
from typing import Any

from tests.fakes.fake_zfs import key_digest

FAKE = Path(__file__).with_name("fake_zfs.py")
_guids = itertools.count(7000000000000000001)


class FakeZfs:
    """Owns a state file, a call log and two wrapper executables, bin/zfs and bin/zpool."""

    def __init__(self, root: Path) -> None:
        root.mkdir(parents=True, exist_ok=True)
        self.state_path = root / "zfs-state.json"
        self.log_path = root / "zfs-calls.jsonl"
        self.zvol_dir = root / "zvol"
        self.bin_dir = root / "bin"
        self.bin_dir.mkdir(exist_ok=True)
        self.log_path.touch()
        for program in ("zfs", "zpool"):
            wrapper = self.bin_dir / program
            wrapper.write_text(
                f'#!/bin/sh\nexec "{sys.executable}" "{FAKE}" --state "{self.state_path}"'
                f' --log "{self.log_path}" {program} "$@"\n'
            )
            wrapper.chmod(0o755)
        self.save({"pools": {}, "datasets": {}, "zvol_dir": str(self.zvol_dir)})

    @property
    def zfs(self) -> str:
        return str(self.bin_dir / "zfs")

    @property
    def zpool(self) -> str:
        return str(self.bin_dir / "zpool")

    def load(self) -> dict[str, Any]:
        state: dict[str, Any] = json.loads(self.state_path.read_text())
        return state

    def save(self, state: dict[str, Any]) -> None:
        self.state_path.write_text(json.dumps(state, indent=1))

    def add_pool(self, name: str, guid: str | None = None) -> str:
        guid = guid or str(next(_guids))
        state = self.load()
        state["pools"][name] = {"guid": guid}
        state["datasets"][name] = {"type": "filesystem", "guid": str(next(_guids)), "mounted": True}
        self.save(state)
        return guid

    def add_encrypted(
        self,
        name: str,
        key: bytes,
        keyformat: str = "raw",
        keystatus: str = "unavailable",
        managed: bool = True,
        keylocation: str = "prompt",
        **extra: Any,
    ) -> str:
        """An encryption root whose key is KEY (as it would be piped to zfs)."""
        guid = str(next(_guids))
        state = self.load()
        state["datasets"][name] = {
            "type": "filesystem",
            "guid": guid,
            "encryptionroot": name,
            "keyformat": keyformat,
            "keylocation": keylocation,
            "key": key_digest(key, keyformat),
            "keystatus": keystatus,
            "mounted": keystatus == "available",
            "props": {"zfs-unlock-agent:managed": "on"} if managed else {},
            **extra,
        }
        self.save(state)
        return guid

    def add_child(self, name: str, **extra: Any) -> str:
        """A dataset inheriting its parent's encryption root."""
        guid = str(next(_guids))
        state = self.load()
        parent = state["datasets"][name.rsplit("/", 1)[0]]
        state["datasets"][name] = {
            "type": "filesystem",
            "guid": guid,
            "encryptionroot": parent.get("encryptionroot", ""),
            "mounted": False,
            **extra,
        }
        self.save(state)
        return guid

    def dataset(self, name: str) -> dict[str, Any]:
        ds: dict[str, Any] = self.load()["datasets"][name]
        return ds

    def keystatus(self, name: str) -> str:
        state = self.load()
        root = state["datasets"][name]["encryptionroot"]
        return str(state["datasets"][root]["keystatus"])

    def calls(self, *words: str) -> list[dict[str, Any]]:
        """Logged calls whose program and argv start with WORDS (e.g. 'zfs', 'load-key')."""
        calls = [json.loads(line) for line in self.log_path.read_text().splitlines()]
        return [c for c in calls if [c["program"], *c["argv"]][: len(words)] == list(words)]


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
