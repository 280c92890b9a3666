"""One file written whole or not at all, mode 0600: a new name appears only complete.

Opened before the command becomes the data directory's owner (datadir.py): a temporary
file beside the target is created then, with the admin's own rights, and a helper
process that keeps those rights moves it into place when the command says so (a
directory only root may write stays writable for it), or removes it when the command
fails or dies. Without --force an existing file is never replaced, even one that
appears meanwhile: the move is a hard link, which refuses an existing name.
"""

from __future__ import annotations

import contextlib
import os
import signal
from dataclasses import dataclass
from pathlib import Path

from zfs_unlock_common.syncdir import sync_directory
from zfs_unlock_server.errors import CannotCreate

_COMMIT = b"k"


@dataclass
class AtomicOutput:
    path: Path
    option: str
    temporary: Path
    fd: int
    _helper: tuple[int, int, int] | None  # (pid, command pipe, answer pipe)

    @classmethod
    def open(cls, path: Path, option: str, force: bool) -> AtomicOutput:
        if not force and (path.exists() or path.is_symlink()):
            raise CannotCreate(f"{option} {path} exists; refusing to overwrite it (--force does)")
        if path.is_dir():
            raise CannotCreate(f"{option} {path} is a directory")
        temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        try:
            fd = os.open(temporary, flags, 0o600)
        except OSError as exc:
            raise CannotCreate(f"{option} {path}: {exc.strerror}") from None
        os.fchmod(fd, 0o600)  # whatever the umask
        commands, answers = os.pipe(), os.pipe()
        pid = os.fork()
        if pid == 0:
            _helper(commands, answers, temporary, path, force)
        os.close(commands[0])
        os.close(answers[1])
        return cls(path, option, temporary, fd, (pid, commands[1], answers[0]))

    def write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            view = view[os.write(self.fd, view) :]
        os.fsync(self.fd)

    def commit(self) -> None:
        """Move the written file to its name; CannotCreate when that fails."""
        os.close(self.fd)
        self.fd = -1
        helper, self._helper = self._helper, None
        if helper is None:
            raise CannotCreate(f"{self.option} {self.path}: already finished")
        pid, command, answer = helper
        try:
            os.write(command, _COMMIT)
            os.close(command)
            reply = os.read(answer, 4096).decode("utf-8", "replace")
        finally:
            os.close(answer)
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, 0)
        if reply != "ok":
            raise CannotCreate(f"{self.option} {self.path}: {reply or 'not written'}")

    def discard(self) -> None:
        """The command failed: the temporary file goes, the target stays as it was."""
        if self.fd >= 0:
            with contextlib.suppress(OSError):
                os.close(self.fd)
            self.fd = -1
        helper, self._helper = self._helper, None
        if helper is not None:
            pid, command, answer = helper
            for fd in (command, answer):
                with contextlib.suppress(OSError):
                    os.close(fd)
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, 0)


def _helper(
    commands: tuple[int, int], answers: tuple[int, int], temporary: Path, path: Path, force: bool
) -> None:
    """The child: on the command's word, move TEMPORARY to PATH and answer; else remove it."""
    try:
        for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(signum, signal.SIG_IGN)  # a ^C is for the command; its end tells
        os.close(commands[1])
        os.close(answers[0])
        word = os.read(commands[0], 1)
        reply = "not written"
        if word == _COMMIT:
            try:
                if force:
                    os.replace(temporary, path)
                else:
                    os.link(temporary, path)
                reply = "ok"
            except FileExistsError:
                reply = "exists now; refusing to overwrite it (--force does)"
            except OSError as exc:
                reply = exc.strerror or "cannot be written"
        with contextlib.suppress(OSError):
            temporary.unlink()
        if reply == "ok":
            with contextlib.suppress(OSError):
                sync_directory(path.parent)
        with contextlib.suppress(OSError):
            os.write(answers[1], reply.encode())
    finally:
        os._exit(0)
