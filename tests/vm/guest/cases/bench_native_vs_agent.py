"""The benchmark among the cases, not a behaviour test: ZFS's own keylocation=https://
against the agent, for 1 and for 20 encryption roots. Last in cases/__init__.py: it
trusts the key server system-wide.

STRATEGY (timings for docs/benchmarks-vm.md, which the host writes from this scenario's
data only when ZUA_WRITE_BENCHMARKS=1):
1. Native: the host imports 20 SimpleZFSKeySystem-style keys ("legacy POOL_GUID
   bench-nNN", one control command each; no key crosses the channel). The server's
   certificate goes into the guest's trust store: appended to
   /etc/ssl/certs/ca-certificates.crt, libcurl's default CA file (the guest has no
   update-ca-certificates). Before that, `zfs create` with keylocation=https:// and
   only SSL_CLIENT_CERT_FILE/KEY_FILE set fails; after it, the same creates
   tank2/bn/n00..n19 (keyformat=raw, keylocation=https://10.0.2.100:8443/MACHINE_ID/
   POOL_GUID/bench-nNN). No SSL_CA_CERT_FILE anywhere in this scenario.
2. Agent: tank2/ba/a00..a19, each created with a raw key of its own that is imported
   on the server (import_keys, as key_formats does) and marked managed: the state
   `enroll` leaves. (`enroll` itself lists every dataset twice per root: 20 of them
   took 50 s of set-up under TCG, even called in-process.)
   The parents tank2/bn and tank2/ba are unencrypted, canmount=off.
3. Lock all 40; check they are the only locked encryption roots in the system.
   Five rounds (one in a test run: /mnt/host/bench-rounds), each: native `zfs load-key tank2/bn/n00`; agent `unlock --no-mount
   --dataset tank2/ba/a00`; agent `unlock --no-mount` with the 20 --dataset; native
   `zfs load-key -a`, which must report "20 / 20 key(s) successfully loaded" (it
   counts what it tried: the 20 native roots are the only locked ones then). Keys
   are unloaded between measurements (`zfs unload-key`, -r on the parents).
4. The agent's fixed cost: `python3 -c pass` and `zfs-unlock-agent --version`
   (interpreter start-up; the agent's imports without work), three times each.
5. Every time goes into the results' data; tank2/bn and tank2/ba are destroyed.
"""

from __future__ import annotations

import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path

from tests.vm.guest.harness import (
    AGENT,
    AGENT_MODULE,
    SERVER_CERT,
    SERVER_URL,
    Context,
    Failure,
    check,
    control,
    import_keys,
    machine_id,
    new_dataset,
    pool_guid,
)

BENCH_ROOTS = 20
# Five rounds when the host writes docs/benchmarks-vm.md; a test run proves the case
# with one (the host's share says which).
ROUNDS_FILE = Path("/mnt/host/bench-rounds")
CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")  # libcurl's default CA file on Debian
CLIENT_SSL = {  # what libzfs's https:// fetch needs besides a trusted server
    "SSL_CLIENT_CERT_FILE": "/etc/zfs-unlock-agent/client.crt",
    "SSL_CLIENT_KEY_FILE": "/etc/zfs-unlock-agent/client.key",
}


def timed(ctx: Context, *argv: str, env: Mapping[str, str] | None = None, says: str = "") -> float:
    """Run ARGV, which must succeed (and print SAYS); its wall-clock seconds."""
    done = ctx.run(*argv, env=env)
    if done.returncode != 0:
        raise Failure(f"{' '.join(argv)} exited {done.returncode}: {done.stderr.strip()[-500:]}")
    check(says in done.stdout + done.stderr, f"{' '.join(argv)} did not say {says!r}")
    return float(ctx.steps[-1]["seconds"])


