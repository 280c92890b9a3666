"""Scenarios on real OpenZFS, run inside the test guest by run.sh.

STRATEGY:
1. The agent runs exactly as an operator runs it: `python3 -m zfs_unlock_agent -c
   /etc/zfs-unlock-agent/agent.toml ...`, with the real key server behind
   https://10.0.2.100:8443 (a forwarder on the host) and real `zfs`/`zpool`.
2. Each scenario is a function below, with its own STRATEGY. It sets up what it needs
   on the pools run.sh created (tank on /dev/vda1, tank2 on /dev/vdb1; /dev/vdc1 is left
   for a scenario's own pool), with datasets of its own, checks with `zfs` itself, and
   fails with a reason naming the step. It leaves no managed encryption root behind that
   its server key cannot open, so `unlock` of every managed root stays meaningful.
3. Output: "SCENARIO <name> PASS|FAIL <reason>" per scenario, a JSON results file
   (every command, its status and stderr, for the host's report), and exit status 1
   if any scenario failed.

Usage: scenarios.py --results FILE [NAME...]   (default: every scenario, in order)
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from zfs_unlock_agent.keyclient import KeyClient

CONFIG = "/etc/zfs-unlock-agent/agent.toml"
AGENT_MODULE = [sys.executable, "-m", "zfs_unlock_agent"]
AGENT = [*AGENT_MODULE, "-c", CONFIG]
CONTROL = ("10.0.2.101", 9000)  # the host's forwarder switch (tests/vm/vm.py)
SERVER_URL = "https://10.0.2.100:8443"  # the key server, through the host's forwarder
SERVER_CERT = "/mnt/host/agent/server.crt"  # its certificate, for libcurl (keylocation=https)
MANAGED = "zfs-unlock-agent:managed"
EX_PARTIAL = 1
EX_TEMPFAIL = 75
EX_BADKEY = 79
KILLED = -9  # subprocess's status for a child killed by SIGKILL


class Failure(Exception):
    """A scenario's expectation did not hold."""


class Context:
    """Runs commands for one scenario and keeps a record of them."""

    def __init__(self) -> None:
        self.steps: list[dict[str, Any]] = []
        self.data: dict[str, Any] = {}  # a scenario's measurements, for the host

    def run(
        self,
        *argv: str,
        stdin: bytes = b"",
        timeout: float = 300,
        env: Mapping[str, str] | None = None,
    ) -> subprocess.CompletedProcess[str]:
        started = time.monotonic()
        environment = {**os.environ, **env} if env else None
        try:
            raw = subprocess.run(
                argv, input=stdin, capture_output=True, timeout=timeout, check=False,
                env=environment,
            )  # fmt: skip
        except subprocess.TimeoutExpired:
            raise Failure(f"{' '.join(argv)}: timed out after {timeout:g} s") from None
        seconds = round(time.monotonic() - started, 3)
        done = subprocess.CompletedProcess(
            argv,
            raw.returncode,
            raw.stdout.decode(errors="replace"),
            raw.stderr.decode(errors="replace"),
        )
        if list(argv[: len(AGENT)]) == AGENT:
            shown = " ".join(["zfs-unlock-agent", *argv[len(AGENT) :]])
        elif list(argv[: len(AGENT_MODULE)]) == AGENT_MODULE:
            shown = " ".join(["zfs-unlock-agent", *argv[len(AGENT_MODULE) :]])
        else:
            shown = " ".join(argv)
        shown = " ".join([*(f"{k}=..." for k in sorted(env or {})), shown])
        shown += " <key" if stdin else ""
        print(f"+ {shown} -> {done.returncode} ({seconds} s)", flush=True)
        for line in done.stderr.splitlines():
            print(f"    {line}", flush=True)
        self.steps.append(
            {
                "command": shown,
                "rc": done.returncode,
                "seconds": seconds,
                "stdout": done.stdout[-2000:],
                "stderr": done.stderr[-2000:],
            }
        )
        return done

    def must(self, *argv: str, stdin: bytes = b"", env: Mapping[str, str] | None = None) -> str:
        done = self.run(*argv, stdin=stdin, env=env)
        if done.returncode != 0:
            raise Failure(f"{' '.join(argv)} exited {done.returncode}: {done.stderr.strip()}")
        return done.stdout

    def note(self, text: str) -> None:
        """A step that is no command (a request made from this process), for the record."""
        print(f"+ {text}", flush=True)
        self.steps.append({"command": text, "rc": 0, "seconds": 0, "stdout": "", "stderr": ""})

    def agent(
        self,
        *args: str,
        expect: int = 0,
        config: str = CONFIG,
        env: Mapping[str, str] | None = None,
    ) -> subprocess.CompletedProcess[str]:
        done = self.run(*AGENT_MODULE, "-c", config, *args, env=env)
        if done.returncode != expect:
            raise Failure(
                f"zfs-unlock-agent {' '.join(args)} exited {done.returncode}, expected {expect}:"
                f" {done.stderr.strip()[-500:]}"
            )
        return done

    def props(self, dataset: str, *names: str) -> dict[str, str]:
        out = self.must("zfs", "get", "-H", "-p", "-o", "property,value", ",".join(names), dataset)
        return dict(line.split("\t", 1) for line in out.splitlines())


