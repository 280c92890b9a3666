"""Files an admin command writes where its command line says (--cert-out, --issue-key).

They are opened with the rights of the user who runs the command, before it becomes the
data directory's owner (privileges.py), and written once the command has its result: so
root can name a file in a directory that only root may write. What the command created
is removed again when it fails, so that a refused command leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import os
import signal
import stat
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from zfs_unlock_server.errors import CannotCreate

_WRITE = os.O_WRONLY | os.O_CLOEXEC


@dataclass
class OutputFile:
    """One opened output. An existing file is truncated only when it is written."""

    path: Path
    fd: int
    created: bool  # by this command: removed again if the command fails

    def write(self, data: bytes) -> None:
        if stat.S_ISREG(os.fstat(self.fd).st_mode):  # not /dev/stdout or a pipe
            os.ftruncate(self.fd, 0)
        view = memoryview(data)
        while view:
            view = view[os.write(self.fd, view) :]
        if stat.S_ISREG(os.fstat(self.fd).st_mode):
            os.fsync(self.fd)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self.fd)


def open_file(path: Path, option: str) -> OutputFile:
    """PATH for writing, created (mode 0666 less the umask) if missing, as a shell's
    redirection would; its old content stays until it is written."""
    try:
        try:
            fd = os.open(path, _WRITE | os.O_CREAT | os.O_EXCL, 0o666)
            return OutputFile(path, fd, created=True)
        except FileExistsError:
            return OutputFile(path, os.open(path, _WRITE), created=False)
    except OSError as exc:
        raise CannotCreate(f"{option} {path}: {exc.strerror}") from None


@dataclass
class HostBundle:
    """A directory for a host's new key pair (--issue-key): client.key (0400) and
    client.crt, both new files in a directory that was empty or missing."""

    directory: Path
    key: OutputFile
    cert: OutputFile
    made_dirs: tuple[Path, ...]  # the directories this command created, deepest last

    @classmethod
    def open(cls, directory: Path, option: str = "--issue-key") -> HostBundle:
        try:
            if directory.exists() and any(directory.iterdir()):
                raise CannotCreate(f"{directory} exists and is not empty")
            made = _make_dirs(directory)
        except OSError as exc:
            raise CannotCreate(f"{option} {directory}: {exc.strerror}") from None
        files: list[OutputFile] = []
        try:
            for name, mode in (("client.key", 0o400), ("client.crt", 0o644)):
                flags = _WRITE | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                files.append(
                    OutputFile(directory / name, os.open(directory / name, flags, mode), True)
                )
        except OSError as exc:
            _remove([f.path for f in files], made)
            raise CannotCreate(f"{option} {directory}: {exc.strerror}") from None
        return cls(directory, files[0], files[1], made)

    def write(self, key_pem: bytes, cert_pem: bytes) -> None:
        self.key.write(key_pem)
        self.cert.write(cert_pem)

    def files(self) -> list[OutputFile]:
        return [self.key, self.cert]

    def close(self) -> None:
        """Keep what was written; let go of the files."""
        for output in self.files():
            output.close()

    def discard(self) -> None:
        """Remove what open() made (the command that owns it failed)."""
        self.close()
        _remove([f.path for f in self.files()], self.made_dirs)


def _make_dirs(directory: Path) -> tuple[Path, ...]:
    """mkdir -p with mode 0700; the directories it made, outermost first."""
    missing = []
    for candidate in (directory, *directory.parents):
        if candidate.exists():
            break
        missing.append(candidate)
    for made in reversed(missing):
        made.mkdir(mode=0o700)
    return tuple(reversed(missing))


def _remove(files: Sequence[Path], dirs: Sequence[Path]) -> None:
    for path in files:
        with contextlib.suppress(OSError):
            path.unlink()
    for directory in reversed(dirs):
        with contextlib.suppress(OSError):
            directory.rmdir()  # only if empty: never what someone else put there


@dataclass
class Outputs:
    """Every output one command names, by option."""

    files: dict[str, OutputFile] = field(default_factory=dict)
    bundle: HostBundle | None = None
    _janitor: tuple[int, int] | None = None  # (pid, pipe) of the process that cleans up

    def file(self, option: str) -> OutputFile | None:
        return self.files.get(option)

    def _all(self) -> list[OutputFile]:
        return [*self.files.values(), *(self.bundle.files() if self.bundle else [])]

    def _created(self) -> tuple[list[Path], tuple[Path, ...]]:
        files = [f.path for f in self._all() if f.created]
        return files, self.bundle.made_dirs if self.bundle else ()

    def clean_up_as_invoker(self) -> None:
        """Before the command gives up the invoker's rights: leave a process behind that
        keeps them, to remove what was created if the command fails (the data
        directory's owner may not be allowed to)."""
        files, dirs = self._created()
        if not files and not dirs:
            return
        read_end, write_end = os.pipe()
        pid = os.fork()
        if pid == 0:
            _janitor(read_end, write_end, files, dirs)
        os.close(read_end)
        self._janitor = (pid, write_end)

    def finish(self, succeeded: bool) -> None:
        """Close every output; remove what this command created unless it succeeded."""
        for output in self._all():
            output.close()
        if self._janitor is not None:
            pid, pipe = self._janitor
            with contextlib.suppress(OSError):
                if succeeded:
                    os.write(pipe, b"k")
                os.close(pipe)
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, 0)
        elif not succeeded:
            _remove(*self._created())


def _janitor(read_end: int, write_end: int, files: Sequence[Path], dirs: Sequence[Path]) -> None:
    """The child: wait for the command's word; without a 'k' (it failed, or died), remove."""
    try:
        for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(signum, signal.SIG_IGN)  # a ^C is for the command; its end tells
        os.close(write_end)
        if os.read(read_end, 1) != b"k":
            _remove(files, dirs)
    finally:
        os._exit(0)
