"""STRATEGY:
0. `zfs-unlock-agent check` passes against the server (real pools, real clock), and
   `enroll` of a name that does not exist, without --create, exits 69 and creates nothing.
1. `zfs-unlock-agent enroll --dataset tank/secret --create` creates tank/secret, encrypted,
   and moves it to a key the server issued (raw, keylocation=prompt, managed=on,
   and OpenZFS's org.openzfs.systemd:ignore=on: zfs-mount-generator makes it no units).
2. Write a file; `zfs unmount` and `zfs unload-key`: the key is unavailable.
3. `zfs-unlock-agent --dataset tank/secret` loads the key and mounts the dataset.
4. The file is intact, keystatus is available; `status --json` agrees and
   `verify` proves the server's key with `zfs load-key -n`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from tests.vm.guest.harness import (
    AGENT_MODULE,
    CONFIG,
    Context,
    check,
    expect_props,
    lock,
)


def run(ctx: Context) -> str:
    checked = ctx.run(*AGENT_MODULE, "-c", CONFIG, "check")
    check(checked.returncode == 0, f"check exited {checked.returncode}: {checked.stdout}")
    check("1 of 1 key server(s) would release" in checked.stdout, checked.stdout)
    typo = ctx.agent("enroll", "--dataset", "tank/secert", expect=69)
    check("no such dataset" in typo.stderr, f"enroll of a typo said {typo.stderr.strip()!r}")
    missing = ctx.run("zfs", "list", "tank/secert")
    check(missing.returncode != 0, "enroll without --create created tank/secert")

    done = ctx.agent("enroll", "--dataset", "tank/secret", "--create")
    check("created and enrolled" in done.stdout, f"enroll said {done.stdout.strip()!r}")
    expect_props(
        ctx,
        "tank/secret",
        encryption="aes-256-gcm",
        encryptionroot="tank/secret",
        keyformat="raw",
        keylocation="prompt",
        keystatus="available",
        mounted="yes",
        zfs_unlock_agent__managed="on",
    )
    ignore = ctx.props("tank/secret", "org.openzfs.systemd:ignore")
    check(ignore == {"org.openzfs.systemd:ignore": "on"}, f"tank/secret: {ignore}")
    data = os.urandom(4096).hex()
    Path("/tank/secret/file").write_text(data)
    ctx.must("sync")
    lock(ctx, "tank/secret")
    check(not Path("/tank/secret/file").exists(), "the file is visible while locked")

    ctx.agent("--dataset", "tank/secret")
    expect_props(ctx, "tank/secret", keystatus="available", mounted="yes")
    check(Path("/tank/secret/file").read_text() == data, "the file changed")

    rows = json.loads(ctx.agent("status", "--json").stdout)
    check(
        [(r["encryption_root"], r["keystatus"]) for r in rows] == [("tank/secret", "available")],
        f"status --json said {rows}",
    )
    check(rows[0]["mounted"] == ["tank/secret"], f"status: mounted {rows[0]['mounted']}")
    ctx.agent("verify")
    return "enrolled, locked, unlocked and mounted; data intact"