def check(condition: bool, message: str) -> None:
    if not condition:
        raise Failure(message)


def expect_props(ctx: Context, dataset: str, **expected: str) -> None:
    names = [n.replace("__", ":").replace("_", "-") for n in expected]
    actual = ctx.props(dataset, *names)
    for name, want in zip(names, expected.values(), strict=True):
        check(actual.get(name) == want, f"{dataset}: {name} is {actual.get(name)!r}, not {want!r}")


def control(command: str, timeout: float = 60) -> None:
    """Send COMMAND to the host's control channel (tests/vm/vm.py, Forwarder); expect "ok"."""
    with socket.create_connection(CONTROL, timeout=timeout) as sock:
        sock.sendall(f"{command}\n".encode())
        with sock.makefile("rb") as reader:
            answer = reader.readline()
    check(answer == b"ok\n", f"host control {command!r}: answered {answer!r}")


def switch_server(state: str) -> None:
    """Make the key server unreachable ("down") or reachable ("up") via the host."""
    control(state, timeout=10)
    print(f"+ key server switched {state}", flush=True)


def lock(ctx: Context, root: str) -> None:
    ctx.must("zfs", "unmount", root)
    ctx.must("zfs", "unload-key", root)
    expect_props(ctx, root, keystatus="unavailable", mounted="no")


def managed_roots(ctx: Context) -> list[str]:
    out = ctx.must("zfs", "list", "-H", "-o", f"name,encryptionroot,{MANAGED}")
    rows = [line.split("\t") for line in out.splitlines()]
    return [name for name, root, managed in rows if name == root and managed == "on"]


# Helpers of the scenarios below


def new_dataset(ctx: Context, name: str, key: bytes, keyformat: str = "raw") -> None:
    """Create encryption root NAME with KEY (read from stdin, keylocation=prompt)."""
    ctx.must(
        "zfs", "create", "-o", "encryption=on", "-o", f"keyformat={keyformat}",
        "-o", "keylocation=prompt", name, stdin=key,
    )  # fmt: skip


def write_data(path: str) -> str:
    data = os.urandom(512).hex()
    Path(path).write_text(data)
    return data


def expect_data(files: Mapping[str, str]) -> None:
    for path, data in files.items():
        check(Path(path).is_file(), f"{path} is missing")
        check(Path(path).read_text() == data, f"{path} changed")


def mounted_below(ctx: Context, *tops: str) -> dict[str, str]:
    """Every dataset in the trees TOPS: "yes", "no" or "-" (a volume)."""
    out = ctx.must(
        "zfs", "list", "-H", "-r", "-t", "filesystem,volume", "-o", "name,mounted", *tops
    )
    return dict(line.split("\t") for line in out.splitlines())


def lock_tree(ctx: Context, *tops: str) -> None:
    """Unmount every filesystem in the trees TOPS (deepest first) and unload every key
    below them (`unload-key -r`); check every encrypted dataset there is locked."""
    out = ctx.must("zfs", "list", "-H", "-r", "-t", "filesystem", "-o", "name,mounted", *tops)
    mounted = [row[0] for row in (line.split("\t") for line in out.splitlines()) if row[1] == "yes"]
    for name in sorted(mounted, key=lambda n: n.count("/"), reverse=True):
        ctx.must("zfs", "unmount", name)
    for top in tops:
        ctx.must("zfs", "unload-key", "-r", top)
    out = ctx.must(
        "zfs", "list", "-H", "-r", "-t", "filesystem,volume", "-o", "name,keystatus", *tops
    )
    unlocked = [line for line in out.splitlines() if line.split("\t")[1] == "available"]
    check(not unlocked, f"still unlocked after unload-key: {unlocked}")


