"""zfs_unlock_agent.log: the line formats the tests and journald read, the level filter,
a traceback only where asked, and a log that cannot be written stops nothing."""

from __future__ import annotations

import io

import pytest

from zfs_unlock_agent.log import Log


@pytest.fixture(autouse=True)
def not_under_systemd(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("JOURNAL_STREAM", raising=False)


def test_plain_lines_name_the_program_and_the_level(capsys: pytest.CaptureFixture[str]) -> None:
    log = Log()
    log.setup(verbose=False)
    log.info("%s: unlocked (%s)", "tank/a", "key loaded")
    log.warning("50% done")  # no arguments: no formatting
    log.debug("not shown")
    assert capsys.readouterr().err == (
        "zfs-unlock-agent: INFO: tank/a: unlocked (key loaded)\n"
        "zfs-unlock-agent: WARNING: 50% done\n"
    )


def test_under_systemd_lines_carry_journald_priorities(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("JOURNAL_STREAM", "8:1234")
    log = Log()
    log.setup(verbose=True)
    log.debug("d")
    log.info("i")
    log.warning("w")
    log.error("e")
    assert capsys.readouterr().err == "<7>d\n<6>i\n<4>w\n<3>e\n"


def test_a_traceback_only_with_exc_info_while_handling(capsys: pytest.CaptureFixture[str]) -> None:
    log = Log()
    log.setup(verbose=True)
    log.debug("no exception", exc_info=True)  # noqa: LOG014 - what it does then is the test
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        log.debug("traceback", exc_info=True)
    lines = capsys.readouterr().err.splitlines()
    assert lines[0] == "zfs-unlock-agent: DEBUG: no exception"
    assert lines[1] == "zfs-unlock-agent: DEBUG: traceback"
    assert lines[2] == "Traceback (most recent call last):"
    assert lines[-1] == "RuntimeError: boom"


def test_a_closed_stderr_is_no_error(monkeypatch: pytest.MonkeyPatch) -> None:
    closed = io.StringIO()
    closed.close()
    monkeypatch.setattr("sys.stderr", closed)
    Log().error("nobody hears this")
