"""A value worked out from a file's contents, worked out again only when the file changes
(another inode, or another modification time): what a serving worker reads per request
from files that an admin command replaces while it runs (the served certificate's pin,
the next CA's key id)."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T")


class Derived(Generic[T]):
    def __init__(self, path: os.PathLike[str], derive: Callable[[bytes], T], missing: T) -> None:
        self.path = path
        self._derive = derive
        self._missing = missing
        self._seen: tuple[int, int] | None = None
        self._value = missing

    def __call__(self) -> T:
        """The value for the file as it is now; MISSING while there is no file. A file that
        cannot be read or derived from leaves the last value (the TLS context, read from
        the same files, keeps its last good state too)."""
        try:
            stat = os.stat(self.path)
        except FileNotFoundError:
            self._seen, self._value = None, self._missing
            return self._value
        except OSError:
            return self._value
        seen = (stat.st_ino, stat.st_mtime_ns)
        if seen != self._seen:
            try:
                with open(self.path, "rb") as file:
                    self._value = self._derive(file.read())
                self._seen = seen
            except (OSError, ValueError):
                pass
        return self._value
