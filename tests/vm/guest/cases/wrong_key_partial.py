"""STRATEGY:
1. Three encryption roots (tank/wp-a, tank/wp-b, tank2/wp-c), each created with its
   own raw key and a file; the server gets the right key of wp-a and wp-c and a
   different (wrong) key for wp-b (imported, activated, managed).
2. Lock all three; `unlock --dataset` for the three exits 1 (partial).
3. wp-a and wp-c are available and mounted with their files intact; wp-b stays
   unavailable and unmounted; the one error line names tank/wp-b (incorrect key)
   and no error line names the others.
4. tank/wp-b is destroyed: no later scenario should meet a managed root that its
   server key cannot open.
"""

from __future__ import annotations

import os

from tests.vm.guest.harness import (
    EX_PARTIAL,
    Context,
    check,
    error_lines,
    expect_data,
    expect_props,
    import_key,
    lock_tree,
    new_dataset,
    write_data,
)


def run(ctx: Context) -> str:
    roots = ("tank/wp-a", "tank/wp-b", "tank2/wp-c")
    files = {}
    for root in roots:
        key = os.urandom(32)
        new_dataset(ctx, root, key)
        files[f"/{root}/file"] = write_data(f"/{root}/file")
        import_key(ctx, root, os.urandom(32) if root == "tank/wp-b" else key, "raw")
    ctx.must("sync")
    lock_tree(ctx, *roots)

    done = ctx.agent("unlock", *(a for r in roots for a in ("--dataset", r)), expect=EX_PARTIAL)
    for root in ("tank/wp-a", "tank2/wp-c"):
        expect_props(ctx, root, keystatus="available", mounted="yes")
    expect_data({path: data for path, data in files.items() if "wp-b" not in path})
    expect_props(ctx, "tank/wp-b", keystatus="unavailable", mounted="no")
    errors = error_lines(done.stderr)
    check(
        len(errors) == 1 and "tank/wp-b" in errors[0] and "incorrect key" in errors[0],
        f"error lines: {errors}",
    )
    ctx.must("zfs", "destroy", "-r", "tank/wp-b")
    return f"exit 1; two roots unlocked and mounted; the error names tank/wp-b: {errors[0]}"
