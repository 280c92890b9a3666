"""zfs_unlock_agent.processes: the secret reaches the child's stdin and nothing else,
output and status come back in order, at most PARALLEL children run at once, a child
past its time is killed, and one that cannot start raises."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

from zfs_unlock_agent.processes import Command, run_all
from zfs_unlock_agent.secret import Secret

ENV = {"PATH": "/usr/bin:/bin", "LC_ALL": "C"}


def test_the_secret_arrives_on_stdin_and_output_comes_back() -> None:
    [finished] = run_all([Command(["cat"], Secret(b"k" * 32))], ENV, timeout=10)
    assert (finished.returncode, finished.stdout, finished.stderr) == (0, b"k" * 32, b"")
    assert not finished.timed_out


def test_status_and_stderr_in_the_order_of_the_commands() -> None:
    commands = [
        Command(["sh", "-c", f"sleep 0.{3 - i}; echo out{i}; echo err{i} >&2; exit {i}"])
        for i in range(3)
    ]
    results = run_all(commands, ENV, timeout=10, parallel=3)
    assert [(r.returncode, r.stdout, r.stderr) for r in results] == [
        (i, f"out{i}\n".encode(), f"err{i}\n".encode()) for i in range(3)
    ]


def test_the_environment_is_only_what_is_given() -> None:
    [finished] = run_all([Command(["env"])], ENV, timeout=10)
    assert sorted(finished.stdout.decode().splitlines()) == ["LC_ALL=C", "PATH=/usr/bin:/bin"]


def test_at_most_parallel_children_run_at_once(tmp_path: Path) -> None:
    trace = tmp_path / "trace"
    step = f"echo + >> {trace}; sleep 0.2; echo - >> {trace}"
    run_all([Command(["sh", "-c", step]) for _ in range(6)], ENV, timeout=10, parallel=3)
    running, most = 0, 0
    for mark in trace.read_text().split():
        running += 1 if mark == "+" else -1
        most = max(most, running)
    assert most == 3


def test_a_child_past_its_time_is_killed() -> None:
    start = time.monotonic()
    slow, quick = run_all(
        [Command(["sleep", "30"]), Command(["true"])], ENV, timeout=0.5, parallel=2
    )
    assert slow.timed_out and slow.returncode == -9
    assert not quick.timed_out and quick.returncode == 0
    assert time.monotonic() - start < 5


def test_output_closed_before_the_exit_waits_for_the_exit() -> None:
    [finished] = run_all([Command(["sh", "-c", "exec >&- 2>&-; sleep 0.3; exit 4"])], ENV, 10)
    assert finished.returncode == 4 and not finished.timed_out


def test_a_child_that_ignores_its_stdin_is_no_error() -> None:
    [finished] = run_all([Command(["true"], Secret(b"x" * 32))], ENV, timeout=10)
    assert finished.returncode == 0


def test_a_program_that_cannot_start_raises() -> None:
    with pytest.raises(FileNotFoundError):
        run_all([Command(["true"]), Command(["/nonexistent/zfs"])], ENV, timeout=10)


def test_a_bare_name_is_found_in_the_given_path_only(tmp_path: Path) -> None:
    program = tmp_path / "say-hello"
    program.write_text("#!/bin/sh\necho hello\n")
    program.chmod(0o755)
    env = {**ENV, "PATH": f"{tmp_path}:/usr/bin:/bin"}
    [finished] = run_all([Command(["say-hello"])], env, timeout=10)
    assert finished.stdout == b"hello\n"
    with pytest.raises(FileNotFoundError):
        run_all([Command(["say-hello"])], ENV, timeout=10)


def test_a_file_that_is_not_executable_is_refused(tmp_path: Path) -> None:
    (tmp_path / "zfs").write_text("#!/bin/sh\n")
    with pytest.raises(PermissionError):
        run_all([Command(["zfs"])], {**ENV, "PATH": str(tmp_path)}, timeout=10)


def test_no_descriptor_of_ours_reaches_the_child_and_sigpipe_is_default() -> None:
    inherited = os.open(os.devnull, os.O_RDONLY)
    os.set_inheritable(inherited, True)  # as if our own parent had passed it on
    try:
        script = (
            f"test -e /proc/$$/fd/{inherited} && echo leaked || echo closed;"
            " sed -n 's/^SigIgn:\\t//p' /proc/$$/status"
        )
        [finished] = run_all([Command(["sh", "-c", script], Secret(b"k"))], ENV, timeout=10)
    finally:
        os.close(inherited)
    descriptor, ignored = finished.stdout.decode().splitlines()
    assert descriptor == "closed"
    assert not int(ignored, 16) & (1 << (signal.SIGPIPE - 1))  # Python ignores it; zfs must not
