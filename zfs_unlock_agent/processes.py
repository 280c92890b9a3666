"""Run commands the way zfs.py needs: argument lists (never a shell), a secret written
to standard input through a pipe, output collected, each bounded in time, several at once.

Children start with posix_spawn (subprocess's imports alone cost a cold unlock about
4 ms) and one loop watches every running child's stdout, stderr and pidfd, so a child
is reaped the moment it exits, and the children of a batch overlap, each on its own CPU
where there are several.
"""

from __future__ import annotations

import contextlib
import errno
import os
import selectors
import signal
import time
from collections import deque
from collections.abc import Mapping, Sequence
from typing import NamedTuple

from zfs_unlock_agent.secret import Secret

READ_CHUNK = 65536
NO_PIDFD_POLL = 0.001  # seconds between looks for an exit, where there is no pidfd
FALLBACK_FD_LIMIT = 1024  # descriptors to mark close-on-exec when /proc cannot list them


class Command(NamedTuple):
    argv: Sequence[str]
    stdin: Secret | None = None  # written whole, then the pipe is closed


class Finished(NamedTuple):
    returncode: int  # negative: killed by that signal
    stdout: bytes
    stderr: bytes
    timed_out: bool = False


def executable(name: str, env: Mapping[str, str]) -> str:
    """NAME as exec would find it: itself when it holds a slash, else the first
    executable file of that name in ENV's PATH (what subprocess does with env=)."""
    if "/" in name:
        return name
    denied = False
    for directory in env.get("PATH", os.defpath).split(os.pathsep):
        candidate = os.path.join(directory or ".", name)
        if os.path.isfile(candidate):
            if os.access(candidate, os.X_OK):
                return candidate
            denied = True
    code = errno.EACCES if denied else errno.ENOENT
    raise (PermissionError if denied else FileNotFoundError)(code, os.strerror(code), name)


class _Child:
    """One started command, fed and watched by run_all's loop."""

    def __init__(
        self,
        command: Command,
        env: Mapping[str, str],
        timeout: float,
        selector: selectors.BaseSelector,
    ) -> None:
        program = executable(command.argv[0], env)
        self.selector = selector
        self.pipes: list[int] = []  # our ends of the child's stdout and stderr, in that order
        self.output = (bytearray(), bytearray())
        self.exited = False
        self.pidfd: int | None = None
        self.returncode: int | None = None
        stdin_ours: int | None = None
        child_ends: list[int] = []  # its stdin, stdout, stderr: descriptors 0, 1, 2
        try:
            if command.stdin is not None:
                stdin_child, stdin_ours = os.pipe()
            else:
                stdin_child = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
            child_ends.append(stdin_child)
            for _ in range(2):
                ours, theirs = os.pipe()  # both close on exec; dup2 clears that on the copy
                self.pipes.append(ours)
                child_ends.append(theirs)
            self.pid = os.posix_spawn(
                program,
                list(command.argv),
                dict(env),
                file_actions=[
                    (os.POSIX_SPAWN_DUP2, fd, target) for target, fd in enumerate(child_ends)
                ],
                # Python ignores SIGPIPE and SIGXFSZ; the child gets the defaults back, as
                # subprocess's restore_signals gives them.
                setsigdef=(signal.SIGPIPE, signal.SIGXFSZ),
            )
        except BaseException:
            for fd in [*self.pipes, *([stdin_ours] if stdin_ours is not None else [])]:
                os.close(fd)
            raise
        finally:
            for fd in child_ends:
                os.close(fd)
        self.open = set(self.pipes)
        self.deadline = time.monotonic() + timeout
        try:
            if stdin_ours is not None and command.stdin is not None:
                _feed(stdin_ours, command.stdin)
            for fd in self.pipes:
                selector.register(fd, selectors.EVENT_READ, self)
            try:
                self.pidfd = os.pidfd_open(self.pid)
            except OSError:  # a kernel before 5.3: look for the exit once the output ends
                self.pidfd = None
            if self.pidfd is not None:
                selector.register(self.pidfd, selectors.EVENT_READ, self)
        except BaseException:
            self.finish(kill=True)
            raise

    @property
    def done(self) -> bool:
        return not self.open and (self.exited or self.pidfd is None)

    def ready(self, fd: int) -> None:
        """FD can be read: a chunk of output, its end, or (the pidfd) the exit."""
        if fd == self.pidfd:
            self._close_pidfd()
            self.exited = True
            return
        data = os.read(fd, READ_CHUNK)
        if data:
            self.output[self.pipes.index(fd)].extend(data)
        else:
            self._close_pipe(fd)

    def finish(self, kill: bool = False) -> Finished:
        """Reap the child, killed first when KILL (its time is up), and give its result."""
        timed_out = kill
        if not kill and not self.exited:
            timed_out = not self._wait_without_pidfd()
        if timed_out and self.returncode is None:
            os.kill(self.pid, signal.SIGKILL)
        for fd in list(self.open):
            self._close_pipe(fd)
        self._close_pidfd()
        if self.returncode is None:
            self.returncode = os.waitstatus_to_exitcode(os.waitpid(self.pid, 0)[1])
        stdout, stderr = self.output
        return Finished(self.returncode, bytes(stdout), bytes(stderr), timed_out)

    def _wait_without_pidfd(self) -> bool:
        """The exit follows the end of the output; True when it came before the deadline."""
        while time.monotonic() < self.deadline:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.returncode = os.waitstatus_to_exitcode(status)
                return True
            time.sleep(NO_PIDFD_POLL)
        return False

    def _close_pipe(self, fd: int) -> None:
        self._forget(fd)
        self.open.discard(fd)
        os.close(fd)

    def _close_pidfd(self) -> None:
        if self.pidfd is not None:
            self._forget(self.pidfd)
            os.close(self.pidfd)
            self.pidfd = None

    def _forget(self, fd: int) -> None:
        if fd in self.selector.get_map():
            self.selector.unregister(fd)


def _feed(fd: int, secret: Secret) -> None:
    """Write SECRET to the child's stdin and close it. Straight to the descriptor: no
    buffer of ours keeps a copy. A key is far smaller than a pipe's buffer, so this
    never waits for the child; one that exited early shows it in its status."""
    view = secret.view()
    try:
        written = 0
        while written < len(view):
            written += os.write(fd, view[written:])
    except BrokenPipeError:
        pass
    finally:
        view.release()
        os.close(fd)


def _keep_descriptors_home() -> None:
    """Mark every descriptor above 2 close-on-exec. posix_spawn passes on whatever is
    inheritable (subprocess closed it all in the child): anything this process inherited
    itself, say from the service manager, would reach zfs."""
    try:
        descriptors = [int(name) for name in os.listdir("/proc/self/fd")]
    except OSError:  # no /proc (a bare chroot): the usual range
        descriptors = list(range(3, FALLBACK_FD_LIMIT))
    for fd in descriptors:
        if fd > 2:
            with contextlib.suppress(OSError):  # the listing's own, gone by now
                os.set_inheritable(fd, False)


def run_all(
    commands: Sequence[Command], env: Mapping[str, str], timeout: float, parallel: int = 1
) -> list[Finished]:
    """Run COMMANDS, at most PARALLEL at a time, each killed after TIMEOUT seconds;
    results in the order of COMMANDS. A command that cannot be started (OSError from
    exec) raises after the ones already started are killed and reaped. Each child gets
    its stdin, stdout and stderr and no other descriptor of ours."""
    _keep_descriptors_home()
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
                    key.data.ready(key.fd)
        finally:
            for child in running.values():
                child.finish(kill=True)
    return [result for result in results if result is not None]
