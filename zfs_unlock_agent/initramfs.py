"""Rebuild this host's initramfs, so that the unlock at boot trusts what the host learned
while running (a server's next pin, learnedpins.py).

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

from zfs_unlock_agent.errors import AgentError
from zfs_unlock_agent.log import log

TIMEOUT = 900.0  # dracut and mkinitramfs take a minute or two per kernel on slow disks
KEEPALIVE_EVERY = 10.0
_TOOLS = (
    ("update-initramfs", ("-u", "-k", "all")),
    ("dracut", ("--regenerate-all", "--force")),
)


class InitramfsFailed(AgentError):
    """The initramfs could not be rebuilt; it does not hold what was learned."""


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