def keystatus(ctx: Context, names: Iterable[str]) -> dict[str, str]:
    return {name: ctx.props(name, "keystatus")["keystatus"] for name in names}


def agent_client() -> KeyClient:
    """The agent's own KeyClient, from the agent's configuration (pinned, client certificate)."""
    from zfs_unlock_agent import config  # the checkout (PYTHONPATH), when needed
    from zfs_unlock_agent.keyclient import KeyClient

    cfg = config.load(Path(CONFIG))
    return KeyClient(cfg.servers, cfg.client_certificate, cfg.client_key, cfg.network)


def machine_id() -> str:
    return Path("/etc/machine-id").read_text().strip()


def guids(ctx: Context, dataset: str) -> tuple[str, str]:
    """(pool GUID, dataset GUID) of DATASET."""
    return pool_guid(ctx, dataset.split("/", 1)[0]), ctx.props(dataset, "guid")["guid"]


def pool_guid(ctx: Context, pool: str) -> str:
    return ctx.must("zpool", "get", "-H", "-p", "-o", "value", "guid", pool).strip()


def import_key(ctx: Context, dataset: str, material: bytes, keyformat: str) -> str:
    """Give the server MATERIAL as DATASET's key (import_keys); returns the key id."""
    return import_keys(ctx, {dataset: material}, keyformat)[dataset]


def import_keys(ctx: Context, materials: Mapping[str, bytes], keyformat: str) -> dict[str, str]:
    """Give the server each dataset's MATERIALS as its key, as a host moving an existing
    key does: POST /v1/keys with `key` (pending), then /v1/keys/activate; mark the
    datasets managed. Returns the key ids, by dataset."""
    from zfs_unlock_common import protocol

    out = ctx.must("zfs", "list", "-H", "-p", "-o", "name,guid", *materials)
    dataset_guids = dict(line.split("\t") for line in out.splitlines())
    pools = {name.split("/", 1)[0] for name in materials}
    pool_guids = {pool: pool_guid(ctx, pool) for pool in sorted(pools)}
    host = machine_id()
    key_ids = {}
    with agent_client() as client:
        for dataset, material in materials.items():
            ids = {
                "machine_id": host,
                "pool_guid": pool_guids[dataset.split("/", 1)[0]],
                "dataset_guid": dataset_guids[dataset],
            }
            answer = client.call(
                "POST",
                protocol.ROUTE_ENROLL,
                {
                    **ids,
                    "dataset": dataset,
                    "keyformat": keyformat,
                    "key": base64.b64encode(material).decode(),
                },
            )
            body = answer.body
            check(
                (answer.status, body.get("state"), body.get("keyformat"))
                == (201, "pending", keyformat),
                f"{dataset}: importing its key answered {answer.status} {body.get('state')}",
            )
            check(body.get("key") == base64.b64encode(material).decode(), f"{dataset}: key differs")
            key_id = key_ids[dataset] = str(body["key_id"])
            activated = client.call("POST", protocol.ROUTE_ACTIVATE, {**ids, "key_id": key_id})
            check(
                activated.body.get("state") == "active", f"{dataset}: activation {activated.body}"
            )
            ctx.note(
                f"import {keyformat} key ({len(material)} bytes) for {dataset}: {key_id} active"
            )
    ctx.must("zfs", "set", f"{MANAGED}=on", *materials)
    return key_ids


def server_keys(ctx: Context, *datasets: str) -> dict[str, tuple[str, str]]:
    """(key id, state) of each dataset's key on the server, via the batch release."""
    from zfs_unlock_common.protocol import DatasetRef

    refs = {name: DatasetRef(*guids(ctx, name)) for name in datasets}
    with agent_client() as client:
        released, denied = client.release(machine_id(), list(refs.values()))
    states = {}
    for name, ref in refs.items():
        key = released.get(ref)
        if key is not None:
            key.secret.wipe()
            states[name] = (key.key_id, key.state)
    check(not denied and len(states) == len(refs), f"server refused: {denied}")
    ctx.note(f"server keys: {states}")
    return states


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if ": ERROR: " in line]


# Scenarios


