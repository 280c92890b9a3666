#!/usr/bin/env python3
"""A stateful stand-in for `zfs` and `zpool`, for the fast test tier.

It keeps pools and datasets in a JSON file and behaves like OpenZFS where the
agent relies on it: keystatus and encryption-root inheritance, keys checked by
format (raw: 32 bytes read as bytes; hex and passphrase: one trailing newline
trimmed, as getline() does), "Incorrect key provided", "Key already loaded",
`load-key -n` changing nothing, mount state, change-key, create. Every call is
appended to a log as JSON: argv, environment, and the SHA-256 and length of
what arrived on stdin (never the bytes themselves). The real-ZFS tier checks
the same behaviours against OpenZFS.

Usage: fake_zfs.py --state FILE --log FILE (zfs|zpool) ARGS...
"""

from __future__ import annotations

import fcntl
import hashlib
import itertools
import json
import os
import sys
from pathlib import Path
from typing import Any

State = dict[str, Any]


class Failure(Exception):
    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code


def lock_path(state_path: Path) -> Path:
    """Held (flock) while a call reads and writes the state and appends to the log: a test
    may then change the state while a long-running agent (the daemon) calls the fake."""
    return state_path.with_name(state_path.name + ".lock")


def key_digest(material: bytes, keyformat: str) -> str:
    """What zfs would end up with after reading MATERIAL from a pipe."""
    if keyformat == "raw":
        if len(material) != 32:
            raise Failure(
                f"Key load error: Raw key too {'long' if len(material) > 32 else 'short'}"
                f" (expected 32)."
            )
    else:
        if material.endswith(b"\n"):
            material = material[:-1]
        material = material.split(b"\n", 1)[0]
        if keyformat == "hex":
            if len(material) != 64 or any(c not in b"0123456789abcdefABCDEF" for c in material):
                raise Failure("Key load error: Invalid hex key provided.")
            material = bytes.fromhex(material.decode())
        elif not 8 <= len(material) <= 512:
            raise Failure("Key load error: Passphrase too short (min 8).")
    return hashlib.sha256(keyformat.encode() + b"\0" + material).hexdigest()


def root_of(state: State, name: str) -> dict[str, Any]:
    dataset = state["datasets"].get(name)
    if dataset is None:
        raise Failure(f"cannot open '{name}': dataset does not exist")
    root_name = dataset.get("encryptionroot", "")
    if not root_name:
        raise Failure(f"Key load error: Keys are not supported on unencrypted dataset '{name}'.")
    root: dict[str, Any] = state["datasets"][root_name]
    return root


def refresh_zvols(state: State) -> None:
    zvol_dir = state.get("zvol_dir")
    if not zvol_dir:
        return
    for name, ds in state["datasets"].items():
        if ds.get("type") != "volume" or ds.get("no_link"):
            continue  # no_link: udev never creates this volume's device link
        link = Path(zvol_dir) / name
        unlocked = not ds.get("encryptionroot") or (
            state["datasets"][ds["encryptionroot"]].get("keystatus") == "available"
        )
        if unlocked:
            link.parent.mkdir(parents=True, exist_ok=True)
            link.touch()
        else:
            link.unlink(missing_ok=True)


def get_guid(things: dict[str, Any], args: list[str], kind: str) -> str:
    """`get -H -o value guid NAME`, the one form the recovery kit's by-hand commands use."""
    if args[:-1] != ["get", "-H", "-o", "value", "guid"]:
        raise Failure(f"fake {kind}: unsupported {args}", 2)
    if args[-1] not in things:
        raise Failure(f"cannot open '{args[-1]}': no such {kind}", 1)
    return f"{things[args[-1]]['guid']}\n"


def zpool(state: State, args: list[str]) -> str:
    if args[:1] == ["list"]:
        return "".join(f"{name}\t{p['guid']}\n" for name, p in sorted(state["pools"].items()))
    if args[:1] == ["get"]:
        return get_guid(state["pools"], args, "pool")
    raise Failure(f"fake zpool: unsupported {args}", 2)


