"""`zfs-unlock-agent boot-unlock`: in an initramfs, the key server and the person at the
console race to open one encryption root; the first key that loads wins.

Three tasks run at once, and `zfs load-key` judges every candidate key:

- the network asks the key servers, with the agent's backoff, for as long as the race
  lasts (or until --deadline);
- the prompt appears a short grace period after the network is up (or after
  NETWORK_WAIT seconds without it), so that a healthy network unlock never shows it, on
  the console or through plymouth when it runs; a typed key that does not load says so
  and asks again;
- the watcher reads the root's keystatus, so that a key loaded some other way (OpenZFS's
  `zfsunlock` over SSH) ends the race too.

The first key that loads ends the race: the prompt is taken down, and the process exits,
which ends the other tasks with it. A raw key cannot be typed: the console says what to do
instead.
"""

from __future__ import annotations

import contextlib
import os
import select
import shutil
import signal
import subprocess
import termios
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from types import FrameType
from typing import Any, Protocol

from zfs_unlock_agent.errors import (
    EX_BADKEY,
    EX_NOPERM,
    EX_OK,
    EX_TEMPFAIL,
    EX_UNAVAILABLE,
    AgentError,
    KeyAlreadyLoaded,
    ZfsError,
)
from zfs_unlock_agent.keyclient import KeyClient, ReleasedKey
from zfs_unlock_agent.log import log
from zfs_unlock_agent.secret import Secret
from zfs_unlock_agent.unlock import RootResult, Unlocker
from zfs_unlock_agent.zfs import TYPABLE_KEYFORMATS, Dataset, Inventory
from zfs_unlock_common.protocol import DatasetRef

GRACE_SECONDS = 2.0  # the prompt waits this long for the key server, once the network is up
NETWORK_WAIT = 15.0  # the longest wait for the network to come up before the grace starts
WATCH_SECONDS = 1.0  # how often the watcher reads the keystatus
_POLL_SECONDS = 0.2  # how often a waiting prompt looks whether the race is over
_MAX_TYPED = 1024  # bytes of one typed line; OpenZFS takes passphrases up to 512

# The winners, as the console tells them.
BY_SERVER = "the key server's key"
BY_TYPED = "the typed key"
BY_OTHER = "a key loaded from elsewhere (zfsunlock, or an SSH session)"
STOPPED = "stopped by a signal"


class Race:
    """Who won, once somebody has, and which keys are on their way into zfs (so that the
    watcher does not credit somebody else with a key that is being loaded here)."""

    def __init__(self) -> None:
        self.over = threading.Event()
        self.network_up = threading.Event()  # the network is up, or the wait for it is over
        self.prompt_may_start = threading.Event()  # the grace is over, or the network gave up
        self.prompt_shown = threading.Event()
        self.network_gave_up = threading.Event()
        self.winner = ""
        self._loading = 0
        self._lock = threading.Lock()

    def finish(self, winner: str) -> None:
        with self._lock:
            if not self.over.is_set():
                self.winner = winner
                self.over.set()
                self.network_up.set()
                self.prompt_may_start.set()

    def begin_load(self) -> None:
        """A key of ours is on its way into zfs: the watcher leaves the verdict to it."""
        with self._lock:
            self._loading += 1

    def end_load(self) -> None:
        with self._lock:
            self._loading -= 1

    @contextlib.contextmanager
    def loading(self) -> Iterator[None]:
        self.begin_load()
        try:
            yield
        finally:
            self.end_load()

    def finish_unless_loading(self, winner: str) -> None:
        with self._lock:
            if self._loading:
                return
        self.finish(winner)


class Prompt(Protocol):
    def ask(self, text: str, race: Race) -> Secret | None:
        """A typed line (empty: ask again), or None when the race ended first or nothing
        can be typed any more."""

    def say(self, text: str) -> None:
        """A line for the person at the console."""

    def close(self, last: str) -> None:
        """Take the prompt down for good (the race is over), then say LAST, if anything."""