def enroll_unlock_mount(ctx: Context) -> str:
    """STRATEGY:
    1. `zfs-unlock-agent enroll --dataset tank/secret` creates tank/secret, encrypted,
       and moves it to a key the server issued (raw, keylocation=prompt, managed=on).
    2. Write a file; `zfs unmount` and `zfs unload-key`: the key is unavailable.
    3. `zfs-unlock-agent --dataset tank/secret` loads the key and mounts the dataset.
    4. The file is intact, keystatus is available; `status --json` agrees and
       `verify` proves the server's key with `zfs load-key -n`.
    """
    done = ctx.agent("enroll", "--dataset", "tank/secret")
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


def server_down_then_up(ctx: Context) -> str:
    """STRATEGY:
    1. Enroll tank2/outage (on the second pool), write a file, and lock every managed
       encryption root.
    2. Switch the key server down: `zfs-unlock-agent unlock` exits 75 (EX_TEMPFAIL)
       and every managed root stays locked.
    3. Switch it up: `unlock` exits 0, every managed root is available and mounted,
       and the file is intact.
    """
    ctx.agent("enroll", "--dataset", "tank2/outage")
    data = os.urandom(64).hex()
    Path("/tank2/outage/file").write_text(data)
    roots = managed_roots(ctx)
    check("tank2/outage" in roots, f"managed roots: {roots}")
    for root in roots:
        lock(ctx, root)
    switch_server("down")
    try:
        ctx.agent("unlock", expect=EX_TEMPFAIL)
        for root in roots:
            expect_props(ctx, root, keystatus="unavailable", mounted="no")
    finally:
        switch_server("up")
    ctx.agent("unlock")
    for root in roots:
        expect_props(ctx, root, keystatus="available", mounted="yes")
    check(Path("/tank2/outage/file").read_text() == data, "the file changed")
    return f"down: exit 75, nothing loaded; up: {len(roots)} root(s) unlocked"


def zfs_as_the_agent_expects(ctx: Context) -> str:
    """STRATEGY (the behaviour of `zfs` that zfs_unlock_agent/zfs.py and tests/fakes assume):
    1. `zfs list -H -p -o <the agent's columns>` gives one tab-separated field per column;
       "-" and "none" where a dataset is unencrypted, "-" for a volume's mount columns.
    2. load-key of a loaded key fails with "Key already loaded"; `load-key -n` of a loaded
       key succeeds and changes nothing; mounting a mounted dataset says "already mounted".
    3. A wrong key fails with "Incorrect key provided" and leaves the key unavailable.
    """
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


def volume_link_and_wrong_key(ctx: Context) -> str:
    """STRATEGY:
    1. Enroll tank/vols, give it a volume, lock it: no /dev/zvol link while locked.
    2. `zfs-unlock-agent --dataset tank/vols` exits 0 once udev has made the link
       /dev/zvol/tank/vols/vol (the agent waits for it).
    3. Re-key the dataset behind the agent's back (`zfs change-key`) and lock it:
       the agent exits 79 (EX_BADKEY) and the key stays unavailable.
    """
    ctx.agent("enroll", "--dataset", "tank/vols")
    ctx.must("zfs", "create", "-V", "16M", "tank/vols/vol")
    link = Path("/dev/zvol/tank/vols/vol")
    ctx.must("udevadm", "settle")
    check(link.exists(), f"{link} missing after zfs create")
    lock(ctx, "tank/vols")
    ctx.must("udevadm", "settle")
    check(not link.exists(), f"{link} exists while locked")
    ctx.agent("--dataset", "tank/vols")
    check(link.exists(), f"{link} missing after unlock")
    rekey = ["-o", "keylocation=prompt", "-o", "keyformat=raw"]
    ctx.must("zfs", "change-key", *rekey, "tank/vols", stdin=os.urandom(32))
    lock(ctx, "tank/vols")
    ctx.agent("--dataset", "tank/vols", expect=79)
    expect_props(ctx, "tank/vols", keystatus="unavailable")
    ctx.must("zfs", "destroy", "-r", "tank/vols")  # a dataset the server's key cannot open
    return "volume link appeared on unlock; a wrong server key exits 79"