def column(name: str, ds: dict[str, Any], col: str, state: State) -> str:
    if col == "name":
        return name
    if col == "keystatus":
        return ds.get("keystatus", "") if ds.get("encryptionroot") else "-"
    if col == "mounted":
        return "-" if ds.get("type") == "volume" else ("yes" if ds.get("mounted") else "no")
    if col == "encryptionroot":
        return ds.get("encryptionroot") or "-"
    if col == "keyformat":
        if ds.get("encryptionroot"):
            return str(state["datasets"][ds["encryptionroot"]]["keyformat"])
        return "none"
    if col == "keylocation":
        if ds.get("encryptionroot") == name:
            return str(ds.get("keylocation", "prompt"))
        return "none"
    if col in ("canmount", "mountpoint"):
        default = "on" if col == "canmount" else "/" + name
        return "-" if ds.get("type") == "volume" else str(ds.get(col, default))
    if ":" in col:
        return str(ds.get("props", {}).get(col, "-"))
    return str(ds.get(col, "-"))


def effective_keystatus(state: State) -> None:
    """Children share their encryption root's keystatus."""
    for ds in state["datasets"].values():
        root = ds.get("encryptionroot")
        if root and root in state["datasets"]:
            ds["keystatus"] = state["datasets"][root].get("keystatus", "unavailable")


