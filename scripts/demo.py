"""The main job, end to end: a key server on embedded defaults unlocks real encrypted ZFS.

This machine plays the key server's admin: `zfs-unlock-server init` (SQLite, a generated
CA, a master key) in a temporary directory, then `serve` on 127.0.0.1. The ZFS host is
this machine when it has working ZFS (root, /dev/zfs, `zfs version`), else a QEMU VM with
OpenZFS (tests/vm: the image is built once, then cached). Either way the host runs the same
steps, scripts/demo_zfs_host.py, with the real agent command line on a throw-away pool
named `zuademo` on a sparse file; it never touches another pool.

The host asks for the admin's actions (enroll it, revoke and restore its key, show the
audit log) over the admin channel: a TCP port on 127.0.0.1 (in the VM, 10.0.2.101:9000,
the guest's control address) that takes one JSON request per connection, runs the
`zfs-unlock-server` command it names (from a short list) and answers with its output.
The host's progress lines ("ZUADEMO <kind> <text>") are rendered here as they come, from
the VM's serial console or the local process; the rest of the console is hidden.

Usage: demo.py [--vm]     (--vm: use the VM even where this machine has ZFS)
Exit status 0 only if every step went as expected.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Self

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))  # scripts.*, and tests.vm.vm: the VM harness of the test tier

from scripts import demo_zfs_host as zfs_host
from scripts.demo_zfs_host import CHECKS, MARKER
from tests.vm.vm import (
    CONTROL_ADDRESS,
    SERVER_ADDRESS,
    Guest,
    Image,
    VmError,
    build_image,
)
from zfs_unlock_server.sealing import load_master_key
from zfs_unlock_server.service import context_of
from zfs_unlock_server.sqlitestore import SqliteStore

BIN = Path(sys.executable).parent  # zfs-unlock-server and zfs-unlock-agent (the .venv)
HOST_SCRIPT = Path(zfs_host.__file__).resolve()
GUEST_SCRIPT = HOST_SCRIPT.with_name("demo_guest.sh")
SERVER_CHECKS = {"server": "key server on embedded defaults, serving"}
FINAL_CHECKS = {"no_leak": "no key material printed or stored in the clear"}
EXPECTED = {**SERVER_CHECKS, **CHECKS, **FINAL_CHECKS}  # the summary, in order
ADMIN_COMMANDS = {("host", "add"), ("host", "show"), ("key", "list"), ("key", "revoke"),
                  ("key", "restore"), ("audit",)}  # fmt: skip
PLAIN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
SERVER_FILES = ("keys.db", "keys.db-wal", "audit.log", "server.toml")
ALLOW_IP = "127.0.0.1/32"
HEARTBEAT = 20.0  # seconds between "still building" lines  # where the host's requests come from, here and from the VM


# What the user sees


class Screen:
    """Renders the demo: numbered steps, commands with who runs them, their output, checks."""

    def __init__(self, show_unmarked: bool) -> None:
        self.color = sys.stdout.isatty() and "NO_COLOR" not in os.environ
        self.show_unmarked = show_unmarked  # lines without the marker: shown here, not from a VM
        self.steps = 0
        self.checks: dict[str, tuple[bool, str]] = {}
        self.host_rc: int | None = None  # from the host's "end" line
        self.unmarked: list[str] = []
        self.transcript: list[str] = []  # everything printed, for the key-material check
        self._lock = threading.Lock()

    def _style(self, code: str, text: str) -> str:
        return f"\033[{code}m{text}\033[0m" if self.color else text

    def print(self, text: str = "") -> None:
        with self._lock:
            self.transcript.append(text)
            print(text, flush=True)

    def step(self, text: str) -> None:
        self.steps += 1
        self.print("\n" + self._style("1", f"==> {self.steps}. {text}"))

    def say(self, text: str) -> None:
        self.print(f"    {text}")

    def cmd(self, where: str, command: str) -> None:
        self.print("    " + self._style("36", f"{where}#") + f" {command}")

    def out(self, text: str) -> None:
        self.print(self._style("2", f"      {text}"))

    def check(self, key: str, ok: bool, observed: str) -> None:
        self.checks[key] = (ok, observed)
        mark = self._style("32", "ok") if ok else self._style("31;1", "BAD")
        self.print(f"    [{mark}] {EXPECTED.get(key, key)}: {observed}")

    def feed(self, raw: str) -> None:
        """One line from the ZFS host: render it when it carries the marker."""
        line = raw.replace("\r", "").rstrip("\n")
        if not line.startswith(MARKER + " "):
            self.unmarked.append(line)
            if self.show_unmarked and line.strip():
                self.out(line)
            return
        kind, _, text = line[len(MARKER) + 1 :].partition(" ")
        if kind == "step":
            self.step(text)
        elif kind == "say":
            self.say(text)
        elif kind == "cmd":
            where, _, command = text.partition(" ")
            self.cmd(where, command)
        elif kind == "check":
            verdict, _, rest = text.partition(" ")
            key, _, observed = rest.partition("\t")
            self.check(key, verdict == "ok", observed)
        elif kind == "end":
            self.host_rc = int(text) if text.strip().isdigit() else 1
        else:
            self.out(text)

    def summary(self, seconds: float, where: str) -> bool:
        self.print("\n" + self._style("1", "==> Summary"))
        width = max(len(text) for text in EXPECTED.values())
        for key, text in EXPECTED.items():
            ok, observed = self.checks.get(key, (False, "not reached"))
            mark = self._style("32", "ok ") if ok else self._style("31;1", "BAD")
            self.print(f"    {mark} {text:<{width}}  {observed}")
        good = self.host_rc == 0 and all(self.checks.get(k, (False, ""))[0] for k in EXPECTED)
        verdict = self._style("32;1", "succeeded") if good else self._style("31;1", "FAILED")
        self.print(f"\n    demo {verdict} in {seconds:.0f} s ({where})")
        return good


# The key server and its admin


def server_env(data_dir: Path) -> dict[str, str]:
    return {
        **os.environ,
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        "ZFS_UNLOCK_SERVER_DATA_DIR": str(data_dir),
    }


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class KeyServer:
    """The real `zfs-unlock-server` in DATA_DIR: `init` and `serve` as the admin runs them."""

    def __init__(self, screen: Screen, data_dir: Path, log: Path) -> None:
        self.screen = screen
        self.data_dir = data_dir
        self.log = log
        self.env = server_env(data_dir)
        self.port = free_port()
        self.pin = ""
        self.process: subprocess.Popen[bytes] | None = None

    def init(self) -> None:
        self.screen.step(
            "The key server starts on embedded defaults: SQLite, a generated CA and TLS"
            " certificate, a master key that seals every dataset key"
        )
        self.screen.cmd("server", f"export ZFS_UNLOCK_SERVER_DATA_DIR={self.data_dir}")
        argv = ["zfs-unlock-server", "init", "--server-name", "127.0.0.1"]
        self.screen.cmd("server", shlex.join(argv))
        done = subprocess.run(argv, env=self.env, capture_output=True, text=True, check=False)
        for line in done.stderr.splitlines():
            self.screen.out(line)
        for line in done.stdout.splitlines():
            if line not in done.stderr:  # the pin, which stderr already shows
                self.screen.out(line)
        found = re.search(r"^sha256//\S+$", done.stdout, re.MULTILINE)
        if done.returncode != 0 or not found:
            raise RuntimeError(f"zfs-unlock-server init failed (exit {done.returncode})")
        self.pin = found.group(0)
        self.screen.say("The pin is the server's public key: hosts trust the server on it alone.")

    def serve(self) -> None:
        listen = f"127.0.0.1:{self.port}"
        # The demo runs as root on a throw-away data directory; a real server runs as its
        # own user (systemd/zfs-unlock-server.service), and serve refuses root without this.
        argv = ["zfs-unlock-server", "serve", "--allow-root", "--listen", listen, "--workers", "2"]
        self.screen.cmd("server", shlex.join(argv) + " &")
        notify_path = self.data_dir.parent / "notify.sock"
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify:
            notify.bind(str(notify_path))
            notify.settimeout(60)
            with self.log.open("wb") as log:
                self.process = subprocess.Popen(
                    argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                    env={**self.env, "NOTIFY_SOCKET": str(notify_path)}, start_new_session=True,
                )  # fmt: skip
            try:
                ready = notify.recv(4096)  # READY=1, the signal systemd waits for
            except TimeoutError:
                ready = b""
        ok = b"READY=1" in ready
        self.screen.out(f"ready: HTTPS, client certificates required, on {listen}" if ok else "")
        self.screen.check("server", ok, f"pin {self.pin[:20]}..., {listen}")
        if not ok:
            raise RuntimeError(f"the key server did not start; its log: {self.log}")

    def stop(self) -> None:
        if self.process is None:
            return
        with contextlib.suppress(ProcessLookupError):
            self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
        self.process = None


class AdminChannel:
    """The admin at the key server, on a TCP port on 127.0.0.1: one JSON request a
    connection, {"argv": ["zfs-unlock-server", ...], "files": {name: text}, "want": [name],
    "stdout": name (optional: the admin's shell sends standard output to that file, as in
    `host add ... > web1.crt`)}; the answer is {"argv": what ran, "rc", "output",
    "files": {name: text}} or {"error"}. Only ADMIN_COMMANDS run, in EXCHANGE (where files
    go in and come out, plain names only); `host add` gets `--allow-ip 127.0.0.1/32` when
    it has none."""

    def __init__(self, exchange: Path, env: dict[str, str]) -> None:
        self.exchange = exchange
        self.env = env
        self.port = 0
        self._listener = socket.socket()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._stop = threading.Event()

    def __enter__(self) -> Self:
        self.exchange.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(4)
        self._listener.settimeout(0.2)
        self.port = self._listener.getsockname()[1]
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        self._listener.close()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with contextlib.suppress(OSError), conn:
                conn.settimeout(30)
                with conn.makefile("rb") as reader:
                    line = reader.readline(1 << 20)
                try:
                    answer = self.answer(json.loads(line))
                except (ValueError, TypeError, KeyError) as exc:
                    answer = {"error": f"bad request: {exc}"}
                conn.sendall(json.dumps(answer).encode() + b"\n")

    def answer(self, request: dict[str, Any]) -> dict[str, Any]:
        argv = [str(word) for word in request["argv"]]
        files = {str(k): str(v) for k, v in dict(request.get("files", {})).items()}
        want = [str(name) for name in request.get("want", [])]
        stdout_to = str(request.get("stdout", ""))
        words = argv[1:]
        if argv[:1] != ["zfs-unlock-server"] or not (
            tuple(words[:2]) in ADMIN_COMMANDS or tuple(words[:1]) in ADMIN_COMMANDS
        ):
            return {"error": f"not something this demo's admin does: {shlex.join(argv)}"}
        if any(word.startswith(("--data-dir", "--issue-key")) for word in words):
            return {"error": "--data-dir and --issue-key are the admin's business"}
        if words[:2] == ["host", "add"]:
            value = words[words.index("--csr") + 1] if "--csr" in words[:-1] else ""
            if not PLAIN_NAME.fullmatch(value):
                return {"error": "host add needs --csr with a plain file name"}
            if "--allow-ip" not in words:
                argv += ["--allow-ip", ALLOW_IP]
        names = [*files, *want, *([stdout_to] if stdout_to else [])]
        if not all(PLAIN_NAME.fullmatch(name) for name in names):
            return {"error": "file names must be plain names"}
        for name, text in files.items():
            path = self.exchange / name
            path.unlink(missing_ok=True)
            path.write_text(text)
        if stdout_to:
            (self.exchange / stdout_to).unlink(missing_ok=True)
            with (self.exchange / stdout_to).open("x") as target:
                done = subprocess.run(
                    argv, cwd=self.exchange, env=self.env, stdin=subprocess.DEVNULL,
                    stdout=target, stderr=subprocess.PIPE, text=True, timeout=60, check=False,
                )  # fmt: skip
            output, shown = done.stderr, [*argv, ">", stdout_to]
        else:
            done = subprocess.run(
                argv, cwd=self.exchange, env=self.env, stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=60,
                check=False,
            )  # fmt: skip
            output, shown = done.stdout, argv
        names = [*want, *([stdout_to] if stdout_to else [])]
        out = {n: (self.exchange / n).read_text() for n in names if (self.exchange / n).is_file()}
        return {"argv": shown, "rc": done.returncode, "output": output, "files": out}


# Where ZFS runs


def zfs_here() -> tuple[bool, str]:
    """Whether this machine can be the ZFS host, and why (or why not)."""
    if os.geteuid() != 0:
        return False, "not running as root"
    if not Path("/dev/zfs").exists():  # checked first: 'zfs version' may try to load the module
        return False, "no /dev/zfs (the ZFS kernel module is not loaded)"
    if shutil.which("zfs") is None:
        return False, "no zfs command"
    done = subprocess.run(["zfs", "version"], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        return False, f"'zfs version' fails: {(done.stderr or done.stdout).strip()[:200]}"
    return True, " and ".join(done.stdout.split())


class ConsoleFollower:
    """Feeds each complete line of a growing file (the VM's serial console) to a callback."""

    def __init__(self, path: Path, callback: Callable[[str], None]) -> None:
        self.path = path
        self.callback = callback
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._follow, daemon=True)

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _follow(self) -> None:
        pending = b""
        offset = 0
        while True:
            stopping = self._stop.is_set()  # read once more after the stop: the last lines
            with contextlib.suppress(FileNotFoundError), self.path.open("rb") as handle:
                handle.seek(offset)
                chunk = handle.read()
                offset += len(chunk)
                pending += chunk
            *lines, pending = pending.split(b"\n")
            for line in lines:
                self.callback(line.decode(errors="replace"))
            if stopping:
                return
            time.sleep(0.1)


