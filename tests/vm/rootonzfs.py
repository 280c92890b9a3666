"""Root on encrypted ZFS, booted for real: the harness of tests/vm/test_boot.py.

- `build_rootfs` runs build-rootfs.sh: cached Debian bookworm trees (initramfs-tools, and
  dracut for OpenZFS 2.3) with Debian's kernel, systemd, OpenZFS 2.3 or 2.1, the agent's
  dependencies, and three network stacks of which each boot picks one.
- `prepare` turns one tree, per run, into the target machine: an overlay on the cached tree
  (which stays untouched), this checkout's Debian packages installed with the tree's own
  dpkg (the agent, its units and initramfs integration, the key server), the target's
  identity (machine-id, hostid, agent.toml, client certificate and key), the
  report unit (tests/vm/boot/target), and an initramfs built in a chroot by the tree's own
  update-initramfs or dracut. It can also write the tree as a tar file for the installer.
- The installer is the existing minimal test guest (vm.Guest) running
  tests/vm/boot/installer/run.sh with the target's identity.
- `Machine` boots the installed system: Debian's kernel and the built initramfs, the disks,
  user networking that reaches only the key server's forwarder, the serial console on a
  socket (read into a log with host timestamps; the test can type into it) and the QEMU
  monitor for disk hot-plug.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Self

from tests.vm.vm import RELAY, SERVER_ADDRESS, SHARE_TAG, VmError, hmp, run_build_script

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
BUILD_SCRIPT = HERE / "build-rootfs.sh"
BOOT_DIR = HERE / "boot"
INSTALLER = BOOT_DIR / "installer"
TARGET_FILES = BOOT_DIR / "target"
VARIANTS = ("initramfs-tools", "dracut")
REPORT_DIR = "usr/local/lib/zua-boot-report"  # in the target


# The cached trees


@dataclass(frozen=True)
class RootTrees:
    directory: Path
    kver: str

    def tree(self, variant: str) -> Path:
        return self.directory / variant

    def kernel(self, variant: str) -> Path:
        return self.tree(variant) / "boot" / f"vmlinuz-{self.kver}"

    def baseline_initrd_bytes(self, variant: str) -> int:
        return int((self.directory / f"{variant}.baseline-initrd-bytes").read_text())


def build_rootfs(
    progress: Callable[[str], None] = print, zfs: str = "2.3", script: Path = BUILD_SCRIPT
) -> RootTrees:
    """Build or find the cached trees of the OpenZFS line ZFS (build-rootfs.sh), passing its
    output to PROGRESS."""
    found = run_build_script(script, ("ZUA_VM_ROOTFS",), progress, zfs)["ZUA_VM_ROOTFS"]
    facts = dict(
        line.split("=", 1) for line in (found / "COMPLETE").read_text().splitlines() if "=" in line
    )
    return RootTrees(found, facts["KVER"])


# Host-side helpers


def run_logged(argv: Sequence[str | Path], log: Path, timeout: float = 600) -> None:
    """Run ARGV with its output appended to LOG; on failure raise with the log's tail."""
    with log.open("a") as out:
        out.write(f"$ {' '.join(map(str, argv))}\n")
        out.flush()
        done = subprocess.run(
            [str(a) for a in argv],
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            timeout=timeout,
            check=False,
        )
    if done.returncode != 0:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-40:])
        raise VmError(f"{argv[0]} exited {done.returncode} (log {log}):\n{tail}")


def build_debs(log: Path) -> list[Path]:
    """This checkout's Debian packages (`scripts/deb.sh`: build/deb/, lintian-checked)."""
    run_logged(["bash", REPO / "scripts" / "deb.sh"], log)
    debs = sorted((REPO / "build" / "deb").glob("*.deb"))
    if len(debs) != 3:
        raise VmError(f"expected three packages in build/deb, found {[d.name for d in debs]}")
    return debs


@contextlib.contextmanager
def overlay(lower: Path, workdir: Path) -> Iterator[Path]:
    """LOWER, writable, at WORKDIR/root; changes go to WORKDIR/upper, LOWER stays as it was."""
    upper, work, merged = workdir / "upper", workdir / "work", workdir / "root"
    for directory in (upper, work, merged):
        directory.mkdir(parents=True, exist_ok=True)
    options = f"lowerdir={lower},upperdir={upper},workdir={work}"
    subprocess.run(["mount", "-t", "overlay", "overlay", "-o", options, str(merged)], check=True)
    try:
        yield merged
    finally:
        subprocess.run(["umount", str(merged)], check=False)


