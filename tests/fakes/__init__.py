"""Test doubles for system commands: a stateful fake zfs/zpool (see fake_zfs.py)."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import itertools
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tests.fakes.fake_zfs import key_digest, lock_path

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

    @contextlib.contextmanager
    def _locked(self, operation: int) -> Iterator[None]:
        """The fake's lock: safe to use while an agent process calls the fake."""
        with lock_path(self.state_path).open("a") as lock:
            fcntl.flock(lock, operation)
            yield

    def load(self) -> dict[str, Any]:
        with self._locked(fcntl.LOCK_SH):
            state: dict[str, Any] = json.loads(self.state_path.read_text())
        return state

    def save(self, state: dict[str, Any]) -> None:
        with self._locked(fcntl.LOCK_EX):
            self.state_path.write_text(json.dumps(state, indent=1))

    @contextlib.contextmanager
    def edit(self) -> Iterator[dict[str, Any]]:
        """Read, change and write the state as one step (no lost update)."""
        with self._locked(fcntl.LOCK_EX):
            state: dict[str, Any] = json.loads(self.state_path.read_text())
            yield state
            self.state_path.write_text(json.dumps(state, indent=1))

    def add_pool(self, name: str, guid: str | None = None) -> str:
        guid = guid or str(next(_guids))
        with self.edit() as state:
            state["pools"][name] = {"guid": guid}
            state["datasets"][name] = {
                "type": "filesystem",
                "guid": str(next(_guids)),
                "mounted": True,
            }
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
        with self.edit() as state:
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
        return guid

    def add_child(self, name: str, **extra: Any) -> str:
        """A dataset inheriting its parent's encryption root."""
        guid = str(next(_guids))
        with self.edit() as state:
            parent = state["datasets"][name.rsplit("/", 1)[0]]
            state["datasets"][name] = {
                "type": "filesystem",
                "guid": guid,
                "encryptionroot": parent.get("encryptionroot", ""),
                "mounted": False,
                **extra,
            }
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
        with self._locked(fcntl.LOCK_SH):
            text = self.log_path.read_text()
        calls = [json.loads(line) for line in text.splitlines()]
        return [c for c in calls if [c["program"], *c["argv"]][: len(words)] == list(words)]


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
