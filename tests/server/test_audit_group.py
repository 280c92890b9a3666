"""Group commit of audit records (server/audit.py): one fsync may cover several workers' records.

The invariant: when AuditLog.write(durable=True) returns, its record has been
covered by an fsync that began after the record was written. An fsync that began
when the file was already at least as long as the record's end, on the same
file, began after the record was written, so every fsync here is recorded with
the file's size as it began, and the tests check each record against them.
Workers are threads in one process (where the log's flock must order them) or
forked processes sharing a SharedSync made before the fork, as in the server.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import fcntl
import json
import os
import select
import signal
import threading
import time
import traceback
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from zfs_unlock_server.audit import AuditError, AuditLog, AuditRecord, SharedSync

WAIT = 60.0  # seconds; generous, so that a loaded machine is slow rather than failing


@dataclass(frozen=True)
class Fsync:
    """One fsync of a file: which file, its size as the fsync began, when it began and ended."""

    dev: int
    ino: int
    size: int
    began: int  # time.monotonic_ns(), the same clock in every process
    ended: int


@dataclass
class FsyncSpy:
    """os.fsync as audit.py calls it: recorded, then done for real (or failed on request)."""

    real: Callable[[int], None]
    calls: list[Fsync] = field(default_factory=list)
    failures: int = 0  # the next this many calls fail with EIO, as a dying disk would

    def __call__(self, fd: int) -> None:
        began = now()
        status = os.fstat(fd)
        if self.failures:
            self.failures -= 1
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        self.real(fd)
        self.calls.append(Fsync(status.st_dev, status.st_ino, status.st_size, began, now()))


def now() -> int:
    return time.monotonic_ns()


@pytest.fixture
def fsyncs(monkeypatch: pytest.MonkeyPatch) -> FsyncSpy:
    spy = FsyncSpy(os.fsync)
    monkeypatch.setattr("zfs_unlock_server.audit.os.fsync", spy)
    return spy


@pytest.fixture
def log_path(tmp_path: Path) -> Path:
    return tmp_path / "audit.log"


def identity_of(path: Path) -> tuple[int, int]:
    status = path.stat()
    return status.st_dev, status.st_ino


def end_of(path: Path, record_id: str) -> int:
    """The offset just past the line of the record whose "id" is RECORD_ID."""
    data = path.read_bytes()
    at = data.index(b'"id":"%s"' % record_id.encode())
    return data.index(b"\n", at) + 1


def covered(fsyncs: Iterable[Fsync], identity: tuple[int, int], end: int) -> bool:
    """Whether one of FSYNCS, of the file IDENTITY, began once the file reached END."""
    return any((f.dev, f.ino) == identity and f.size >= end for f in fsyncs)


def record(record_id: str, padding: int = 0) -> AuditRecord:
    return {"event": "release", "id": record_id, "padding": "p" * padding or None}


def write_durably(log: AuditLog, spy: FsyncSpy, *records: AuditRecord) -> list[Fsync]:
    """Write RECORDS through LOG; check each was covered by an fsync begun during the write
    (none had begun after it before); return the fsyncs made."""
    before = len(spy.calls)
    log.write(*records)
    made = spy.calls[before:]
    for written in records:
        end = end_of(log.path, str(written["id"]))
        assert covered(made, identity_of(log.path), end), (written["id"], end, made)
    return made


@contextlib.contextmanager
def log_lock_held(path: Path) -> Iterator[None]:
    """Hold the log's flock, as a worker syncing it would: writers append, then wait."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def wait_until(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + WAIT
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"waited {WAIT} s for {what}")
        time.sleep(0.002)


def lines_in(path: Path) -> int:
    return path.read_bytes().count(b"\n")


def wait_for_lines(path: Path, count: int) -> None:
    wait_until(lambda: lines_in(path) == count, f"{count} records in the log")


class Writer(threading.Thread):
    """A worker in a thread: one durable write; an AuditError is kept for the test."""

    def __init__(self, log: AuditLog, written: AuditRecord) -> None:
        super().__init__(daemon=True)
        self.log = log
        self.written = written
        self.error: AuditError | None = None

    def run(self) -> None:
        try:
            self.log.write(self.written)
        except AuditError as exc:
            self.error = exc


