"""`zfs-unlock-agent daemon` as a real process, with a notify socket the test reads.

The daemon runs the console script with NOTIFY_SOCKET pointing at an AF_UNIX
datagram socket (as systemd's Type=notify does) and, when asked, WATCHDOG_USEC.
Its stderr goes to a file the test can read while it runs. Every daemon is
stopped and reaped by the fixture that started it, with its process group.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.agent.harness import AGENT_BIN, AgentHost
from tests.keyserver import toml_value

# Inherited variables that would change how the daemon behaves or where it reports.
SYSTEMD_VARIABLES = (
    "NOTIFY_SOCKET",
    "WATCHDOG_USEC",
    "WATCHDOG_PID",
    "INVOCATION_ID",
    "JOURNAL_STREAM",
    "LISTEN_FDS",
    "LISTEN_PID",
)

WAIT = 30.0  # the bound for anything the daemon should do "soon"


@dataclass(frozen=True)
class Message:
    """One sd_notify datagram: its fields, and when the test received it (monotonic)."""

    at: float
    data: bytes
    raw: str
    fields: dict[str, str]

    def has(self, name: str, value: str | None = None) -> bool:
        return name in self.fields and (value is None or self.fields[name] == value)

    @property
    def ready(self) -> bool:
        return self.has("READY", "1")

    @property
    def status(self) -> str | None:
        return self.fields.get("STATUS")


class NotifySocket:
    """What systemd would read: a bound AF_UNIX datagram socket, in a short path."""

    def __init__(self) -> None:
        # sun_path holds 108 bytes; pytest's tmp_path can be longer than that.
        self._dir = tempfile.TemporaryDirectory(prefix="zua-notify-")
        self.path = Path(self._dir.name) / "notify"
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sock.bind(str(self.path))
        self.messages: list[Message] = []
        self._cursor = 0

    def close(self) -> None:
        self._sock.close()
        self._dir.cleanup()

    def _receive(self, timeout: float) -> bool:
        self._sock.settimeout(timeout if timeout > 0 else 0.0)  # 0.0: do not block
        try:
            data = self._sock.recv(65536)
        except (TimeoutError, BlockingIOError):
            return False
        text = data.decode("utf-8", "replace")
        fields = dict(line.split("=", 1) for line in text.split("\n") if "=" in line)
        self.messages.append(Message(time.monotonic(), data, text, fields))
        return True

    def collect(self, seconds: float) -> list[Message]:
        """Everything that arrives during SECONDS (and what is queued already)."""
        start = len(self.messages)
        end = time.monotonic() + seconds
        while (left := end - time.monotonic()) > 0:
            self._receive(left)
        while self._receive(0):
            pass
        return self.messages[start:]

    def expect(
        self,
        predicate: Callable[[Message], bool],
        timeout: float = WAIT,
        alive: Callable[[], bool] = lambda: True,
    ) -> Message:
        """The next message (after the last one expect() returned) that matches; fails
        after TIMEOUT, or as soon as ALIVE says the sender is gone and nothing is queued."""
        end = time.monotonic() + timeout
        while True:
            while self._cursor < len(self.messages):
                message = self.messages[self._cursor]
                self._cursor += 1
                if predicate(message):
                    return message
            left = end - time.monotonic()
            gone = not alive()
            if left <= 0 or (gone and not self._receive(0)):
                seen = [m.raw for m in self.messages]
                why = "the sender exited" if gone else f"nothing in {timeout} s"
                raise AssertionError(f"no matching notify message ({why}); got {seen}")
            self._receive(min(left, 0.2))

    def received(self, predicate: Callable[[Message], bool]) -> list[Message]:
        while self._receive(0):
            pass
        return [m for m in self.messages if predicate(m)]


@dataclass
class DaemonProcess:
    process: subprocess.Popen[bytes]
    notify: NotifySocket
    log_path: Path
    started: float = field(default_factory=time.monotonic)

    @property
    def pid(self) -> int:
        return self.process.pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def alive(self) -> bool:
        return self.process.poll() is None

    def expect(self, predicate: Callable[[Message], bool], timeout: float = WAIT) -> Message:
        """The next matching notify message; fails early, with the log, if the daemon exits."""
        try:
            return self.notify.expect(predicate, timeout, self.alive)
        except AssertionError as exc:
            raise AssertionError(f"{exc}\ndaemon log:\n{self.log()}") from None

    def expect_ready(self, timeout: float = WAIT) -> Message:
        return self.expect(lambda m: m.ready, timeout)

    def wait_log(self, pattern: str, count: int = 1, timeout: float = WAIT) -> list[re.Match[str]]:
        """Wait until PATTERN matches COUNT lines of the log; fail if the daemon exits."""
        end = time.monotonic() + timeout
        while True:
            found = list(re.finditer(pattern, self.log(), re.MULTILINE))
            if len(found) >= count:
                return found
            if not self.alive():
                raise AssertionError(
                    f"daemon exited ({self.process.returncode}) before {count} x {pattern!r}:\n"
                    + self.log()
                )
            if time.monotonic() > end:
                raise AssertionError(
                    f"{count} x {pattern!r} not logged in {timeout} s:\n{self.log()}"
                )
            time.sleep(0.1)

    def send(self, sig: int) -> None:
        self.process.send_signal(sig)

    def terminate(self, timeout: float = 10.0) -> int:
        """SIGTERM, then the exit status; fails if it takes longer than TIMEOUT."""
        self.send(signal.SIGTERM)
        try:
            return self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"daemon still running {timeout} s after SIGTERM") from None

    def wait_exit(self, timeout: float = WAIT) -> int:
        return self.process.wait(timeout=timeout)

    def reap(self) -> None:
        """Kill whatever is left of it (its process group: fake zfs calls included)."""
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=30)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)  # children it left behind


def daemon_table(**settings: Any) -> str:
    """A [daemon] table for AgentHost.write_config(extra=...)."""
    return "[daemon]\n" + "".join(f"{k} = {toml_value(v)}\n" for k, v in settings.items())


class Daemons:
    """Starts daemons for one test and stops every one of them afterwards."""

    def __init__(self) -> None:
        self._started: list[DaemonProcess] = []

    def start(
        self,
        host: AgentHost,
        *args: str,
        watchdog_usec: int | None = None,
        env: Mapping[str, str | None] | None = None,
    ) -> DaemonProcess:
        """ENV adds to the inherited environment; a None value removes a variable."""
        notify = NotifySocket()
        environment = {k: v for k, v in os.environ.items() if k not in SYSTEMD_VARIABLES}
        environment["NOTIFY_SOCKET"] = str(notify.path)
        if watchdog_usec is not None:
            environment["WATCHDOG_USEC"] = str(watchdog_usec)
        for name, value in (env or {}).items():
            if value is None:
                environment.pop(name, None)
            else:
                environment[name] = value
        log_path = host.root / f"daemon-{len(self._started)}.log"
        with log_path.open("wb") as log:
            process = subprocess.Popen(
                [str(AGENT_BIN), "-c", str(host.config_path), "daemon", *args],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=environment,
                start_new_session=True,
            )
        daemon = DaemonProcess(process, notify, log_path)
        self._started.append(daemon)
        return daemon

    def stop_all(self) -> None:
        for daemon in self._started:
            daemon.reap()
            daemon.notify.close()
