"""systemd's password agent protocol, the answering side (systemd's PASSWORD_AGENTS.md).

A program that needs a password (systemd-ask-password) writes an `ask.*` file into
/run/systemd/ask-password and waits on a datagram socket named in it. Any agent may
answer by sending "+PASSWORD" to that socket; the asker takes the first answer. An agent
that has no answer sends nothing, so that the others (the console, plymouth) still can:
this module never cancels a question.

Nothing here knows ZFS or the key server: passwordagent.py decides which questions are
ours and what to answer.
"""

from __future__ import annotations

import configparser
import os
import socket
import stat
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from zfs_unlock_agent.secret import Secret

ASK_DIRECTORY = Path("/run/systemd/ask-password")
_MAX_ASK_FILE = 64 * 1024  # an ask file is a few hundred bytes; never read a huge one


@dataclass(frozen=True)
class Question:
    path: Path  # the ask file
    identity: tuple[int, int]  # (inode, mtime): the same path may be a new question later
    pid: int  # the asker; 0 when the file names none
    socket: str  # where the answer goes
    not_after: int  # CLOCK_MONOTONIC microseconds; 0: no time limit
    message: str
    id: str  # e.g. "zfs:tank/secret" from OpenZFS's zfs-load-key@ units; "" when unset

    def expired(self) -> bool:
        return self.not_after != 0 and monotonic_us() > self.not_after

    def asker_alive(self) -> bool:
        if self.pid <= 0:
            return True  # nothing to check: the socket tells when the asker is gone
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True  # alive, someone else's
        return True

    def still_asked(self) -> bool:
        """The file is there, unchanged, its asker alive and its time not up."""
        try:
            current = _identity(os.stat(self.path))
        except OSError:
            return False
        return current == self.identity and self.asker_alive() and not self.expired()


def monotonic_us() -> int:
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000


def _identity(status: os.stat_result) -> tuple[int, int]:
    return status.st_ino, status.st_mtime_ns


def read_question(path: Path) -> Question | None:
    """The question in ask file PATH, or None for a file that is not one (gone already,
    not a regular file of root's, malformed, or naming no socket)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        status = os.fstat(fd)
        # Only root can write the directory; a file of anyone else's came some other way.
        if not stat.S_ISREG(status.st_mode) or status.st_uid != 0:
            return None
        raw = os.read(fd, _MAX_ASK_FILE + 1)
    except OSError:
        return None
    finally:
        os.close(fd)
    if len(raw) > _MAX_ASK_FILE:
        return None
    parser = configparser.ConfigParser(interpolation=None, strict=False)
    parser.optionxform = str  # type: ignore[assignment,method-assign] # keys keep their case
    try:
        parser.read_string(raw.decode("utf-8"))
        ask = parser["Ask"]
        found = Question(
            path=path,
            identity=_identity(status),
            pid=int(ask.get("PID", "0")),
            socket=ask.get("Socket", ""),
            not_after=int(ask.get("NotAfter", "0")),
            message=ask.get("Message", ""),
            id=ask.get("Id", ""),
        )
    except (UnicodeDecodeError, configparser.Error, KeyError, ValueError):
        return None
    return found if found.socket.startswith("/") else None


def entries(directory: Path = ASK_DIRECTORY) -> list[str]:
    """The names in DIRECTORY, sorted ([] when it cannot be read): anything at all there is
    what the .path unit's DirectoryNotEmpty= sees."""
    try:
        return sorted(entry.name for entry in os.scandir(directory))
    except OSError:
        return []


def questions(
    directory: Path = ASK_DIRECTORY, names: Sequence[str] | None = None
) -> list[Question]:
    """Every readable question in DIRECTORY (among NAMES, when given: entries() of it),
    oldest name first."""
    found = []
    for name in entries(directory) if names is None else names:
        if name.startswith("ask."):
            question = read_question(directory / name)
            if question is not None:
                found.append(question)
    return found


def answer(question: Question, password: Secret) -> None:
    """Send "+PASSWORD" to the asker's socket. The datagram is built in a buffer of ours and
    wiped after it is sent; the asker accepts it because the kernel attaches our
    credentials (root) to it. Raises OSError when the asker is gone."""
    datagram = bytearray(b"+")
    datagram += password.buffer()
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.sendto(datagram, question.socket)
    finally:
        datagram[:] = bytes(len(datagram))
