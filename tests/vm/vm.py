"""The real-OpenZFS test guest: its image, one boot of it, and the host side it talks to.

- `build_image` runs build-image.sh, which builds the kernel and base initramfs once
  (cached outside the checkout) and returns where they are.
- `Forwarder` is a TCP proxy on 127.0.0.1 in front of the key server. The guest switches
  it off and on by sending "down" or "up" to its control port, so a scenario can make the
  server unreachable, then reachable again, without the host knowing its timing. With
  `legacy=SimpleZfsImporter(...)`, "legacy POOL_GUID NAME" makes the host import a fresh
  SimpleZFSKeySystem key for the guest (the key never crosses the control channel).
- `Guest` boots the image under QEMU (TCG) with a payload (run.sh and files, unpacked at
  /payload), disks (GPT, one ZFS partition each), 9p shares and user networking that
  reaches only the forwarder (10.0.2.100:8443) and its control port (10.0.2.101:9000).
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import shutil
import signal
import socket
import sqlite3
import stat
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Self

from tests.vm.relay import relay
from zfs_unlock_common import validate

if TYPE_CHECKING:
    import pytest

    from tests.keyserver import HostCreds, KeyServer

HERE = Path(__file__).resolve().parent
BUILD_SCRIPT = HERE / "build-image.sh"
RELAY = HERE / "relay.py"

SERVER_ADDRESS = ("10.0.2.100", 8443)  # the key server, as the guest sees it
CONTROL_ADDRESS = ("10.0.2.101", 9000)  # the forwarder's switch, as the guest sees it
SHARE_TAG = "hostshare"  # mounted read-write at /mnt/host; other shares at /mnt/<tag>, read-only
ZFS_PARTITION_TYPE = "6A898CC3-1DD2-11B2-99A6-080020286F6D"
GIB = 1 << 30
# Debian 12's OpenZFS lines: bookworm-backports' (the default) and bookworm's own.
ZFS_LINES = ("2.3", "2.1")
EXIT_MARKER = re.compile(r"^ZFSVM-EXIT: (\d+)\s*$", re.MULTILINE)


class VmError(Exception):
    """The guest could not be built or booted."""


# The image


@dataclass(frozen=True)
class Image:
    directory: Path
    site: Path  # the agent's runtime dependencies, for the guest's Python

    @property
    def kernel(self) -> Path:
        return self.directory / "vmlinuz"

    @property
    def base_cpio(self) -> Path:
        return self.directory / "base.cpio"


def progress_printer(config: pytest.Config, tag: str) -> Callable[[str], None]:
    """Print past pytest's capture: the first build takes minutes and should show it is alive."""
    capture = config.pluginmanager.getplugin("capturemanager")

    def progress(line: str) -> None:
        with capture.global_and_fixture_disabled() if capture else contextlib.nullcontext():
            print(f"[{tag}] {line}", file=sys.stderr, flush=True)

    return progress


def write_guest_agent_config(
    directory: Path, server: KeyServer, creds: HostCreds, network: str
) -> None:
    """A guest's /etc/zfs-unlock-agent: agent.toml reaching the server at SERVER_ADDRESS
    with the NETWORK table's body, client.crt, client.key (0400)."""
    directory.mkdir(parents=True)
    shutil.copyfile(creds.cert, directory / "client.crt")
    shutil.copyfile(creds.key, directory / "client.key")
    (directory / "client.key").chmod(0o400)
    host, port = SERVER_ADDRESS
    (directory / "agent.toml").write_text(
        'machine_id_file = "/etc/machine-id"\n'
        f'[[server]]\nurl = "https://{host}:{port}"\npins = ["{server.pin}"]\n'
        '[client]\ncertificate = "client.crt"\nkey = "client.key"\n'
        f"[network]\n{network}"
    )


