"""Entering a data directory for an admin command: read what the admin named, then become
the directory's owner (privileges.become_owner), then check what will be written.

The order matters when root runs the command on a directory the service's user owns: a
CSR, a database to import or a master key credential may be readable by root only, so
they are read first, with the admin's own rights; an output the owner could not write is
refused after the switch, before anything changes.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

from zfs_unlock_server import config as server_config
from zfs_unlock_server import privileges, sealing
from zfs_unlock_server.errors import DataError
from zfs_unlock_server.sealing import Sealer
from zfs_unlock_server.simplezfs import SimpleZfsRow, read_simplezfs


@dataclass(frozen=True)
class Output:
    """A path the command will write, so the data directory's owner must be able to."""

    path: Path
    option: str  # how the command line named it, for the message
    hint: str = ""


@dataclass(frozen=True)
class Wants:
    """What one admin command names on its command line."""

    csr: str | None = None  # a CSR file, '-' for standard input
    simplezfs: Path | None = None  # a SimpleZFSKeySystem database to import
    seals_keys: bool = False  # it needs the master key
    outputs: tuple[Output, ...] = ()


@dataclass(frozen=True)
class AdminInputs:
    """What was read with the admin's own rights, for the command to use."""

    csr_pem: bytes | None = None
    simplezfs_rows: tuple[SimpleZfsRow, ...] | None = None
    # The credential, read before the switch; None: the command reads the master key
    # itself (it did not switch, so it can).
    master: Sealer | None = None


def enter_data_dir(data_dir: Path, wants: Wants) -> AdminInputs:
    """Read WANTS' inputs, become DATA_DIR's owner if root should, check WANTS' outputs."""
    layout = server_config.Layout(data_dir)
    if not layout.config.is_file():
        server_config.load(layout)  # raises: not a data directory, said before anything else
    csr_pem = read_input(wants.csr) if wants.csr else None
    rows = tuple(read_simplezfs(wants.simplezfs)) if wants.simplezfs is not None else None
    if privileges.owner_to_become(data_dir) is None:
        return AdminInputs(csr_pem, rows)
    master = sealing.load_credential() if wants.seals_keys else None
    privileges.become_owner(data_dir)
    for output in wants.outputs:
        privileges.check_writable(output.path, output.option, output.hint)
    return AdminInputs(csr_pem, rows, master)


def read_input(path: str) -> bytes:
    """PATH's bytes, or standard input's for '-'."""
    try:
        return sys.stdin.buffer.read() if path == "-" else Path(path).read_bytes()
    except OSError as exc:
        raise DataError(f"{path}: {exc.strerror}") from None