@contextlib.contextmanager
def chroot_mounts(root: Path) -> Iterator[None]:
    """/proc, /sys, /dev and /dev/pts of the host inside ROOT, unmounted whatever happens."""
    mounted: list[Path] = []
    try:
        for name in ("proc", "sys", "dev", "dev/pts"):
            target = root / name
            target.mkdir(parents=True, exist_ok=True)
            subprocess.run(["mount", "--bind", f"/{name}", str(target)], check=True)
            mounted.append(target)
        yield
    finally:
        for target in reversed(mounted):
            subprocess.run(["umount", "-l", str(target)], check=False)


def in_root(root: Path, *argv: str) -> list[str]:
    """ARGV run inside ROOT with a clean environment (as the installed system would)."""
    path = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
    return ["chroot", str(root), "/usr/bin/env", "-i", path, "HOME=/root", "LC_ALL=C.UTF-8", *argv]


# The target machine


@dataclass(frozen=True)
class Target:
    """Who the installed machine is: what goes into its /etc and its initramfs."""

    machine_id: str
    hostid: int
    agent_dir: Path  # agent.toml, client.crt, client.key, and pins.json when there is one
    hostname: str = "zfsboot"

    def hostid_bytes(self) -> bytes:
        return self.hostid.to_bytes(4, "little")  # /etc/hostid: host byte order


@dataclass
class Prepared:
    variant: str
    kernel: Path
    initrd: Path
    initrd_bytes: int
    baseline_bytes: int
    seconds: dict[str, float] = field(default_factory=dict)
    log: Path = Path()
    tar: Path | None = None


def _write_identity(root: Path, target: Target) -> None:
    (root / "etc" / "machine-id").write_text(f"{target.machine_id}\n")
    (root / "etc" / "hostid").write_bytes(target.hostid_bytes())
    config = root / "etc" / "zfs-unlock-agent"
    config.mkdir(mode=0o700, parents=True, exist_ok=True)
    for name in ("agent.toml", "client.crt", "client.key"):
        shutil.copyfile(target.agent_dir / name, config / name)
    (config / "client.key").chmod(0o400)
    if (target.agent_dir / "pins.json").exists():  # server pins the host learned
        state = root / "var" / "lib" / "zfs-unlock-agent"
        state.mkdir(mode=0o755, parents=True, exist_ok=True)
        shutil.copyfile(target.agent_dir / "pins.json", state / "pins.json")
        (state / "pins.json").chmod(0o644)


def _install_report(root: Path) -> None:
    directory = root / REPORT_DIR
    directory.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(TARGET_FILES / "report.py", directory / "report.py")
    shutil.copyfile(TARGET_FILES / "server-setup.sh", directory / "server-setup.sh")
    for name in ("zua-boot-report.service", "zua-needs-data.service"):
        shutil.copyfile(TARGET_FILES / name, root / "etc" / "systemd" / "system" / name)
    generators = root / "etc" / "systemd" / "system-generators"
    generators.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(TARGET_FILES / "zua-network-stack", generators / "zua-network-stack")
    (generators / "zua-network-stack").chmod(0o755)