def write_while_locked(path: Path, writers: list[Writer]) -> None:
    """Start WRITERS while the log is locked; release it once all their records are in
    the file, so that each record is written before any of them can sync."""
    expected = lines_in(path) + len(writers)
    with log_lock_held(path):
        for writer in writers:
            writer.start()
        wait_for_lines(path, expected)
    for writer in writers:
        writer.join(WAIT)
        assert not writer.is_alive(), "a writer hung"


# One process


def test_each_durable_record_is_covered_by_an_fsync_begun_after_it(
    log_path: Path, fsyncs: FsyncSpy
) -> None:
    shared = SharedSync()
    workers = [AuditLog(log_path, shared), AuditLog(log_path, shared)]
    writes = 0
    for n in range(12):
        log = workers[n % 2]
        batch = [record(f"r{n}-{i}", padding=37 * n) for i in range(1 + n % 3)]
        write_durably(log, fsyncs, *batch)
        writes += 1
    # Nobody else wrote in between, so nothing could have covered a write but its own fsync.
    assert len(fsyncs.calls) == writes


def test_a_record_another_worker_synced_after_it_was_written_gets_no_fsync(
    log_path: Path, fsyncs: FsyncSpy
) -> None:
    shared = SharedSync()
    AuditLog(log_path, shared).write(record("first"))
    before = len(fsyncs.calls)
    writers = [Writer(AuditLog(log_path, shared), record(f"w{i}")) for i in range(3)]
    write_while_locked(log_path, writers)

    assert [writer.error for writer in writers] == [None, None, None]
    made = fsyncs.calls[before:]
    # The first writer to get the lock synced all three records; the others saw that.
    assert len(made) == 1, made
    for i in range(3):
        assert covered(made, identity_of(log_path), end_of(log_path, f"w{i}"))


def test_a_failed_fsync_covers_nothing(log_path: Path, fsyncs: FsyncSpy) -> None:
    shared = SharedSync()
    AuditLog(log_path, shared).write(record("first"))
    before = len(fsyncs.calls)
    fsyncs.failures = 1
    writers = [Writer(AuditLog(log_path, shared), record(f"w{i}")) for i in range(2)]
    write_while_locked(log_path, writers)

    # Whoever got the lock first failed (and reports it); the other must sync for itself.
    failed = [writer for writer in writers if writer.error is not None]
    assert len(failed) == 1
    made = fsyncs.calls[before:]
    assert len(made) == 1
    succeeded = next(writer for writer in writers if writer.error is None)
    assert covered(made, identity_of(log_path), end_of(log_path, str(succeeded.written["id"])))


def test_a_log_rotated_by_rename_is_synced_again(log_path: Path, fsyncs: FsyncSpy) -> None:
    shared = SharedSync()
    one, other = AuditLog(log_path, shared), AuditLog(log_path, shared)
    write_durably(one, fsyncs, record("old-1", padding=8000))
    write_durably(other, fsyncs, record("old-2"))
    old_size = log_path.stat().st_size
    log_path.rename(log_path.with_name("audit.log.1"))

    write_durably(other, fsyncs, record("new-1"))  # checks the new file was synced
    # Sharp: the shared state says the old file was synced past where this record ends.
    assert end_of(log_path, "new-1") < old_size
    write_durably(one, fsyncs, record("new-2"))


def test_a_deleted_log_is_synced_again(log_path: Path, fsyncs: FsyncSpy) -> None:
    # docs/protocol.md: a deleted log is noticed and the next record makes a new file.
    # With one writer the old file is closed before the new one is made, and ext4 then
    # hands out the freed inode number again: the same (device, inode) as the log the
    # shared state says was synced past this record's end.
    shared = SharedSync()
    log = AuditLog(log_path, shared)
    write_durably(log, fsyncs, record("old", padding=8000))
    old_size = log_path.stat().st_size
    log_path.unlink()

    write_durably(log, fsyncs, record("new"))
    assert end_of(log_path, "new") < old_size