def unlock_all_two_pools(ctx: Context) -> str:
    """STRATEGY:
    1. Enroll four encryption roots with `enroll`: tank/ua, tank/ub (mountpoint /srv/ub),
       tank2/uc, and tank/ua/nest/inner, a root nested inside tank/ua's tree.
    2. Give them children with inherited keys: tank/ua/docs(/deep), tank/ua/none
       (mountpoint=none), tank/ua/legacy (mountpoint=legacy), tank/ua/noauto
       (canmount=noauto) with a child tank/ua/noauto/kid that zfs mount -a does mount,
       tank/ua/nest/inner/leaf, tank2/uc/data and the volume tank2/uc/vol.
       Write data everywhere (the volume: its first block; legacy and noauto: mounted
       by hand, then unmounted).
    3. `zfs mount -a`: what it mounts is the expected set (ZFS's own answer).
    4. Lock the three trees (unmount, `zfs unload-key -r`): nothing mounted, no volume link.
    5. `zfs-unlock-agent unlock --all` exits 0; every key is loaded; exactly the expected
       set is mounted (none, legacy and noauto are not); /dev/zvol/tank2/uc/vol exists;
       every file and the volume's block are intact; `zfs mount -a` then finds nothing
       left to mount; noauto and legacy, mounted by hand, still hold their data.
    """
    tops = ("tank/ua", "tank/ub", "tank2/uc")
    for root in ("tank/ua", "tank/ub", "tank2/uc"):
        ctx.agent("enroll", "--dataset", root)
    ctx.must("zfs", "set", "mountpoint=/srv/ub", "tank/ub")
    ctx.must("zfs", "create", "-p", "tank/ua/docs/deep")
    ctx.must("zfs", "create", "tank/ua/nest")
    ctx.agent("enroll", "--dataset", "tank/ua/nest/inner")
    ctx.must("zfs", "create", "tank/ua/nest/inner/leaf")
    ctx.must("zfs", "create", "-o", "mountpoint=none", "tank/ua/none")
    ctx.must("zfs", "create", "-o", "mountpoint=legacy", "tank/ua/legacy")
    ctx.must("zfs", "create", "-o", "canmount=noauto", "tank/ua/noauto")
    ctx.must("zfs", "create", "tank2/uc/data")
    ctx.must("zfs", "create", "-V", "16M", "tank2/uc/vol")
    expect_props(ctx, "tank/ua/nest/inner", encryptionroot="tank/ua/nest/inner")
    expect_props(ctx, "tank/ua/nest/inner/leaf", encryptionroot="tank/ua/nest/inner")
    expect_props(ctx, "tank/ua/nest", encryptionroot="tank/ua")

    files = {
        path: write_data(path)
        for path in (
            "/tank/ua/file",
            "/tank/ua/docs/deep/file",
            "/tank/ua/nest/inner/leaf/file",
            "/srv/ub/file",
            "/tank2/uc/data/file",
        )
    }
    by_hand: dict[str, str] = {}
    ctx.must("zfs", "mount", "tank/ua/noauto")
    by_hand["/tank/ua/noauto/file"] = write_data("/tank/ua/noauto/file")
    ctx.must("zfs", "unmount", "tank/ua/noauto")
    ctx.must("zfs", "create", "tank/ua/noauto/kid")  # canmount=on below a noauto parent
    files["/tank/ua/noauto/kid/file"] = write_data("/tank/ua/noauto/kid/file")
    legacy_dir = Path("/mnt/ua-legacy")
    legacy_dir.mkdir(exist_ok=True)
    ctx.must("mount.zfs", "tank/ua/legacy", str(legacy_dir))
    by_hand[f"{legacy_dir}/file"] = write_data(f"{legacy_dir}/file")
    ctx.must("umount", str(legacy_dir))
    link = Path("/dev/zvol/tank2/uc/vol")
    ctx.must("udevadm", "settle")
    block = os.urandom(4096)
    with link.open("r+b") as vol:
        vol.write(block)
    ctx.must("sync")

    ctx.must("zfs", "mount", "-a")
    expected = mounted_below(ctx, *tops)
    wanted = {n for n, m in expected.items() if m == "yes"}
    never = {"tank/ua/none", "tank/ua/legacy", "tank/ua/noauto"}
    check(not wanted & never, f"zfs mount -a mounted {sorted(wanted & never)}")
    check("tank/ua/noauto/kid" in wanted, "zfs mount -a did not mount tank/ua/noauto/kid")

    lock_tree(ctx, *tops)
    check(set(mounted_below(ctx, *tops).values()) <= {"no", "-"}, "mounted while locked")
    ctx.must("udevadm", "settle")
    check(not link.exists(), f"{link} exists while locked")

    ctx.agent("unlock", "--all")
    after = mounted_below(ctx, *tops)
    check(after == expected, f"mounted after unlock: {after}; zfs mount -a: {expected}")
    locked = {n: s for n, s in keystatus(ctx, after).items() if s != "available"}
    check(not locked, f"still locked: {locked}")
    check(link.exists(), f"{link} missing after unlock")
    with link.open("rb") as vol:
        check(vol.read(len(block)) == block, f"{link}: first block changed")
    expect_data(files)
    ctx.must("zfs", "mount", "-a")
    check(mounted_below(ctx, *tops) == expected, "zfs mount -a found more to mount")
    ctx.must("zfs", "unmount", "tank/ua/noauto/kid")  # not to hide it below its parent
    ctx.must("zfs", "mount", "tank/ua/noauto")
    ctx.must("mount.zfs", "tank/ua/legacy", str(legacy_dir))
    expect_data(by_hand)
    ctx.must("umount", str(legacy_dir))
    ctx.must("zfs", "unmount", "tank/ua/noauto")
    ctx.must("zfs", "mount", "tank/ua/noauto/kid")
    return (
        f"4 roots on 2 pools; unlock --all mounted the {len(wanted)} datasets zfs mount -a"
        " mounts (not none/legacy/noauto); volume link back; data intact"
    )


