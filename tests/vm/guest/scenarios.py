"""Scenarios on real OpenZFS, run inside the test guest by run.sh.

STRATEGY:
1. The agent runs exactly as an operator runs it: `python3 -m zfs_unlock_agent -c
   /etc/zfs-unlock-agent/agent.toml ...`, with the real key server behind
   https://10.0.2.100:8443 (a forwarder on the host) and real `zfs`/`zpool`.
2. Each scenario is a function below, with its own STRATEGY. It sets up what it needs
   on the pools run.sh created (tank on /dev/vda1, tank2 on /dev/vdb1), checks with
   `zfs` itself, and fails with a reason naming the step.
3. Output: "SCENARIO <name> PASS|FAIL <reason>" per scenario, a JSON results file
   (every command, its status and stderr, for the host's report), and exit status 1
   if any scenario failed.

Usage: scenarios.py --results FILE [NAME...]   (default: every scenario, in order)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

CONFIG = "/etc/zfs-unlock-agent/agent.toml"
AGENT = [sys.executable, "-m", "zfs_unlock_agent", "-c", CONFIG]
CONTROL = ("10.0.2.101", 9000)  # the host's forwarder switch (tests/vm/vm.py)
MANAGED = "zfs-unlock-agent:managed"
EX_TEMPFAIL = 75


class Failure(Exception):
    """A scenario's expectation did not hold."""


class Context:
    """Runs commands for one scenario and keeps a record of them."""

    def __init__(self) -> None:
        self.steps: list[dict[str, Any]] = []

    def run(
        self, *argv: str, stdin: bytes = b"", timeout: float = 300
    ) -> subprocess.CompletedProcess[str]:
        started = time.monotonic()
        try:
            raw = subprocess.run(
                argv, input=stdin, capture_output=True, timeout=timeout, check=False
            )
        except subprocess.TimeoutExpired:
            raise Failure(f"{' '.join(argv)}: timed out after {timeout:g} s") from None
        seconds = round(time.monotonic() - started, 2)
        done = subprocess.CompletedProcess(
            argv,
            raw.returncode,
            raw.stdout.decode(errors="replace"),
            raw.stderr.decode(errors="replace"),
        )
        agent = list(argv[: len(AGENT)]) == AGENT
        shown = " ".join(["zfs-unlock-agent", *argv[len(AGENT) :]] if agent else argv)
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

    def must(self, *argv: str, stdin: bytes = b"") -> str:
        done = self.run(*argv, stdin=stdin)
        if done.returncode != 0:
            raise Failure(f"{' '.join(argv)} exited {done.returncode}: {done.stderr.strip()}")
        return done.stdout

    def agent(self, *args: str, expect: int = 0) -> subprocess.CompletedProcess[str]:
        done = self.run(*AGENT, *args)
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


def switch_server(state: str) -> None:
    """Make the key server unreachable ("down") or reachable ("up") via the host."""
    with socket.create_connection(CONTROL, timeout=10) as sock:
        sock.sendall(f"{state}\n".encode())
        with sock.makefile("rb") as reader:
            answer = reader.readline()
    check(answer == b"ok\n", f"forwarder switch {state!r}: answered {answer!r}")
    print(f"+ key server switched {state}", flush=True)


def lock(ctx: Context, root: str) -> None:
    ctx.must("zfs", "unmount", root)
    ctx.must("zfs", "unload-key", root)
    expect_props(ctx, root, keystatus="unavailable", mounted="no")


def managed_roots(ctx: Context) -> list[str]:
    out = ctx.must("zfs", "list", "-H", "-o", f"name,encryptionroot,{MANAGED}")
    rows = [line.split("\t") for line in out.splitlines()]
    return [name for name, root, managed in rows if name == root and managed == "on"]


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
    1. Enrol tank2/outage (on the second pool), write a file, and lock every managed
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
    1. Enrol tank/vols, give it a volume, lock it: no /dev/zvol link while locked.
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


SCENARIOS: dict[str, Callable[[Context], str]] = {
    "enroll_unlock_mount": enroll_unlock_mount,
    "server_down_then_up": server_down_then_up,
    "zfs_as_the_agent_expects": zfs_as_the_agent_expects,
    "volume_link_and_wrong_key": volume_link_and_wrong_key,
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
