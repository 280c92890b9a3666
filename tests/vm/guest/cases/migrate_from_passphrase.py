"""STRATEGY:
1. tank/mig-pass: keyformat=passphrase, keylocation=prompt, loaded, with a file.
2. `enroll --dataset tank/mig-pass` moves it to a server key: keyformat=raw,
   keylocation=prompt, managed=on; the passphrase no longer opens it.
3. Lock; `zfs-unlock-agent --dataset` opens and mounts it, data intact.
"""

from __future__ import annotations

from tests.vm.guest.harness import (
    Context,
    check,
    expect_migrated,
    new_dataset,
    unlock_after_unload,
    write_data,
)


def run(ctx: Context) -> str:
    root = "tank/mig-pass"
    passphrase = b"correct horse battery staple"
    new_dataset(ctx, root, passphrase, "passphrase")
    files = {f"/{root}/file": write_data(f"/{root}/file")}
    ctx.agent("enroll", "--dataset", root)
    expect_migrated(ctx, root)
    old = ctx.run("zfs", "load-key", "-n", "-L", "prompt", root, stdin=passphrase)
    check(old.returncode != 0, "the old passphrase still opens the dataset")
    unlock_after_unload(ctx, root, files)
    return "passphrase dataset moved to a server key (raw); the passphrase is gone"
