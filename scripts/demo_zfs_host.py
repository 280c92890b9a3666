"""The demo's ZFS host: the same steps on this machine or in the demo VM.

scripts/demo.py starts this as root where ZFS works: on the user's machine, or in the
QEMU guest (through scripts/demo_guest.sh). It drives the real agent command line
(`zfs-unlock-agent`, found on PATH) against the real key server, on a pool named
`zuademo` on a sparse file in WORKDIR, which it creates and destroys. It never creates,
imports, exports or destroys any other pool, and refuses to start when a pool of that
name exists. The agent's configuration confines it to the demo's dataset.

What the admin does on the key server (enroll this host, revoke and restore its key, read
the audit log) goes over the demo's admin channel: a JSON line with the
`zfs-unlock-server` command to scripts/demo.py, which runs it there and answers with
what it ran, its exit status, its output and the files it wrote.

Output: one line per event, "ZUADEMO <kind> <text>", which scripts/demo.py renders (and
through which it hides the rest of the VM's console); kinds are in KINDS. Key material is
never printed: the agent never prints it, and neither does this script.

Usage: demo_zfs_host.py --settings FILE
    FILE (JSON): server_url, pin, admin_host, admin_port, workdir, config
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import socket
import subprocess
import sys
import time
import traceback
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

MARKER = "ZUADEMO"
KINDS = ("step", "say", "cmd", "out", "check", "end")
POOL = "zuademo"  # the guard: the only pool this script touches
DATASET = f"{POOL}/secret"
POOL_FILE_SIZE = 256 << 20
HOST_NAME = "demo-host"
EX_NOPERM = 77  # the agent's exit status when the server refuses (zfs_unlock_agent.errors)
DEFAULT_CONFIG = Path("/etc/zfs-unlock-agent/agent.toml")

# The summary's lines, in order: key, what is expected.
CHECKS: dict[str, str] = {
    "pool": f"a throw-away pool '{POOL}' on a file",
    "identity": "setup wrote the config, key pair (0400) and CSR",
    "enrolled": "the admin enrolled the host; check passed",
    "dataset": "new encrypted dataset, key on the server only",
    "locked": "after the 'reboot' the dataset is locked",
    "unlocked": "unlock fetched the key, loaded it, mounted",
    "verify": "verify proved the key with 'zfs load-key -n'",
    "revoked": "after a revoke the host cannot unlock",
    "restored": "after a restore it unlocks again",
    "audit": "the audit log recorded the decisions",
    "cleanup": "demo pool destroyed, no other pool touched",
}


class Failure(Exception):
    """A step did not go as expected; the rest is skipped (the pool is still destroyed)."""


def emit(kind: str, text: str = "") -> None:
    for line in text.splitlines() or [""]:
        print(f"{MARKER} {kind} {line}", flush=True)


def step(text: str) -> None:
    emit("step", text)


def say(text: str) -> None:
    emit("say", text)


def check(key: str, ok: bool, observed: str) -> bool:
    emit("check", f"{'ok' if ok else 'BAD'} {key}\t{observed}")
    return ok


@dataclass
class Host:
    server_url: str
    pin: str
    admin_address: tuple[str, int]
    workdir: Path
    config: Path
    pool_file: Path = field(init=False)
    created_pool: bool = False
    pools_before: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.pool_file = self.workdir / f"{POOL}.img"

    # Commands, shown as they run

    def run(
        self, *argv: str, expect: int | None = 0, quiet: bool = False, strict: bool = True
    ) -> tuple[int, str]:
        """Run ARGV here, show it and its output. Fail unless it exits EXPECT (None: any
        status), or, when not STRICT, only say whether it did."""
        if not quiet:
            emit("cmd", f"host {shlex.join(argv)}")
        started = time.monotonic()
        done = subprocess.run(
            argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            text=True, errors="replace", check=False,
        )  # fmt: skip
        seconds = time.monotonic() - started
        if not quiet:
            if done.stdout.strip():
                emit("out", done.stdout.rstrip("\n"))
            status = [f"exit {done.returncode}"] if done.returncode else []
            status += ["as expected"] if done.returncode and done.returncode == expect else []
            status += [f"{seconds:.1f} s"] if seconds >= 1 else []
            if status:
                emit("out", f"({', '.join(status)})")
        if strict and expect is not None and done.returncode != expect:
            raise Failure(f"{shlex.join(argv)} exited {done.returncode}, expected {expect}")
        return done.returncode, done.stdout

    def admin(
        self,
        *argv: str,
        files: Mapping[str, bytes] | None = None,
        want: Sequence[str] = (),
        stdout: str = "",
    ) -> tuple[int, str, dict[str, bytes]]:
        """Ask the admin to run `zfs-unlock-server ARGV` on the key server (with its
        standard output sent to the file STDOUT, if given)."""
        request = {
            "argv": ["zfs-unlock-server", *argv],
            "files": {name: data.decode() for name, data in (files or {}).items()},
            "want": list(want),
            **({"stdout": stdout} if stdout else {}),
        }
        with socket.create_connection(self.admin_address, timeout=120) as sock:
            sock.sendall(json.dumps(request).encode() + b"\n")
            sock.shutdown(socket.SHUT_WR)
            with sock.makefile("rb") as reader:
                answer: dict[str, Any] = json.loads(reader.readline() or b"{}")
        if "error" in answer or "argv" not in answer:
            raise Failure(f"the admin channel refused {argv}: {answer.get('error', answer)}")
        shown: list[str] = answer["argv"]
        redirect = f" > {shown[-1]}" if shown[-2:-1] == [">"] else ""
        emit("cmd", f"server {shlex.join(shown[:-2] if redirect else shown)}{redirect}")
        if answer["output"].strip():
            emit("out", answer["output"].rstrip("\n"))
        if answer["rc"] != 0:
            emit("out", f"[exit {answer['rc']}]")
        received = {name: data.encode() for name, data in answer["files"].items()}
        return int(answer["rc"]), str(answer["output"]), received

    def agent(self, *args: str, expect: int | None = 0, strict: bool = True) -> tuple[int, str]:
        return self.run("zfs-unlock-agent", *args, expect=expect, strict=strict)

    def props(self, dataset: str, *names: str) -> dict[str, str]:
        _, out = self.run(
            "zfs", "get", "-H", "-p", "-o", "property,value", ",".join(names), dataset, quiet=True
        )
        return dict(line.split("\t", 1) for line in out.splitlines())

    def pools(self) -> list[str]:
        _, out = self.run("zpool", "list", "-H", "-o", "name", quiet=True)
        return sorted(out.split())

    def data_file(self) -> Path:
        return Path(self.props(DATASET, "mountpoint")["mountpoint"]) / "notes.txt"

    def digest(self) -> str:
        _, out = self.run("sha256sum", str(self.data_file()))
        return out.split()[0]

    # The steps

    def make_pool(self) -> None:
        step("The host gets a pool to work on: a throw-away pool on a sparse file")
        _, version = self.run("zfs", "version", quiet=True)
        say(f"this host runs {' and '.join(version.split())}")
        self.pools_before = self.pools()
        if POOL in self.pools_before:
            raise Failure(
                f"a pool named {POOL} exists already (left by an interrupted demo?); this demo"
                f" touches no pool it did not create: if it is a leftover, 'zpool destroy {POOL}'"
            )
        self.workdir.mkdir(parents=True, exist_ok=True)
        with self.pool_file.open("xb") as handle:
            handle.truncate(POOL_FILE_SIZE)
        say(f"made the sparse file {self.pool_file} ({POOL_FILE_SIZE >> 20} MiB)")
        self.run(
            "zpool", "create", "-o", "cachefile=none", "-m", str(self.workdir / "mnt"),
            POOL, str(self.pool_file),
        )  # fmt: skip
        self.created_pool = True
        self.run("zpool", "list", "-o", "name,size,health", POOL)
        check("pool", True, f"{POOL} on {self.pool_file}")

    def setup(self) -> str:
        step(
            "The host's first run: 'setup' writes its configuration (the server's URL and the"
            " pin from 'init') and makes its identity: a private key that never leaves it, and"
            " a certificate request (CSR) for the admin"
        )
        if self.config != DEFAULT_CONFIG:
            os.environ["ZFS_UNLOCK_AGENT_CONFIG"] = str(self.config)
            emit("cmd", f"host export ZFS_UNLOCK_AGENT_CONFIG={shlex.quote(str(self.config))}")
        _, out = self.agent(
            "setup", "--server", self.server_url, "--pin", self.pin, "--name", HOST_NAME
        )
        lines = [line for line in out.splitlines() if line.startswith("zfs-unlock-server host add")]
        if not lines:
            raise Failure("setup printed no 'zfs-unlock-server host add' line")
        say("the demo confines the agent to its own dataset, not this host's others:")
        with self.config.open("a") as config:
            config.write(f'[datasets]\nproperty = false\ninclude = ["{DATASET}"]\n')
        self.run("cat", str(self.config))
        key = self.config.parent / "client.key"
        mode = key.stat().st_mode & 0o777
        check("identity", mode == 0o400, f"{key.name} mode {mode:04o}, a CSR for the admin")
        return lines[0]

    def enroll(self, line: str) -> None:
        step(
            "The admin enrolls the host: runs the line 'setup' printed, on the key server,"
            " with the host's CSR (the server signs it and binds it to the machine-id)"
        )
        argv = shlex.split(line)[1:]
        if argv[-2:-1] != [">"]:
            raise Failure(f"setup's line does not send the certificate to a file: {line}")
        argv, certificate = argv[:-2], argv[-1]
        csr_name = argv[argv.index("--csr") + 1]
        csr = (self.config.parent / "client.csr").read_bytes()
        rc, _, files = self.admin(*argv, files={csr_name: csr}, stdout=certificate)
        cert = files.get(certificate, b"")
        if rc != 0 or not cert:
            check("enrolled", False, f"host add exited {rc}")
            raise Failure("the admin could not enroll the host")
        (self.config.parent / "client.crt").write_bytes(cert)
        say(f"the admin sends {certificate} back: {self.config.parent / 'client.crt'}")
        self.agent("check")
        check("enrolled", True, f"{HOST_NAME}: certificate issued, check passed")

    def enroll_dataset(self) -> str:
        step(
            f"The host creates {DATASET}, encrypted with a key the server issues"
            " (the key is never written to this host's disk)"
        )
        _, out = self.agent("enroll", "--dataset", DATASET, "--create")
        found = re.search(r"enrolled with key (\S+)", out)
        if not found:
            raise Failure(f"enroll did not name the key: {out.strip()!r}")
        properties = "encryption,keyformat,keylocation,keystatus,zfs-unlock-agent:managed"
        self.run("zfs", "get", "-o", "property,value,source", properties, DATASET)
        got = self.props(DATASET, "encryption", "keylocation", "keystatus")
        ok = got == {"encryption": "aes-256-gcm", "keylocation": "prompt", "keystatus": "available"}
        check("dataset", ok, f"{got['encryption']}, keylocation={got['keylocation']}")
        return found.group(1)

    def write_data(self) -> str:
        step("Data goes in")
        path = self.data_file()
        path.write_text(f"written by the zfs-unlock-agent demo at {time.ctime()}\n")
        say(f"wrote {path}")
        self.run("sync")
        self.run("cat", str(path))
        return self.digest()

    def reboot(self) -> None:
        step(
            "A 'reboot': export and import the pool. ZFS forgets the key, so the dataset"
            " comes back locked"
        )
        self.run("zpool", "export", POOL)
        self.run("zpool", "import", "-d", str(self.workdir), "-o", "cachefile=none", POOL)
        self.run("zfs", "get", "-o", "property,value", "keystatus,mounted", DATASET)
        got = self.props(DATASET, "keystatus", "mounted")
        visible = self.data_file().exists()
        ok = got == {"keystatus": "unavailable", "mounted": "no"} and not visible
        shown = "VISIBLE" if visible else "hidden"
        check("locked", ok, f"keystatus {got['keystatus']}, file {shown}")

    def unlock(self, digest: str, key: str, expect: int = 0) -> bool:
        rc, _ = self.agent("unlock", expect=expect, strict=False)
        self.run("zfs", "get", "-o", "property,value", "keystatus,mounted", DATASET)
        got = self.props(DATASET, "keystatus", "mounted")
        if expect != 0:
            ok = rc == expect and got["keystatus"] == "unavailable"
            return check(key, ok, f"unlock exit {rc}, keystatus {got['keystatus']}")
        same = self.digest() == digest if got["mounted"] == "yes" else False
        ok = rc == 0 and got == {"keystatus": "available", "mounted": "yes"} and same
        return check(key, ok, f"exit {rc}, mounted, data {'intact' if same else 'CHANGED'}")

    def boot_unlock(self, digest: str) -> None:
        step(
            "At boot the host runs 'unlock': one request over mutual TLS to the pinned"
            " server, the key piped to 'zfs load-key', then mount"
        )
        if not self.unlock(digest, "unlocked"):
            raise Failure("the host could not unlock its dataset")
        self.agent("status")

    def verify(self) -> None:
        step("'verify' proves the server's key still opens the dataset, changing nothing")
        rc, _ = self.agent("verify", strict=False)
        check("verify", rc == 0, f"exit {rc}")

    def revoke(self, key_id: str, digest: str) -> None:
        step("The admin revokes the dataset's key (say, the machine was stolen)")
        self.admin("key", "list")
        self.admin("key", "revoke", key_id)
        step("The host is locked again and tries to unlock: the server refuses")
        self.run("zfs", "unmount", DATASET)
        self.run("zfs", "unload-key", DATASET)
        self.unlock(digest, "revoked", expect=EX_NOPERM)

    def restore(self, key_id: str, digest: str) -> None:
        step("The admin restores the key; the host unlocks again, no restart anywhere")
        self.admin("key", "restore", key_id)
        self.unlock(digest, "restored")

    def audit(self) -> None:
        step("The audit log: every decision, who asked and why it was answered that way")
        rc, out, _ = self.admin("audit", "--last", "10")
        released = re.search(r"^\S+ release\s+allow", out, re.MULTILINE)
        denied = re.search(r"^\S+ release\s+deny", out, re.MULTILINE)
        ok = rc == 0 and bool(released) and bool(denied)
        check("audit", ok, "releases allowed and the refusal recorded" if ok else f"exit {rc}")

    def cleanup(self) -> None:
        """Destroy the demo's pool, if this run created it and it is still ours."""
        if not self.created_pool:
            return
        step(f"Clean up: destroy the demo's pool {POOL} and its file")
        _, status = self.run("zpool", "status", "-P", POOL, expect=None, quiet=True)
        if str(self.pool_file) in status:
            self.run("zpool", "destroy", "-f", POOL, expect=None)
        elif POOL not in self.pools():  # exported by an interrupted 'reboot'
            say(f"{POOL} is not imported; nothing to destroy")
        self.pool_file.unlink(missing_ok=True)
        after = self.pools()
        ok = POOL not in after and after == [p for p in self.pools_before if p != POOL]
        check("cleanup", ok, f"pools now: {', '.join(after) or 'none'}")

    def demo(self) -> None:
        self.make_pool()
        self.enroll(self.setup())
        key_id = self.enroll_dataset()
        digest = self.write_data()
        self.reboot()
        self.boot_unlock(digest)
        self.verify()
        self.revoke(key_id, digest)
        self.restore(key_id, digest)
        self.audit()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--settings", type=Path, required=True)
    settings = json.loads(parser.parse_args().settings.read_text())
    host = Host(
        server_url=settings["server_url"],
        pin=settings["pin"],
        admin_address=(settings["admin_host"], int(settings["admin_port"])),
        workdir=Path(settings["workdir"]),
        config=Path(settings["config"]),
    )
    rc = 0
    try:
        host.demo()
    except Failure as exc:
        emit("out", f"STOPPED: {exc}")
        rc = 1
    except Exception:  # noqa: BLE001 - say what broke, then clean up all the same
        emit("out", traceback.format_exc(limit=4))
        rc = 1
    except KeyboardInterrupt:
        emit("out", "interrupted")
        rc = 130
    finally:
        try:
            host.cleanup()
        except Exception:  # noqa: BLE001
            emit("out", "cleanup failed:\n" + traceback.format_exc(limit=4))
            rc = 1
        emit("end", str(rc))
    return rc


if __name__ == "__main__":
    sys.exit(main())
