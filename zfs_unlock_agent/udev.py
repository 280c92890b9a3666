"""Wait for device links of volumes whose key was just loaded, woken by udev events."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

POLL_INTERVAL = 0.25


class _Monitor(Protocol):
    def poll(self, timeout: float) -> object: ...


def wait_for_links(links: Sequence[Path], timeout: float) -> list[Path]:
    """Block until every link exists or TIMEOUT passes; return the ones still missing."""
    pending = [link for link in links if not link.exists()]
    if not pending:
        return []
    monitor = _block_monitor()
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


def _block_monitor() -> _Monitor | None:
    """A started pyudev monitor for block devices, or None where udev is not reachable."""
    with contextlib.suppress(Exception):
        import pyudev  # noqa: PLC0415 - only hosts with volumes pay for the import

        context = pyudev.Context()
        monitor = pyudev.Monitor.from_netlink(context)
        monitor.filter_by("block")
        monitor.start()
        return monitor  # type: ignore[no-any-return]
    return None
