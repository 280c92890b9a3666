"""STRATEGY:
1. Ask the host over the control channel ("legacy POOL_GUID mig-https-1") to import
   a SimpleZFSKeySystem-style key (32 hex characters, keyformat=raw) for this host
   with the real `zfs-unlock-server import-simplezfs`; the key never crosses the
   control channel.
2. `zfs create -o keyformat=raw -o keylocation=https://10.0.2.100:8443/MACHINE_ID/
   POOL_GUID/mig-https-1 tank2/mig-https`: ZFS fetches the key itself (libcurl), with
   SSL_CA_CERT_FILE (the server's certificate) and SSL_CLIENT_CERT_FILE/KEY_FILE (the
   agent's client certificate) in its environment. Write a file.
3. Native: lock; `zfs load-key` without those variables fails (no client certificate,
   untrusted server); with them it loads; mount; data intact.
4. Lock again; `enroll --dataset tank2/mig-https` (with the SSL_* variables) loads the
   key from its https:// location, then moves the dataset to a server key.
5. Lock; `zfs-unlock-agent --dataset` opens and mounts it, data intact.
"""

from __future__ import annotations

from tests.vm.guest.harness import (
    SERVER_CERT,
    SERVER_URL,
    Context,
    check,
    control,
    expect_data,
    expect_migrated,
    expect_props,
    lock_tree,
    machine_id,
    pool_guid,
    unlock_after_unload,
    write_data,
)


def run(ctx: Context) -> str:
    root, name = "tank2/mig-https", "mig-https-1"
    pool = pool_guid(ctx, "tank2")
    control(f"legacy {pool} {name}")
    ctx.note(f"host imported a SimpleZFSKeySystem key {pool}/{name}")
    ssl = {
        "SSL_CA_CERT_FILE": SERVER_CERT,
        "SSL_CLIENT_CERT_FILE": "/etc/zfs-unlock-agent/client.crt",
        "SSL_CLIENT_KEY_FILE": "/etc/zfs-unlock-agent/client.key",
    }
    url = f"{SERVER_URL}/{machine_id()}/{pool}/{name}"
    ctx.must(
        "zfs", "create", "-o", "encryption=on", "-o", "keyformat=raw",
        "-o", f"keylocation={url}", root, env=ssl,
    )  # fmt: skip
    expect_props(ctx, root, keylocation=url, keystatus="available")
    files = {f"/{root}/file": write_data(f"/{root}/file")}
    ctx.must("sync")
    lock_tree(ctx, root)
    bare = ctx.run("zfs", "load-key", root)
    check(bare.returncode != 0, "zfs load-key worked without a client certificate")
    ctx.must("zfs", "load-key", root, env=ssl)
    ctx.must("zfs", "mount", root)
    expect_data(files)

    lock_tree(ctx, root)
    ctx.agent("enroll", "--dataset", root, env=ssl)
    expect_migrated(ctx, root)
    unlock_after_unload(ctx, root, files)
    return "native keylocation=https:// (SimpleZFSKeySystem route) loaded, then moved"