def test_a_log_truncated_in_place_is_synced_again(log_path: Path, fsyncs: FsyncSpy) -> None:
    # logrotate's copytruncate: same file, same inode, emptied; the next records land
    # below the size the last fsync reached, but no fsync has seen them.
    shared = SharedSync()
    log = AuditLog(log_path, shared)
    write_durably(log, fsyncs, record("old", padding=8000))
    os.truncate(log_path, 0)

    write_durably(log, fsyncs, record("new"))


@pytest.mark.parametrize("shared", [SharedSync, type(None)], ids=["shared", "alone"])
def test_a_record_written_without_durable_is_never_synced(
    log_path: Path, fsyncs: FsyncSpy, shared: Callable[[], SharedSync | None]
) -> None:
    log = AuditLog(log_path, shared())
    for n in range(5):
        log.write(record(f"r{n}"), durable=False)
    assert fsyncs.calls == []
    assert lines_in(log_path) == 5


def test_without_shared_state_every_durable_write_syncs(log_path: Path, fsyncs: FsyncSpy) -> None:
    # The admin commands' path: no workers to share with, so no skipping.
    logs = [AuditLog(log_path), AuditLog(log_path)]
    for n in range(6):
        made = write_durably(logs[n % 2], fsyncs, record(f"r{n}"), record(f"s{n}"))
        assert len(made) == 1


# Forked workers, as gunicorn makes them

WORKERS = 4


@dataclass
class Report:
    """What a forked writer saw: its fsyncs and when each of its writes returned."""

    fsyncs: list[Fsync]
    returned: dict[int, int]  # record number -> time.monotonic_ns()


def report_path(directory: Path, worker: int) -> Path:
    return directory / f"worker-{worker}.json"


def save_report(path: Path, report: Report) -> None:
    fsyncs = [[f.dev, f.ino, f.size, f.began, f.ended] for f in report.fsyncs]
    path.write_text(json.dumps({"fsyncs": fsyncs, "returned": report.returned}))


def load_report(path: Path) -> Report:
    data = json.loads(path.read_text())
    fsyncs = [Fsync(*values) for values in data["fsyncs"]]
    return Report(fsyncs, {int(n): ns for n, ns in data["returned"].items()})


class Children:
    """Forked processes running WORK(index); each leaves with os._exit, never into pytest."""

    def __init__(self, count: int, work: Callable[[int], None]) -> None:
        self.running: set[int] = set()
        for index in range(count):
            pid = os.fork()
            if pid == 0:
                status = 1
                try:
                    work(index)
                    status = 0
                except BaseException:  # noqa: BLE001 - a child must not unwind into pytest
                    traceback.print_exc()  # to the test's captured output
                finally:
                    os._exit(status)
            self.running.add(pid)

    def wait(self) -> list[int]:
        """Exit codes, once all have exited; fails after WAIT seconds."""
        codes = []
        deadline = time.monotonic() + WAIT
        while self.running:
            for pid in list(self.running):
                done, status = os.waitpid(pid, os.WNOHANG)
                if done:
                    self.running.discard(pid)
                    codes.append(os.waitstatus_to_exitcode(status))
            if time.monotonic() > deadline:
                pytest.fail(f"forked writers still running after {WAIT} s")
            time.sleep(0.005)
        return codes

    def stop(self) -> None:
        for pid in self.running:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        self.running.clear()


@contextlib.contextmanager
def forked(count: int, work: Callable[[int], None]) -> Iterator[Children]:
    children = Children(count, work)
    try:
        yield children
    finally:
        children.stop()


def wait_readable(fd: int) -> None:
    readable, _, _ = select.select([fd], [], [], WAIT)
    if not readable:
        raise TimeoutError(f"nothing to read after {WAIT} s")


