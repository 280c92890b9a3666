"""STRATEGY:
1. `enroll --dataset tank/gencache --create`: OpenZFS's org.openzfs.systemd:ignore is on, set on
   the root, and a child created afterwards inherits it (zfs-mount-generator makes no
   units for either); the child is destroyed again.
2. As for a root enrolled by an older version: `zfs inherit` the property, and set up
   zed's cache file for tank (/etc/zfs/zfs-list.cache/tank). Locked and unlocked again,
   the agent warns that systemd may unmount it and names the `zfs set` that fixes it.
3. With the property back on, the same unlock warns no more. The cache file is removed
   whatever happens (no other scenario expects it).
"""

from __future__ import annotations

from pathlib import Path

from tests.vm.guest.harness import Context, check, expect_props, lock

IGNORE = "org.openzfs.systemd:ignore"
CACHE = Path("/etc/zfs/zfs-list.cache/tank")


def run(ctx: Context) -> str:
    ctx.agent("enroll", "--dataset", "tank/gencache", "--create")
    ctx.must("zfs", "create", "tank/gencache/child")
    for name, source in (("tank/gencache", "local"), ("tank/gencache/child", "inherited")):
        got = ctx.must("zfs", "get", "-H", "-o", "value,source", IGNORE, name).strip()
        check(got.startswith(f"on\t{source}"), f"{name}: {IGNORE} is {got!r}")
    ctx.must("zfs", "destroy", "tank/gencache/child")  # lock() unmounts the root alone
    fix = f"zfs set {IGNORE}=on tank/gencache"
    CACHE.parent.mkdir(parents=True, exist_ok=True)
    CACHE.touch()
    try:
        ctx.must("zfs", "inherit", IGNORE, "tank/gencache")
        lock(ctx, "tank/gencache")
        warned = ctx.agent("--dataset", "tank/gencache")
        expect_props(ctx, "tank/gencache", keystatus="available", mounted="yes")
        check(fix in warned.stderr, f"no warning naming {fix!r}: {warned.stderr.strip()!r}")

        ctx.must("zfs", "set", f"{IGNORE}=on", "tank/gencache")
        lock(ctx, "tank/gencache")
        quiet = ctx.agent("--dataset", "tank/gencache")
        expect_props(ctx, "tank/gencache", keystatus="available", mounted="yes")
        check(IGNORE not in quiet.stderr, f"warned again: {quiet.stderr.strip()!r}")
    finally:
        CACHE.unlink(missing_ok=True)
    return f"enroll set {IGNORE}=on (children inherit); without it and with a cache file, a warning"
