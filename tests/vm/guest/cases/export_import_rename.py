"""STRATEGY:
1. A pool of its own, xport on /dev/vdc1 (cachefile=none); `enroll --dataset
   xport/a --create`; a child xport/a/c; files in both.
2. `zpool export xport`, `zpool import -d /dev -o cachefile=none xport`: the keys are
   unavailable; `unlock --dataset xport/a` opens and mounts both, data intact.
3. `zfs rename xport/a xport/b`; lock; `unlock --dataset xport/b` opens and mounts
   xport/b and xport/b/c, data intact (the key is bound to the dataset GUID).
4. `zpool destroy xport`.
"""

from __future__ import annotations

from tests.vm.guest.harness import (
    Context,
    expect_data,
    expect_props,
    lock_tree,
    write_data,
)


def run(ctx: Context) -> str:
    ctx.must("zpool", "create", "-f", "-o", "cachefile=none", "xport", "/dev/vdc1")
    ctx.agent("enroll", "--dataset", "xport/a", "--create")
    ctx.must("zfs", "create", "xport/a/c")
    data = {"a/file": write_data("/xport/a/file"), "a/c/file": write_data("/xport/a/c/file")}
    ctx.must("sync")
    ctx.must("zpool", "export", "xport")
    ctx.must("zpool", "import", "-d", "/dev", "-o", "cachefile=none", "xport")
    for name in ("xport/a", "xport/a/c"):
        expect_props(ctx, name, keystatus="unavailable", mounted="no")
    ctx.agent("unlock", "--dataset", "xport/a")
    for name in ("xport/a", "xport/a/c"):
        expect_props(ctx, name, keystatus="available", mounted="yes")
    expect_data({f"/xport/{path}": value for path, value in data.items()})

    ctx.must("zfs", "rename", "xport/a", "xport/b")
    lock_tree(ctx, "xport/b")
    ctx.agent("unlock", "--dataset", "xport/b")
    for name in ("xport/b", "xport/b/c"):
        expect_props(ctx, name, keystatus="available", mounted="yes")
    expect_data({f"/xport/{path.replace('a/', 'b/', 1)}": v for path, v in data.items()})
    ctx.must("zpool", "destroy", "xport")
    return "export/import then unlock; rename then unlock (key bound to the GUID)"
