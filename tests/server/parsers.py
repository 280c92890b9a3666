"""The server's command-line parsers, for tests that check each command's help and page."""

from __future__ import annotations

import argparse

from zfs_unlock_server.cli import build_parser


def every_parser() -> dict[str, argparse.ArgumentParser]:
    """The program's parser and every command's, leaves and groups ("host") alike."""
    found: dict[str, argparse.ArgumentParser] = {}

    def walk(parser: argparse.ArgumentParser, words: tuple[str, ...]) -> None:
        found[" ".join(words)] = parser
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, child in action.choices.items():
                    walk(child, (*words, name))

    walk(build_parser(), ())
    return found
