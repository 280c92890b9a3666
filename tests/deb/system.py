"""What the Debian package tier's modules share: the clean Debian 12 tree, the packages
of this checkout, and a throw-away chroot on the tree (Chroot).

The tree is a cached debootstrap of bookworm (build-tree.sh); the packages are what
scripts/deb.sh builds into build/deb/. The session's fixtures (conftest.py) make each
once, whichever module asks first.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import time
from collections.abc import Mapping
from pathlib import Path

import pytest

from tests.vm.vm import run_build_script

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
BUILD_TREE = HERE / "build-tree.sh"
DEB_SCRIPT = REPO / "scripts" / "deb.sh"

AGENT, SERVER, COMMON = "zfs-unlock-agent", "zfs-unlock-server", "python3-zfs-unlock-common"
PACKAGES = (AGENT, SERVER, COMMON)

DEBS = "/tmp/zua-debs"  # in the chroot: the .deb files apt installs from (the tests')

# Runs in a new mount namespace (unshare --mount, private propagation; with a host name,
# a UTS namespace too): the overlay and the kernel's file systems, then waits for its
# standard input to close.
MOUNT_SCRIPT = """
set -eu
lower=$1 upper=$2 work=$3 root=$4 name=${5:-}
if [ -n "$name" ]; then hostname "$name"; fi
mount -t overlay overlay -o "lowerdir=$lower,upperdir=$upper,workdir=$work" "$root"
mount -t proc proc "$root/proc"
mount --rbind /sys "$root/sys"
mount --rbind /dev "$root/dev"
mount -t tmpfs -o mode=0755 tmpfs "$root/run"
echo ready
read -r _ || true
"""
CHROOT_ENV = {
    "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
    "HOME": "/root",
    "LC_ALL": "C.UTF-8",
    "DEBIAN_FRONTEND": "noninteractive",
}
POLICY_RC_D = (
    "#!/bin/sh\n# zfs-unlock-agent's package tests: no service starts in this chroot\nexit 101\n"
)
# The tree leaves out documentation and manual pages (build-tree.sh); ours go in, so
# that purge has them to remove.
OURS_INCLUDED = (
    "path-include=/usr/share/doc/zfs-unlock-*\n"
    "path-include=/usr/share/doc/python3-zfs-unlock-common*\n"
    "path-include=/usr/share/man/man8\n"
    "path-include=/usr/share/man/man8/zfs-unlock-*\n"
)


def require_deb_tier() -> None:
    """Skip when switched off (ZUA_SKIP_DEB=1); fail, not skip, without root."""
    if os.environ.get("ZUA_SKIP_DEB") == "1":
        pytest.skip("ZUA_SKIP_DEB=1: the Debian package tier was switched off")
    if os.geteuid() != 0:
        pytest.fail("the Debian package tier needs root (debootstrap, mounts); or ZUA_SKIP_DEB=1")


def build_tree() -> Path:
    """The cached clean tree (build-tree.sh builds it the first time)."""
    started = time.monotonic()
    found = run_build_script(BUILD_TREE, ("ZUA_DEB_ROOT",), lambda line: None)["ZUA_DEB_ROOT"]
    print(f"deb tier: tree {found}: {time.monotonic() - started:.1f} s")
    return found


def build_debs(out: Path) -> dict[str, Path]:
    """The three packages of this checkout (scripts/deb.sh), copied out of build/deb
    into OUT: package -> .deb."""
    started = time.monotonic()
    log = out / "deb.sh.log"
    with log.open("w") as handle:
        done = subprocess.run(
            ["bash", str(DEB_SCRIPT)],
            stdout=handle,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            timeout=900,
            check=False,
        )
    assert done.returncode == 0, log.read_text()[-4000:]
    found = {}
    for package in PACKAGES:
        (deb,) = (REPO / "build" / "deb").glob(f"{package}_*_all.deb")
        found[package] = out / deb.name
        shutil.copyfile(deb, found[package])
    print(f"deb tier: scripts/deb.sh: {time.monotonic() - started:.1f} s")
    return found


class Chroot:
    """A writable, throw-away copy of TREE (an overlay; changes go to WORKDIR/upper)
    with /proc, /sys, /dev and a /run tmpfs, in a mount namespace held by one helper
    process. Nothing is mounted in the host's namespace; closing ends the helper, and
    with it every mount. With HOSTNAME, the helper also holds a UTS namespace of its
    own with that host name, which every command then has."""

    def __init__(self, tree: Path, workdir: Path, hostname: str | None = None) -> None:
        self.root = workdir / "root"
        self.hostname = hostname
        dirs = [workdir / "upper", workdir / "work", self.root]
        for directory in dirs:
            directory.mkdir(parents=True)
        uts = ["--uts"] if hostname else []
        self.helper: subprocess.Popen[str] | None = subprocess.Popen(
            ["unshare", "--mount", *uts, "--propagation", "private", "--", "sh", "-c",
             MOUNT_SCRIPT, "sh", str(tree), *map(str, dirs), hostname or ""],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )  # fmt: skip
        assert self.helper.stdout is not None
        ready = self.helper.stdout.readline()
        if ready != "ready\n":
            self.close()
            raise RuntimeError(f"mounting the overlay failed: {ready}")
        self.pid = self.helper.pid

    def close(self) -> None:
        if self.helper is None:
            return
        helper, self.helper = self.helper, None
        with contextlib.suppress(BrokenPipeError):
            assert helper.stdin is not None
            helper.stdin.close()
        try:
            helper.wait(timeout=30)
        except subprocess.TimeoutExpired:
            helper.kill()
            helper.wait(timeout=30)
        for stream in (helper.stdout, helper.stderr):
            if stream is not None:
                stream.close()

    def path(self, inside: str) -> Path:
        """INSIDE as the host reaches it: through the helper's view of the mounts."""
        return Path(f"/proc/{self.pid}/root") / self.root.relative_to("/") / inside.lstrip("/")

    def command(
        self,
        *argv: str,
        env: Mapping[str, str] | None = None,
        user: str | None = None,
        cwd: str | None = None,
        netns: str | None = None,
    ) -> list[str]:
        """ARGV in the chroot, with CHROOT_ENV and ENV alone, as USER, in CWD (inside),
        in the network namespace NETNS (a path, such as /run/netns/NAME)."""
        as_user = []
        if user is not None:
            as_user = ["setpriv", f"--reuid={user}", f"--regid={user}", "--clear-groups"]
        namespaces = ["--uts"] if self.hostname else []
        if netns is not None:
            namespaces.append(f"--net={netns}")
        chdir = ["-C", cwd] if cwd is not None else []
        environment = [f"{k}={v}" for k, v in {**CHROOT_ENV, **(env or {})}.items()]
        return [
            "nsenter", f"--target={self.pid}", "--mount", *namespaces, "--", "chroot",
            str(self.root), *as_user, "/usr/bin/env", "-i", *chdir, *environment, *argv,
        ]  # fmt: skip

    def run(
        self,
        *argv: str,
        env: Mapping[str, str] | None = None,
        user: str | None = None,
        cwd: str | None = None,
        netns: str | None = None,
        timeout: float = 120,
        check: bool = True,
    ) -> subprocess.CompletedProcess[str]:
        done = subprocess.run(
            self.command(*argv, env=env, user=user, cwd=cwd, netns=netns),
            capture_output=True,
            text=True,
            stdin=subprocess.DEVNULL,
            timeout=timeout,
            check=False,
        )
        if check and done.returncode != 0:
            raise AssertionError(
                f"{' '.join(argv)}: exit {done.returncode}\n{done.stdout}\n{done.stderr}"
            )
        return done

    def apt(self, *args: str, log: Path) -> subprocess.CompletedProcess[str]:
        """apt-get ARGS -y, no recommends, output appended to LOG; never raises."""
        done = self.run("apt-get", "-y", "--no-install-recommends", *args, timeout=600, check=False)
        with log.open("a") as out:
            out.write(f"$ apt-get {' '.join(args)} (exit {done.returncode})\n")
            out.write(done.stdout + done.stderr)
        return done

    def prepare(self) -> None:
        """What the tier adds to the clean tree before anything is installed."""
        policy = self.path("/usr/sbin/policy-rc.d")
        policy.write_text(POLICY_RC_D)
        policy.chmod(0o755)
        shutil.copyfile("/etc/resolv.conf", self.path("/etc/resolv.conf"))
        self.path("/etc/dpkg/dpkg.cfg.d/02-zua-ours").write_text(OURS_INCLUDED)
        self.path(DEBS).mkdir(parents=True)

    def listing(self) -> dict[str, str]:
        """Every path of the root file system: type, mode, owner, and for a file its
        size, for a link its target (find -xdev: no /proc, /sys, /dev or /run)."""
        done = self.run("find", "/", "-xdev", "-printf", r"%p\0%y %m %U:%G %s %l\0")
        fields = done.stdout.split("\0")
        found = {}
        for path, attributes in zip(fields[0:-1:2], fields[1::2], strict=True):
            kind, mode, owner, size, target = attributes.split(" ", 4)
            found[path] = f"{kind} {mode} {owner}" + {"f": f" {size}", "l": f" -> {target}"}.get(
                kind, ""
            )
        return found

    def installed(self) -> dict[str, str]:
        """Installed packages and their versions."""
        done = self.run("dpkg-query", "-W", "-f", "${Package}\t${Version}\t${Status}\n")
        rows = [line.split("\t") for line in done.stdout.splitlines()]
        return {name: version for name, version, status in rows if status.endswith(" installed")}

    def status(self, package: str) -> str:
        done = self.run("dpkg-query", "-W", "-f", "${Status}", package, check=False)
        return done.stdout if done.returncode == 0 else "unknown"
