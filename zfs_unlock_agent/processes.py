"""Run commands the way zfs.py needs: argument lists (never a shell), a secret written
to standard input through a pipe, output collected, each bounded in time, several at once.

One loop watches every running child's stdout, stderr and pidfd, so a child is reaped
the moment it exits (subprocess's wait with a timeout polls with sleeps instead), and
the children of a batch overlap, each on its own CPU where there are several.
"""

from __future__ import annotations

import os
import selectors
import subprocess
import time
from collections import deque
from collections.abc import Mapping, Sequence
from typing import IO, Any, NamedTuple

from zfs_unlock_agent.secret import Secret

READ_CHUNK = 65536


class Command(NamedTuple):
    argv: Sequence[str]
    stdin: Secret | None = None  # written whole, then the pipe is closed


class Finished(NamedTuple):
    returncode: int  # negative: killed by that signal
    stdout: bytes
    stderr: bytes
    timed_out: bool = False


class _Child:
    """One started command, fed and watched by run_all's loop."""

    def __init__(
        self, command: Command, env: Mapping[str, str], timeout: float, selector: Any
    ) -> None:
        self.process = subprocess.Popen(  # noqa: S603 - an argument list; callers validate
            list(command.argv),
            stdin=subprocess.PIPE if command.stdin is not None else subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=dict(env),
        )
        self.deadline = time.monotonic() + timeout
        self.selector = selector
        self.streams = [s for s in (self.process.stdout, self.process.stderr) if s is not None]
        self.output = [bytearray() for _ in self.streams]  # stdout's, stderr's
        self.open_streams = 0
        self.exited = False
        self.pidfd: int | None = None
        try:
            if command.stdin is not None and self.process.stdin is not None:
                _feed(self.process.stdin, command.stdin)
            for stream in self.streams:
                selector.register(stream, selectors.EVENT_READ, self)
                self.open_streams += 1
            try:
                self.pidfd = os.pidfd_open(self.process.pid)
            except OSError:  # a kernel before 5.3: wait once the output has ended
                self.pidfd = None
            if self.pidfd is not None:
                selector.register(self.pidfd, selectors.EVENT_READ, self)
        except BaseException:
            self.finish(kill=True)
            raise

    @property
    def done(self) -> bool:
        return self.open_streams == 0 and (self.exited or self.pidfd is None)

    def ready(self, fileobj: Any) -> None:
        """FILEOBJ can be read: a chunk of output, its end, or (the pidfd) the exit."""
        if fileobj is self.pidfd:
            self._close_pidfd()
            self.exited = True
            return
        data = os.read(fileobj.fileno(), READ_CHUNK)
        if data:
            self.output[self.streams.index(fileobj)] += data
        else:
            self._forget(fileobj)
            fileobj.close()
            self.open_streams -= 1

    def finish(self, kill: bool = False) -> Finished:
        """Reap the child, killed first when KILL (its time is up), and give its result."""
        stdout, stderr = (bytes(output) for output in self.output)
        timed_out = kill
        if not kill and not self.exited:
            # Without a pidfd the exit is waited for here; it follows the output's end.
            try:
                self.process.wait(max(self.deadline - time.monotonic(), 0.001))
            except subprocess.TimeoutExpired:
                timed_out = True
        if timed_out:
            self.process.kill()
        for stream in self.streams:
            if not stream.closed:
                self._forget(stream)
                stream.close()
        self._close_pidfd()
        return Finished(self.process.wait(), stdout, stderr, timed_out)

    def _close_pidfd(self) -> None:
        if self.pidfd is not None:
            self._forget(self.pidfd)
            os.close(self.pidfd)
            self.pidfd = None

    def _forget(self, fileobj: Any) -> None:
        if fileobj in self.selector.get_map():
            self.selector.unregister(fileobj)


def _feed(pipe: IO[bytes], secret: Secret) -> None:
    """Write SECRET to the child's stdin and close it. Straight to the descriptor: no
    buffer of ours keeps a copy. A key is far smaller than a pipe's buffer, so this
    never waits for the child; one that exited early shows it in its status."""
    view = secret.view()
    try:
        written = 0
        while written < len(view):
            written += os.write(pipe.fileno(), view[written:])
    except BrokenPipeError:
        pass
    finally:
        view.release()
        pipe.close()


def run_all(
    commands: Sequence[Command], env: Mapping[str, str], timeout: float, parallel: int = 1
) -> list[Finished]:
    """Run COMMANDS, at most PARALLEL at a time, each killed after TIMEOUT seconds;
    results in the order of COMMANDS. A command that cannot be started (OSError from
    exec) raises after the ones already started are killed and reaped."""
    results: list[Finished | None] = [None] * len(commands)
    waiting = deque(enumerate(commands))
    running: dict[int, _Child] = {}
    with selectors.DefaultSelector() as selector:
        try:
            while waiting or running:
                while waiting and len(running) < max(parallel, 1):
                    index, command = waiting.popleft()
                    running[index] = _Child(command, env, timeout, selector)
                now = time.monotonic()
                for index, child in list(running.items()):
                    if child.done or child.deadline <= now:
                        results[index] = child.finish(kill=not child.done)
                        del running[index]
                if not running:
                    continue
                soonest = min(child.deadline for child in running.values())
                for key, _ in selector.select(max(soonest - time.monotonic(), 0)):
                    key.data.ready(key.fileobj)
        finally:
            for child in running.values():
                child.finish(kill=True)
    return [result for result in results if result is not None]
