"""Append-only audit trail: one JSON object per line, durable before a key leaves.

Records never carry key material. json.dumps(ensure_ascii=True) escapes every
control character, so no field value can start a new line or forge a record.
A failed write raises AuditError, and callers release nothing.
"""

from __future__ import annotations

import datetime
import json
import os
from collections.abc import Iterator, Mapping
from pathlib import Path

AuditValue = str | int | None
AuditRecord = Mapping[str, AuditValue]


class AuditError(Exception):
    """The audit record could not be made durable."""


def utc_now_iso() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="milliseconds")


def encode(record: AuditRecord) -> bytes:
    line = {"ts": utc_now_iso(), **{k: v for k, v in record.items() if v is not None}}
    return json.dumps(line, ensure_ascii=True, separators=(",", ":")).encode("ascii") + b"\n"


class AuditLog:
    """Appends to PATH (mode 0600) with O_APPEND, so workers' lines never interleave.

    Reopens PATH when it no longer names the open file, like logging's WatchedFileHandler.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
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
            if durable:
                os.fsync(fd)
        except OSError as exc:
            self.close()
            raise AuditError(f"cannot write audit log {self.path}: {exc.strerror or exc}") from None

    def close(self) -> None:
        if self._fd is not None:
            try:
                os.close(self._fd)
            finally:
                self._fd = None


def read(path: Path) -> Iterator[dict[str, AuditValue]]:
    """Yield the records of an audit log; a damaged line is reported, not skipped."""
    with path.open("rb") as handle:
        for number, raw in enumerate(handle, start=1):
            try:
                record = json.loads(raw)
            except ValueError:
                record = {"event": "unreadable_line", "line": number}
            yield record
