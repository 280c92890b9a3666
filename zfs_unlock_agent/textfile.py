"""The daemon's state for Prometheus's node_exporter, in its textfile-collector format.

node_exporter reads every *.prom file of one directory at each scrape; the daemon
rewrites its own file whole (a temporary file renamed over it, so a scrape never sees
half of one) after each pass and check-in. It says how many managed encryption roots
are locked and unlocked, when the daemon last succeeded and when it last failed, and
the last failure's message: no key, no server answer, nothing secret.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path

MAX_MESSAGE = 200  # a label value, not a log


@dataclass(frozen=True)
class AgentState:
    unlocked: int
    locked: int
    last_success: float | None  # Unix time; None: not yet
    last_error: float | None
    last_error_message: str


def render(state: AgentState) -> str:
    lines = [
        "# HELP zfs_unlock_agent_roots Managed encryption roots, by key state.",
        "# TYPE zfs_unlock_agent_roots gauge",
        f'zfs_unlock_agent_roots{{state="unlocked"}} {state.unlocked}',
        f'zfs_unlock_agent_roots{{state="locked"}} {state.locked}',
    ]
    lines += _timestamp(
        "zfs_unlock_agent_last_success_timestamp_seconds",
        "When an unlock pass or a check-in last succeeded.",
        state.last_success,
    )
    lines += _timestamp(
        "zfs_unlock_agent_last_error_timestamp_seconds",
        "When an unlock or a check-in last failed.",
        state.last_error,
    )
    if state.last_error is not None:
        lines += [
            "# HELP zfs_unlock_agent_last_error_info The last failure's message.",
            "# TYPE zfs_unlock_agent_last_error_info gauge",
            f'zfs_unlock_agent_last_error_info{{message="{_label(state.last_error_message)}"}} 1',
        ]
    return "\n".join(lines) + "\n"


def _timestamp(name: str, help_text: str, value: float | None) -> list[str]:
    if value is None:
        return []
    return [f"# HELP {name} {help_text}", f"# TYPE {name} gauge", f"{name} {value:.3f}"]


def _label(text: str) -> str:
    """A label value: one line, escaped as the exposition format wants, and short."""
    line = " ".join(text.split())[:MAX_MESSAGE]
    return line.replace("\\", "\\\\").replace('"', '\\"')


def write(path: Path, state: AgentState) -> None:
    """Replace PATH with STATE (0644: node_exporter runs as another user). Raises OSError."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        with os.fdopen(descriptor, "w", encoding="utf-8") as handle:
            handle.write(render(state))
        os.chmod(temporary, 0o644)  # whatever the umask
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            temporary.unlink()
        raise
