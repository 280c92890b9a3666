"""Append-only audit trail: one JSON object per line, durable before a key leaves.

Records never carry key material. json.dumps(ensure_ascii=True) escapes every
control character, so no field value can start a new line or forge a record.
A failed write raises AuditError, and callers release nothing.
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import json
import mmap
import os
import struct
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Protocol

from zfs_unlock_server.errors import ServerError

AuditValue = str | int | None
AuditRecord = Mapping[str, AuditValue]


class AuditError(Exception):
    """The audit record could not be made durable."""


def utc_now_iso() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="milliseconds")


def encode(record: AuditRecord) -> bytes:
    line = {"ts": utc_now_iso(), **{k: v for k, v in record.items() if v is not None}}
    return json.dumps(line, ensure_ascii=True, separators=(",", ":")).encode("ascii") + b"\n"


class AuditSink(Protocol):
    """Where audit records go: a file (AuditLog) or the shared database (TableAuditLog)."""

    def write(self, *records: AuditRecord, durable: bool = True) -> None:
        """Record RECORDS, durably unless told otherwise, or raise AuditError."""
        ...

    def close(self) -> None: ...


class AuditTable(Protocol):
    """A database that keeps the audit trail (pgstore.PgStore)."""

    where: str

    def append_audit(self, lines: Sequence[str], durable: bool) -> None: ...
    def audit_lines(self, last: int = 0) -> list[str]: ...


class TableAuditLog:
    """The audit trail as rows of the database every node shares: one JSON object a row,
    the same text as a line of the file. Inside a store transaction the records commit
    with it, so a release and its record are one commit, made before the key is sent."""

    def __init__(self, table: AuditTable) -> None:
        self._table = table

    def write(self, *records: AuditRecord, durable: bool = True) -> None:
        lines = [encode(r).decode("ascii").rstrip("\n") for r in records]
        try:
            self._table.append_audit(lines, durable)
        except ServerError as exc:  # the database is unavailable: nothing was recorded
            raise AuditError(f"cannot write the audit trail: {exc}") from None

    def close(self) -> None:
        """The store owns the connection."""


class SharedSync:
    """What the server's workers share so that one fsync can cover several records.

    Made before gunicorn forks, so every worker sees the same memory: the device,
    inode and size of the log that the last completed fsync covered, behind a lock of
    its own (during a rotation two workers may sync two different files at once).
    """

    _LAYOUT = struct.Struct("QQQ")

    def __init__(self) -> None:
        # A memfd: no file system needed (the server's unit has little), and its POSIX
        # record lock belongs to each process, so the forked workers exclude each other.
        self._fd = os.memfd_create("zfs-unlock-audit-sync", os.MFD_CLOEXEC)
        os.ftruncate(self._fd, self._LAYOUT.size)
        self._memory = mmap.mmap(self._fd, self._LAYOUT.size)

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        fcntl.lockf(self._fd, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.lockf(self._fd, fcntl.LOCK_UN)

    def covered(self, identity: tuple[int, int], end: int, size: int) -> bool:
        """Did an fsync that covered byte END of this file complete? A file now shorter
        than what was synced was truncated or replaced (an inode number can be reused),
        so nothing recorded for it counts."""
        with self._locked():
            dev, ino, synced = self._LAYOUT.unpack_from(self._memory)
        return (dev, ino) == identity and end <= synced <= size

    def record(self, identity: tuple[int, int], synced: int) -> None:
        with self._locked():
            self._LAYOUT.pack_into(self._memory, 0, *identity, synced)

    def forget(self) -> None:
        """A log file was (re)opened: whatever was recorded may name a deleted file."""
        self.record((0, 0), 0)


class AuditLog:
    """Appends to PATH (mode 0600) with O_APPEND, so workers' lines never interleave.

    Reopens PATH when it no longer names the open file, like logging's WatchedFileHandler.
    With SHARED (the server's workers), a durable write is a group commit: a record
    that an fsync begun after it was written has covered needs no fsync of its own.
    """

    def __init__(self, path: Path, shared: SharedSync | None = None) -> None:
        self.path = path
        self._shared = shared
        self._fd: int | None = None

    def _open(self) -> int:
        # A log moved away (rotation) or deleted with its directory must not
        # swallow records: write to what PATH names now, or fail.
        if self._fd is not None and not self._is_current(self._fd):
            self.close()
        if self._fd is None:
            self._fd = os.open(
                self.path,
                os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW,
                0o600,
            )
            if self._shared is not None:
                self._shared.forget()
        return self._fd

    def _is_current(self, fd: int) -> bool:
        try:
            named = os.stat(self.path, follow_symlinks=False)
        except OSError:
            return False
        opened = os.fstat(fd)
        return (named.st_dev, named.st_ino) == (opened.st_dev, opened.st_ino)

    def write(self, *records: AuditRecord, durable: bool = True) -> None:
        data = b"".join(encode(r) for r in records)
        try:
            fd = self._open()
            written = os.write(fd, data)
            if written != len(data):
                raise OSError("short write")
            if durable and self._shared is not None:
                self._group_sync(fd, self._shared)
            elif durable:
                os.fsync(fd)
        except OSError as exc:
            self.close()
            raise AuditError(f"cannot write audit log {self.path}: {exc.strerror or exc}") from None

    def _group_sync(self, fd: int, shared: SharedSync) -> None:
        # O_APPEND left this descriptor's offset at the end of our record.
        end = os.lseek(fd, 0, os.SEEK_CUR)
        # The log's own lock serialises fsyncs: each worker opened the file itself,
        # so each holds a separate open file description and flock excludes them.
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            status = os.fstat(fd)
            identity = (status.st_dev, status.st_ino)
            if not shared.covered(identity, end, status.st_size):
                # Every byte up to this size was written before this fsync began.
                os.fsync(fd)
                shared.record(identity, status.st_size)
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)

    def close(self) -> None:
        if self._fd is not None:
            try:
                os.close(self._fd)
            finally:
                self._fd = None


def read(path: Path) -> Iterator[dict[str, AuditValue]]:
    """Yield the records of an audit log; a damaged line is reported, not skipped."""
    with path.open("rb") as handle:
        yield from parse(handle)


def parse(lines: Iterable[bytes | str]) -> Iterator[dict[str, AuditValue]]:
    for number, raw in enumerate(lines, start=1):
        try:
            record = json.loads(raw)
        except ValueError:
            record = {"event": "unreadable_line", "line": number}
        yield record
