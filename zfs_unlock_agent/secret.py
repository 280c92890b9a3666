"""Key material in a mutable buffer that is wiped after use and never printed.

Python cannot promise that no copy exists (the TLS and HTTP layers hold
immutable bytes); what we own, we wipe.
"""

from __future__ import annotations

from types import TracebackType
from typing import Self


class Secret:
    __slots__ = ("_buffer",)

    def __init__(self, material: bytes | bytearray | memoryview) -> None:
        self._buffer = bytearray(material)

    def __len__(self) -> int:
        return len(self._buffer)

    def __repr__(self) -> str:
        return f"Secret(len={len(self._buffer)})"

    __str__ = __repr__

    def view(self) -> memoryview:
        """A read-only view for writing to a pipe without copying."""
        return memoryview(self._buffer).toreadonly()

    def buffer(self) -> bytearray:
        """The buffer itself, for checks that need bytes semantics. Do not keep or copy it."""
        return self._buffer

    def wipe(self) -> None:
        self._buffer[:] = bytes(len(self._buffer))  # same length: overwritten in place

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.wipe()

    def __eq__(self, other: object) -> bool:
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]