def key_formats(ctx: Context) -> str:
    """STRATEGY:
    1. tank/kf-raw: `enroll` (raw). tank/kf-hex: `enroll --keyformat hex`.
    2. tank2/kf-nl: created with a raw key holding 0x0a (first, middle and last byte),
       0x0d and 0x00 bytes; that key is imported on the server (POST /v1/keys with `key`,
       then activate, through the agent's KeyClient).
    3. tank2/kf-pass: created with a passphrase (keyformat=passphrase), imported the same way.
    4. Write a file in each, lock all four; `unlock --dataset` for the four exits 0:
       each is available and mounted with its file intact, and its keyformat unchanged.
    """
    ctx.agent("enroll", "--dataset", "tank/kf-raw")
    ctx.agent("enroll", "--dataset", "tank/kf-hex", "--keyformat", "hex")
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


def wrong_key_partial(ctx: Context) -> str:
    """STRATEGY:
    1. Three encryption roots (tank/wp-a, tank/wp-b, tank2/wp-c), each created with its
       own raw key and a file; the server gets the right key of wp-a and wp-c and a
       different (wrong) key for wp-b (imported, activated, managed).
    2. Lock all three; `unlock --dataset` for the three exits 1 (partial).
    3. wp-a and wp-c are available and mounted with their files intact; wp-b stays
       unavailable and unmounted; the one error line names tank/wp-b (incorrect key)
       and no error line names the others.
    4. tank/wp-b is destroyed: no later scenario should meet a managed root that its
       server key cannot open.
    """
    roots = ("tank/wp-a", "tank/wp-b", "tank2/wp-c")
    files = {}
    for root in roots:
        key = os.urandom(32)
        new_dataset(ctx, root, key)
        files[f"/{root}/file"] = write_data(f"/{root}/file")
        import_key(ctx, root, os.urandom(32) if root == "tank/wp-b" else key, "raw")
    ctx.must("sync")
    lock_tree(ctx, *roots)

    done = ctx.agent("unlock", *(a for r in roots for a in ("--dataset", r)), expect=EX_PARTIAL)
    for root in ("tank/wp-a", "tank2/wp-c"):
        expect_props(ctx, root, keystatus="available", mounted="yes")
    expect_data({path: data for path, data in files.items() if "wp-b" not in path})
    expect_props(ctx, "tank/wp-b", keystatus="unavailable", mounted="no")
    errors = error_lines(done.stderr)
    check(
        len(errors) == 1 and "tank/wp-b" in errors[0] and "incorrect key" in errors[0],
        f"error lines: {errors}",
    )
    ctx.must("zfs", "destroy", "-r", "tank/wp-b")
    return f"exit 1; two roots unlocked and mounted; the error names tank/wp-b: {errors[0]}"


def verify_mismatch(ctx: Context) -> str:
    """STRATEGY:
    1. Four encryption roots with imported server keys: tank/vf-locked and tank/vf-loaded
       with their right keys, tank2/vf-bad-locked and tank2/vf-bad-loaded with wrong ones.
       The *-locked ones are locked, the *-loaded ones loaded and mounted.
    2. `verify --dataset` for the two right ones exits 0; for the two wrong ones, 79
       (EX_BADKEY), naming both.
    3. After each run, every root's keystatus (and mounted) is what it was before.
    4. The four are destroyed (the wrong ones must not outlive the scenario).
    """
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