def run(ctx: Context) -> str:
    natives = [f"tank2/bn/n{i:02d}" for i in range(BENCH_ROOTS)]
    agents = [f"tank2/ba/a{i:02d}" for i in range(BENCH_ROOTS)]
    pool, mid = pool_guid(ctx, "tank2"), machine_id()
    setup: dict[str, float] = {}
    for parent in ("tank2/bn", "tank2/ba"):
        ctx.must("zfs", "create", "-o", "canmount=off", parent)

    started = time.monotonic()
    for index in range(BENCH_ROOTS):
        control(f"legacy {pool} bench-n{index:02d}")
    setup["legacy_imports"] = round(time.monotonic() - started, 3)
    ctx.note(f"host imported {BENCH_ROOTS} SimpleZFSKeySystem keys in {setup['legacy_imports']} s")

    def create_native(name: str) -> subprocess.CompletedProcess[str]:
        url = f"{SERVER_URL}/{mid}/{pool}/bench-{name.rsplit('/', 1)[1]}"
        return ctx.run(
            "zfs", "create", "-o", "encryption=on", "-o", "keyformat=raw",
            "-o", f"keylocation={url}", name, env=CLIENT_SSL,
        )  # fmt: skip

    untrusted = create_native(natives[0])
    check(untrusted.returncode != 0, "zfs create worked before the server was trusted")
    check(
        ctx.run("zfs", "list", natives[0]).returncode != 0,
        f"{natives[0]} exists after a failed create",
    )
    bundle = CA_BUNDLE.read_text()
    CA_BUNDLE.write_text(bundle.rstrip("\n") + "\n" + Path(SERVER_CERT).read_text())
    trusted = CA_BUNDLE.read_text().count("-----BEGIN CERTIFICATE-----")
    ctx.note(f"appended {SERVER_CERT} to {CA_BUNDLE} ({trusted} certificates)")
    started = time.monotonic()
    for name in natives:
        done = create_native(name)
        check(done.returncode == 0, f"zfs create {name}: {done.stderr.strip()}")
    setup["native_create"] = round(time.monotonic() - started, 3)

    started = time.monotonic()
    keys = {name: os.urandom(32) for name in agents}
    for name, key in keys.items():
        new_dataset(ctx, name, key)
    import_keys(ctx, keys, "raw")
    setup["agent_import"] = round(time.monotonic() - started, 3)

    ctx.must("umount", *(f"/{name}" for name in (*natives, *agents)))
    for parent in ("tank2/bn", "tank2/ba"):
        ctx.must("zfs", "unload-key", "-r", parent)
    out = ctx.must(
        "zfs", "list", "-H", "-t", "filesystem,volume", "-o", "name,encryptionroot,keystatus"
    )
    rows = [line.split("\t") for line in out.splitlines()]
    locked = {name for name, root, status in rows if name == root and status == "unavailable"}
    check(locked == {*natives, *agents}, f"locked roots: {sorted(locked)}")

    times: dict[str, list[float]] = {}

    def record(kind: str, seconds: float) -> None:
        times.setdefault(kind, []).append(seconds)

    every_agent = [arg for name in agents for arg in ("--dataset", name)]
    loaded = f"{BENCH_ROOTS} / {BENCH_ROOTS} key(s) successfully loaded"
    rounds = int(ROUNDS_FILE.read_text()) if ROUNDS_FILE.exists() else 5
    for _ in range(rounds):
        record("native_1", timed(ctx, "zfs", "load-key", natives[0], env=CLIENT_SSL))
        ctx.must("zfs", "unload-key", natives[0])
        record("agent_1", timed(ctx, *AGENT, "unlock", "--no-mount", "--dataset", agents[0]))
        ctx.must("zfs", "unload-key", agents[0])
        record("agent_20", timed(ctx, *AGENT, "unlock", "--no-mount", *every_agent))
        record("native_20", timed(ctx, "zfs", "load-key", "-a", env=CLIENT_SSL, says=loaded))
        for parent in ("tank2/bn", "tank2/ba"):
            ctx.must("zfs", "unload-key", "-r", parent)
    for _ in range(3):
        record("python_start", timed(ctx, sys.executable, "-c", "pass"))
        record("agent_start", timed(ctx, *AGENT_MODULE, "--version"))

    ctx.must("zfs", "destroy", "-r", "tank2/bn")
    ctx.must("zfs", "destroy", "-r", "tank2/ba")
    ctx.data = {
        "roots": BENCH_ROOTS,
        "rounds": rounds,
        "native_all": "zfs load-key -a",
        "trust_store": str(CA_BUNDLE),
        "trust_store_certificates": trusted,
        "datasets": len(rows),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "setup_seconds": setup,
        "seconds": times,
    }
    return "medians: " + ", ".join(
        f"{kind} {statistics.median(times[kind]):.2f} s"
        for kind in ("native_1", "agent_1", "native_20", "agent_20")
    )