def run_build_script(
    script: Path, announced: Sequence[str], progress: Callable[[str], None], zfs: str = "2.3"
) -> dict[str, Path]:
    """Run a cache-building SCRIPT for the OpenZFS line ZFS (one of ZFS_LINES), passing its
    output to PROGRESS, and return the paths it announces as NAME=PATH lines for each name
    in ANNOUNCED; VmError when it fails."""
    if zfs not in ZFS_LINES:
        raise VmError(f"no OpenZFS line {zfs!r}: one of {ZFS_LINES}")
    paths: dict[str, Path] = {}
    tail: list[str] = []
    with subprocess.Popen(
        ["bash", str(script)],
        env={**os.environ, "ZUA_VM_ZFS": zfs},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        text=True,
    ) as process:
        assert process.stdout is not None
        for raw in process.stdout:
            line = raw.rstrip("\n")
            key, _, value = line.partition("=")
            if key in announced:
                paths[key] = Path(value)
            progress(line)
            tail = [*tail[-29:], line]
    if process.returncode != 0 or len(paths) != len(announced):
        raise VmError(f"{script} failed (exit {process.returncode}):\n" + "\n".join(tail))
    return paths


def build_image(
    progress: Callable[[str], None] = print, zfs: str = "2.3", script: Path = BUILD_SCRIPT
) -> Image:
    """Build or verify the cached image of the OpenZFS line ZFS (build-image.sh), passing
    its output to PROGRESS."""
    paths = run_build_script(script, ("ZUA_VM_IMAGE", "ZUA_VM_SITE"), progress, zfs)
    return Image(paths["ZUA_VM_IMAGE"], paths["ZUA_VM_SITE"])


# The switchable forwarder


