"""STRATEGY:
1. tank/kf-raw: `enroll --create` (raw). tank/kf-hex: `enroll --create --keyformat hex`.
2. tank2/kf-nl: created with a raw key holding 0x0a (first, middle and last byte),
   0x0d and 0x00 bytes; that key is imported on the server (POST /v1/keys with `key`,
   then activate, through the agent's KeyClient).
3. tank2/kf-pass: created with a passphrase (keyformat=passphrase), imported the same way.
4. Write a file in each, lock all four; `unlock --dataset` for the four exits 0:
   each is available and mounted with its file intact, and its keyformat unchanged.
"""

from __future__ import annotations

import base64
import os

from tests.vm.guest.harness import (
    Context,
    expect_data,
    expect_props,
    import_key,
    lock_tree,
    new_dataset,
    write_data,
)


def run(ctx: Context) -> str:
    ctx.agent("enroll", "--dataset", "tank/kf-raw", "--create")
    ctx.agent("enroll", "--dataset", "tank/kf-hex", "--keyformat", "hex", "--create")
    awkward = bytearray(os.urandom(32))
    awkward[0] = awkward[13] = awkward[31] = 0x0A
    awkward[7], awkward[20] = 0x0D, 0x00
    new_dataset(ctx, "tank2/kf-nl", bytes(awkward))
    import_key(ctx, "tank2/kf-nl", bytes(awkward), "raw")
    passphrase = base64.b64encode(os.urandom(24)).decode().encode()  # 32 printable bytes
    new_dataset(ctx, "tank2/kf-pass", passphrase, "passphrase")
    import_key(ctx, "tank2/kf-pass", passphrase, "passphrase")
    formats = {
        "tank/kf-raw": "raw",
        "tank/kf-hex": "hex",
        "tank2/kf-nl": "raw",
        "tank2/kf-pass": "passphrase",
    }
    files = {f"/{name}/file": write_data(f"/{name}/file") for name in formats}
    ctx.must("sync")
    lock_tree(ctx, *formats)

    ctx.agent("unlock", *(arg for name in formats for arg in ("--dataset", name)))
    for name, keyformat in formats.items():
        expect_props(ctx, name, keystatus="available", mounted="yes", keyformat=keyformat)
    expect_data(files)
    return "raw, hex, raw with 0x0a/0x0d/0x00 bytes and passphrase keys all opened"