def zfs(state: State, args: list[str], stdin: bytes) -> str:
    command, rest = args[0], args[1:]
    datasets: dict[str, dict[str, Any]] = state["datasets"]
    if command == "list":
        columns = rest[rest.index("-o") + 1].split(",")
        effective_keystatus(state)
        listing = "".join(
            "\t".join(column(name, ds, c, state) for c in columns) + "\n"
            for name, ds in sorted(datasets.items())
        )
        for ds in datasets.values():
            # loaded_after_list: another process loads this root's key right after
            # the caller listed it, so the caller's next load-key meets "Key already loaded".
            if ds.pop("loaded_after_list", False):
                ds["keystatus"] = "available"
                refresh_zvols(state)
        return listing
    if command == "load-key":
        dry_run = "-n" in rest
        name = rest[-1]
        root = root_of(state, name)
        if root is not datasets[name]:
            raise Failure(f"Key load error: Keys must be loaded for encryption root of '{name}'.")
        if "-L" in rest:
            material = stdin
        else:
            location = root.get("keylocation", "prompt")
            if not location.startswith("file://"):
                raise Failure("Key load error: fake zfs reads only file:// keylocations")
            material = Path(location.removeprefix("file://")).read_bytes()
        if root.get("keystatus") == "available" and not dry_run:
            raise Failure(f"Key load error: Key already loaded for '{name}'.")
        if key_digest(material, root["keyformat"]) != root["key"]:
            raise Failure(f"Key load error: Incorrect key provided for '{name}'.", 255)
        if not dry_run:
            root["keystatus"] = "available"
            refresh_zvols(state)
        return ""
    if command == "unload-key":
        root = root_of(state, rest[-1])
        for ds in datasets.values():
            if ds.get("encryptionroot") == rest[-1] and ds.get("mounted"):
                ds["mounted"] = False
        root["keystatus"] = "unavailable"
        refresh_zvols(state)
        return ""
    if command == "get" and args[:-1] == ["get", "-H", "-o", "value", "keystatus"]:
        effective_keystatus(state)
        target = datasets.get(args[-1])
        if target is None:
            raise Failure(f"cannot open '{args[-1]}': dataset does not exist")
        return column(args[-1], target, "keystatus", state) + "\n"
    if command == "get":
        return get_guid(datasets, args, "dataset")
    if command == "mount" and rest == ["-a"]:  # what `zfs mount -a` would mount, all it can
        effective_keystatus(state)
        for ds in datasets.values():
            locked = ds.get("encryptionroot") and ds.get("keystatus") != "available"
            wanted = ds.get("type") == "filesystem" and ds.get("canmount", "on") == "on"
            if wanted and not locked and ds.get("mountpoint") not in ("none", "legacy"):
                ds["mounted"] = True
        return ""
    if command == "mount":
        name = rest[-1]
        if name not in datasets:
            raise Failure(f"cannot open '{name}': dataset does not exist")
        target = datasets[name]
        effective_keystatus(state)
        if target.get("encryptionroot") and target.get("keystatus") != "available":
            raise Failure(f"cannot mount '{name}': encryption key not loaded")
        if target.get("mounted"):
            raise Failure(f"cannot mount '{name}': filesystem already mounted")
        if target.get("mountpoint") in ("none", "legacy"):
            raise Failure(f"cannot mount '{name}': no mountpoint set")
        target["mounted"] = True
        return ""
    if command == "change-key":
        name = rest[-1]
        root = root_of(state, name)
        if root.get("keystatus") != "available":
            raise Failure(f"Key change error: Key must be loaded for '{name}'.")
        options = dict(v.split("=", 1) for k, v in itertools.pairwise(rest) if k == "-o")
        keyformat = options.get("keyformat", root["keyformat"])
        root["key"] = key_digest(stdin, keyformat)
        root["keyformat"] = keyformat
        root["keylocation"] = options.get("keylocation", root.get("keylocation"))
        return ""
    if command == "create":
        name = rest[-1]
        if name in datasets:
            raise Failure(f"cannot create '{name}': dataset already exists")
        parent = name.rsplit("/", 1)[0]
        if "/" not in name or parent not in datasets:
            raise Failure(f"cannot create '{name}': parent does not exist")
        options = dict(v.split("=", 1) for k, v in itertools.pairwise(rest) if k == "-o")
        keyformat = options.pop("keyformat")
        options.pop("encryption", None)
        props = {k: v for k, v in options.items() if ":" in k}
        state["next_guid"] = state.get("next_guid", 9000000000000000000) + 1
        datasets[name] = {
            "type": "filesystem",
            "guid": str(state["next_guid"]),
            "encryptionroot": name,
            "keyformat": keyformat,
            "keylocation": options.get("keylocation", "prompt"),
            "key": key_digest(stdin, keyformat),
            "keystatus": "available",
            "mounted": True,
            "props": props,
        }
        return ""
    if command == "set":  # zfs set PROP=VALUE... DATASET: all of them, or none
        *assignments, name = rest
        if not assignments or not all("=" in a for a in assignments):
            raise Failure("fake zfs: usage: set PROP=VALUE... DATASET", 2)
        if name not in datasets:
            raise Failure(f"cannot open '{name}': dataset does not exist")
        for assignment in assignments:
            prop, value = assignment.split("=", 1)
            if ":" in prop:
                datasets[name].setdefault("props", {})[prop] = value
            else:
                datasets[name][prop] = value
        return ""
    raise Failure(f"fake zfs: unsupported {args}", 2)


def main(argv: list[str]) -> int:
    state_path, log_path = (
        Path(argv[argv.index("--state") + 1]),
        Path(argv[argv.index("--log") + 1]),
    )
    program_index = argv.index("--log") + 2
    program, args = argv[program_index], argv[program_index + 1 :]
    stdin = b"" if sys.stdin.isatty() else sys.stdin.buffer.read()
    with lock_path(state_path).open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        with log_path.open("a") as log:
            log.write(
                json.dumps(
                    {
                        "program": program,
                        "argv": args,
                        "env": dict(os.environ),
                        "stdin_sha256": hashlib.sha256(stdin).hexdigest(),
                        "stdin_len": len(stdin),
                    }
                )
                + "\n"
            )
        state: State = json.loads(state_path.read_text())
        try:
            out = zpool(state, args) if program == "zpool" else zfs(state, args, stdin)
        except Failure as failure:
            sys.stderr.write(f"{failure}\n")
            return failure.code
        state_path.write_text(json.dumps(state, indent=1))
    sys.stdout.write(out)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