def run_here(screen: Screen, settings: Path) -> None:
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    with subprocess.Popen(
        [sys.executable, str(HOST_SCRIPT), "--settings", str(settings)],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        env=env, text=True, errors="replace",
    ) as process:  # fmt: skip
        try:
            for line in process.stdout or ():
                screen.feed(line)
        except KeyboardInterrupt:
            # It had the same SIGINT, and destroys its pool before it exits: show that.
            for line in process.stdout or ():
                screen.feed(line)
            raise


def prepare_vm(screen: Screen, reason: str) -> Image:
    screen.step("No usable ZFS on this machine, so the ZFS host is a QEMU VM with OpenZFS")
    screen.say(f"why: {reason}. Where ZFS works, the demo uses the machine itself.")
    screen.say(
        "The first run builds the VM image: 4-7 minutes (apt, then DKMS compiles zfs.ko)."
        " Later runs only verify it (seconds)."
    )
    started = time.monotonic()
    with Heartbeat(screen, started):
        image = build_image(
            lambda line: None if line.startswith("ZUA_VM_") else screen.out(f"| {line}")
        )
    screen.say(f"image ready in {time.monotonic() - started:.0f} s: {image.directory}")
    return image


class Heartbeat:
    """While the image builds, say every HEARTBEAT seconds that it does, with the last line
    of the build's newest log (build-image.sh keeps apt's and DKMS's output there)."""

    def __init__(self, screen: Screen, started: float) -> None:
        self.screen = screen
        self.started = started
        cache = Path(os.environ.get("ZUA_VM_CACHE", "/var/cache/zfs-unlock-agent-vm"))
        self.logs = cache / "logs"
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, daemon=True)

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _latest(self) -> str:
        with contextlib.suppress(OSError, ValueError):
            newest = max(self.logs.glob("*.log"), key=lambda path: path.stat().st_mtime)
            if time.time() - newest.stat().st_mtime < 60:
                lines = newest.read_text(errors="replace").strip().splitlines()
                return f"; {newest.name}: {lines[-1].strip()[:90]}" if lines else ""
        return ""

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT):
            minutes, seconds = divmod(int(time.monotonic() - self.started), 60)
            self.screen.out(f"| ... still building, {minutes}:{seconds:02d} so far{self._latest()}")


