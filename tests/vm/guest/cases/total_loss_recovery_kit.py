"""STRATEGY:
1. Every managed root so far (raw, hex and passphrase keys, on tank and tank2) gets a
   file. The host's admin takes a backup and a recovery kit for an age identity that
   only the admin's medium holds (the share), then the key server is lost: stopped,
   its data directory deleted.
2. Every managed root locked: `zfs-unlock-agent unlock` exits 75, nothing loaded;
   `recover` with another age identity exits 77, nothing loaded.
3. `zfs-unlock-agent recover --kit KIT --identity ID --all` loads every root's key from
   the kit and mounts what was mounted: all available, every file intact.
4. By hand, with nothing of ours: a raw and a passphrase root locked again, then opened
   with docs/recovery-kit.md's commands as written (`age -d`, awk, base64 -d,
   `zfs load-key -L prompt`, `zfs mount -a`); files intact.
5. The admin rebuilds the server from the backup (restore, another port, same pin):
   `zfs-unlock-agent verify` proves every root's key on it.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from tests.vm.guest.harness import (
    EX_TEMPFAIL,
    Context,
    check,
    control,
    expect_data,
    expect_props,
    managed_roots,
    write_data,
)

KIT = "/mnt/host/recovery/kit.age"
IDENTITY = "/mnt/host/recovery/identity.txt"
BY_HAND_DOC = Path("/mnt/src/docs/recovery-kit.md")  # the checkout, read-only


def by_hand_commands(dataset: str) -> str:
    """The by-hand procedure of docs/recovery-kit.md (its block marked for tests), for
    DATASET; it runs where kit.age and identity.txt are."""
    text = BY_HAND_DOC.read_text()
    marker = "<!-- test: by-hand -->\n```sh\n"
    check(marker in text, f"{BY_HAND_DOC} has no block marked <!-- test: by-hand -->")
    block = text.split(marker, 1)[1].split("```", 1)[0]
    check("ds=tank/secret" in block, "the by-hand block no longer starts from ds=tank/secret")
    return block.replace("ds=tank/secret", f"ds='{dataset}'", 1)


def lock_roots(ctx: Context, roots: list[str]) -> None:
    """Unmount every filesystem that shares a key with ROOTS (deepest first), then unload
    each root's key alone: roots may nest, and `unload-key -r` of an outer one would meet
    an inner one already unloaded."""
    out = ctx.must("zfs", "list", "-H", "-t", "filesystem", "-o", "name,encryptionroot,mounted")
    rows = [line.split("\t") for line in out.splitlines()]
    mounted = [name for name, root, is_mounted in rows if root in roots and is_mounted == "yes"]
    for name in sorted(mounted, key=lambda n: n.count("/"), reverse=True):
        ctx.must("zfs", "unmount", name)
    for root in roots:
        ctx.must("zfs", "unload-key", root)
        expect_props(ctx, root, keystatus="unavailable", mounted="no")


def run(ctx: Context) -> str:
    roots = managed_roots(ctx)
    formats = {root: ctx.props(root, "keyformat")["keyformat"] for root in roots}
    pools = {root.split("/", 1)[0] for root in roots}
    check(
        set(formats.values()) >= {"raw", "hex", "passphrase"} and pools >= {"tank", "tank2"},
        f"managed roots and keyformats: {formats}",
    )
    out = ctx.must("zfs", "list", "-H", "-o", "name,mountpoint,mounted", *roots)
    mounted = {name: point for name, point, is_mounted in
               (line.split("\t") for line in out.splitlines()) if is_mounted == "yes"}  # fmt: skip
    files = {f"{point}/kit-check": write_data(f"{point}/kit-check") for point in mounted.values()}
    control("backup", timeout=600)
    control("kit", timeout=600)
    control("lose", timeout=120)

    lock_roots(ctx, roots)
    ctx.agent("unlock", expect=EX_TEMPFAIL)
    for root in roots:
        expect_props(ctx, root, keystatus="unavailable")

    ctx.must("age-keygen", "-o", "/tmp/another-identity.txt")
    wrong = ctx.agent(
        "recover", "--kit", KIT, "--identity", "/tmp/another-identity.txt", "--all", expect=77
    )
    check("does not open" in wrong.stderr, f"recover with another identity: {wrong.stderr!r}")
    for root in roots:
        expect_props(ctx, root, keystatus="unavailable")

    ctx.agent("recover", "--kit", KIT, "--identity", IDENTITY, "--all")
    for root in roots:
        expect_props(ctx, root, keystatus="available")
    for root in mounted:
        expect_props(ctx, root, mounted="yes")
    expect_data(files)

    raw = next(r for r, f in formats.items() if f == "raw" and r in mounted)
    passphrase = next(r for r, f in formats.items() if f == "passphrase" and r in mounted)
    work = Path("/tmp/by-hand")  # the medium, copied to where the admin works
    work.mkdir(exist_ok=True)
    shutil.copyfile(KIT, work / "kit.age")
    shutil.copyfile(IDENTITY, work / "identity.txt")
    for root in (raw, passphrase):
        lock_roots(ctx, [root])
        done = ctx.run("sh", "-ec", f"cd {work}\n{by_hand_commands(root)}")
        check(done.returncode == 0, f"by hand for {root}: exit {done.returncode}: {done.stderr}")
        check(
            ctx.props(root, "keystatus")["keystatus"] == "available",
            f"{root}: by hand left it locked",
        )
    expect_data(files)
    shutil.rmtree(work)

    control("restore", timeout=600)
    ctx.agent("verify")
    for path in files:
        Path(path).unlink()
    Path("/tmp/another-identity.txt").unlink()
    return (
        f"lost server: {len(roots)} roots recovered from the kit, 2 by hand with age;"
        " rebuilt server verified"
    )
