"""`needs-prompt`: the ExecCondition of OpenZFS's zfs-load-key@ROOT units.

Exit 1 skips the prompt for roots the agent manages whose key is not loaded; everything
else, errors included, exits 0 so that OpenZFS prompts as before (never a lock-out).
"""

from __future__ import annotations

import os
from pathlib import Path

from tests.agent.harness import AgentHost
from tests.keyserver import KeyServer


def _host(server: KeyServer, tmp_path: Path, name: str) -> AgentHost:
    host = AgentHost.create(tmp_path, server, name)
    host.zfs.add_pool("tank")
    host.zfs.add_encrypted("tank/managed", os.urandom(32))
    host.zfs.add_child("tank/managed/child")
    host.zfs.add_encrypted("tank/other", os.urandom(32), managed=False)
    host.zfs.add_encrypted("tank/listed", os.urandom(32), managed=False)
    return host


def test_managed_roots_skip_the_prompt_others_keep_it(
    shared_keyserver: KeyServer, tmp_path: Path
) -> None:
    host = _host(shared_keyserver, tmp_path, "prompt-managed")
    host.write_config(extra='[datasets]\ninclude = ["tank/listed"]\n')

    assert host.run("needs-prompt", "tank/managed").returncode == 1
    assert host.run("needs-prompt", "tank/managed/child").returncode == 1
    assert host.run("needs-prompt", "tank/listed").returncode == 1
    other = host.run("needs-prompt", "tank/other")
    assert other.returncode == 0, other.stderr
    # No key server is asked: this runs while the boot waits.
    assert not host.zfs.calls("zfs", "load-key")


def test_any_doubt_leaves_the_prompt(shared_keyserver: KeyServer, tmp_path: Path) -> None:
    host = _host(shared_keyserver, tmp_path, "prompt-doubt")
    missing = host.run("needs-prompt", "tank/absent")
    assert missing.returncode == 0
    assert "leaving the prompt to OpenZFS" in missing.stderr

    assert host.run("needs-prompt", "not a dataset!").returncode == 0

    host.config_path.write_text("this is not toml [")
    broken = host.run("needs-prompt", "tank/managed")
    assert broken.returncode == 0
    assert "leaving the prompt to OpenZFS" in broken.stderr


def test_a_managed_root_whose_key_is_loaded_lets_its_unit_run(
    shared_keyserver: KeyServer, tmp_path: Path
) -> None:
    """A root the initramfs opened: the unit runs, finds the key loaded, and succeeds, so
    mounts that zfs-mount-generator bound to it are not stopped."""
    host = _host(shared_keyserver, tmp_path, "prompt-loaded")
    host.zfs.add_encrypted("tank/opened", os.urandom(32), keystatus="available")
    host.write_config()

    assert host.run("needs-prompt", "tank/managed").returncode == 1
    opened = host.run("needs-prompt", "tank/opened")
    assert opened.returncode == 0, opened.stderr


def test_answer_keeps_the_prompt_of_a_root_whose_key_can_be_typed(
    shared_keyserver: KeyServer, tmp_path: Path
) -> None:
    """With openzfs_prompt = "answer" the password agent answers OpenZFS's prompt, so a
    hex or passphrase root keeps it; a raw key, which no prompt carries, is still skipped."""
    host = _host(shared_keyserver, tmp_path, "prompt-answer")
    host.zfs.add_encrypted("tank/hex", os.urandom(32).hex().encode(), "hex")
    host.zfs.add_encrypted("tank/words", b"correct horse battery staple", "passphrase")
    assert host.run("needs-prompt", "tank/hex").returncode == 1  # "skip", the default
    host.write_config(extra='[datasets]\nopenzfs_prompt = "answer"\n')
    kept = host.run("needs-prompt", "tank/hex")
    assert kept.returncode == 0, kept.stderr
    assert "tank/hex: prompt kept; the password agent answers it" in kept.stderr
    assert host.run("needs-prompt", "tank/words").returncode == 0
    assert host.run("needs-prompt", "tank/managed").returncode == 1  # raw