def run_in_vm(
    screen: Screen, image: Image, work: Path, settings: dict[str, Any], admin_port: int, port: int
) -> Path:
    share, payload = work / "share", work / "payload"
    share.mkdir()
    payload.mkdir()
    shutil.copyfile(GUEST_SCRIPT, payload / "run.sh")
    (share / "settings.json").write_text(json.dumps(settings))
    screen.step("The VM boots (software emulation: about 10 s, then a few seconds a command)")
    screen.say(
        f"its network reaches only the key server ({SERVER_ADDRESS[0]}:{SERVER_ADDRESS[1]})"
        f" and the admin channel ({CONTROL_ADDRESS[0]}:{CONTROL_ADDRESS[1]}), both on"
        " this machine's 127.0.0.1"
    )
    guest = Guest(
        image, payload, share, work / "guest",
        server_port=port, control_port=admin_port, machine_id=os.urandom(16).hex(), disks=(),
        read_only_shares={"src": REPO, "site": image.site}, timeout=900,
    )  # fmt: skip
    with guest:
        guest.start()
        with ConsoleFollower(guest.console_path, screen.feed):
            run = guest.wait()
    if run.rc is None:
        screen.out(f"the VM stopped without reporting (QEMU exit {run.qemu_rc})")
    return run.console_path


