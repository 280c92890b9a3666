"""Tell systemd how the daemon is doing: READY, STATUS, RELOADING, STOPPING and the watchdog.

Without $NOTIFY_SOCKET (not started by systemd with Type=notify) every call does nothing.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping

import sdnotify


class Notifier:
    def __init__(
        self,
        environ: Mapping[str, str] = os.environ,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._notifier = sdnotify.SystemdNotifier() if environ.get("NOTIFY_SOCKET") else None
        self._clock = clock
        self.watchdog_interval: float | None = None
        usec = environ.get("WATCHDOG_USEC", "")
        pid = environ.get("WATCHDOG_PID", "")
        if usec.isdigit() and int(usec) > 0 and (not pid or pid == str(os.getpid())):
            # Ping at half the timeout, as sd_watchdog_enabled(3) recommends.
            self.watchdog_interval = int(usec) / 2_000_000
        self._last_ping = clock()

    def _send(self, *fields: str) -> None:
        if self._notifier is not None:
            self._notifier.notify("\n".join(fields))

    def status(self, text: str) -> None:
        self._send(f"STATUS={text}")

    def ready(self, text: str) -> None:
        self._send("READY=1", f"STATUS={text}")

    def reloading(self) -> None:
        monotonic_usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        self._send("RELOADING=1", f"MONOTONIC_USEC={monotonic_usec}")

    def stopping(self) -> None:
        self._send("STOPPING=1", "STATUS=stopping")

    def next_ping(self) -> float:
        """When the watchdog must next hear from us (infinity without a watchdog)."""
        if self.watchdog_interval is None:
            return float("inf")
        return self._last_ping + self.watchdog_interval

    def ping(self) -> None:
        """Pet the watchdog if it is due. Called from the main loop only, so a loop stuck
        for longer than WatchdogSec= gets the service restarted."""
        if self.watchdog_interval is not None and self._clock() >= self.next_ping():
            self._send("WATCHDOG=1")
            self._last_ping = self._clock()
