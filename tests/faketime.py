"""Another clock for one process and its children, with Debian's libfaketime (LD_PRELOAD):
the real program, its real system calls, only the wall clock moved."""

from __future__ import annotations

from pathlib import Path

import pytest

LIBFAKETIME = Path("/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1")


def faketime_env(offset: str, sleeps: bool = False) -> dict[str, str]:
    """Environment that moves the wall clock by OFFSET ("+340d", "-2h"); the monotonic
    clocks, which time the program's own timeouts, stay as they are. SLEEPS: a program
    that sleeps (gunicorn's arbiter) gets its monotonic clocks moved by as much, since
    libfaketime 0.9.10 makes Python's time.sleep fail (EINVAL) when only the wall clock
    moves; a constant shift leaves every interval it measures as it was."""
    if not LIBFAKETIME.exists():
        pytest.fail(f"{LIBFAKETIME} is missing: scripts/test.sh installs libfaketime")
    return {
        "LD_PRELOAD": str(LIBFAKETIME),
        "FAKETIME": offset,
        "FAKETIME_DONT_FAKE_MONOTONIC": "0" if sleeps else "1",
        "FAKETIME_NO_CACHE": "1",
    }