def prepare(
    trees: RootTrees,
    variant: str,
    debs: Sequence[Path],
    target: Target,
    workdir: Path,
    *,
    tar: Path | None = None,
    progress: Callable[[str], None] = print,
) -> Prepared:
    """Make VARIANT's tree into the target machine and build its initramfs (see the module
    docstring); with TAR, also write the tree there for the installer."""
    workdir.mkdir(parents=True, exist_ok=True)
    log = workdir / "prepare.log"
    seconds: dict[str, float] = {}
    started = time.monotonic()

    def lap(name: str) -> None:
        nonlocal started
        now = time.monotonic()
        seconds[name] = round(now - started, 1)
        started = now
        progress(f"{variant}: {name} {seconds[name]} s")

    initrd = workdir / f"initrd.img-{trees.kver}"
    with overlay(trees.tree(variant), workdir / "overlay") as root:
        lap("overlay")
        with chroot_mounts(root):
            # As an admin installs them; their dependencies are in the tree already. The
            # initramfs is built below, so the packages' update-initramfs trigger waits.
            (root / "tmp" / "debs").mkdir()
            for deb in debs:
                shutil.copyfile(deb, root / "tmp" / "debs" / deb.name)
            run_logged(in_root(root, "dpkg", "--install", "--no-triggers",
                               *(f"/tmp/debs/{deb.name}" for deb in debs)), log)  # fmt: skip
            shutil.rmtree(root / "tmp" / "debs")
            _write_identity(root, target)
            # Enabled by the package; the report sets the server up, then starts it.
            run_logged(in_root(root, "systemctl", "disable", "zfs-unlock-server.service"), log)
            _install_report(root)
            run_logged(in_root(root, "systemctl", "enable", "zua-boot-report.service",
                               "zua-needs-data.service"), log)  # fmt: skip
            lap("install agent, integration, identity")
            if variant == "initramfs-tools":
                build = ["update-initramfs", "-c", "-k", trees.kver]
            else:
                build = [
                    "dracut",
                    "--force",
                    "--kver",
                    trees.kver,
                    f"/boot/initrd.img-{trees.kver}",
                ]
            run_logged(in_root(root, *build), log)
            initrd.touch(mode=0o600)  # it holds the host's client key
            shutil.copyfile(root / "boot" / f"initrd.img-{trees.kver}", initrd)
            lap(f"initramfs ({build[0]})")
        if tar is not None:
            excludes = [f"--exclude=./{d}/*" for d in ("proc", "sys", "dev", "run", "tmp")]
            run_logged(["tar", "-C", root, "--numeric-owner", "-cf", tar, *excludes, "."], log)
            lap("tar of the tree")
    return Prepared(
        variant,
        trees.kernel(variant),
        initrd,
        initrd.stat().st_size,
        trees.baseline_initrd_bytes(variant),
        seconds,
        log,
        tar,
    )


# Booting it


@dataclass(frozen=True)
class Disk:
    path: Path
    serial: str  # the guest's /dev/disk/by-id/virtio-SERIAL


@dataclass(frozen=True)
class BootRun:
    console: str
    console_path: Path
    qemu_rc: int
    seconds: float
    share: Path