class Forwarder:
    """A proxy on 127.0.0.1 to the key server; the guest switches it with "down"/"up".

    While down, new connections are reset at once and open ones are cut, as when the
    server's machine is gone. Every control command is answered "ok" (or "error").
    "legacy POOL_GUID NAME" calls LEGACY (when given) with the validated arguments; a
    word that names one of HOOKS runs it (the admin's work on the server's machine: a
    backup, a restore, a recovery kit, a lost server), "ok" unless it raises.
    """

    def __init__(
        self,
        target_port: int,
        legacy: LegacyImporter | None = None,
        hooks: Mapping[str, Callable[[], None]] | None = None,
    ) -> None:
        self.target_port = target_port
        self.legacy = legacy
        self.hooks = dict(hooks or {})
        self.port = 0
        self.control_port = 0
        self.events: list[str] = []  # what happened, for the test's report
        self._up = True
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._open: set[socket.socket] = set()
        self._threads: list[threading.Thread] = []
        self._listeners: list[socket.socket] = []

    @property
    def up(self) -> bool:
        return self._up

    def switch(self, up: bool) -> None:
        with self._lock:
            self._up = up
            self.events.append(f"{time.strftime('%H:%M:%S')} {'up' if up else 'down'}")
        if not up:
            self._cut()

    def retarget(self, port: int) -> None:
        """Send new connections to the server on PORT from now on (a restored server)."""
        with self._lock:
            self.target_port = port
            self.events.append(f"{time.strftime('%H:%M:%S')} now to port {port}")

    def _cut(self) -> None:
        with self._lock:
            open_sockets = list(self._open)
        for sock in open_sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def start(self) -> None:
        self.port = self._listen(self._serve_data)
        self.control_port = self._listen(self._serve_control)

    def stop(self) -> None:
        self._stop.set()
        self._cut()
        for thread in self._threads:
            thread.join(timeout=5)
        for sock in self._listeners:
            sock.close()

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _listen(self, handler: Callable[[socket.socket], None]) -> int:
        listener = socket.socket()
        listener.bind(("127.0.0.1", 0))
        listener.listen(16)
        listener.settimeout(0.2)  # so the accept loop notices stop()
        self._listeners.append(listener)
        self._spawn(self._accept_loop, listener, handler)
        port: int = listener.getsockname()[1]
        return port

    def _spawn(self, target: Callable[..., None], *args: object) -> None:
        thread = threading.Thread(target=target, args=args, daemon=True)
        self._threads.append(thread)
        thread.start()

    def _accept_loop(
        self, listener: socket.socket, handler: Callable[[socket.socket], None]
    ) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            conn.settimeout(None)
            self._spawn(self._guarded, handler, conn)

    @staticmethod
    def _guarded(handler: Callable[[socket.socket], None], conn: socket.socket) -> None:
        with contextlib.suppress(OSError), conn:
            handler(conn)

    def _serve_data(self, conn: socket.socket) -> None:
        if not self._up:
            self.events.append(f"{time.strftime('%H:%M:%S')} reset a connection (down)")
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # RST
            return
        with socket.create_connection(("127.0.0.1", self.target_port), timeout=10) as upstream:
            upstream.settimeout(None)
            with self._lock:
                self._open |= {conn, upstream}
            try:
                relay(conn, upstream)
            finally:
                with self._lock:
                    self._open -= {conn, upstream}

    def _serve_control(self, conn: socket.socket) -> None:
        conn.settimeout(10)
        with conn.makefile("r", encoding="ascii", errors="replace") as reader:
            command = reader.readline().strip()
        words = command.split(" ")
        if command in ("down", "up"):
            self.switch(command == "up")
            conn.sendall(b"ok\n")
        elif len(words) == 3 and words[0] == "legacy":
            conn.sendall(b"ok\n" if self._import_legacy(words[1], words[2]) else b"error\n")
        elif command in self.hooks:
            conn.settimeout(None)  # a backup or a restore may take a while under TCG load
            conn.sendall(b"ok\n" if self._run_hook(command) else b"error\n")
        else:
            conn.sendall(b"error\n")

    def _run_hook(self, name: str) -> bool:
        try:
            self.hooks[name]()
        except (VmError, OSError, RuntimeError, subprocess.SubprocessError) as exc:
            self.events.append(f"{time.strftime('%H:%M:%S')} {name}: failed: {exc}")
            return False
        self.events.append(f"{time.strftime('%H:%M:%S')} {name}: done")
        return True

    def _import_legacy(self, pool_guid: str, name: str) -> bool:
        stamp = time.strftime("%H:%M:%S")
        try:
            validate.guid(pool_guid, "pool GUID")
            validate.label(name, "name")
        except validate.InvalidInput as exc:
            self.events.append(f"{stamp} legacy: refused ({exc})")
            return False
        if self.legacy is None:
            self.events.append(f"{stamp} legacy {pool_guid} {name}: no importer")
            return False
        try:
            self.legacy(pool_guid, name)
        except (VmError, OSError, sqlite3.Error, subprocess.SubprocessError) as exc:
            self.events.append(f"{stamp} legacy {pool_guid} {name}: failed: {exc}")
            return False
        self.events.append(f"{stamp} legacy {pool_guid} {name}: imported")
        return True


# The control channel's "legacy" command: SimpleZFSKeySystem keys, made on the host

LegacyImporter = Callable[[str, str], None]  # (pool GUID, name) -> None, or raises


@dataclass(frozen=True)
class SimpleZfsImporter:
    """Import a fresh SimpleZFSKeySystem-style key for MACHINE_ID's POOL_GUID/NAME.

    As that system made them: 32 random hex characters, used by ZFS as a keyformat=raw
    key. They go into a one-row RedBean-style SQLite file (table `key`: name, machine,
    pool, keyvalue, active), which the real admin command `zfs-unlock-server
    import-simplezfs` reads; the file is removed afterwards. The key stays on the host:
    the guest fetches it itself through the server's /MACHINE_ID/POOL_GUID/NAME route.
    """

    server_bin: Path
    data_dir: Path
    machine_id: str
    workdir: Path

    def __call__(self, pool_guid: str, name: str) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        database = self.workdir / f"simplezfs-{pool_guid}-{name}.db"
        database.unlink(missing_ok=True)
        try:
            database.touch(mode=0o600)
            write_simplezfs_database(
                database, [(name, self.machine_id, pool_guid, secrets.token_hex(16), 1)]
            )
            command = [str(self.server_bin), "--data-dir", str(self.data_dir)]
            done = subprocess.run(
                [*command, "import-simplezfs", str(database)],
                capture_output=True,
                text=True,
                timeout=60,
                check=False,
            )
        finally:
            database.unlink(missing_ok=True)
        if done.returncode != 0:
            raise VmError(f"import-simplezfs exited {done.returncode}: {done.stderr.strip()}")


