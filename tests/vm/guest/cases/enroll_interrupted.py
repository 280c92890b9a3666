"""STRATEGY (the agent is SIGKILLed mid-enrollment by a wrapper zfs, configured in a
second agent configuration with [zfs] zfs = "/run/zfs-wrap"):
1. After change-key, recovered by unlock: tank/int-a (own raw key, a file) is
   enrolled through the wrapper, killed right after change-key. keylocation is
   prompt, the old key no longer opens it, the server key is pending. Lock;
   `zfs-unlock-agent --dataset tank/int-a` opens it with the pending key, the key
   becomes active on the server and the dataset managed; data intact.
2. After change-key, recovered by enroll: tank/int-b, the same crash; re-running
   `enroll` exits 0 with the same key id, now active; managed.
3. Before change-key: tank/int-c, killed on the first zfs call after the enrollment
   request (the 'load-key -n' probe). The server key is pending; the old key still
   opens the data (lock, zfs load-key with it, mount, file intact); re-running
   `enroll` exits 0 with that same key, now active.
4. Lock all three; `unlock --dataset` for the three exits 0; data intact.
"""

from __future__ import annotations

import os
from pathlib import Path

from tests.vm.guest.harness import (
    CONFIG,
    KILLED,
    MANAGED,
    Context,
    check,
    expect_data,
    expect_migrated,
    expect_props,
    lock_tree,
    new_dataset,
    server_keys,
    write_data,
)

WRAPPER = """#!/bin/sh
# zfs for enroll_interrupted: the real one, and a one-shot SIGKILL of the agent that runs
# it. Mode "before": on the first call that is not 'list', instead of running it.
# Mode "after": right after a change-key that succeeded.
# The call it fired on goes to /run/zfs-wrap.fired.
mode=$(cat /run/zfs-wrap.mode 2>/dev/null)
if [ "$mode" = before ] && [ "$1" != list ]; then
    rm -f /run/zfs-wrap.mode
    echo "$*" >/run/zfs-wrap.fired
    kill -KILL "$PPID"
    exit 137
fi
/usr/sbin/zfs "$@"
rc=$?
if [ "$mode" = after ] && [ "$1" = change-key ] && [ "$rc" = 0 ]; then
    rm -f /run/zfs-wrap.mode
    echo "$*" >/run/zfs-wrap.fired
    kill -KILL "$PPID"
fi
exit "$rc"
"""


def run(ctx: Context) -> str:
    wrapper, mode = Path("/run/zfs-wrap"), Path("/run/zfs-wrap.mode")
    fired_file = Path("/run/zfs-wrap.fired")
    wrapper.write_text(WRAPPER)
    wrapper.chmod(0o755)
    wrapped = str(Path(CONFIG).with_name("agent-wrap.toml"))
    Path(wrapped).write_text(Path(CONFIG).read_text() + f'\n[zfs]\nzfs = "{wrapper}"\n')
    roots = ("tank/int-a", "tank/int-b", "tank/int-c")
    keys, files = {}, {}
    for root in roots:
        keys[root] = os.urandom(32)
        new_dataset(ctx, root, keys[root])
        files[f"/{root}/file"] = write_data(f"/{root}/file")
    ctx.must("sync")

    def crash(root: str, when: str, at: str) -> None:
        mode.write_text(when)
        ctx.agent("enroll", "--dataset", root, config=wrapped, expect=KILLED)
        check(not mode.exists(), f"the wrapper did not fire ({when})")
        fired = fired_file.read_text().strip()
        ctx.note(f"the wrapper killed the agent {when} 'zfs {fired}'")
        check(fired.startswith(at), f"{root}: killed {when} 'zfs {fired}', not {at}")

    for root in ("tank/int-a", "tank/int-b"):
        crash(root, "after", "change-key")
        expect_props(ctx, root, keylocation="prompt", keystatus="available")
        check(ctx.props(root, MANAGED)[MANAGED] != "on", f"{root}: managed before the end")
        old = ctx.run("zfs", "load-key", "-n", "-L", "prompt", root, stdin=keys[root])
        check(old.returncode != 0, f"{root}: the old key still opens it after change-key")
    crash("tank/int-c", "before", "load-key -n")  # the probe for an earlier change-key
    states = server_keys(ctx, *roots)
    check({s for _, s in states.values()} == {"pending"}, f"server: {states}")
    pending = {root: key_id for root, (key_id, _) in states.items()}

    lock_tree(ctx, "tank/int-a")
    ctx.agent("--dataset", "tank/int-a")
    expect_props(ctx, "tank/int-a", keystatus="available", mounted="yes")
    expect_props(ctx, "tank/int-a", zfs_unlock_agent__managed="on")

    done = ctx.agent("enroll", "--dataset", "tank/int-b")
    check(pending["tank/int-b"] in done.stdout, f"enroll said {done.stdout.strip()!r}")

    lock_tree(ctx, "tank/int-c")
    ctx.must("zfs", "load-key", "-L", "prompt", "tank/int-c", stdin=keys["tank/int-c"])
    ctx.must("zfs", "mount", "tank/int-c")
    expect_data({k: v for k, v in files.items() if "int-c" in k})
    done = ctx.agent("enroll", "--dataset", "tank/int-c")
    check(pending["tank/int-c"] in done.stdout, f"enroll said {done.stdout.strip()!r}")

    states = server_keys(ctx, *roots)
    check(states == {r: (pending[r], "active") for r in roots}, f"server: {states}")
    for root in roots:
        expect_migrated(ctx, root)
    lock_tree(ctx, *roots)
    ctx.agent("unlock", *(a for r in roots for a in ("--dataset", r)))
    for root in roots:
        expect_props(ctx, root, keystatus="available", mounted="yes")
    expect_data(files)
    return "killed after change-key (x2) and before it: every state opened; all completed"
