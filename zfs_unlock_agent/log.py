"""The agent's log: one line per message on stderr; under systemd, with the <N> priority
prefixes journald understands.

It is all the agent needs of the logging package, whose imports (traceback, linecache,
tokenize, string, weakref) would cost every cold unlock about 6 ms.
"""

from __future__ import annotations

import os
import sys
from typing import TextIO

DEBUG, INFO, WARNING, ERROR = 10, 20, 30, 40
_NAMES = {DEBUG: "DEBUG", INFO: "INFO", WARNING: "WARNING", ERROR: "ERROR"}
_PRIORITY = {DEBUG: 7, INFO: 6, WARNING: 4, ERROR: 3}  # syslog's, as journald reads them


class Log:
    """Messages with %-style arguments, formatted only when they are written."""

    def __init__(self) -> None:
        self.level = INFO
        self.journal = False
        self.progress_level = DEBUG

    def setup(self, verbose: bool) -> None:
        """DEBUG and up when VERBOSE, else INFO and up; journald's prefixes when systemd
        connected stderr to the journal (it sets JOURNAL_STREAM). Progress goes out at INFO
        when someone watches (a terminal, or VERBOSE), else at DEBUG: a daemon waiting for
        its server must not fill the journal with one line per try."""
        self.level = DEBUG if verbose else INFO
        self.journal = bool(os.environ.get("JOURNAL_STREAM"))
        self.progress_level = INFO if verbose or _watched(sys.stderr) else DEBUG

    def debug(self, message: str, *args: object, exc_info: bool = False) -> None:
        self._write(DEBUG, message, args, exc_info)

    def info(self, message: str, *args: object) -> None:
        self._write(INFO, message, args)

    def progress(self, message: str, *args: object) -> None:
        """How a wait goes (a failed try, the next pause); see setup() for its level."""
        self._write(self.progress_level, message, args)

    def warning(self, message: str, *args: object) -> None:
        self._write(WARNING, message, args)

    def error(self, message: str, *args: object) -> None:
        self._write(ERROR, message, args)

    def _write(
        self, level: int, message: str, args: tuple[object, ...], exc_info: bool = False
    ) -> None:
        if level < self.level:
            return
        text = message % args if args else message
        if exc_info and sys.exc_info()[0] is not None:
            import traceback  # noqa: PLC0415 - only a -v run that hit a bug needs it

            text += "\n" + traceback.format_exc().rstrip("\n")
        if self.journal:
            line = f"<{_PRIORITY[level]}>{text}\n"
        else:
            line = f"zfs-unlock-agent: {_NAMES[level]}: {text}\n"
        try:
            sys.stderr.write(line)
            sys.stderr.flush()
        except (OSError, ValueError):  # no stderr to write to must not stop an unlock
            pass


def _watched(stream: TextIO | None) -> bool:
    """True when STREAM is a terminal: someone reads the lines as they come."""
    try:
        return stream is not None and stream.isatty()
    except (OSError, ValueError):  # closed, or no file behind it
        return False


log = Log()
