"""What the rollovers of the server's TLS key (tlsrotate.py) and of the hosts' CA
(carotate.py) share: a next key pair made beside the live one, and an activation that
waits for the hosts, then moves the pair into place with two renames, the key first (a
run killed between them is finished by the next: the next key is then already live)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from zfs_unlock_common.syncdir import sync_directory
from zfs_unlock_server import pki, secretfile
from zfs_unlock_server.errors import DataError, NotYet


@dataclass(frozen=True)
class Pair:
    """Where a next key pair is, and the live pair it replaces."""

    next_cert: Path
    next_key: Path
    live_cert: Path
    live_key: Path

    def half_moved(self) -> bool:
        """An activation was killed between its renames: the next key is live already."""
        return not self.next_key.exists()

    def next_key_now(self) -> Path:
        """The next pair's key: still beside it, or already live (a killed activation)."""
        return self.next_key if self.next_key.exists() else self.live_key

    def check(self) -> None:
        """Refuse a next certificate whose key is not where it must be (DataError)."""
        key = self.next_key_now()
        try:
            pki.check_key_pair(self.next_cert.read_bytes(), secretfile.read_private(key))
        except DataError:
            raise DataError(
                f"{key} is not the private key of {self.next_cert}; nothing was changed"
            ) from None

    def move_into_place(self) -> None:
        if self.next_key.exists():  # absent when a killed activation got this far
            os.replace(self.next_key, self.live_key)
        os.replace(self.next_cert, self.live_cert)
        sync_directory(self.live_cert.parent)


def refuse_while_waiting(names: Sequence[str], waiting_for: str, force: bool) -> None:
    """NotYet naming the hosts (the first ten) that would be locked out, unless FORCE.
    WAITING_FOR completes "N enabled host(s) ...": what they have not done yet, and how
    they will, and what --force costs them."""
    if not names or force:
        return
    shown = ", ".join(names[:10]) + (f" and {len(names) - 10} more" if len(names) > 10 else "")
    raise NotYet(f"{len(names)} enabled host(s) {waiting_for.format(hosts=shown)}")
