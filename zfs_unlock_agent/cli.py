"""zfs-unlock-agent command line."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from zfs_unlock_agent import __version__


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="zfs-unlock-agent",
        description="Unlock OpenZFS encrypted datasets with keys from a zfs-unlock key server.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    build_parser().parse_args(argv)
    return 0
