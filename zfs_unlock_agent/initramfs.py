"""Rebuild this host's initramfs, so that the unlock at boot has what the host changed
while running: the server pins it learned (learnedpins.py), its renewed certificate
(renew.py).

Whoever changes a file the initramfs copies marks the initramfs stale first (a file in
the state directory); refresh() rebuilds it and only then clears the mark, so a crash or
a failed rebuild leaves the mark, and the daemon tries again at its next check-in.

The command is [daemon] initramfs_update, or found here: update-initramfs where
initramfs-tools builds the images, dracut where dracut does; each rebuilds the image of
every installed kernel (any of them may boot next), and their hooks copy the learned pins
(bootfiles.py lists them). Under systemd the command runs as a transient unit through
systemd-run: the daemon's own sandbox is made for unlocking, not for writing /boot.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from zfs_unlock_agent.errors import AgentError
from zfs_unlock_agent.log import log
from zfs_unlock_common.syncdir import sync_directory

TIMEOUT = 900.0  # dracut and mkinitramfs take a minute or two per kernel on slow disks
KEEPALIVE_EVERY = 10.0
_TOOLS = (
    ("update-initramfs", ("-u", "-k", "all")),
    ("dracut", ("--regenerate-all", "--force")),
)


STALE_MARK = "initramfs-stale"


class InitramfsFailed(AgentError):
    """The initramfs could not be rebuilt; it does not hold what was learned."""


def mark_stale(state_directory: Path) -> None:
    """Record, durably, that the initramfs lacks what is about to change."""
    state_directory.mkdir(mode=0o755, parents=True, exist_ok=True)
    mark = state_directory / STALE_MARK
    if mark.exists():
        return
    descriptor = os.open(mark, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
    sync_directory(state_directory)


def is_stale(state_directory: Path) -> bool:
    return (state_directory / STALE_MARK).exists()


def refresh(
    state_directory: Path,
    command: tuple[str, ...] | None,
    keepalive: Callable[[], None] = lambda: None,
) -> None:
    """Rebuild the initramfs if it is marked stale, then clear the mark (InitramfsFailed
    leaves it). Nothing to rebuild (no initramfs builder, or initramfs_update = []) clears
    it too: no image here copies anything."""
    if not is_stale(state_directory):
        return
    rebuild(command, keepalive)
    try:
        (state_directory / STALE_MARK).unlink(missing_ok=True)
        sync_directory(state_directory)
    except OSError as exc:
        raise InitramfsFailed(f"cannot clear {state_directory / STALE_MARK}: {exc}") from None


def default_command() -> tuple[str, ...]:
    """The system's initramfs builder for every installed kernel; () when there is none."""
    for tool, arguments in _TOOLS:
        if shutil.which(tool, path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin"):
            return (tool, *arguments)
    return ()


def rebuild(command: tuple[str, ...] | None, keepalive: Callable[[], None] = lambda: None) -> bool:
    """Run COMMAND (None: default_command()), calling KEEPALIVE every few seconds while it
    runs (the daemon's watchdog); False when there is nothing to rebuild. Raises
    InitramfsFailed with the tool's last words when it fails."""
    argv = default_command() if command is None else command
    if not argv:
        return False
    if os.environ.get("INVOCATION_ID") and shutil.which("systemd-run"):
        argv = ("systemd-run", "--wait", "--collect", "--quiet", "--pipe", "--", *argv)
    log.info("rebuilding the initramfs: %s", " ".join(argv))
    try:
        child = subprocess.Popen(  # noqa: S603 (the administrator's command, or ours)
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            errors="replace",
        )
    except OSError as exc:
        raise InitramfsFailed(f"cannot rebuild the initramfs ({argv[0]}): {exc}") from None
    deadline = time.monotonic() + TIMEOUT
    output = ""
    with child:
        while True:
            try:
                output = child.communicate(timeout=KEEPALIVE_EVERY)[0]
                break
            except subprocess.TimeoutExpired:
                keepalive()
                if time.monotonic() > deadline:
                    child.kill()
                    child.communicate()
                    raise InitramfsFailed(
                        f"{' '.join(argv)} did not finish in {TIMEOUT:g} s"
                    ) from None
    if child.returncode:
        last = output.strip().splitlines()[-3:]
        raise InitramfsFailed(
            f"{' '.join(argv)} failed (exit {child.returncode}): {' / '.join(last)}"
        )
    return True
