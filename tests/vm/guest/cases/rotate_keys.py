"""STRATEGY (a pool of its own, rot on /dev/vdc1, destroyed at the end):
1. rot/raw (`enroll --create`), rot/hex (`enroll --create --keyformat hex`) and rot/pass
   (created with a passphrase, its passphrase imported on the server), each with a child
   mounted and a file in the child held open while its key is rotated.
2. `rotate --dataset` for each exits 0: the server's active key is a new one; keyformat,
   keylocation=prompt and the mounts are unchanged; the old passphrase no longer opens
   rot/pass; data intact.
3. `zpool export rot` and import (a reboot): `unlock --dataset` for the three opens and
   mounts everything with the keys the server releases; data intact.
4. SIGKILL of the agent by a wrapper zfs (configured in a second agent configuration),
   each time on rot/raw, each followed by an export/import and `unlock --dataset`:
   a. before change-key (the 'load-key -n' probe): the active key still opens it; a
      second `rotate` finishes with the same next key.
   b. right after change-key: the unlock opens it with the next key and finishes the
      rotation (the server's active key is then the one the dataset is wrapped with).
   c. after the proof ('load-key -n' with the next key), before the server's activation:
      the same.
"""

from __future__ import annotations

import base64
import os
from pathlib import Path

from tests.vm.guest.harness import (
    CONFIG,
    KILLED,
    Context,
    check,
    expect_data,
    expect_props,
    import_key,
    lock_tree,
    new_dataset,
    server_keys,
    write_data,
)

WRAPPER = """#!/bin/sh
# zfs for rotate_keys: the real one, and a one-shot SIGKILL of the agent that runs it.
# Mode "before": on the first call that is not 'list', instead of running it.
# Mode "after": right after a change-key that succeeded.
# Mode "proof": right after a 'load-key -n' that succeeded once change-key had.
mode=$(cat /run/zfs-wrap.mode 2>/dev/null)
if [ "$mode" = before ] && [ "$1" != list ]; then
    rm -f /run/zfs-wrap.mode
    echo "$*" >/run/zfs-wrap.fired
    kill -KILL "$PPID"
    exit 137
fi
/usr/sbin/zfs "$@"
rc=$?
if [ "$rc" = 0 ] && [ "$1" = change-key ]; then
    touch /run/zfs-wrap.changed
fi
if [ "$rc" = 0 ] && { { [ "$mode" = after ] && [ "$1" = change-key ]; } ||
    { [ "$mode" = proof ] && [ "$1 $2" = "load-key -n" ] && [ -e /run/zfs-wrap.changed ]; }; }
then
    rm -f /run/zfs-wrap.mode /run/zfs-wrap.changed
    echo "$*" >/run/zfs-wrap.fired
    kill -KILL "$PPID"
fi
exit "$rc"
"""
ROOTS = ("rot/raw", "rot/hex", "rot/pass")


def reboot(ctx: Context) -> None:
    """What a reboot does to the pool: exported, imported again, every key unloaded."""
    ctx.must("zpool", "export", "rot")
    ctx.must("zpool", "import", "-d", "/dev", "-o", "cachefile=none", "rot")
    for root in ROOTS:
        expect_props(ctx, root, keystatus="unavailable", mounted="no")


def unlock_all(ctx: Context, files: dict[str, str]) -> None:
    ctx.agent("unlock", *(a for r in ROOTS for a in ("--dataset", r)))
    for root in ROOTS:
        expect_props(ctx, root, keystatus="available", mounted="yes")
        expect_props(ctx, f"{root}/child", mounted="yes")
    expect_data(files)


def run(ctx: Context) -> str:
    ctx.must("zpool", "create", "-f", "-o", "cachefile=none", "rot", "/dev/vdc1")
    ctx.agent("enroll", "--dataset", "rot/raw", "--create")
    ctx.agent("enroll", "--dataset", "rot/hex", "--keyformat", "hex", "--create")
    passphrase = base64.b64encode(os.urandom(24))
    new_dataset(ctx, "rot/pass", passphrase, "passphrase")
    import_key(ctx, "rot/pass", passphrase, "passphrase")
    files = {}
    for root in ROOTS:
        ctx.must("zfs", "create", f"{root}/child")
        files[f"/{root}/file"] = write_data(f"/{root}/file")
        files[f"/{root}/child/file"] = write_data(f"/{root}/child/file")
    ctx.must("sync")
    formats = {"rot/raw": "raw", "rot/hex": "hex", "rot/pass": "passphrase"}

    before = server_keys(ctx, *ROOTS)
    for root in ROOTS:
        with Path(f"/{root}/child/file").open() as in_use:
            rotated = ctx.agent("rotate", "--dataset", root)
            check(f"{root}: key rotated" in rotated.stdout, f"rotate said {rotated.stdout!r}")
            check(in_use.read() == files[f"/{root}/child/file"], f"{root}: child file changed")
        expect_props(ctx, root, keyformat=formats[root], keylocation="prompt", mounted="yes")
        expect_props(ctx, f"{root}/child", mounted="yes")
    after = server_keys(ctx, *ROOTS)
    for root in ROOTS:
        check(after[root][1] == "active" and after[root][0] != before[root][0], f"{root}: {after}")
    old = ctx.run("zfs", "load-key", "-n", "-L", "prompt", "rot/pass", stdin=passphrase)
    check(old.returncode != 0, "the old passphrase still opens rot/pass after rotate")
    expect_data(files)
    reboot(ctx)
    unlock_all(ctx, files)

    wrapper, mode = Path("/run/zfs-wrap"), Path("/run/zfs-wrap.mode")
    wrapper.write_text(WRAPPER)
    wrapper.chmod(0o755)
    wrapped = str(Path(CONFIG).with_name("agent-wrap.toml"))
    Path(wrapped).write_text(Path(CONFIG).read_text() + f'\n[zfs]\nzfs = "{wrapper}"\n')
    fired = Path("/run/zfs-wrap.fired")
    for when, at in (("before", "load-key -n"), ("after", "change-key"), ("proof", "load-key -n")):
        active = server_keys(ctx, "rot/raw")["rot/raw"][0]
        mode.write_text(when)
        Path("/run/zfs-wrap.changed").unlink(missing_ok=True)
        ctx.agent("rotate", "--dataset", "rot/raw", config=wrapped, expect=KILLED)
        check(not mode.exists(), f"the wrapper did not fire ({when})")
        call = fired.read_text().strip()
        ctx.note(f"the wrapper killed the agent {when} 'zfs {call}'")
        check(call.startswith(at), f"killed {when} 'zfs {call}', not {at}")
        ctx.must("sync")
        lock_tree(ctx, "rot")
        reboot(ctx)
        unlock_all(ctx, files)
        now = server_keys(ctx, "rot/raw")["rot/raw"][0]
        if when == "before":
            check(now == active, f"before change-key: the active key changed ({now})")
            finished = ctx.agent("rotate", "--dataset", "rot/raw")
            check("is now active" in finished.stdout, f"rotate said {finished.stdout!r}")
        else:
            check(now != active, f"killed {when}: the unlock did not finish the rotation")
    ctx.must("zpool", "destroy", "rot")
    return (
        "raw, hex and passphrase roots rotated in use; killed before and after change-key"
        " and before activation: every state opened after export/import, all completed"
    )