def expect_migrated(ctx: Context, root: str) -> None:
    expect_props(
        ctx, root, keyformat="raw", keylocation="prompt", keystatus="available",
        zfs_unlock_agent__managed="on",
    )  # fmt: skip


def unlock_after_unload(ctx: Context, root: str, files: Mapping[str, str]) -> None:
    """Lock ROOT, then `zfs-unlock-agent --dataset ROOT` opens and mounts it, data intact."""
    lock_tree(ctx, root)
    ctx.agent("--dataset", root)
    expect_props(ctx, root, keystatus="available", mounted="yes")
    expect_data(files)


def migrate_from_file(ctx: Context) -> str:
    """STRATEGY:
    1. tank/mig-file: keyformat=hex, keylocation=file:///root/mig-file.key; write a file;
       lock it.
    2. `enroll --dataset tank/mig-file` loads the key from its file itself, then moves the
       dataset to a server key: keyformat=raw, keylocation=prompt, managed=on.
    3. Delete the key file; lock; `zfs-unlock-agent --dataset` opens and mounts it, data
       intact.
    """
    root, keyfile = "tank/mig-file", Path("/root/mig-file.key")
    keyfile.write_text(os.urandom(32).hex() + "\n")
    keyfile.chmod(0o400)
    ctx.must(
        "zfs", "create", "-o", "encryption=on", "-o", "keyformat=hex",
        "-o", f"keylocation=file://{keyfile}", root,
    )  # fmt: skip
    files = {f"/{root}/file": write_data(f"/{root}/file")}
    ctx.must("sync")
    lock_tree(ctx, root)
    ctx.agent("enroll", "--dataset", root)
    expect_migrated(ctx, root)
    keyfile.unlink()
    unlock_after_unload(ctx, root, files)
    return "file:// hex key moved to a server key; opened without the file"


def migrate_from_passphrase(ctx: Context) -> str:
    """STRATEGY:
    1. tank/mig-pass: keyformat=passphrase, keylocation=prompt, loaded, with a file.
    2. `enroll --dataset tank/mig-pass` moves it to a server key: keyformat=raw,
       keylocation=prompt, managed=on; the passphrase no longer opens it.
    3. Lock; `zfs-unlock-agent --dataset` opens and mounts it, data intact.
    """
    root = "tank/mig-pass"
    passphrase = b"correct horse battery staple"
    new_dataset(ctx, root, passphrase, "passphrase")
    files = {f"/{root}/file": write_data(f"/{root}/file")}
    ctx.agent("enroll", "--dataset", root)
    expect_migrated(ctx, root)
    old = ctx.run("zfs", "load-key", "-n", "-L", "prompt", root, stdin=passphrase)
    check(old.returncode != 0, "the old passphrase still opens the dataset")
    unlock_after_unload(ctx, root, files)
    return "passphrase dataset moved to a server key (raw); the passphrase is gone"


def migrate_from_native_https(ctx: Context) -> str:
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


def enroll_interrupted(ctx: Context) -> str:
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


def export_import_rename(ctx: Context) -> str:
    """STRATEGY:
    1. A pool of its own, xport on /dev/vdc1 (cachefile=none); `enroll --dataset
       xport/a`; a child xport/a/c; files in both.
    2. `zpool export xport`, `zpool import -d /dev -o cachefile=none xport`: the keys are
       unavailable; `unlock --dataset xport/a` opens and mounts both, data intact.
    3. `zfs rename xport/a xport/b`; lock; `unlock --dataset xport/b` opens and mounts
       xport/b and xport/b/c, data intact (the key is bound to the dataset GUID).
    4. `zpool destroy xport`.
    """
    ctx.must("zpool", "create", "-f", "-o", "cachefile=none", "xport", "/dev/vdc1")
    ctx.agent("enroll", "--dataset", "xport/a")
    ctx.must("zfs", "create", "xport/a/c")
    data = {"a/file": write_data("/xport/a/file"), "a/c/file": write_data("/xport/a/c/file")}
    ctx.must("sync")
    ctx.must("zpool", "export", "xport")
    ctx.must("zpool", "import", "-d", "/dev", "-o", "cachefile=none", "xport")
    for name in ("xport/a", "xport/a/c"):
        expect_props(ctx, name, keystatus="unavailable", mounted="no")
    ctx.agent("unlock", "--dataset", "xport/a")
    for name in ("xport/a", "xport/a/c"):
        expect_props(ctx, name, keystatus="available", mounted="yes")
    expect_data({f"/xport/{path}": value for path, value in data.items()})

    ctx.must("zfs", "rename", "xport/a", "xport/b")
    lock_tree(ctx, "xport/b")
    ctx.agent("unlock", "--dataset", "xport/b")
    for name in ("xport/b", "xport/b/c"):
        expect_props(ctx, name, keystatus="available", mounted="yes")
    expect_data({f"/xport/{path.replace('a/', 'b/', 1)}": v for path, v in data.items()})
    ctx.must("zpool", "destroy", "xport")
    return "export/import then unlock; rename then unlock (key bound to the GUID)"


