"""A host's first run: its configuration (`setup`), its key pair and CSR (`setup`,
`identity`), and the one line the key server's admin runs to enroll it.

The configuration is written whole or not at all (a temporary file, then a link or a
rename into place), and an existing one is replaced only when asked to. The private
key is created 0400 with O_EXCL and never replaced.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

from zfs_unlock_agent import config
from zfs_unlock_agent.errors import AlreadyExists, ConfigError, UsageError
from zfs_unlock_common import pinning, validate
from zfs_unlock_common.syncdir import sync_directory


class Identity(NamedTuple):
    key: Path
    csr: Path
    created: bool  # False: the key existed and was kept (its CSR too, if it exists)


def render_config(servers: Sequence[tuple[str, str]]) -> str:
    """An agent.toml for SERVERS ((url, pin) pairs) with every other setting at its
    default; the documented example (examples/agent.toml) lists them all."""
    lines = [
        "# zfs-unlock-agent configuration, written by 'zfs-unlock-agent setup'.",
        "# Every setting not named here has its default; the commented example, with all of",
        "# them, is /usr/share/doc/zfs-unlock-agent/examples/agent.toml.",
        "# Check it with: zfs-unlock-agent configcheck (offline) and zfs-unlock-agent check.",
        "",
    ]
    for url, pin in servers:
        lines += ["[[server]]", f"url = {_toml_string(url)}", f"pins = [{_toml_string(pin)}]", ""]
    lines += [
        "# This host's identity: the key 'setup' made (0400, it never leaves this host)",
        "# and the certificate the key server's admin issues for it.",
        "[client]",
        'certificate = "client.crt"',
        'key = "client.key"',
        "",
    ]
    return "\n".join(lines)


def _toml_string(text: str) -> str:
    # URLs and pins that passed their checks hold no quote, backslash or control character.
    return f'"{text}"'


def server_pairs(urls: Sequence[str], pins: Sequence[str]) -> list[tuple[str, str]]:
    """Pair each --server with its --pin, each checked as the configuration checks it."""
    if not urls:
        raise UsageError("give at least one --server URL --pin PIN")
    if len(urls) != len(pins):
        raise UsageError("give one --pin for each --server, in the same order")
    from zfs_unlock_agent import transport  # noqa: PLC0415 - check_url is all it needs

    pairs = []
    for url, pin in zip(urls, pins, strict=True):
        try:
            pairs.append((transport.check_url(url), pin))
            pinning.parse_pin(pin)
        except (ValueError, pinning.PinError) as exc:
            raise UsageError(f"{url} {pin}: {exc}") from None
    return pairs


def write_config(path: Path, text: str, force: bool) -> None:
    """Write TEXT to PATH atomically; an existing file stays unless FORCE."""
    config.parse(text, path, check_files=False)  # what we write must be what we read
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd, temporary = tempfile.mkstemp(prefix=".agent.toml.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(temporary, 0o644)  # no secret in it; the client key is a file of its own
        if force:
            os.replace(temporary, path)
        else:
            try:
                os.link(temporary, path)  # fails if PATH exists: no overwrite, no race
            except FileExistsError:
                raise AlreadyExists(f"{path} exists; not replaced (--force replaces it)") from None
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
    sync_directory(path.parent)


def make_identity(key_path: Path, name: str) -> Identity:
    """This host's private key (0400, made once) and a CSR for NAME beside it, made anew
    over an existing key (what `host cert` needs when a certificate expired)."""
    csr_path = key_path.with_suffix(".csr")
    # Only here: the X.509 library is large, and unlock (in an initramfs) never needs it.
    from zfs_unlock_common.csr import csr_for_key, new_key_and_csr  # noqa: PLC0415

    if key_path.exists():
        config.check_private_key_file(key_path, "client key")
        try:
            csr_pem = csr_for_key(key_path.read_bytes(), validate.label(name, "host name"))
        except (ValueError, TypeError):
            raise ConfigError(f"client key {key_path}: cannot sign a request with it") from None
        csr_path.write_bytes(csr_pem)
        return Identity(key_path, csr_path, created=False)

    key_pem, csr_pem = new_key_and_csr(validate.label(name, "host name"))
    key_path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    try:
        fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o400)
    except OSError as exc:
        raise ConfigError(f"client key {key_path}: cannot create: {exc.strerror}") from None
    with os.fdopen(fd, "wb") as handle:
        handle.write(key_pem)
    csr_path.write_bytes(csr_pem)
    return Identity(key_path, csr_path, created=True)


def host_add_line(name: str, machine_id: str, pool_guids: Sequence[str]) -> str:
    """The admin's command on the key server. The certificate comes on standard output,
    which the admin's shell writes: a server that runs as its own user could not write
    the admin's working directory itself."""
    pools = "".join(f" --pool {g}" for g in pool_guids)
    return (
        f"zfs-unlock-server host add {name} --machine-id {machine_id}{pools}"
        f" --csr {shlex.quote(name + '.csr')} > {shlex.quote(name + '.crt')}"
    )