def write_simplezfs_database(path: Path, rows: Sequence[tuple[str, str, str, str, int]]) -> None:
    """A SimpleZFSKeySystem database as RedBeanPHP lays it out: (name, machine, pool,
    keyvalue, active) rows in table `key`, with an autoincrement id."""
    db = sqlite3.connect(path)
    try:
        with db:
            db.execute(
                "CREATE TABLE `key` (id INTEGER PRIMARY KEY AUTOINCREMENT, name TEXT,"
                " machine TEXT, pool TEXT, keyvalue TEXT, active INTEGER)"
            )
            db.executemany(
                "INSERT INTO `key` (name, machine, pool, keyvalue, active) VALUES (?, ?, ?, ?, ?)",
                rows,
            )
    finally:
        db.close()


# The guest


@dataclass(frozen=True)
class GuestRun:
    rc: int | None  # the payload's exit status; None when the guest never reported one
    console: str  # the serial console
    console_path: Path
    qemu_rc: int
    seconds: float


def newc_archive(entries: Sequence[tuple[str, int, bytes]]) -> bytes:
    """An uncompressed newc cpio archive of (name, mode, data) entries."""
    out = bytearray()

    def add(ino: int, name: str, mode: int, data: bytes) -> None:
        encoded = name.encode() + b"\0"
        fields = (ino, mode, 0, 0, 1, 0, len(data), 0, 0, 0, 0, len(encoded), 0)
        out.extend(b"070701" + b"".join(b"%08X" % f for f in fields) + encoded)
        out.extend(b"\0" * (-len(out) % 4) + data)
        out.extend(b"\0" * (-len(out) % 4))

    for ino, (name, mode, data) in enumerate(entries, start=1):
        add(ino, name, mode, data)
    add(0, "TRAILER!!!", 0, b"")
    return bytes(out)


def payload_entries(payload: Path, extra: Mapping[str, bytes]) -> list[tuple[str, int, bytes]]:
    """PAYLOAD's files (no caches) and EXTRA files, all below /payload in the guest."""
    entries = [("payload", stat.S_IFDIR | 0o755, b"")]
    for path in sorted(payload.rglob("*")):
        relative = path.relative_to(payload)
        if "__pycache__" in relative.parts:
            continue
        name = f"payload/{relative.as_posix()}"
        if path.is_dir():
            entries.append((name, stat.S_IFDIR | 0o755, b""))
        elif name[len("payload/") :] not in extra:
            entries.append((name, stat.S_IFREG | (path.stat().st_mode & 0o777), path.read_bytes()))
    entries += [(f"payload/{name}", stat.S_IFREG | 0o644, data) for name, data in extra.items()]
    return entries


def make_disk(path: Path, size: int) -> Path:
    """A sparse image with a GPT and one ZFS partition. (Without udev, `zpool create`
    on a whole disk waits 30 s for the partition it makes, then fails.)"""
    path.unlink(missing_ok=True)
    with path.open("wb") as handle:
        handle.truncate(size)
    subprocess.run(
        ["sfdisk", "--quiet", "--label", "gpt", str(path)],
        input=f"type={ZFS_PARTITION_TYPE}\n",
        text=True,
        check=True,
        capture_output=True,
    )
    return path