BENCH_ROOTS = 20
BENCH_ROUNDS = 5
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


def bench_native_vs_agent(ctx: Context) -> str:
    """STRATEGY (timings for docs/benchmarks-vm.md, which the host writes from this scenario's
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
       Five rounds, each: native `zfs load-key tank2/bn/n00`; agent `unlock --no-mount
       --dataset tank2/ba/a00`; agent `unlock --no-mount` with the 20 --dataset; native
       `zfs load-key -a`, which must report "20 / 20 key(s) successfully loaded" (it
       counts what it tried: the 20 native roots are the only locked ones then). Keys
       are unloaded between measurements (`zfs unload-key`, -r on the parents).
    4. The agent's fixed cost: `python3 -c pass` and `zfs-unlock-agent --version`
       (interpreter start-up; the agent's imports without work), three times each.
    5. Every time goes into the results' data; tank2/bn and tank2/ba are destroyed.
    """
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
    for _ in range(BENCH_ROUNDS):
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
        "rounds": BENCH_ROUNDS,
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


SCENARIOS: dict[str, Callable[[Context], str]] = {
    "enroll_unlock_mount": enroll_unlock_mount,
    "server_down_then_up": server_down_then_up,
    "zfs_as_the_agent_expects": zfs_as_the_agent_expects,
    "volume_link_and_wrong_key": volume_link_and_wrong_key,
    "unlock_all_two_pools": unlock_all_two_pools,
    "key_formats": key_formats,
    "wrong_key_partial": wrong_key_partial,
    "verify_mismatch": verify_mismatch,
    "migrate_from_file": migrate_from_file,
    "migrate_from_passphrase": migrate_from_passphrase,
    "migrate_from_native_https": migrate_from_native_https,
    "enroll_interrupted": enroll_interrupted,
    "export_import_rename": export_import_rename,
    "bench_native_vs_agent": bench_native_vs_agent,
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", type=Path, required=True)
    parser.add_argument("names", nargs="*", metavar="NAME", help=", ".join(SCENARIOS))
    args = parser.parse_args()
    unknown = set(args.names) - set(SCENARIOS)
    if unknown:
        parser.error(f"unknown scenario(s): {', '.join(sorted(unknown))}")
    results: list[dict[str, Any]] = []
    for name in args.names or list(SCENARIOS):
        ctx = Context()
        started = time.monotonic()
        print(f"== SCENARIO {name}", flush=True)
        try:
            status, reason = "PASS", SCENARIOS[name](ctx)
        except Failure as exc:
            status, reason = "FAIL", str(exc)
        except Exception:  # noqa: BLE001 - a bug in a scenario: report it, run the others
            status, reason = "FAIL", traceback.format_exc(limit=5)
        seconds = round(time.monotonic() - started, 1)
        print(f"SCENARIO {name} {status} {reason.splitlines()[-1] if reason else ''}", flush=True)
        results.append(
            {
                "name": name,
                "status": status,
                "reason": reason,
                "seconds": seconds,
                "steps": ctx.steps,
                **({"data": ctx.data} if ctx.data else {}),
            }
        )
    zfs_version = subprocess.run(["zfs", "version"], capture_output=True, text=True, check=False)
    document = {
        "kernel": platform.release(),
        "zfs_version": zfs_version.stdout.split(),
        "scenarios": results,
    }
    args.results.write_text(json.dumps(document, indent=2) + "\n")
    return 1 if any(r["status"] != "PASS" for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
