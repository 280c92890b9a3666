"""The man page documents exactly the exit codes the agent can return."""

from __future__ import annotations

import re
from pathlib import Path

from zfs_unlock_agent import errors

MAN_PAGE = Path(__file__).parents[2] / "docs" / "man" / "zfs-unlock-agent.8"


def documented_codes() -> set[int]:
    text = MAN_PAGE.read_text()
    section = text.split(".SH EXIT STATUS", 1)[1].split(".SH ", 1)[0]
    return {int(code) for code in re.findall(r"^\.TP\n\.B (\d+)$", section, re.MULTILINE)}


def test_every_exit_code_is_documented_and_nothing_else() -> None:
    defined = {value for name, value in vars(errors).items() if name.startswith("EX_")}
    assert documented_codes() == defined


def test_every_error_class_maps_to_a_documented_code() -> None:
    classes = [
        c for c in vars(errors).values() if isinstance(c, type) and issubclass(c, errors.AgentError)
    ]
    assert len(classes) > 5
    assert {c.exit_code for c in classes} <= documented_codes()
