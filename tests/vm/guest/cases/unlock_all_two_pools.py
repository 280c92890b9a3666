"""STRATEGY:
1. Enroll four encryption roots with `enroll --create`: tank/ua, tank/ub (mountpoint /srv/ub),
   tank2/uc, and tank/ua/nest/inner, a root nested inside tank/ua's tree.
2. Give them children with inherited keys: tank/ua/docs(/deep), tank/ua/none
   (mountpoint=none), tank/ua/legacy (mountpoint=legacy), tank/ua/noauto
   (canmount=noauto) with a child tank/ua/noauto/kid that zfs mount -a does mount,
   tank/ua/nest/inner/leaf, tank2/uc/data and the volume tank2/uc/vol.
   Write data everywhere (the volume: its first block; legacy and noauto: mounted
   by hand, then unmounted).
3. `zfs mount -a`: what it mounts is the expected set (ZFS's own answer).
4. Lock the three trees (unmount, `zfs unload-key -r`): nothing mounted, no volume link.
5. `zfs-unlock-agent unlock --all` exits 0; every key is loaded; exactly the expected
   set is mounted (none, legacy and noauto are not); /dev/zvol/tank2/uc/vol exists;
   every file and the volume's block are intact; `zfs mount -a` then finds nothing
   left to mount; noauto and legacy, mounted by hand, still hold their data.
"""

from __future__ import annotations

import os
from pathlib import Path

from tests.vm.guest.harness import (
    Context,
    check,
    expect_data,
    expect_props,
    keystatus,
    lock_tree,
    mounted_below,
    write_data,
)


def run(ctx: Context) -> str:
    tops = ("tank/ua", "tank/ub", "tank2/uc")
    for root in ("tank/ua", "tank/ub", "tank2/uc"):
        ctx.agent("enroll", "--dataset", root, "--create")
    ctx.must("zfs", "set", "mountpoint=/srv/ub", "tank/ub")
    ctx.must("zfs", "create", "-p", "tank/ua/docs/deep")
    ctx.must("zfs", "create", "tank/ua/nest")
    ctx.agent("enroll", "--dataset", "tank/ua/nest/inner", "--create")
    ctx.must("zfs", "create", "tank/ua/nest/inner/leaf")
    ctx.must("zfs", "create", "-o", "mountpoint=none", "tank/ua/none")
    ctx.must("zfs", "create", "-o", "mountpoint=legacy", "tank/ua/legacy")
    ctx.must("zfs", "create", "-o", "canmount=noauto", "tank/ua/noauto")
    ctx.must("zfs", "create", "tank2/uc/data")
    ctx.must("zfs", "create", "-V", "16M", "tank2/uc/vol")
    expect_props(ctx, "tank/ua/nest/inner", encryptionroot="tank/ua/nest/inner")
    expect_props(ctx, "tank/ua/nest/inner/leaf", encryptionroot="tank/ua/nest/inner")
    expect_props(ctx, "tank/ua/nest", encryptionroot="tank/ua")

    files = {
        path: write_data(path)
        for path in (
            "/tank/ua/file",
            "/tank/ua/docs/deep/file",
            "/tank/ua/nest/inner/leaf/file",
            "/srv/ub/file",
            "/tank2/uc/data/file",
        )
    }
    by_hand: dict[str, str] = {}
    ctx.must("zfs", "mount", "tank/ua/noauto")
    by_hand["/tank/ua/noauto/file"] = write_data("/tank/ua/noauto/file")
    ctx.must("zfs", "unmount", "tank/ua/noauto")
    ctx.must("zfs", "create", "tank/ua/noauto/kid")  # canmount=on below a noauto parent
    files["/tank/ua/noauto/kid/file"] = write_data("/tank/ua/noauto/kid/file")
    legacy_dir = Path("/mnt/ua-legacy")
    legacy_dir.mkdir(exist_ok=True)
    ctx.must("mount.zfs", "tank/ua/legacy", str(legacy_dir))
    by_hand[f"{legacy_dir}/file"] = write_data(f"{legacy_dir}/file")
    ctx.must("umount", str(legacy_dir))
    link = Path("/dev/zvol/tank2/uc/vol")
    ctx.must("udevadm", "settle")
    block = os.urandom(4096)
    with link.open("r+b") as vol:
        vol.write(block)
    ctx.must("sync")

    ctx.must("zfs", "mount", "-a")
    expected = mounted_below(ctx, *tops)
    wanted = {n for n, m in expected.items() if m == "yes"}
    never = {"tank/ua/none", "tank/ua/legacy", "tank/ua/noauto"}
    check(not wanted & never, f"zfs mount -a mounted {sorted(wanted & never)}")
    check("tank/ua/noauto/kid" in wanted, "zfs mount -a did not mount tank/ua/noauto/kid")

    lock_tree(ctx, *tops)
    check(set(mounted_below(ctx, *tops).values()) <= {"no", "-"}, "mounted while locked")
    ctx.must("udevadm", "settle")
    check(not link.exists(), f"{link} exists while locked")

    ctx.agent("unlock", "--all")
    after = mounted_below(ctx, *tops)
    check(after == expected, f"mounted after unlock: {after}; zfs mount -a: {expected}")
    locked = {n: s for n, s in keystatus(ctx, after).items() if s != "available"}
    check(not locked, f"still locked: {locked}")
    check(link.exists(), f"{link} missing after unlock")
    with link.open("rb") as vol:
        check(vol.read(len(block)) == block, f"{link}: first block changed")
    expect_data(files)
    ctx.must("zfs", "mount", "-a")
    check(mounted_below(ctx, *tops) == expected, "zfs mount -a found more to mount")
    ctx.must("zfs", "unmount", "tank/ua/noauto/kid")  # not to hide it below its parent
    ctx.must("zfs", "mount", "tank/ua/noauto")
    ctx.must("mount.zfs", "tank/ua/legacy", str(legacy_dir))
    expect_data(by_hand)
    ctx.must("umount", str(legacy_dir))
    ctx.must("zfs", "unmount", "tank/ua/noauto")
    ctx.must("zfs", "mount", "tank/ua/noauto/kid")
    return (
        f"4 roots on 2 pools; unlock --all mounted the {len(wanted)} datasets zfs mount -a"
        " mounts (not none/legacy/noauto); volume link back; data intact"
    )
