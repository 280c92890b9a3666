"""udev, through pyudev: wait for volumes' device links; notice disks that carry a pool."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

POLL_INTERVAL = 0.25


class _Monitor(Protocol):
    def poll(self, timeout: float) -> object: ...

    def fileno(self) -> int: ...


def wait_for_links(links: Sequence[Path], timeout: float) -> list[Path]:
    """Block until every link exists or TIMEOUT passes; return the ones still missing."""
    pending = [link for link in links if not link.exists()]
    if not pending:
        return []
    monitor = block_monitor()
    deadline = time.monotonic() + timeout
    while pending:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            break
        if monitor is not None:
            # Wake on any block device event; re-check existence at least this often
            # because the event may have come before the monitor started.
            monitor.poll(timeout=min(POLL_INTERVAL, remaining))
        else:
            time.sleep(min(POLL_INTERVAL, remaining))
        pending = [link for link in pending if not link.exists()]
    return pending


def block_monitor() -> _Monitor | None:
    """A started pyudev monitor for block devices, or None where udev is not reachable."""
    with contextlib.suppress(Exception):
        import pyudev  # noqa: PLC0415 - only hosts with volumes pay for the import

        context = pyudev.Context()
        monitor = pyudev.Monitor.from_netlink(context)
        monitor.filter_by("block")
        monitor.start()
        return monitor  # type: ignore[no-any-return]
    return None


class PoolDiskWatch:
    """Reports block devices that appeared or changed and carry a ZFS label: a pool that
    may be imported soon (a USB backup disk, a hot-plugged drive)."""

    def __init__(self) -> None:
        self._monitor = block_monitor()

    def fileno(self) -> int | None:
        return self._monitor.fileno() if self._monitor is not None else None

    def drain(self) -> bool:
        """Consume the queued events; True when one of them was a ZFS member disk."""
        seen = False
        if self._monitor is None:
            return seen
        while (device := self._monitor.poll(timeout=0)) is not None:
            action = getattr(device, "action", None)
            get = getattr(device, "get", None)
            if (
                action in ("add", "change")
                and get is not None
                and get("ID_FS_TYPE") == "zfs_member"
            ):
                seen = True
        return seen
