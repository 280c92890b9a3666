"""Server pins learned from the key server itself, kept in the agent's state directory.

The server announces the pins to trust (the one it serves, and the next one `tls next`
made) in each check-in's answer, inside a channel this host already pins: a pin learned
that way is as trustworthy as the pin that protected the answer. They are kept beside the
pins in agent.toml, never in place of them, and copied into the initramfs (bootfiles.py),
so that the boot after the server's switch already trusts the new key.

A pin no server has announced for FORGET_AFTER is dropped: after a rollover the old key
stops being announced, and this host stops trusting it a month later. The file holds no
secret, but whoever can write it chooses which servers this host trusts: it must be a
regular file writable by nobody but its owner, root or this process's user.
"""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Iterable
from pathlib import Path

from zfs_unlock_agent import durable
from zfs_unlock_agent.errors import ConfigError
from zfs_unlock_common import pinning

FILE_NAME = "pins.json"
FORMAT = 1
FORGET_AFTER = 30 * 86400
REFRESH_AFTER = 86400


class LearnedPins:
    """The learned pins, as the file holds them (a plain class: dataclasses would cost
    every unlock, at every boot, the import of inspect)."""

    def __init__(self, path: Path, announced: dict[str, int] | None = None) -> None:
        self.path = path
        # pin text ("sha256//...") -> when a server last announced it (Unix time)
        self.announced: dict[str, int] = dict(announced or {})
        # Whether memory differs from the file: the set changed, or a pin was announced
        # again a day or more after the time the file holds for it (kept fresh for
        # FORGET_AFTER).
        self.dirty = False

    def copy(self) -> LearnedPins:
        twin = LearnedPins(self.path, self.announced)
        twin.dirty = self.dirty
        return twin

    def digests(self) -> tuple[bytes, ...]:
        return tuple(pinning.parse_pin(p) for p in sorted(self.announced))

    def learn(self, pins: Iterable[str], configured: Iterable[str], now: int) -> bool:
        """Take an announcement: PINS are the ones a server vouches for now. Those already
        in agent.toml (CONFIGURED) are not kept twice; pins unannounced for FORGET_AFTER are
        dropped. True when the set of pins changed (and so the initramfs must be rebuilt:
        the caller marks it stale before saving)."""
        before = set(self.announced)
        skip = set(configured)
        for pin in pins:
            if pin in skip:
                continue
            # Moved forward at most daily, so that memory and file agree in between.
            if pin not in self.announced or now - self.announced[pin] >= REFRESH_AFTER:
                self.announced[pin] = now
                self.dirty = True
        for pin, when in list(self.announced.items()):
            if when < now - FORGET_AFTER:
                del self.announced[pin]
        changed = set(self.announced) != before
        self.dirty |= changed
        return changed

    def save(self) -> None:
        """Replace the file atomically (0644: it is copied into the initramfs as is)."""
        document = {"format": FORMAT, "pins": self.announced}
        self.path.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
        durable.replace(self.path, (json.dumps(document, indent=1, sort_keys=True) + "\n").encode())
        self.dirty = False


def load(state_directory: Path) -> LearnedPins:
    """The pins learned so far (none when the file does not exist). A file that others
    may write, or that is not what save() writes, is a ConfigError: trusting it would let
    them choose this host's servers."""
    path = state_directory / FILE_NAME
    try:
        descriptor = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        return LearnedPins(path)
    except OSError as exc:
        raise ConfigError(f"learned pins {path}: cannot read: {exc.strerror}") from None
    with os.fdopen(descriptor, "rb") as handle:
        info = os.fstat(handle.fileno())
        if not stat.S_ISREG(info.st_mode):
            raise ConfigError(f"learned pins {path}: not a regular file")
        if info.st_uid not in (0, os.geteuid()) or info.st_mode & 0o022:
            raise ConfigError(
                f"learned pins {path}: others may change it (owner {info.st_uid}, mode"
                f" {stat.S_IMODE(info.st_mode):04o}); it must be root's and not group- or"
                " world-writable, or removed (the host learns the pins again at its next"
                " check-in)"
            )
        raw = handle.read(64 * 1024)
    return LearnedPins(path, _parse(raw, path))


def _parse(raw: bytes, path: Path) -> dict[str, int]:
    broken = ConfigError(
        f"learned pins {path}: not a pin file of this agent; remove it (the host learns"
        " the pins again at its next check-in)"
    )
    try:
        document = json.loads(raw)
    except ValueError:
        raise broken from None
    if not isinstance(document, dict) or document.get("format") != FORMAT:
        raise broken
    pins = document.get("pins")
    if not isinstance(pins, dict) or set(document) != {"format", "pins"}:
        raise broken
    for pin, when in pins.items():
        if not isinstance(when, int) or isinstance(when, bool):
            raise broken
        try:
            pinning.parse_pin(pin)
        except pinning.PinError:
            raise broken from None
    return dict(pins)
