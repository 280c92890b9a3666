"""STRATEGY:
1. Note the digest of every managed root's key as the server releases it.
2. While a loop locks tank/secret and unlocks it with `zfs-unlock-agent --dataset`, the
   host's admin takes an online backup (`zfs-unlock-server backup`): every unlock of the
   loop succeeds, before, during and after it.
3. The admin restores the backup into a new data directory, serves it on another port,
   and the forwarder sends this host there: same URL, same pin in agent.toml.
4. Every managed root locked; `zfs-unlock-agent unlock` opens all of them from the
   restored server, data intact; the keys it releases have the same digests.
"""

from __future__ import annotations

import threading
from pathlib import Path

from tests.vm.guest.harness import (
    AGENT,
    Context,
    check,
    control,
    expect_data,
    expect_props,
    key_digests,
    lock,
    managed_roots,
    write_data,
)

LOOPED = "tank/secret"


def run(ctx: Context) -> str:
    roots = managed_roots(ctx)
    check(LOOPED in roots and len(roots) >= 2, f"managed roots: {roots}")
    before = key_digests(ctx, *roots)
    files = {f"/{root}/restore-check": write_data(f"/{root}/restore-check") for root in roots}

    stop = threading.Event()
    outcomes: list[int] = []

    def unlock_loop() -> None:
        while not stop.is_set():
            lock(ctx, LOOPED)
            outcomes.append(ctx.run(*AGENT, "--dataset", LOOPED).returncode)

    loop = threading.Thread(target=unlock_loop)
    loop.start()
    try:
        control("backup", timeout=600)
        during = len(outcomes)
    finally:
        stop.set()
        loop.join(timeout=600)
    check(bool(outcomes) and set(outcomes) == {0}, f"unlocks while backing up exited {outcomes}")
    ctx.note(f"{len(outcomes)} unlocks of {LOOPED} in the loop, {during} done by the backup's end")

    control("restore", timeout=600)
    for root in roots:
        lock(ctx, root)
    ctx.agent("unlock")
    for root in roots:
        expect_props(ctx, root, keystatus="available", mounted="yes")
    expect_data(files)
    after = key_digests(ctx, *roots)
    check(after == before, "the restored server releases other keys")
    for path in files:
        Path(path).unlink()
    return f"{len(outcomes)} unlocks around the backup; restored server opened {len(roots)} roots"