def no_key_material(screen: Screen, data_dir: Path, files: list[Path]) -> None:
    """The admin's check: open every sealed key with the master key and look for it (raw,
    hex, base64) in what the demo printed, the VM's whole console, and FILES."""
    haystacks = {
        "this transcript": "\n".join(screen.transcript).encode(),
        "the host's output": "\n".join(screen.unmarked).encode(),
    }
    haystacks |= {path.name: path.read_bytes() for path in files if path.is_file()}
    store = SqliteStore(data_dir / "keys.db")
    try:
        records = store.keys()
    finally:
        store.close()
    if not records:
        return  # the host never got as far as a key: nothing to look for
    screen.step(
        "Last, the admin checks that no key ever appeared in the clear: it opens the sealed"
        " keys with the master key and searches everything above, the host's whole output"
        " and the server's files for them"
    )
    sealer = load_master_key(data_dir / "master.key")
    found: list[str] = []
    for record in records:
        material = sealer.open(record.sealed, context_of(record))
        forms = (material, material.hex().encode(), base64.b64encode(material))
        found += [name for name, data in haystacks.items() if any(f in data for f in forms)]
    screen.say(f"searched: {', '.join(haystacks)}")
    verdict = f"FOUND in {', '.join(found)}" if found else "found nowhere"
    screen.check("no_leak", not found, f"{len(records)} key(s), {verdict}")


