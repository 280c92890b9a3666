"""Reading the tables of a rendered docs/benchmarks.md back, for the tests."""

from __future__ import annotations


def table_after(text: str, heading: str) -> list[list[str]]:
    """The cells of the first table after HEADING, its header included, its rule not."""
    rows: list[list[str]] = []
    for line in text[text.index(heading) :].splitlines():
        if line.startswith("|"):
            rows.append([cell.strip() for cell in line.strip("|").split("|")])
        elif rows:
            break
    return [rows[0], *rows[2:]]