class ConsolePrompt:
    """Asks on a terminal with echo off, as `zfs load-key` would; reads with select so
    that a key from the network can take the prompt down. Once closed, it writes nothing
    more and leaves echo on, whatever a late asking thread tries."""

    def __init__(self, fd_in: int, fd_out: int) -> None:
        self.fd = fd_in
        self.fd_out = fd_out
        self._saved: list[Any] | None = None
        self._closed = False
        self._lock = threading.Lock()

    def ask(self, text: str, race: Race) -> Secret | None:
        self._write(text)
        self._echo(False)
        buffer = bytearray(_MAX_TYPED)
        view = memoryview(buffer)
        used = 0
        try:
            while not race.over.is_set():
                ready, _, _ = select.select([self.fd], [], [], _POLL_SECONDS)
                if not ready:
                    continue
                if race.over.is_set():  # a line typed as the race ended is not used
                    return None
                count = os.readv(self.fd, [view[used:]])
                if count == 0:  # Ctrl-D on a terminal asks again; a closed pipe ends asking
                    return Secret(b"") if os.isatty(self.fd) else None
                used += count
                end = buffer.find(b"\n", 0, used)
                if end >= 0:
                    if buffer[end - 1 : end] == b"\r":
                        end -= 1
                    return Secret(view[:end])
                if used == len(buffer):
                    with contextlib.suppress(termios.error):
                        termios.tcflush(self.fd, termios.TCIFLUSH)  # the rest is no key either
                    self._write("\n")
                    self.say("That is too long for a key; try again.")
                    return Secret(b"")
            return None
        finally:
            view.release()
            buffer[:] = bytes(len(buffer))
            self._echo(True)
            self._write("\n")

    def say(self, text: str) -> None:
        self._write(text + "\n")

    def close(self, last: str) -> None:
        with self._lock:
            self._restore()
            if last:
                self._write_now(f"\n{last}\n")
            self._closed = True

    def _echo(self, on: bool) -> None:
        with self._lock:
            if on:
                self._restore()
                return
            if self._closed:
                return
            try:
                if self._saved is None:
                    self._saved = termios.tcgetattr(self.fd)
                quiet = termios.tcgetattr(self.fd)
                quiet[3] &= ~termios.ECHO
                termios.tcsetattr(self.fd, termios.TCSANOW, quiet)
            except termios.error:  # not a terminal (a pipe in a test): nothing to echo
                pass

    def _restore(self) -> None:
        if self._saved is not None:
            with contextlib.suppress(termios.error):
                termios.tcsetattr(self.fd, termios.TCSANOW, self._saved)
            self._saved = None

    def _write(self, text: str) -> None:
        with self._lock:
            if not self._closed:
                self._write_now(text)

    def _write_now(self, text: str) -> None:
        with contextlib.suppress(OSError):
            os.write(self.fd_out, text.encode())


class PlymouthPrompt:
    """Asks through plymouth's splash screen (`plymouth ask-for-password`)."""

    def __init__(self, plymouth: str) -> None:
        self.plymouth = plymouth
        self._asking: subprocess.Popen[bytes] | None = None
        self._closed = False
        self._lock = threading.Lock()

    def ask(self, text: str, race: Race) -> Secret | None:
        with self._lock:
            if self._closed:
                return None
            asking = self._asking = subprocess.Popen(  # noqa: S603 - a fixed program
                [self.plymouth, "ask-for-password", f"--prompt={text}"],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
            )
        stdout = asking.stdout
        if stdout is None:  # never: stdout=PIPE
            return None
        fd = stdout.fileno()
        buffer = bytearray(_MAX_TYPED)
        view = memoryview(buffer)
        used = 0
        try:
            while True:
                ready, _, _ = select.select([fd], [], [], _POLL_SECONDS)
                if race.over.is_set():
                    return None
                if not ready:
                    continue
                count = os.readv(fd, [view[used:]]) if used < len(buffer) else 0
                if count == 0:
                    break
                used += count
            if asking.wait() != 0:  # cancelled (Escape), or plymouth went away
                return None
            return Secret(view[:used])
        finally:
            self._take_down(asking)
            stdout.close()
            view.release()
            buffer[:] = bytes(len(buffer))

    def say(self, text: str) -> None:
        with self._lock:
            if self._closed:
                return
        self._message(text)

    def close(self, last: str) -> None:
        with self._lock:
            self._closed = True
            asking = self._asking
        if asking is not None:
            self._take_down(asking)
        if last:
            self._message(last)

    @staticmethod
    def _take_down(asking: subprocess.Popen[bytes]) -> None:
        """Ending the client takes its question off the splash screen."""
        if asking.poll() is None:
            asking.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            asking.wait(timeout=5)

    def _message(self, text: str) -> None:
        with contextlib.suppress(OSError, subprocess.TimeoutExpired):
            subprocess.run(  # noqa: S603 - a fixed program
                [self.plymouth, "display-message", f"--text={text}"],
                stdin=subprocess.DEVNULL,
                check=False,
                timeout=10,
            )