class Guest:
    """One boot of the test guest. `run()` boots and waits; with `monitor=True`,
    `start()`, then `hmp()` (e.g. `hotplug_disk`) while it runs, then `wait()`."""

    def __init__(
        self,
        image: Image,
        payload: Path,
        share: Path,
        workdir: Path,
        *,
        server_port: int,
        control_port: int,
        machine_id: str = "",
        disks: Sequence[int] = (GIB, GIB),
        read_only_shares: Mapping[str, Path] | None = None,
        memory_mib: int = 1024,
        cpus: int = 2,
        timeout: float = 900,
        monitor: bool = False,
        keep_disks: bool = False,
    ) -> None:
        self.image = image
        self.payload = payload
        self.share = share
        self.workdir = workdir
        self.server_port = server_port
        self.control_port = control_port
        self.machine_id = machine_id
        self.disk_sizes = tuple(disks)
        self.read_only_shares = dict(read_only_shares or {})
        self.memory_mib = memory_mib
        self.cpus = cpus
        self.timeout = timeout
        self.monitor_path: Path | None = workdir / "monitor.sock" if monitor else None
        self.keep_disks = keep_disks  # for a later boot from them (tests/vm/rootonzfs.py)
        self.console_path = workdir / "console.log"
        self.disks: list[Path] = []
        self._process: subprocess.Popen[bytes] | None = None
        self._started = 0.0
        self._hotplugged = 0

    # Building the boot

    def _initrd(self) -> Path:
        """base.cpio followed by the payload: the kernel unpacks both (an uncompressed
        archive after a compressed one would be ignored, so base stays uncompressed)."""
        extra = {"machine-id": f"{self.machine_id}\n".encode()} if self.machine_id else {}
        initrd = self.workdir / "initrd.cpio"
        with initrd.open("wb") as out, self.image.base_cpio.open("rb") as base:
            while chunk := base.read(1 << 20):
                out.write(chunk)
            out.write(newc_archive(payload_entries(self.payload, extra)))
        return initrd

    def _forward(self, address: tuple[str, int], port: int) -> str:
        # cmd: runs a relay per guest connection; the chardev form (-tcp:HOST:PORT)
        # would carry the first connection of the boot only.
        return f"guestfwd=tcp:{address[0]}:{address[1]}-cmd:{sys.executable} {RELAY} {port}"

    def command(self, initrd: Path) -> list[str]:
        accel = os.environ.get("ZUA_VM_ACCEL", "tcg")
        accel_args = (
            ["-accel", "kvm", "-cpu", "host"] if accel == "kvm" else ["-accel", "tcg,thread=multi"]
        )
        netdev = ",".join(
            [
                "user,id=n0,restrict=on",
                self._forward(SERVER_ADDRESS, self.server_port),
                self._forward(CONTROL_ADDRESS, self.control_port),
            ]
        )
        monitor = f"unix:{self.monitor_path},server=on,wait=off" if self.monitor_path else "none"
        args = [
            "timeout", "--kill-after=10", str(int(self.timeout)),
            "qemu-system-x86_64", *accel_args,
            "-m", str(self.memory_mib), "-smp", str(self.cpus),
            "-display", "none", "-nodefaults", "-no-reboot", "-serial", "stdio",
            "-monitor", monitor,
            "-kernel", str(self.image.kernel), "-initrd", str(initrd),
            "-append", "console=ttyS0 panic=-1 quiet loglevel=3 rdinit=/init",
            "-netdev", netdev, "-device", "virtio-net-pci,netdev=n0",
            "-object", "rng-random,id=rng0,filename=/dev/urandom",
            "-device", "virtio-rng-pci,rng=rng0",
        ]  # fmt: skip
        for index, disk in enumerate(self.disks):
            args += [
                "-drive", f"file={disk},if=none,id=disk{index},format=raw,cache=unsafe",
                "-device", f"virtio-blk-pci,drive=disk{index},serial=zua-disk{index}",
            ]  # fmt: skip
        shares = {SHARE_TAG: (self.share, False)}
        shares |= {tag: (path, True) for tag, path in self.read_only_shares.items()}
        for tag, (path, read_only) in shares.items():
            options = f"local,path={path},mount_tag={tag},security_model=none,id={tag}"
            args += ["-virtfs", options + (",readonly=on" if read_only else "")]
        return args

    # Running it

    def start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.disks = [
            make_disk(self.workdir / f"disk{i}.img", size) for i, size in enumerate(self.disk_sizes)
        ]
        initrd = self._initrd()
        with self.console_path.open("wb") as console:
            self._started = time.monotonic()
            self._process = subprocess.Popen(
                self.command(initrd), stdin=subprocess.DEVNULL, stdout=console, stderr=console
            )

    def wait(self) -> GuestRun:
        if self._process is None:
            raise VmError("the guest was not started")
        try:
            qemu_rc = self._process.wait(timeout=self.timeout + 30)
        except subprocess.TimeoutExpired:
            self.kill()
            qemu_rc = self._process.wait()
        seconds = time.monotonic() - self._started
        self._process = None
        (self.workdir / "initrd.cpio").unlink(missing_ok=True)  # a copy of the 80 MB base
        for disk in [] if self.keep_disks else self.disks:
            disk.unlink(missing_ok=True)
        console = self.console_path.read_text(errors="replace").replace("\r", "")
        markers = EXIT_MARKER.findall(console)
        rc = int(markers[-1]) if markers else None
        return GuestRun(rc, console, self.console_path, qemu_rc, seconds)

    def run(self) -> GuestRun:
        self.start()
        return self.wait()

    def kill(self) -> None:
        """Stop QEMU at once: `timeout` put itself and QEMU in a process group of their own."""
        if self._process is not None and self._process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self._process.pid, signal.SIGKILL)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.kill()

    # The QEMU monitor (monitor=True)

    def hmp(self, command: str, timeout: float = 30) -> str:
        """Run one human-monitor command; return its output."""
        if self.monitor_path is None:
            raise VmError("the guest was started without monitor=True")
        return hmp(self.monitor_path, command, timeout)

    def hotplug_disk(self, size: int = GIB) -> Path:
        """Attach a new partitioned disk to the running guest (virtio-blk-pci)."""
        self._hotplugged += 1
        name = f"hot{self._hotplugged}"
        disk = make_disk(self.workdir / f"{name}.img", size)
        self.disks.append(disk)
        output = self.hmp(f"drive_add 0 file={disk},if=none,id={name},format=raw,cache=unsafe")
        output += self.hmp(f"device_add virtio-blk-pci,drive={name},id={name},serial=zua-{name}")
        if "rror" in output:
            raise VmError(f"hot-plugging {disk} failed: {output}")
        return disk


def hmp(monitor_path: Path, command: str, timeout: float = 30) -> str:
    """Run one human-monitor command on the QEMU monitor socket MONITOR_PATH; its output."""
    with _connect_unix(monitor_path, timeout) as sock:
        _read_until(sock, b"(qemu) ")  # the banner
        sock.sendall(command.encode() + b"\n")
        output = _read_until(sock, b"(qemu) ").decode(errors="replace")
    return output.replace("\r", "").split("\n", 1)[-1].removesuffix("(qemu) ").strip()


@contextlib.contextmanager
def _connect_unix(path: Path, timeout: float) -> Iterator[socket.socket]:
    deadline = time.monotonic() + timeout
    while True:
        sock = socket.socket(socket.AF_UNIX)
        sock.settimeout(timeout)
        try:
            sock.connect(str(path))
            break
        except OSError:
            sock.close()
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)
    with sock:
        yield sock


def _read_until(sock: socket.socket, marker: bytes) -> bytes:
    data = b""
    while not data.endswith(marker):
        chunk = sock.recv(4096)
        if not chunk:
            raise VmError(f"QEMU monitor closed the connection: {data!r}")
        data += chunk
    return data