class Console:
    """The guest's serial console on a socket: kept in full with the host's arrival times,
    searchable while the guest runs, and typed into."""

    def __init__(self, path: Path, log: Path) -> None:
        self.path = path
        self.log = log
        self._sock: socket.socket | None = None
        self._text = ""
        self._stamps: list[tuple[int, float]] = []  # (offset in text, time.monotonic())
        self._changed = threading.Condition()
        self._thread: threading.Thread | None = None

    def connect(self, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while True:
            sock = socket.socket(socket.AF_UNIX)
            try:
                sock.connect(str(self.path))
                break
            except OSError:
                sock.close()
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        self._sock = sock
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        assert self._sock is not None
        with self.log.open("wb") as log:
            while True:
                try:
                    data = self._sock.recv(65536)
                except OSError:
                    data = b""
                if not data:
                    break
                log.write(data)
                log.flush()
                with self._changed:
                    self._stamps.append((len(self._text), time.monotonic()))
                    self._text += data.decode(errors="replace").replace("\r", "")
                    self._changed.notify_all()
        with self._changed:
            self._sock.close()
            self._sock = None
            self._changed.notify_all()

    @property
    def text(self) -> str:
        with self._changed:
            return self._text

    def time_of(self, offset: int) -> float:
        """When the character at OFFSET arrived (time.monotonic())."""
        with self._changed:
            stamps = [t for start, t in self._stamps if start <= offset]
        return stamps[-1] if stamps else 0.0

    def wait_for(self, pattern: re.Pattern[str], timeout: float, start: int = 0) -> re.Match[str]:
        """The first match of PATTERN at or after offset START; VmError on time-out or when
        the guest is gone."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                found = pattern.search(self._text, start)
                if found:
                    return found
                remaining = deadline - time.monotonic()
                if remaining <= 0 or (self._sock is None and self._thread is not None):
                    raise VmError(f"no {pattern.pattern!r} on the console after {timeout:.0f} s")
                self._changed.wait(min(remaining, 1.0))

    def type(self, text: str) -> None:
        """Type TEXT slowly enough for a serial line without flow control."""
        with self._changed:
            sock = self._sock
        if sock is None:
            raise VmError("the console is closed")
        for char in text.encode():
            sock.sendall(bytes([char]))
            time.sleep(0.01)

    def close(self) -> None:
        if self._thread is not None:
            self._thread.join(timeout=10)


class Machine:
    """One boot of the installed system under QEMU (TCG): `start()`, interact through
    `console` and `hotplug()`, then `wait()`."""

    def __init__(
        self,
        name: str,
        kernel: Path,
        initrd: Path,
        append: str,
        disks: Sequence[Disk],
        workdir: Path,
        share: Path,
        *,
        server_port: int,
        memory_mib: int = 1536,
        cpus: int = 2,
        timeout: float = 900,
    ) -> None:
        self.name = name
        self.kernel = kernel
        self.initrd = initrd
        self.append = append
        self.disks = list(disks)
        self.workdir = workdir
        self.share = share
        self.server_port = server_port
        self.memory_mib = memory_mib
        self.cpus = cpus
        self.timeout = timeout
        self.monitor_path = workdir / "monitor.sock"
        self.serial_path = workdir / "serial.sock"
        self.console = Console(self.serial_path, workdir / "console.log")
        self._process: subprocess.Popen[bytes] | None = None
        self.started = 0.0

    def command(self) -> list[str]:
        accel = os.environ.get("ZUA_VM_ACCEL", "tcg")
        accel_args = (
            ["-accel", "kvm", "-cpu", "host"] if accel == "kvm" else ["-accel", "tcg,thread=multi"]
        )
        relay = f"{sys.executable} {RELAY} {self.server_port}"
        netdev = f"user,id=n0,restrict=on,guestfwd=tcp:{SERVER_ADDRESS[0]}:{SERVER_ADDRESS[1]}-cmd:{relay}"
        args = [
            "timeout", "--kill-after=10", str(int(self.timeout)),
            "qemu-system-x86_64", *accel_args,
            "-m", str(self.memory_mib), "-smp", str(self.cpus),
            "-display", "none", "-nodefaults", "-no-reboot",
            # wait=on: QEMU starts the guest once the console reader is connected.
            "-chardev", f"socket,id=ser0,path={self.serial_path},server=on,wait=on",
            "-serial", "chardev:ser0",
            "-monitor", f"unix:{self.monitor_path},server=on,wait=off",
            "-kernel", str(self.kernel), "-initrd", str(self.initrd), "-append", self.append,
            "-netdev", netdev, "-device", "virtio-net-pci,netdev=n0",
            "-object", "rng-random,id=rng0,filename=/dev/urandom",
            "-device", "virtio-rng-pci,rng=rng0",
            "-virtfs", f"local,path={self.share},mount_tag={SHARE_TAG},security_model=none,id=share",
        ]  # fmt: skip
        for index, disk in enumerate(self.disks):
            args += [
                "-drive", f"file={disk.path},if=none,id=disk{index},format=raw,cache=unsafe",
                "-device", f"virtio-blk-pci,drive=disk{index},serial={disk.serial}",
            ]  # fmt: skip
        return args

    def start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        for path in (self.serial_path, self.monitor_path):
            path.unlink(missing_ok=True)
        with (self.workdir / "qemu.log").open("wb") as log:
            self._process = subprocess.Popen(
                self.command(), stdin=subprocess.DEVNULL, stdout=log, stderr=log
            )
        self.started = time.monotonic()
        try:
            self.console.connect()
        except OSError as exc:
            self.kill()
            raise VmError(f"cannot connect to the console: {exc}") from exc

    def hotplug(self, disk: Disk, node: str = "hot1") -> None:
        """Attach DISK to the running guest (virtio-blk-pci), as a USB disk would appear."""
        output = hmp(self.monitor_path, f"drive_add 0 file={disk.path},if=none,id={node},"
                     "format=raw,cache=unsafe")  # fmt: skip
        output += hmp(self.monitor_path, f"device_add virtio-blk-pci,drive={node},id={node},"
                      f"serial={disk.serial}")  # fmt: skip
        if "rror" in output:
            raise VmError(f"hot-plugging {disk.path} failed: {output}")
        self.disks.append(disk)

    def wait(self) -> BootRun:
        if self._process is None:
            raise VmError("the machine was not started")
        try:
            qemu_rc = self._process.wait(timeout=self.timeout + 30)
        except subprocess.TimeoutExpired:
            self.kill()
            qemu_rc = self._process.wait()
        self.console.close()
        seconds = time.monotonic() - self.started
        self._process = None
        return BootRun(self.console.text, self.console.log, qemu_rc, seconds, self.share)

    def kill(self) -> None:
        if self._process is not None and self._process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self._process.pid, 9)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.kill()
