"""STRATEGY (the behaviour of `zfs` that zfs_unlock_agent/zfs.py and tests/fakes assume):
1. `zfs list -H -p -o <the agent's columns>` gives one tab-separated field per column;
   "-" and "none" where a dataset is unencrypted, "-" for a volume's mount columns.
2. load-key of a loaded key fails with "Key already loaded"; `load-key -n` of a loaded
   key succeeds and changes nothing; mounting a mounted dataset says "already mounted".
3. A wrong key fails with "Incorrect key provided" and leaves the key unavailable.
"""

from __future__ import annotations

import os
import subprocess

from tests.vm.guest.harness import (
    Context,
    check,
    expect_props,
    lock,
)


def run(ctx: Context) -> str:
    from zfs_unlock_agent.zfs import LIST_COLUMNS  # the checkout (PYTHONPATH), when needed

    key = os.urandom(32)
    options = ["-o", "encryption=on", "-o", "keyformat=raw", "-o", "keylocation=prompt"]
    ctx.must("zfs", "create", *options, "tank/contract", stdin=key)
    ctx.must("zfs", "create", "-V", "16M", "tank/contract/vol")
    ctx.must("zfs", "create", "tank/plain")
    out = ctx.must(
        "zfs", "list", "-H", "-p", "-t", "filesystem,volume", "-o", ",".join(LIST_COLUMNS)
    )
    rows = {line.split("\t")[0]: line.split("\t") for line in out.splitlines()}
    check(all(len(r) == len(LIST_COLUMNS) for r in rows.values()), f"zfs list: {out!r}")
    plain = dict(zip(LIST_COLUMNS, rows["tank/plain"], strict=True))
    check(
        (plain["encryptionroot"], plain["keystatus"], plain["keyformat"]) == ("-", "-", "none"),
        f"unencrypted dataset listed as {plain}",
    )
    vol = dict(zip(LIST_COLUMNS, rows["tank/contract/vol"], strict=True))
    check(
        (vol["mounted"], vol["canmount"], vol["mountpoint"], vol["encryptionroot"])
        == ("-", "-", "-", "tank/contract"),
        f"volume listed as {vol}",
    )

    def load(*flags: str, material: bytes = key) -> subprocess.CompletedProcess[str]:
        return ctx.run("zfs", "load-key", *flags, "-L", "prompt", "tank/contract", stdin=material)

    done = load()
    check(done.returncode != 0 and "Key already loaded" in done.stderr, "load-key when loaded")
    check(load("-n").returncode == 0, "load-key -n of a loaded key failed")
    done = ctx.run("zfs", "mount", "tank/contract")
    check(done.returncode != 0 and "already mounted" in done.stderr, "mount when mounted")
    lock(ctx, "tank/contract")
    done = load(material=os.urandom(32))
    check(done.returncode != 0 and "Incorrect key provided" in done.stderr, "wrong key")
    expect_props(ctx, "tank/contract", keystatus="unavailable")
    ctx.must("zfs", "destroy", "-r", "tank/contract")
    ctx.must("zfs", "destroy", "tank/plain")
    return "list columns and the messages the agent matches are as assumed"