def plymouth_running() -> str | None:
    """plymouth's path when its daemon runs (`plymouth --ping`), else None."""
    plymouth = shutil.which("plymouth")
    if plymouth is None:
        return None
    try:
        pinged = subprocess.run(  # noqa: S603 - a fixed program
            [plymouth, "--ping"], stdin=subprocess.DEVNULL, check=False, timeout=10
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return plymouth if pinged.returncode == 0 else None


def console_prompt() -> ConsolePrompt:
    """The console: this process's own standard input and output when they are a terminal
    (an initramfs runs its scripts on /dev/console), else /dev/console itself."""
    if os.isatty(0) and os.isatty(1):
        return ConsolePrompt(0, 1)
    fd = os.open("/dev/console", os.O_RDWR | os.O_NOCTTY)
    return ConsolePrompt(fd, fd)


def any_prompt() -> Prompt:
    plymouth = plymouth_running()
    return PlymouthPrompt(plymouth) if plymouth is not None else console_prompt()


# CLIENT(RACE, REPORT, DEADLINE): a key client whose pauses end when RACE does, that tells
# REPORT of each failed try and gives up after DEADLINE seconds.
ClientFactory = Callable[[Race, Callable[[str], None], float], KeyClient]


class BootRace:
    def __init__(
        self,
        unlocker: Unlocker,
        client: ClientFactory,
        root: str,
        prompt: Callable[[], Prompt],
        grace: float = GRACE_SECONDS,
        deadline: float | None = None,
        network_up: Path | None = None,
        network_wait: float = NETWORK_WAIT,
        request_deadline: float = 60.0,
    ) -> None:
        """PROMPT() makes the prompt once the grace period is over (plymouth may have
        started meanwhile). NETWORK_UP: a file that appears once the network is up; the
        key server is asked, and the grace period starts, then, or after NETWORK_WAIT
        seconds without it. DEADLINE: stop asking the key server after that long (None:
        for as long as the race lasts). REQUEST_DEADLINE: how long one request to the
        servers may take, its retries included ([network] deadline)."""
        self.unlocker = unlocker
        self.client = client
        self.root = root
        self.make_prompt = prompt
        self.grace = grace
        self.network_up = network_up
        self.network_wait = network_wait
        self.deadline = deadline
        self.request_deadline = request_deadline
        self.race = Race()
        self.prompt: Prompt | None = None
        self.network_status = 0  # why the network side gave up, when it did
        self._key_in_hand = False

    def run(self, inventory: Inventory, managed: set[str]) -> int:
        """Race until a key is loaded (exit 0). Without a key: 69 for a root the agent
        does not manage (left to OpenZFS at once), the network side's status when nothing
        can be typed and the server gave up, 75 when a signal stopped the race. INVENTORY:
        the datasets as listed just before; MANAGED: the roots this host manages."""
        root = inventory.root_of(self.root)
        if root.keystatus == "available":
            log.info("%s: its key is loaded already", root.name)
            return EX_OK
        if root.name not in managed:
            log.info("%s: not managed by zfs-unlock-agent; left to OpenZFS", root.name)
            return EX_UNAVAILABLE
        typable = root.keyformat in TYPABLE_KEYFORMATS and root.keylocation == "prompt"
        if root.keylocation != "prompt" and self.deadline is None:
            # OpenZFS loads such a key from its keylocation once we are done: not forever.
            self.deadline = self.request_deadline
        if typable:
            log.info(
                "%s: asking the key server; a prompt follows %g s after the network is up,"
                " unless a key loads first",
                root.name,
                self.grace,
            )
        previous = {
            signum: signal.signal(signum, self._stop) for signum in (signal.SIGTERM, signal.SIGINT)
        }
        network = threading.Thread(target=self._network, args=(inventory, root), daemon=True)
        asking = threading.Thread(target=self._ask, args=(root,), daemon=True)
        for task in (
            network,
            asking,
            threading.Thread(target=self._watch, args=(root.name,), daemon=True),
        ):
            task.start()
        try:
            self._grace()
            while not self.race.over.wait(_POLL_SECONDS):
                if self.race.network_gave_up.is_set() and not typable:
                    break  # nobody can type this key: OpenZFS goes on its own way
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)
        return self._end(root, network, asking)

    def _end(self, root: Dataset, network: threading.Thread, asking: threading.Thread) -> int:
        winner = self.race.winner
        loaded = winner in (BY_SERVER, BY_TYPED, BY_OTHER)
        if not loaded:
            try:
                loaded = self.unlocker.zfs.keystatus(root.name) == "available"
            except AgentError:
                loaded = False
        self.race.finish(winner or "nobody")  # stops the other tasks' loops
        prompt = self.prompt
        if prompt is not None:
            last = "" if winner == BY_TYPED or not loaded else f"{root.name}: unlocked with"
            prompt.close(f"{last} {winner}; no key needed" if last else "")
            asking.join(_POLL_SECONDS * 3)  # its own clean-up (echo, the splash question)
        if winner == STOPPED:
            log.info("%s: stopped; its key is %s", root.name, "loaded" if loaded else "not loaded")
            return EX_OK if loaded else EX_TEMPFAIL
        if not loaded:
            log.error("%s: no key from the key server, and it cannot be typed", root.name)
            return self.network_status or EX_TEMPFAIL
        log.info("%s: unlocked with %s", root.name, winner)
        return EX_OK

    def _grace(self) -> None:
        """Wait for the network (at most NETWORK_WAIT), then the grace period; a network
        side that gave up, or the end of the race, cuts both short."""
        waiting = self.race.prompt_may_start
        if self.network_up is not None:
            until = time.monotonic() + self.network_wait
            while not self.network_up.exists() and time.monotonic() < until:
                if waiting.wait(0.1):
                    return
        self.race.network_up.set()
        waiting.wait(self.grace)
        waiting.set()

    def _stop(self, signum: int, frame: FrameType | None) -> None:
        self.race.finish(STOPPED)

    # The network

    def _network(self, inventory: Inventory, root: Dataset) -> None:
        # Asked before the network is up, the server would only pile up pauses (up to
        # backoff_max) that could hold its answer back past the grace period.
        self.race.network_up.wait()
        try:
            results = self.unlocker.unlock(inventory, [root], mount=False, source=self._fetch)
        except AgentError as exc:
            log.error("%s: %s", root.name, exc)
            results = [RootResult(root.name, "failed", exc.exit_code, str(exc))]
        finally:
            if self._key_in_hand:
                self.race.end_load()
        outcome = results[0]
        if outcome.outcome == "unlocked":
            self.race.finish(BY_SERVER)
        elif outcome.outcome == "available" and outcome.message != _RACE_OVER:
            self.race.finish(BY_OTHER)
        elif not self.race.over.is_set():
            self.network_status = outcome.exit_code
            self.race.network_gave_up.set()
            self.race.prompt_may_start.set()  # nothing more will come from the network

    def _fetch(
        self, inventory: Inventory, locked: Sequence[Dataset], results: dict[str, RootResult]
    ) -> dict[str, ReleasedKey]:
        """The key source of Unlocker.unlock: asks until the server answers, the race ends,
        or the deadline passes. Only a failure that retrying cannot mend ends it early."""
        [root] = locked
        ref = DatasetRef(inventory.pool_guid(root), root.guid)
        limit = self.request_deadline
        until = None if self.deadline is None else time.monotonic() + self.deadline
        while not self.race.over.is_set():
            left = limit if until is None else min(limit, until - time.monotonic())
            try:
                if left <= 0:
                    raise DeadlinePassed
                with self.client(self.race, self.progress, left) as client:
                    batch = client.release(
                        self.unlocker.machine_id, [ref], self.unlocker.ticket, self.race.over.is_set
                    )
            except DeadlinePassed:
                results[root.name] = RootResult(
                    root.name, "failed", EX_TEMPFAIL, "no key from the key server in time"
                )
                return {}
            except AgentError as exc:
                if exc.exit_code == EX_TEMPFAIL and (until is None or time.monotonic() < until):
                    self.progress(f"{root.name}: no key from the key server yet ({exc})")
                    continue
                results[root.name] = RootResult(root.name, "failed", exc.exit_code, str(exc))
                return {}
            if ref in batch.waiting:  # asked again, for the same request, while the race lasts
                self.progress(f"{root.name}: approval {batch.approval} is still pending")
                continue
            released = batch.released
            if ref not in released:
                results[root.name] = RootResult(
                    root.name, "failed", EX_NOPERM, "the key server refused to release its key"
                )
                return {}
            if self.race.over.is_set():
                released[ref].wipe()
                break
            self._key_in_hand = True  # ended by _network, once Unlocker.unlock has loaded it
            self.race.begin_load()
            return {root.name: released[ref]}
        results[root.name] = RootResult(root.name, "available", message=_RACE_OVER)
        return {}

    def progress(self, message: str) -> None:
        """How the network side fares, while nobody is typing: once the prompt is on the
        console, a line per retry would only scramble it."""
        if not self.race.prompt_shown.is_set():
            log.progress("%s", message)

    # The person at the console

    def _ask(self, root: Dataset) -> None:
        self.race.prompt_may_start.wait()
        if self.race.over.is_set():
            return
        if root.keylocation != "prompt":
            return  # OpenZFS loads it from its keylocation once the server gave up
        prompt = self.prompt = self.make_prompt()
        if root.keyformat not in TYPABLE_KEYFORMATS:
            prompt.say(
                f"{root.name}: its key is {root.keyformat} and cannot be typed; waiting for the"
                " key server. To unlock it by hand, log in over SSH (dropbear-initramfs) and"
                f" load it from a key file: zfs load-key -L file:///PATH {root.name}"
            )
            return
        what = "hex key" if root.keyformat == "hex" else "passphrase"
        text = f"Enter {what} for '{root.name}' (the key server is tried meanwhile): "
        self.race.prompt_shown.set()
        while not self.race.over.is_set():
            typed = prompt.ask(text, self.race)
            if typed is None:
                return
            with typed:
                if len(typed):
                    self._try_typed(root.name, typed, what, prompt)

    def _try_typed(self, root: str, typed: Secret, what: str, prompt: Prompt) -> None:
        with self.race.loading():
            try:
                self.unlocker.zfs.load_key(root, typed)
            except KeyAlreadyLoaded:
                self.race.finish(BY_OTHER)
                return
            except ZfsError as exc:
                if exc.exit_code == EX_BADKEY:
                    prompt.say(f"That {what} does not open {root}; try again.")
                else:
                    prompt.say(f"{root}: {exc}; try again.")
                return
            self.race.finish(BY_TYPED)

    # Anybody else

    def _watch(self, root: str) -> None:
        while not self.race.over.wait(WATCH_SECONDS):
            try:
                if self.unlocker.zfs.keystatus(root) == "available":
                    self.race.finish_unless_loading(BY_OTHER)
            except AgentError as exc:
                log.debug("%s: cannot read the keystatus: %s", root, exc)


_RACE_OVER = "the race is over"


class DeadlinePassed(Exception):
    """--deadline ran out between two requests."""