def keep_logs(paths: list[Path]) -> Path:
    kept = Path(tempfile.mkdtemp(prefix="zfs-unlock-demo-logs-"))
    for path in paths:
        if path.is_file():
            shutil.copyfile(path, kept / path.name)
    return kept


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vm", action="store_true", help="use the VM even where ZFS works here")
    args = parser.parse_args()
    started = time.monotonic()
    here, reason = zfs_here()
    local = here and not args.vm
    reason = "--vm was given" if here and args.vm else reason
    screen = Screen(show_unmarked=local)
    screen.print(
        "zfs-unlock-agent demo. A key server keeps the keys of encrypted ZFS datasets; each"
        " ZFS host\nruns the agent, which fetches its keys over mutual TLS to unlock them at"
        " boot. No key ever\ntouches the host's disk, and none is printed here.\n"
        "'server#' marks what the admin runs on the key server (this machine, 127.0.0.1),"
        " 'host#'\nwhat runs on the ZFS host"
        + (" (this machine: " + reason + ")." if local else " (a VM: see below).")
    )
    if os.geteuid() != 0:
        screen.print("\nThe demo needs root: ZFS, or building the VM image (apt, DKMS).")
        return 77
    work = Path(tempfile.mkdtemp(prefix="zfs-unlock-demo-"))
    server: KeyServer | None = None
    logs: list[Path] = [work / "server.log"]
    try:
        image = None if local else prepare_vm(screen, reason)
        server = KeyServer(screen, work / "server", work / "server.log")
        server.init()
        server.serve()
        with AdminChannel(work / "admin", server.env) as admin:
            if local:
                settings = {
                    "server_url": f"https://127.0.0.1:{server.port}",
                    "admin_host": "127.0.0.1",
                    "admin_port": admin.port,
                    "workdir": str(work / "host"),
                    "config": str(work / "host" / "etc" / "agent.toml"),
                }
                path = work / "settings.json"
                path.write_text(json.dumps({**settings, "pin": server.pin}))
                run_here(screen, path)
            elif image is not None:
                settings = {
                    "server_url": f"https://{SERVER_ADDRESS[0]}:{SERVER_ADDRESS[1]}",
                    "admin_host": CONTROL_ADDRESS[0],
                    "admin_port": CONTROL_ADDRESS[1],
                    "workdir": "/tmp/zuademo",  # noqa: S108 - in the VM
                    "config": str(zfs_host.DEFAULT_CONFIG),
                    "pin": server.pin,
                }
                logs.append(run_in_vm(screen, image, work, settings, admin.port, server.port))
        data_dir = server.data_dir
        no_key_material(screen, data_dir, [*logs, *(data_dir / n for n in SERVER_FILES)])
    except (VmError, RuntimeError, OSError, subprocess.SubprocessError) as exc:
        screen.print(f"\nThe demo could not go on: {exc}")
    except KeyboardInterrupt:
        screen.print("\nInterrupted.")
    finally:
        if server is not None:
            server.stop()
        where = "ZFS host: this machine" if local else "ZFS host: a QEMU VM with OpenZFS"
        ok = screen.summary(time.monotonic() - started, f"{where}; key server: 127.0.0.1")
        if not ok:
            screen.print(f"    logs kept in {keep_logs(logs)}")
        shutil.rmtree(work, ignore_errors=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
