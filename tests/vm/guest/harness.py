"""What every real-OpenZFS case shares (tests/vm/guest/cases): Context runs and records
commands, Failure names the step that did not hold, and the helpers below set up, lock,
check and talk to the host's control channel and the key server.

Standard library only at import time: the guest has Debian's python3.11 and the agent's
dependencies, no pytest; the agent's own modules are imported where they are needed.
"""

from __future__ import annotations

import base64
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterable, Mapping
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
        released, denied, *_ = client.release(machine_id(), list(refs.values()))
    states = {}
    for name, ref in refs.items():
        key = released.get(ref)
        if key is not None:
            key.secret.wipe()
            states[name] = (key.key_id, key.state)
    check(not denied and len(states) == len(refs), f"server refused: {denied}")
    ctx.note(f"server keys: {states}")
    return states


def key_digests(ctx: Context, *datasets: str) -> dict[str, str]:
    """SHA-256 of each dataset's key as the server releases it now (the key itself is
    wiped at once): two servers that release the same keys give the same digests."""
    import hashlib

    from zfs_unlock_common.protocol import DatasetRef

    refs = {name: DatasetRef(*guids(ctx, name)) for name in datasets}
    with agent_client() as client:
        released, denied, *_ = client.release(machine_id(), list(refs.values()))
    check(not denied and len(released) == len(refs), f"server refused: {denied}")
    digests = {}
    for name, ref in refs.items():
        with released[ref].secret as secret:
            digests[name] = hashlib.sha256(secret.view()).hexdigest()
    return digests


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if ": ERROR: " in line]


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