def check_log(path: Path, reports: dict[int, Report], records: int) -> None:
    """Every record once, each line whole JSON, each covered before its write returned."""
    data = path.read_bytes()
    assert data.endswith(b"\n")
    identity = identity_of(path)
    every_fsync = [f for report in reports.values() for f in report.fsyncs]
    seen: collections.Counter[tuple[int, int]] = collections.Counter()
    end = 0
    for line in data.splitlines(keepends=True):
        end += len(line)
        written = json.loads(line)
        worker, number = written["worker"], written["n"]
        seen[worker, number] += 1
        returned = reports[worker].returned[number]
        assert any(
            (f.dev, f.ino) == identity and f.size >= end and f.ended <= returned
            for f in every_fsync
        ), f"record {worker}/{number} (ending at {end}) was not synced before write returned"
    expected = {(worker, n) for worker in range(WORKERS) for n in range(records)}
    assert set(seen) == expected
    assert set(seen.values()) == {1}


def test_forked_workers_writing_at_once_lose_nothing_and_share_fsyncs(
    tmp_path: Path, log_path: Path, fsyncs: FsyncSpy
) -> None:
    records = 30
    shared = SharedSync()  # before the fork, as KeyServerApp makes it
    log_path.touch(0o600)
    start_read, start_write = os.pipe()

    def work(worker: int) -> None:
        wait_readable(start_read)
        os.read(start_read, 1)
        log = AuditLog(log_path, shared)
        returned = {}
        for n in range(records):
            log.write({"event": "release", "worker": worker, "n": n, "padding": "p" * 50 * n})
            returned[n] = now()
        save_report(report_path(tmp_path, worker), Report(fsyncs.calls, returned))

    try:
        with forked(WORKERS, work) as children:
            # Each worker's first record is written while the log is locked (taken after
            # the fork: a lock inherited by the children would never be released), so
            # one fsync must cover all of them; after that the workers race freely.
            with log_lock_held(log_path):
                os.write(start_write, b"s" * WORKERS)
                wait_until(lambda: lines_in(log_path) >= WORKERS, "each worker's first record")
            assert children.wait() == [0] * WORKERS
    finally:
        os.close(start_read)
        os.close(start_write)

    reports = {w: load_report(report_path(tmp_path, w)) for w in range(WORKERS)}
    check_log(log_path, reports, records)
    total = sum(len(report.fsyncs) for report in reports.values())
    assert 1 <= total <= WORKERS * records - (WORKERS - 1)


def test_forked_workers_in_lockstep_need_one_fsync_per_round(
    tmp_path: Path, log_path: Path, fsyncs: FsyncSpy
) -> None:
    """Every round, each worker appends a record while the log is locked; once all are
    written, the lock is released. The first worker to sync covers them all."""
    rounds = 8
    shared = SharedSync()
    log_path.touch(0o600)
    go = [os.pipe() for _ in range(WORKERS)]  # test -> worker: write your next record
    done_read, done_write = os.pipe()  # worker -> test: my write returned

    def work(worker: int) -> None:
        log = AuditLog(log_path, shared)
        returned = {}
        for n in range(rounds):
            wait_readable(go[worker][0])
            os.read(go[worker][0], 1)
            log.write({"event": "release", "worker": worker, "n": n})
            returned[n] = now()
            os.write(done_write, b".")
        save_report(report_path(tmp_path, worker), Report(fsyncs.calls, returned))

    try:
        with forked(WORKERS, work) as children:
            for n in range(rounds):
                with log_lock_held(log_path):
                    for _, go_write in go:
                        os.write(go_write, b"g")
                    wait_for_lines(log_path, WORKERS * (n + 1))
                finished = 0
                while finished < WORKERS:
                    wait_readable(done_read)
                    finished += len(os.read(done_read, WORKERS - finished))
            assert children.wait() == [0] * WORKERS
    finally:
        for fd in (done_read, done_write, *(end for pipe in go for end in pipe)):
            os.close(fd)

    reports = {w: load_report(report_path(tmp_path, w)) for w in range(WORKERS)}
    check_log(log_path, reports, rounds)
    # Without group commit this would be WORKERS * rounds; with fewer, a round went unsynced.
    assert sum(len(report.fsyncs) for report in reports.values()) == rounds
