"""Entering a data directory for an admin command: read what the admin named and open
what it will write, then become the directory's owner (privileges.become_owner).

The order matters when root runs the command on a directory the service's user owns: a
CSR, a database to import or a master key credential may be readable by root only, and
an output (--cert-out, --issue-key) may be in a directory only root may write, so they
are read and opened first, with the admin's own rights (outputs.py).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

from zfs_unlock_server import config as server_config
from zfs_unlock_server import privileges, sealing
from zfs_unlock_server.atomicout import AtomicOutput
from zfs_unlock_server.errors import DataError
from zfs_unlock_server.outputs import HostBundle, Outputs, open_file
from zfs_unlock_server.sealing import Sealer
from zfs_unlock_server.simplezfs import SimpleZfsRow, read_simplezfs


@dataclass(frozen=True)
class Output:
    """A path the command will write: a file, or a directory for a host's key pair."""

    path: Path
    option: str  # how the command line named it, for messages and Outputs.file()
    bundle: bool = False


@dataclass(frozen=True)
class Wants:
    """What one admin command names on its command line."""

    csr: str | None = None  # a CSR file, '-' for standard input
    simplezfs: Path | None = None  # a SimpleZFSKeySystem database to import
    seals_keys: bool = False  # it needs the master key
    outputs: tuple[Output, ...] = ()
    # A file that holds a secret, written whole or not at all (atomicout.py), with --force
    secret_out: tuple[Output, bool] | None = None


@dataclass(frozen=True)
class AdminInputs:
    """What was read with the admin's own rights, for the command to use."""

    csr_pem: bytes | None = None
    simplezfs_rows: tuple[SimpleZfsRow, ...] | None = None
    # The credential, read before the switch; None: the command reads the master key
    # itself (it did not switch, so it can).
    master: Sealer | None = None
    outputs: Outputs = field(default_factory=Outputs)
    secret_out: AtomicOutput | None = None

    def finish(self, succeeded: bool) -> None:
        """Close the outputs; what the command created stays only when it succeeded (a
        secret output only once the command committed it)."""
        self.outputs.finish(succeeded)
        if self.secret_out is not None:
            self.secret_out.discard()


def enter_data_dir(data_dir: Path, wants: Wants) -> AdminInputs:
    """Read WANTS' inputs and open its outputs, then become DATA_DIR's owner if root should.
    The caller ends with AdminInputs.outputs.finish()."""
    layout = server_config.Layout(data_dir)
    if not layout.config.is_file():
        server_config.load(layout)  # raises: not a data directory, said before anything else
    csr_pem = read_input(wants.csr) if wants.csr else None
    rows = tuple(read_simplezfs(wants.simplezfs)) if wants.simplezfs is not None else None
    switch = privileges.owner_to_become(data_dir) is not None
    master = sealing.load_credential() if switch and wants.seals_keys else None
    outputs = open_outputs(wants.outputs)  # last: a refusal above leaves nothing to remove
    secret_out = None
    try:
        if wants.secret_out is not None:
            output, force = wants.secret_out
            secret_out = AtomicOutput.open(output.path, output.option, force)
        if switch:
            outputs.clean_up_as_invoker()
            privileges.become_owner(data_dir)
    except BaseException:
        outputs.finish(succeeded=False)
        if secret_out is not None:
            secret_out.discard()
        raise
    return AdminInputs(csr_pem, rows, master, outputs, secret_out)


def open_outputs(wanted: tuple[Output, ...]) -> Outputs:
    outputs = Outputs()
    try:
        for output in wanted:
            if output.bundle:
                outputs.bundle = HostBundle.open(output.path, output.option)
            else:
                outputs.files[output.option] = open_file(output.path, output.option)
    except BaseException:
        outputs.finish(succeeded=False)
        raise
    return outputs


def read_input(path: str) -> bytes:
    """PATH's bytes, or standard input's for '-'."""
    try:
        return sys.stdin.buffer.read() if path == "-" else Path(path).read_bytes()
    except OSError as exc:
        raise DataError(f"{path}: {exc.strerror}") from None
