"""STRATEGY:
1. tank/mig-file: keyformat=hex, keylocation=file:///root/mig-file.key; write a file;
   lock it.
2. `enroll --dataset tank/mig-file` loads the key from its file itself, then moves the
   dataset to a server key: keyformat=raw, keylocation=prompt, managed=on.
3. Delete the key file; lock; `zfs-unlock-agent --dataset` opens and mounts it, data
   intact.
"""

from __future__ import annotations

import os
from pathlib import Path

from tests.vm.guest.harness import (
    Context,
    expect_migrated,
    lock_tree,
    unlock_after_unload,
    write_data,
)


def run(ctx: Context) -> str:
    root, keyfile = "tank/mig-file", Path("/root/mig-file.key")
    keyfile.write_text(os.urandom(32).hex() + "\n")
    keyfile.chmod(0o400)
    ctx.must(
        "zfs", "create", "-o", "encryption=on", "-o", "keyformat=hex",
        "-o", f"keylocation=file://{keyfile}", root,
    )  # fmt: skip
    files = {f"/{root}/file": write_data(f"/{root}/file")}
    ctx.must("sync")
    lock_tree(ctx, root)
    ctx.agent("enroll", "--dataset", root)
    expect_migrated(ctx, root)
    keyfile.unlink()
    unlock_after_unload(ctx, root, files)
    return "file:// hex key moved to a server key; opened without the file"
