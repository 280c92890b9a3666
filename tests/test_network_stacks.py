"""The agent's units close no ordering cycle with any network stack a Debian or Ubuntu host
runs: systemd-networkd, ifupdown (Debian's default, `networking.service`) and
NetworkManager. The latter two bring the network up only after local-fs.target, so a unit
ordered after network-online.target must not hold back local-fs.target.

systemd-analyze verify builds the boot's whole start transaction (multi-user.target) in a
stand-in root and reports every ordering cycle it has to break. The network stacks' unit
files are Debian 12's own, from `apt-get download` (cached); OpenZFS's units are the
host's, or stand-ins with their ordering when the host has none. The boot-proof tier
(tests/vm/test_boot.py) boots the real thing.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from tests.test_systemd_units import HOST_UNITS, UNITS, executables, stub

CACHE = Path(os.environ.get("ZUA_VM_CACHE", "/var/cache/zfs-unlock-agent-vm")) / "network-units"
DEBIAN_PACKAGES = ("ifupdown", "network-manager")
# Each stack: the units it ships, and the targets its [Install] sections enable them in.
STACKS: dict[str, dict[str, tuple[str, ...]]] = {
    "networkd": {
        "systemd-networkd.service": ("multi-user.target",),
        "systemd-networkd-wait-online.service": ("network-online.target",),
    },
    "ifupdown": {
        "networking.service": ("multi-user.target", "network-online.target"),
        "ifupdown-pre.service": (),
        "ifupdown-wait-online.service": ("network-online.target",),
    },
    "networkmanager": {
        "NetworkManager.service": ("multi-user.target",),
        "NetworkManager-wait-online.service": ("network-online.target",),
    },
}
# OpenZFS's ordering (zfsutils-linux 2.1 and 2.3 alike), for a host without its units.
ZFS_STAND_INS = {
    "zfs-import.target": "[Unit]\nDescription=ZFS pool import target (stand-in)\n"
    "Before=dracut-mount.service\n[Install]\nWantedBy=zfs.target\n",
    "zfs-mount.service": "[Unit]\nDescription=Mount ZFS filesystems (stand-in)\n"
    "DefaultDependencies=no\nAfter=zfs-import.target\nBefore=local-fs.target\n"
    "[Service]\nType=oneshot\nRemainAfterExit=yes\nExecStart=/sbin/zfs mount -a\n"
    "[Install]\nWantedBy=zfs.target\n",
    "zfs.target": "[Unit]\nDescription=ZFS startup target (stand-in)\n"
    "[Install]\nWantedBy=multi-user.target\n",
}
ANALYZE = ("systemd-analyze", "verify", "--man=no", "--generators=no")
needs_analyze = pytest.mark.skipif(
    shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed"
)


@pytest.fixture(scope="module")
def debian_units() -> Path:
    """lib/systemd/system of Debian 12's ifupdown and network-manager packages, unpacked
    once into CACHE."""
    done = CACHE / "COMPLETE"
    if not done.exists():
        with tempfile.TemporaryDirectory() as scratch:
            download = ["apt-get", "download", "-q", *DEBIAN_PACKAGES]
            got = subprocess.run(download, cwd=scratch, capture_output=True, text=True, check=False)
            if got.returncode != 0:  # a fresh machine may have no package lists yet
                subprocess.run(["apt-get", "update", "-qq"], check=True, timeout=600)
                subprocess.run(download, cwd=scratch, check=True, timeout=600)
            unpacked = Path(scratch) / "root"
            for deb in sorted(Path(scratch).glob("*.deb")):
                subprocess.run(["dpkg-deb", "-x", str(deb), str(unpacked)], check=True)
            shutil.rmtree(CACHE, ignore_errors=True)
            CACHE.mkdir(parents=True)
            shutil.copytree(unpacked / "lib/systemd/system", CACHE / "system")
        done.write_text("")
    return CACHE / "system"


def boot_root(base: Path, debian_units: Path, stack: str, agent_unit: str) -> Path:
    """A root holding the host's system units, STACK's units enabled as its package
    enables them, OpenZFS's, and ours (AGENT_UNIT as the agent's unit) as install.sh
    installs them; a stub executable wherever a unit points."""
    root = base / stack
    system = root / HOST_UNITS.relative_to("/")
    shutil.copytree(HOST_UNITS, system, symlinks=True)
    etc = root / "etc/systemd/system"
    etc.mkdir(parents=True)
    for name, wanted_by in STACKS[stack].items():
        if not (system / name).exists():
            shutil.copy(debian_units / name, system / name)
        for target in wanted_by:
            enable(etc, target, system / name)
    for name, text in ZFS_STAND_INS.items():
        if not (system / name).exists():
            (system / name).write_text(text)
    enable(etc, "multi-user.target", system / "zfs.target")
    enable(etc, "zfs.target", system / "zfs-mount.service")
    enable(etc, "zfs.target", system / "zfs-import.target")
    (etc / "zfs-unlock-agent.service").write_text(agent_unit)
    shutil.copy(UNITS / "zfs-unlock-agent.target", etc)
    enable(etc, "multi-user.target", etc / "zfs-unlock-agent.service")
    enable(etc, "multi-user.target", etc / "zfs-unlock-agent.target")
    for unit in [*system.glob("*.service"), *etc.glob("*.service")]:
        for program in executables(unit):
            if not (root / program.lstrip("/")).exists():
                stub(root, program)
    return root


def enable(etc: Path, target: str, unit: Path) -> None:
    wants = etc / f"{target}.wants"
    wants.mkdir(exist_ok=True)
    link = wants / unit.name
    if not link.is_symlink():
        link.symlink_to("/" + str(unit.relative_to(etc.parents[2])))


def ordering_cycles(root: Path) -> list[str]:
    """What systemd-analyze verify says about ordering cycles in the boot's transaction:
    each cycle found, the chain of units in it, and the job deleted to break it."""
    done = subprocess.run(
        [*ANALYZE, f"--root={root}", "multi-user.target"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    output = done.stdout + done.stderr
    return [
        line for line in output.splitlines() if "cycle" in line or "Found dependency on" in line
    ]


AGENT_UNIT = (UNITS / "zfs-unlock-agent.service").read_text()
# How the unit was ordered before: pools imported and the network online, and ahead of
# zfs-mount.service and local-fs.target. The control that shows the check can fail.
EARLY_AGENT_UNIT = AGENT_UNIT.replace(
    "After=network-online.target zfs-import.target zfs-load-module.service zfs-mount.service\n",
    "DefaultDependencies=no\nAfter=network-online.target zfs-import.target\n"
    "Before=zfs-mount.service local-fs.target shutdown.target\nConflicts=shutdown.target\n",
)


@needs_analyze
@pytest.mark.parametrize("stack", sorted(STACKS))
def test_no_ordering_cycle_with_the_network_stack(
    stack: str, debian_units: Path, tmp_path: Path
) -> None:
    root = boot_root(tmp_path, debian_units, stack, AGENT_UNIT)
    assert (
        root / "etc/systemd/system/multi-user.target.wants/zfs-unlock-agent.service"
    ).is_symlink()
    assert ordering_cycles(root) == []


@needs_analyze
@pytest.mark.parametrize("stack", ["ifupdown", "networkmanager"])
def test_an_agent_before_local_fs_would_close_a_cycle(
    stack: str, debian_units: Path, tmp_path: Path
) -> None:
    assert EARLY_AGENT_UNIT != AGENT_UNIT
    cycles = ordering_cycles(boot_root(tmp_path, debian_units, stack, EARLY_AGENT_UNIT))
    assert any("Found ordering cycle" in line for line in cycles), cycles
    assert any("zfs-unlock-agent.service" in line for line in cycles), cycles
