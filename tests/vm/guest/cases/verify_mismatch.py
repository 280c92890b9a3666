"""STRATEGY:
1. Four encryption roots with imported server keys: tank/vf-locked and tank/vf-loaded
   with their right keys, tank2/vf-bad-locked and tank2/vf-bad-loaded with wrong ones.
   The *-locked ones are locked, the *-loaded ones loaded and mounted.
2. `verify --dataset` for the two right ones exits 0; for the two wrong ones, 79
   (EX_BADKEY), naming both.
3. After each run, every root's keystatus (and mounted) is what it was before.
4. The four are destroyed (the wrong ones must not outlive the scenario).
"""

from __future__ import annotations

import os

from tests.vm.guest.harness import (
    EX_BADKEY,
    Context,
    check,
    error_lines,
    import_key,
    lock_tree,
    new_dataset,
)


def run(ctx: Context) -> str:
    right = ("tank/vf-locked", "tank/vf-loaded")
    wrong = ("tank2/vf-bad-locked", "tank2/vf-bad-loaded")
    for root in (*right, *wrong):
        key = os.urandom(32)
        new_dataset(ctx, root, key)
        import_key(ctx, root, key if root in right else os.urandom(32), "raw")
    lock_tree(ctx, "tank/vf-locked", "tank2/vf-bad-locked")
    every = (*right, *wrong)

    def state() -> dict[str, tuple[str, str]]:
        props = {name: ctx.props(name, "keystatus", "mounted") for name in every}
        return {name: (p["keystatus"], p["mounted"]) for name, p in props.items()}

    before = state()
    check(
        [before[n][0] for n in every] == ["unavailable", "available"] * 2,
        f"set-up: {before}",
    )
    ctx.agent("verify", *(a for r in right for a in ("--dataset", r)))
    check(state() == before, f"verify (right keys) changed keystatus: {state()} != {before}")
    done = ctx.agent("verify", *(a for r in wrong for a in ("--dataset", r)), expect=EX_BADKEY)
    check(state() == before, f"verify (wrong keys) changed keystatus: {state()} != {before}")
    errors = error_lines(done.stderr)
    check(all(any(r in e for e in errors) for r in wrong), f"error lines: {errors}")
    for root in every:
        ctx.must("zfs", "destroy", "-r", root)
    return "verify: 0 with right keys, 79 with wrong ones; no keystatus changed"
