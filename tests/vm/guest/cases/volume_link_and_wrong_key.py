"""STRATEGY:
1. Enroll tank/vols, give it a volume, lock it: no /dev/zvol link while locked.
2. `zfs-unlock-agent --dataset tank/vols` exits 0 once udev has made the link
   /dev/zvol/tank/vols/vol (the agent waits for it).
3. Re-key the dataset behind the agent's back (`zfs change-key`) and lock it:
   the agent exits 79 (EX_BADKEY) and the key stays unavailable.
"""

from __future__ import annotations

import os
from pathlib import Path

from tests.vm.guest.harness import (
    Context,
    check,
    expect_props,
    lock,
)


def run(ctx: Context) -> str:
    ctx.agent("enroll", "--dataset", "tank/vols", "--create")
    ctx.must("zfs", "create", "-V", "16M", "tank/vols/vol")
    link = Path("/dev/zvol/tank/vols/vol")
    ctx.must("udevadm", "settle")
    check(link.exists(), f"{link} missing after zfs create")
    lock(ctx, "tank/vols")
    ctx.must("udevadm", "settle")
    check(not link.exists(), f"{link} exists while locked")
    ctx.agent("--dataset", "tank/vols")
    check(link.exists(), f"{link} missing after unlock")
    rekey = ["-o", "keylocation=prompt", "-o", "keyformat=raw"]
    ctx.must("zfs", "change-key", *rekey, "tank/vols", stdin=os.urandom(32))
    lock(ctx, "tank/vols")
    ctx.agent("--dataset", "tank/vols", expect=79)
    expect_props(ctx, "tank/vols", keystatus="unavailable")
    ctx.must("zfs", "destroy", "-r", "tank/vols")  # a dataset the server's key cannot open
    return "volume link appeared on unlock; a wrong server key exits 79"
