"""The boot-proof tier: a real Debian 12 system on an encrypted ZFS root, booted in QEMU.

The root dataset's encryption root takes its key from the key server on the host, fetched
by our integration in an initramfs that the system's own tools built (update-initramfs with
zfs-initramfs, or dracut with zfs-dracut); systemd's zfs-unlock-agent.service unlocks the
data pool once the network is online, and a hot-plugged pool afterwards. Everything of
ours comes from this checkout's Debian packages, installed with the target's dpkg. The
installed system has three network stacks (systemd-networkd, ifupdown as Debian's
installer sets it up, NetworkManager); each boot runs one (zua.stack=, the target's
zua-network-stack generator masks the others). One run per OpenZFS line:

1. build-image.sh and build-rootfs.sh (both cached), this checkout's packages (make deb);
2. the trees prepared (rootonzfs.prepare), initramfs sizes recorded;
3. the install guest (the minimal test guest as the target's installer) creates rpool, tank
   and usb on three disks, enrolls their encryption roots, unpacks the root tree;
4. boots from those disks, one after the other. OpenZFS 2.3 (bookworm-backports):
   A  initramfs-tools, networkd, server up: key from the server, multi-user, the daemon's
      work, hot-plug, systemd-analyze, the server's unit (tests 1 and 3);
   B  initramfs-tools, ifupdown, server down: the race's prompt appears within the grace
      period, the test types the key (test 2);
   C  dracut, NetworkManager, server up, rpool/ROOT's key needs approval: the host side
      approves the request the password agent in the initrd made, and the agent answers
      OpenZFS's question with the released key (test 4);
   C2 dracut, networkd, server down as the initrd starts, then up with nobody to approve:
      the key typed at systemd's console prompt wins while the request waits.
   OpenZFS 2.1.11 (Debian 12's own), its own install:
   D  initramfs-tools, ifupdown: Debian 12's default host (test 5). The server is down as
      the initramfs starts: a wrong key is typed at the race's prompt and refused, then
      the server comes back and its key wins (test 2); the booted system's password agent
      answers OpenZFS's generated unit for tank/typed.
Each boot's report (tests/vm/boot/target/report.py) comes back through a 9p share.
The tier fails when it cannot run; ZUA_SKIP_VM=1 skips it, like tests/vm/test_real_zfs.py.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from bench.common import machine_id_for
from tests.keyserver import HostCreds, KeyServer, release
from tests.vm.rootonzfs import (
    INSTALLER,
    REPO,
    VARIANTS,
    BootRun,
    Disk,
    Machine,
    Prepared,
    RootTrees,
    Target,
    build_debs,
    build_rootfs,
    prepare,
)
from tests.vm.vm import (
    GIB,
    SERVER_ADDRESS,
    Forwarder,
    Guest,
    Image,
    VmError,
    build_image,
    progress_printer,
    write_guest_agent_config,
)
from zfs_unlock_common import pinning

pytestmark = [pytest.mark.vm, pytest.mark.slow]

MACHINE_ID = machine_id_for("zfs-unlock-agent-boot-target")
HOSTID = 0x7A756131
HOST_NAME = "zfsboot"
PROMPT = re.compile(
    r"Enter (?:hex key|passphrase|new passphrase) for '?rpool/ROOT'?|"
    r"Encrypted ZFS password for rpool/ROOT"
)
HOTPLUG_READY = re.compile(r"ZUABOOT: HOTPLUG-READY")
# The initramfs-tools race (zfs-unlock-agent boot-unlock), as the console shows it.
RACE_STARTED = re.compile(r"rpool/ROOT: asking the key server; a prompt follows")
NETWORK_UP = re.compile(r"IP-Config: \S+ complete")
TYPED_WON = re.compile(r"rpool/ROOT: unlocked with the typed key")
NETWORK_WON = re.compile(r"rpool/ROOT: unlocked with the key server's key; no key needed")
WRONG_KEY = re.compile(r"That hex key does not open rpool/ROOT; try again")
ROOT_MOUNTED = re.compile(r"Begin: Running /scripts/init-bottom")  # after the root mount
NETWORK_KEY = re.compile(r"rpool/ROOT: unlocked with the key server's key")
# itools-up: a prompt there would only stand in the way of the boot's other evidence; the
# boot asserts instead that the key came within the default grace (network_key_timing).
UNHURRIED = ("zfs_unlock_agent.grace=30",)
GRACE_BOUND = 6.0  # seconds from the network up to the prompt: 2 s of grace, TCG's pace
REPORT_STARTED = re.compile(r"ZUABOOT: report of boot")
COMMON_APPEND = "console=ttyS0 panic=-1 loglevel=4"
ITOOLS_APPEND = "root=ZFS=rpool/ROOT/debian boot=zfs ip=dhcp"
DRACUT_APPEND = "root=zfs:rpool/ROOT/debian rd.neednet=1 ip=dhcp"
OUR_UNITS = ("zfs-unlock-agent", "zfs-mount", "zfs-import", "zfs-load-key", "zfs-unlock-server")
# Each network stack (tests/vm/boot/target/zua-network-stack): its main unit, and the unit
# that network-online.target waits for as Debian 12 enables it. ifupdown's is
# networking.service itself: its ifupdown-wait-online.service is not enabled on new installs.
STACKS = {
    "networkd": ("systemd-networkd.service", "systemd-networkd-wait-online.service"),
    "ifupdown": ("networking.service", "networking.service"),
    "networkmanager": ("NetworkManager.service", "NetworkManager-wait-online.service"),
}
# The pin of a server key retired by a rollover, as an agent.toml still names it.
RETIRED_PIN = pinning.format_pin(hashlib.sha256(b"the server key before the rollover").digest())
HOTPLUG_BOUND = 60.0  # seconds from `zpool import usb` to usb/secure mounted


@dataclass
class Boot:
    name: str
    run: BootRun
    report: dict[str, Any]
    audit: list[dict[str, Any]]  # the key server's records written during this boot
    facts: dict[str, Any] = field(default_factory=dict)  # what the host measured

    def evidence(self) -> str:
        brief = {k: v for k, v in self.report.items() if k not in ("journal", "security")}
        return (
            f"boot {self.name}: qemu exit {self.run.qemu_rc} after {self.run.seconds:.0f} s;"
            f" facts {self.facts}\n--- report (without the full journal) ---\n"
            f"{json.dumps(brief, indent=1)[-12000:]}\n"
            f"--- console ({self.run.console_path}), tail ---\n{self.run.console[-12000:]}"
        )

    def releases(self, dataset: str) -> list[dict[str, Any]]:
        return [
            r
            for r in self.audit
            if r.get("event") == "release"
            and r.get("decision") == "allow"
            and r.get("dataset") == dataset
            and r.get("host") == HOST_NAME
        ]


@dataclass
class Tier:
    progress: Callable[[str], None]
    image: Image
    trees: RootTrees
    server: KeyServer
    creds: HostCreds
    forwarder: Forwarder
    root: Path
    prepared: dict[str, Prepared]
    disks: dict[str, Disk]
    datasets: dict[str, tuple[str, str]]  # encryption root -> (pool GUID, dataset GUID)
    timings: dict[str, float]
    boots: dict[str, Boot] = field(default_factory=dict)

    def append(self, variant: str, name: str, stack: str, *extra: str) -> str:
        base = ITOOLS_APPEND if variant == "initramfs-tools" else DRACUT_APPEND
        return " ".join([base, COMMON_APPEND, f"zua.boot={name}", f"zua.stack={stack}", *extra])

    def machine(self, variant: str, name: str, stack: str, *extra: str) -> Machine:
        """A boot of VARIANT's initramfs whose system runs the network STACK."""
        assert stack in STACKS, stack
        share = self.root / "share"
        prepared = self.prepared[variant]
        return Machine(
            name,
            prepared.kernel,
            prepared.initrd,
            self.append(variant, name, stack, *extra),
            [self.disks["rpool"], self.disks["tank"]],
            self.root / "boots" / name,
            share,
            server_port=self.forwarder.port,
        )

    def finish(self, machine: Machine, audit_from: int, facts: dict[str, Any]) -> Boot:
        run = machine.wait()
        self.timings[f"boot {machine.name}"] = round(run.seconds, 1)
        self.progress(f"boot {machine.name}: {run.seconds:.1f} s, qemu exit {run.qemu_rc}")
        report_file = run.share / machine.name / "report.json"
        report = json.loads(report_file.read_text()) if report_file.exists() else {}
        boot = Boot(machine.name, run, report, self.server.audit_records()[audit_from:], facts)
        self.boots[machine.name] = boot
        return boot

    @contextlib.contextmanager
    def server_down(self) -> Iterator[None]:
        """The key server unreachable from the guests (the forwarder refuses) until the
        block ends or the test calls forwarder.switch(True) itself."""
        self.forwarder.switch(False)
        try:
            yield
        finally:
            self.forwarder.switch(True)

    def key_of(self, dataset: str) -> str:
        """DATASET's key as the server holds it, fetched with the host's own certificate
        (what an operator with that certificate could type at the prompt)."""
        pool_guid, dataset_guid = self.datasets[dataset]
        with self.server.session(self.creds) as session:
            response = release(session, self.server, self.creds, pool_guid, dataset_guid)
        assert response.status_code == 200, response.text
        body = response.json()
        item = body["keys"][0] if "keys" in body else body
        return base64.b64decode(item["key"]).decode("ascii")


def write_agent_config(directory: Path, server: KeyServer, creds: HostCreds) -> None:
    """The target's /etc/zfs-unlock-agent (and the installer's: the same host), as a host
    has it after a rollover of the server's TLS key: agent.toml names only the key before
    (a pin no server presents), and the server's present pin is one the daemon learned
    (pins.json, for /var/lib/zfs-unlock-agent). Every boot's unlock, in the initramfs that
    update-initramfs or dracut built and under systemd, then reaches the server only
    through the learned pin."""
    # TCG is slow: Python starts in seconds, TLS handshakes take a while. The daemon's boot
    # pass took 5-10 s here with the server up; 15 s, not 30, is what a boot with the server
    # down waits for it.
    write_guest_agent_config(
        directory,
        server,
        creds,
        "connect_timeout = 5\nread_timeout = 30\ndeadline = 30\n[daemon]\nboot_deadline = 15\n",
    )
    toml = directory / "agent.toml"
    toml.write_text(toml.read_text().replace(server.pin, RETIRED_PIN))
    learned = {"format": 1, "pins": {server.pin: int(time.time())}}
    (directory / "pins.json").write_text(json.dumps(learned) + "\n")


def install(tier: Tier, tar: Path) -> None:
    """The install guest: pools, enrollment, the root tree; its disks are kept for the boots."""
    share = tier.root / "share"
    (share / "hostid").write_bytes(HOSTID.to_bytes(4, "little"))
    guest = Guest(
        tier.image,
        INSTALLER,
        share,
        tier.root / "installer",
        server_port=tier.forwarder.port,
        control_port=tier.forwarder.control_port,
        machine_id=MACHINE_ID,
        disks=(4 * GIB, GIB, GIB),  # rpool, tank, usb
        read_only_shares={"src": REPO, "site": tier.image.site},
        timeout=1800,
        keep_disks=True,
    )
    with guest:
        run = guest.run()
    tar.unlink()
    tier.timings["install guest"] = round(run.seconds, 1)
    tier.progress(f"install guest: exit {run.rc} after {run.seconds:.1f} s ({run.console_path})")
    if run.rc != 0:
        raise VmError(f"the install guest failed (exit {run.rc}):\n{run.console[-6000:]}")
    for name, disk in zip(("rpool", "tank", "usb"), guest.disks, strict=True):
        tier.disks[name] = Disk(disk, f"zua-{name}")
    for line in (share / "install.txt").read_text().splitlines():
        words = line.split()
        tier.datasets[words[0]] = (words[1], words[2])


@contextlib.contextmanager
def open_tier(
    zfs: str,
    variants: tuple[str, ...],
    root: Path,
    progress: Callable[[str], None],
    zfs_list_cache: bool = False,
) -> Iterator[Tier]:
    """The images and trees of the OpenZFS line ZFS, a key server, VARIANTS prepared, the
    install guest run: a Tier ready to boot. ZFS_LIST_CACHE: the installer also sets up
    OpenZFS's /etc/zfs/zfs-list.cache (zfs-mount-generator's mount units)."""
    if os.environ.get("ZUA_SKIP_VM") == "1":
        pytest.skip("ZUA_SKIP_VM=1: the real-OpenZFS tier was switched off")
    if os.geteuid() != 0:
        pytest.fail("the boot-proof tier needs root (apt, chroot, mounts); or set ZUA_SKIP_VM=1")
    timings: dict[str, float] = {}
    started = time.monotonic()
    try:
        image = build_image(progress, zfs)
        timings["build-image.sh"] = round(time.monotonic() - started, 1)
        started = time.monotonic()
        trees = build_rootfs(progress, zfs)
        timings["build-rootfs.sh"] = round(time.monotonic() - started, 1)
    except (VmError, OSError) as exc:
        pytest.fail(f"cannot build the images of OpenZFS {zfs}: {exc}")
    server = KeyServer(root / "keyserver", ["localhost", "127.0.0.1", SERVER_ADDRESS[0]])
    creds = server.add_host(HOST_NAME, "--allow-ip", "127.0.0.1/32", machine_id=MACHINE_ID)
    share = root / "share"
    write_agent_config(share / "agent", server, creds)
    if zfs_list_cache:
        (share / "zfs-list-cache").touch()
        # tank/typed keeps OpenZFS's prompt, which the password agent answers.
        toml = share / "agent" / "agent.toml"
        toml.write_text(toml.read_text() + '[datasets]\nopenzfs_prompt = "answer"\n')
    target = Target(MACHINE_ID, HOSTID, share / "agent")
    server.start()
    try:
        with Forwarder(server.port) as forwarder:
            tier = Tier(progress, image, trees, server, creds, forwarder, root, {}, {}, {}, timings)
            try:
                started = time.monotonic()
                debs = build_debs(root / "debs.log")
                timings["debs"] = round(time.monotonic() - started, 1)
                tar = share / "rootfs.tar"
                for variant in variants:
                    started = time.monotonic()
                    tier.prepared[variant] = prepare(
                        trees,
                        variant,
                        debs,
                        target,
                        root / "prepare" / variant,
                        tar=tar if variant == "initramfs-tools" else None,
                        progress=progress,
                    )
                    timings[f"prepare {variant}"] = round(time.monotonic() - started, 1)
                install(tier, tar)
            except (VmError, OSError) as exc:
                pytest.fail(f"cannot prepare the root-on-ZFS system (OpenZFS {zfs}): {exc}")
            yield tier
    finally:
        server.stop()
        progress(f"timings of OpenZFS {zfs} (s): {timings}")


@pytest.fixture(scope="module")
def tier(tmp_path_factory: pytest.TempPathFactory, pytestconfig: pytest.Config) -> Iterator[Tier]:
    """OpenZFS 2.3 (bookworm-backports): both initramfs generators."""
    progress = progress_printer(pytestconfig, "boot")
    root = tmp_path_factory.mktemp("boot")
    with open_tier("2.3", VARIANTS, root, progress) as ready:
        yield ready


@pytest.fixture(scope="module")
def tier21(tmp_path_factory: pytest.TempPathFactory, pytestconfig: pytest.Config) -> Iterator[Tier]:
    """OpenZFS 2.1.11 (Debian 12's own): initramfs-tools, whose 2.1 scripts run no key
    providers of their own (our hook adds that); set up as OpenZFS's Debian root-on-ZFS
    guide does, with zfs-list.cache, so zfs-mount-generator makes the mount units."""
    progress = progress_printer(pytestconfig, "boot-2.1")
    root = tmp_path_factory.mktemp("boot21")
    with open_tier("2.1", ("initramfs-tools",), root, progress, zfs_list_cache=True) as ready:
        yield ready


# Boot A: initramfs-tools, server up; the hot-plug and the server's unit too


@pytest.fixture(scope="module")
def boot_up(tier: Tier) -> Boot:
    key = tier.key_of("rpool/ROOT")  # before audit_from: this release is the test's own
    audit_from = len(tier.server.audit_records())
    machine = tier.machine(
        "initramfs-tools", "itools-up", "networkd", "zua.hotplug=1", "zua.server=1", *UNHURRIED
    )
    facts: dict[str, Any] = {}
    with machine:
        machine.start()
        try:
            answer_unexpected_prompt(machine, key, facts, HOTPLUG_READY)
            network_key_timing(machine, facts)
            ready = machine.console.wait_for(HOTPLUG_READY, timeout=900)
            facts["hotplug_ready_after"] = round(
                machine.console.time_of(ready.start()) - machine.started, 1
            )
            machine.hotplug(tier.disks["usb"])
            facts["hotplugged"] = True
        except VmError as exc:
            facts["hotplug_error"] = str(exc)
        return tier.finish(machine, audit_from, facts)


def answer_unexpected_prompt(
    machine: Machine, key: str, facts: dict[str, Any], expected: re.Pattern[str]
) -> None:
    """Wait for EXPECTED on the console; if a key prompt comes first, the initramfs did not
    get the key (the boot's test fails on that): type KEY, so that the rest still runs."""
    either = re.compile(f"{PROMPT.pattern}|{expected.pattern}")
    try:
        first = machine.console.wait_for(either, timeout=900)
    except VmError as exc:
        facts["console_error"] = str(exc)
        return
    if PROMPT.fullmatch(first.group(0)):
        facts["unexpected_prompt"] = first.group(0)
        time.sleep(2)  # the prompt reads the line only once it is shown
        machine.console.type(key + "\n")


def network_key_timing(machine: Machine, facts: dict[str, Any]) -> None:
    """From the network up to the key server's key loaded, in the initramfs-tools race."""
    text = machine.console.text
    network, won = NETWORK_UP.search(text), NETWORK_KEY.search(text)
    if network and won:
        facts["network_up_to_key_loaded"] = round(
            machine.console.time_of(won.start()) - machine.console.time_of(network.start()), 1
        )


def no_prompt(boot: Boot) -> None:
    found = PROMPT.search(boot.run.console)
    assert found is None, f"a key prompt appeared: {found.group(0)!r}\n{boot.evidence()}"


def booted_to_multi_user(boot: Boot, ours_must_not_fail: bool = True) -> None:
    assert boot.report, f"no report came back\n{boot.evidence()}"
    assert boot.report["state"] in ("running", "degraded"), boot.evidence()
    assert boot.report["findmnt"].split()[:2] == ["rpool/ROOT/debian", "zfs"], boot.evidence()
    assert boot.report["zfs"]["rpool/ROOT"]["keystatus"] == "available", boot.evidence()
    if ours_must_not_fail:
        failed = [line for line in boot.report["failed"].splitlines() if line.startswith(OUR_UNITS)]
        assert not failed, f"failed: {failed}\n{boot.evidence()}"
    cycles = [line for line in boot.report["journal"].splitlines() if "ordering cycle" in line]
    assert not cycles, f"ordering cycles: {cycles}\n{boot.evidence()}"


def test_initramfs_tools_fetches_root_key_and_boots(boot_up: Boot) -> None:
    """1. update-initramfs's image with zfs-initramfs and our hook gets rpool/ROOT's key from
    the server (the audit log shows the release), and the system reaches multi-user."""
    print(f"itools-up: {boot_up.facts}")
    # With the default 2 s of grace the prompt would not have come either: the key was
    # loaded sooner than that after the network came up (about 0.5 s here, under TCG).
    assert boot_up.facts.get("network_up_to_key_loaded", 99) < 2.0, boot_up.evidence()
    assert boot_up.releases("rpool/ROOT"), f"no release of rpool/ROOT\n{boot_up.evidence()}"
    no_prompt(boot_up)
    booted_to_multi_user(boot_up)


def active_at(boot: Boot, unit: str) -> int:
    """When UNIT became active, in microseconds since boot (0: never)."""
    return int(boot.report["units"].get(unit, {}).get("ActiveEnterTimestampMonotonic", "0"))


def network_came_up(boot: Boot, stack: str) -> None:
    """STACK's units ran and brought the network online; the other stacks' were masked."""
    units = boot.report["units"]
    for name, (main, wait_online) in STACKS.items():
        if name == stack:
            assert units[main].get("ActiveState") == "active", boot.evidence()
            assert units[wait_online].get("Result") == "success", boot.evidence()
            assert units[wait_online].get("ActiveState") == "active", boot.evidence()
        else:
            assert units[main].get("LoadState") == "masked", boot.evidence()
    assert active_at(boot, "network-online.target") > 0, boot.evidence()
    network = boot.report["network"]
    assert re.search(r"\bens2\s+inet 10\.0\.2\.\d+/", network["addresses"]), boot.evidence()
    seen = {
        "networkd": r"ens2\s+ether\s+routable\s+configured",
        "ifupdown": r"^ens2=ens2$",
        "networkmanager": r"^ens2:connected:ens2$",
    }[stack]
    assert re.search(seen, network[stack], re.MULTILINE), boot.evidence()


def daemon_unlocked_tank(boot: Boot) -> None:
    """zfs-unlock-agent.service started once the network was online and zfs-mount.service
    had run, held back neither local-fs.target nor anything else (no ordering cycle), and
    unlocked and mounted tank/secure itself; zfs-unlock-agent.target came after its READY,
    and a service ordered after that target read tank/secure's data; no zfs-load-key@ unit
    asked for anything."""
    booted_to_multi_user(boot)
    units = boot.report["units"]
    started = int(units["zfs-unlock-agent.service"].get("InactiveExitTimestampMonotonic", "0"))
    ready = active_at(boot, "zfs-unlock-agent.service")
    online, mounted = (
        active_at(boot, "network-online.target"),
        active_at(boot, "zfs-mount.service"),
    )
    local_fs, target = (
        active_at(boot, "local-fs.target"),
        active_at(boot, "zfs-unlock-agent.target"),
    )
    assert 0 < online <= started and 0 < mounted <= started, boot.evidence()
    assert 0 < local_fs <= started, f"local-fs.target waited for the agent\n{boot.evidence()}"
    assert 0 < ready <= target, boot.evidence()
    needs = int(units["zua-needs-data.service"].get("InactiveExitTimestampMonotonic", "0"))
    assert target <= needs, boot.evidence()
    assert boot.report["needs_data"] == "written at install time", boot.evidence()
    tank = boot.report["zfs"].get("tank/secure", {})
    assert tank.get("keystatus") == "available", boot.evidence()
    assert tank.get("mounted") == "yes", boot.evidence()
    assert boot.releases("tank/secure"), boot.evidence()
    # (tank/typed, in the 2.1 tier, keeps OpenZFS's prompt: its unit is its own test's.)
    asked = [
        line for line in boot.report["load_key_units"].splitlines() if "tank-typed" not in line
    ]
    assert not asked, boot.evidence()


def test_daemon_unlocks_tank_after_the_network_and_a_service_sees_its_data(
    boot_up: Boot,
) -> None:
    """3. With systemd-networkd: see daemon_unlocked_tank."""
    network_came_up(boot_up, "networkd")
    daemon_unlocked_tank(boot_up)


def test_daemon_unlocks_hotplugged_pool(boot_up: Boot) -> None:
    """3. A disk attached after boot; `zpool import usb`; the daemon unlocks and mounts
    usb/secure on its own, within HOTPLUG_BOUND seconds."""
    hot = boot_up.report.get("hotplug", {})
    assert boot_up.facts.get("hotplugged"), boot_up.evidence()
    assert hot.get("import", {}).get("rc") == 0, boot_up.evidence()
    after = hot.get("unlocked_and_mounted_after_import")
    assert after is not None, f"usb/secure not unlocked and mounted\n{boot_up.evidence()}"
    assert after <= HOTPLUG_BOUND, boot_up.evidence()
    assert hot.get("marker") == "written at install time", boot_up.evidence()
    assert boot_up.releases("usb/secure"), boot_up.evidence()


def test_units_verify_and_security_score(boot_up: Boot) -> None:
    """3. systemd-analyze verify of our units in the booted system, and the security score."""
    verify = boot_up.report.get("verify")
    assert verify is not None, f"no unit of ours found\n{boot_up.evidence()}"
    print(f"systemd-analyze verify {verify['argv'][2:]}: exit {verify['rc']}\n{verify['out']}")
    print(
        f"systemd-analyze security zfs-unlock-agent.service: {boot_up.report['security_exposure']}"
    )
    assert verify["rc"] == 0, verify["out"]
    assert boot_up.report["security_exposure"], boot_up.report["security"]


def test_server_unit_serves_tls(boot_up: Boot) -> None:
    """3. zfs-unlock-server.service, on a throw-away data directory, is active and answers TLS."""
    server = boot_up.report.get("server", {})
    if "skipped" in server:
        pytest.skip(server["skipped"])
    unit = server.get("unit", {}).get("zfs-unlock-server.service", {})
    detail = json.dumps(server, indent=1)[-8000:]
    assert server.get("setup", {}).get("rc") == 0, detail
    assert unit.get("ActiveState") == "active", detail
    assert server.get("tls", {}).get("rc") == 0, detail
    assert "TLS" in server["tls"]["out"], detail


# Boot B: initramfs-tools, server down: the prompt races the network, a typed key wins


@pytest.fixture(scope="module")
def boot_down(tier: Tier, boot_up: Boot) -> Boot:  # after boot A: same disks
    key = tier.key_of("rpool/ROOT")  # before audit_from: this release is the test's own
    audit_from = len(tier.server.audit_records())
    machine = tier.machine("initramfs-tools", "itools-down", "ifupdown")
    facts: dict[str, Any] = {}
    with tier.server_down(), machine:
        machine.start()
        try:
            prompt = machine.console.wait_for(PROMPT, timeout=900)
            at = machine.console.time_of(prompt.start())
            facts["prompt"] = prompt.group(0)
            facts["prompt_after_start"] = round(at - machine.started, 1)
            began = machine.console.wait_for(RACE_STARTED, 1)
            facts["prompt_after_race_start"] = round(at - machine.console.time_of(began.start()), 1)
            # initramfs-tools prints IP-Config once the network is up, beside the race.
            network = machine.console.wait_for(NETWORK_UP, 120)
            facts["prompt_after_network"] = round(at - machine.console.time_of(network.start()), 1)
            time.sleep(1)
            typed_at = time.monotonic()
            machine.console.type(key + "\n")
            facts["typed"] = True
            won = machine.console.wait_for(TYPED_WON, 120, prompt.end())
            facts["typed_to_unlocked"] = round(machine.console.time_of(won.start()) - typed_at, 1)
            mounted = machine.console.wait_for(ROOT_MOUNTED, 300, won.end())
            facts["typed_to_root_mounted"] = round(
                machine.console.time_of(mounted.start()) - typed_at, 1
            )
        except VmError as exc:
            facts["prompt_error"] = str(exc)
        return tier.finish(machine, audit_from, facts)


def no_initramfs_agent_left(boot: Boot) -> None:
    assert boot.report["initramfs_agents"] == [], boot.evidence()


def test_server_down_prompts_within_the_grace_and_a_typed_key_boots(boot_down: Boot) -> None:
    """2. With the server unreachable, the prompt appears within the grace period (2 s after
    the network is up, the default), the typed hex key opens rpool/ROOT, the race ends (no agent process
    is left) and the system boots to multi-user, with ifupdown bringing the network up and
    no ordering cycle."""
    agent = boot_down.report.get("units", {}).get("zfs-unlock-agent.service", {})
    held = int(agent.get("ActiveEnterTimestampMonotonic", "0")) - int(
        agent.get("InactiveExitTimestampMonotonic", "0")
    )
    print(f"prompt: {boot_down.facts}; zfs-unlock-agent.service took {held / 1e6:.1f} s to start")
    assert boot_down.facts.get("typed"), boot_down.evidence()
    assert boot_down.facts.get("typed_to_root_mounted") is not None, boot_down.evidence()
    # 2 s of grace after the network is up; TCG's pace is allowed for.
    assert 0 < boot_down.facts["prompt_after_network"] <= GRACE_BOUND, boot_down.evidence()
    assert not boot_down.releases("rpool/ROOT"), boot_down.evidence()
    # decrypt_fs found the key loaded: every prompt shown was the race's, none OpenZFS's.
    prompts = re.findall(f"(?:{PROMPT.pattern}).{{0,3}}", boot_down.run.console)
    assert all("(" in shown for shown in prompts), f"{prompts}\n{boot_down.evidence()}"
    booted_to_multi_user(boot_down, ours_must_not_fail=False)
    no_initramfs_agent_left(boot_down)
    network_came_up(boot_down, "ifupdown")
    # The server is still down: tank/secure stays locked, and the boot went on without it.
    assert boot_down.report["zfs"].get("tank/secure", {}).get("keystatus") == "unavailable", (
        boot_down.evidence()
    )


# Boot C: dracut, server up, the root's key needs approval: the host side approves, and
# the password agent in the initrd answers OpenZFS's own prompt with the released key


def root_needs_approval(tier: Tier, policy: str) -> None:
    """Give rpool/ROOT's dataset the approval POLICY (required, or inherit: none)."""
    listed = json.loads(tier.server.must("key", "list", "--json", "--host", HOST_NAME))
    [key_id] = [k["key_id"] for k in listed if k["dataset"] == "rpool/ROOT"]
    tier.server.must("key", "set", key_id, "--approval", policy)


def waiting_request(tier: Tier, machine: Machine, timeout: float) -> dict[str, Any]:
    """The host's approval request, once its agent has made one."""
    deadline = time.monotonic() + timeout
    while True:
        listed = json.loads(tier.server.must("approval", "list", "--json", "--host", HOST_NAME))
        if listed:
            request: dict[str, Any] = listed[0]
            request["after_start"] = round(time.monotonic() - machine.started, 1)
            return request
        if time.monotonic() > deadline:
            raise VmError(f"no approval request in {timeout:g} s")
        time.sleep(1)


@pytest.fixture(scope="module")
def boot_dracut(tier: Tier, boot_down: Boot) -> Boot:
    key = tier.key_of("rpool/ROOT")  # before audit_from: this release is the test's own
    root_needs_approval(tier, "required")
    audit_from = len(tier.server.audit_records())
    machine = tier.machine("dracut", "dracut-up", "networkmanager")
    facts: dict[str, Any] = {}
    with machine:
        machine.start()
        try:
            # The password agent asks; the release waits for a person: the host side.
            request = waiting_request(tier, machine, timeout=900)
            facts["approval"] = request["id"]
            facts["request_after_start"] = request["after_start"]
            facts["request_datasets"] = [d["dataset"] for d in request["datasets"]]
            time.sleep(3)  # the agent keeps asking for the same request meanwhile
            tier.server.must("approval", "approve", request["id"], "--reason", "boot proof")
            approved_at = time.monotonic()
            report = machine.console.wait_for(REPORT_STARTED, 300)
            facts["approved_to_report"] = round(
                machine.console.time_of(report.start()) - approved_at, 1
            )
        except VmError as exc:
            facts["unanswered"] = str(exc)
            with contextlib.suppress(VmError):
                machine.console.type(key + "\n")  # so that the rest of the boot runs
        return tier.finish(machine, audit_from, facts)


def test_dracut_password_agent_waits_for_approval_answers_openzfs_prompt_and_boots(
    boot_dracut: Boot,
) -> None:
    """4. dracut's image with zfs-dracut and our module: OpenZFS's hook asks through
    systemd-ask-password; the root's key needs approval, so the password agent in the
    initrd says which request waits and asks again; the host side approves it, the agent
    answers with the released key, and the system boots; the initrd's agent is gone
    afterwards."""
    facts = boot_dracut.facts
    print(f"dracut, approval: {facts}")
    assert "unanswered" not in facts, boot_dracut.evidence()
    assert facts["request_datasets"] == ["rpool/ROOT"], boot_dracut.evidence()
    [released] = boot_dracut.releases("rpool/ROOT")
    assert (released["reason"], released["approval"]) == ("approved", facts["approval"])
    requested = [r for r in boot_dracut.audit if r.get("event") == "approval_requested"]
    assert [r["approval"] for r in requested] == [facts["approval"]], "one request, asked again"
    journal = boot_dracut.report["journal"]
    assert f"until a person approves request {facts['approval']}" in journal, boot_dracut.evidence()
    answered = "rpool/ROOT: answered the password question with the key server's key"
    assert answered in journal, boot_dracut.evidence()
    booted_to_multi_user(boot_dracut)
    no_initramfs_agent_left(boot_dracut)


def test_dracut_boot_with_networkmanager_unlocks_tank(boot_dracut: Boot) -> None:
    """4. With NetworkManager: see daemon_unlocked_tank."""
    network_came_up(boot_dracut, "networkmanager")
    daemon_unlocked_tank(boot_dracut)


# Boot C2: dracut, server down, then up with nobody to approve: the key typed at the
# console wins


@pytest.fixture(scope="module")
def boot_dracut_down(tier: Tier, boot_dracut: Boot) -> Boot:
    root_needs_approval(tier, "inherit")  # the test's own fetch cannot wait for approval
    key = tier.key_of("rpool/ROOT")
    root_needs_approval(tier, "required")
    audit_from = len(tier.server.audit_records())
    machine = tier.machine("dracut", "dracut-unapproved", "networkd")
    facts: dict[str, Any] = {}
    try:
        with tier.server_down(), machine:
            machine.start()
            try:
                asked = machine.console.wait_for(PROMPT, timeout=900)
                facts["prompt_after_start"] = round(
                    machine.console.time_of(asked.start()) - machine.started, 1
                )
                time.sleep(2)
                # The server comes back; the release waits for a person; nobody comes.
                tier.forwarder.switch(True)
                request = waiting_request(tier, machine, timeout=300)
                facts["approval"] = request["id"]
                time.sleep(2)
                machine.console.type(key + "\n")  # nobody approves; a person types it
                facts["typed"] = True
            except VmError as exc:
                facts["prompt_error"] = str(exc)
            boot = tier.finish(machine, audit_from, facts)
        facts["left"] = json.loads(tier.server.must("approval", "list", "--json"))
    finally:
        for request in json.loads(tier.server.must("approval", "list", "--json")):
            tier.server.must("approval", "deny", request["id"], "--reason", "boot proof over")
        root_needs_approval(tier, "inherit")
    return boot


def test_dracut_server_down_then_nobody_approves_the_typed_key_wins(
    boot_dracut_down: Boot,
) -> None:
    """4. dracut, the server unreachable as the initrd starts: systemd's console prompt
    asks while the password agent has no answer. The server comes back, but the root's key
    needs approval and nobody gives it: the agent waits, the key typed at the prompt opens
    rpool/ROOT and the system boots; the request is still waiting afterwards, and nothing
    was released."""
    facts = boot_dracut_down.facts
    print(f"dracut, nobody approves: {facts}")
    assert facts.get("typed"), boot_dracut_down.evidence()
    assert not boot_dracut_down.releases("rpool/ROOT"), boot_dracut_down.evidence()
    assert [r["id"] for r in facts["left"]] == [facts["approval"]], boot_dracut_down.evidence()
    booted_to_multi_user(boot_dracut_down, ours_must_not_fail=False)
    no_initramfs_agent_left(boot_dracut_down)


# Boot D: OpenZFS 2.1.11, initramfs-tools, ifupdown: Debian 12's default host


@pytest.fixture(scope="module")
def boot_21(tier21: Tier) -> Boot:
    """Server down as the initramfs starts: a wrong key is typed at the race's prompt and
    refused; then the server comes back and its key wins. The rest of the boot has it."""
    tier = tier21
    audit_from = len(tier.server.audit_records())
    machine = tier.machine("initramfs-tools", "itools-2.1", "ifupdown")
    facts: dict[str, Any] = {}
    with tier.server_down(), machine:
        machine.start()
        try:
            prompt = machine.console.wait_for(PROMPT, timeout=900)
            time.sleep(1)
            machine.console.type("0" * 64 + "\n")
            refused = machine.console.wait_for(WRONG_KEY, 120, prompt.end())
            machine.console.wait_for(PROMPT, 60, refused.end())
            facts["wrong_key_refused"] = True
            tier.forwarder.switch(True)
            back = time.monotonic()
            won = machine.console.wait_for(NETWORK_WON, 300, refused.end())
            facts["server_back_to_unlocked"] = round(machine.console.time_of(won.start()) - back, 1)
            facts["prompt_withdrawn"] = True
        except VmError as exc:
            facts["race_error"] = str(exc)
        return tier.finish(machine, audit_from, facts)


def test_openzfs_21_race_a_wrong_key_then_the_server_back_the_network_key_wins(
    boot_21: Boot,
) -> None:
    """2, 5. OpenZFS 2.1.11's initramfs-tools script, which runs no key provider of its own,
    runs the race through our hook. Server down, the prompt shown: a wrong hex key is
    refused with a clear message and asked again; the server comes back, its key opens
    rpool/ROOT, the prompt is withdrawn, and the system reaches multi-user."""
    print(f"race: {boot_21.facts}")
    assert "zfs-2.1.11" in boot_21.report.get("zfs_version", ""), boot_21.evidence()
    assert boot_21.facts.get("wrong_key_refused"), boot_21.evidence()
    assert boot_21.facts.get("prompt_withdrawn"), boot_21.evidence()
    assert boot_21.releases("rpool/ROOT"), f"no release of rpool/ROOT\n{boot_21.evidence()}"
    booted_to_multi_user(boot_21)
    no_initramfs_agent_left(boot_21)


def test_openzfs_21_with_ifupdown_daemon_unlocks_tank(boot_21: Boot) -> None:
    """5. With ifupdown on OpenZFS 2.1.11: see daemon_unlocked_tank."""
    network_came_up(boot_21, "ifupdown")
    daemon_unlocked_tank(boot_21)


def test_openzfs_21_generated_units_prompt_is_answered_by_the_password_agent(
    boot_21: Boot,
) -> None:
    """The booted system: tank/typed (keylocation=prompt, hex) behind OpenZFS's generated
    zfs-load-key@ unit, with no drop-in of ours; its question is answered by the password
    agent with the server's key, the unit succeeds and the generated mount unit mounts it."""
    typed = boot_21.report["zfs"].get("tank/typed", {})
    assert typed.get("keystatus") == "available", boot_21.evidence()
    assert typed.get("mounted") == "yes", boot_21.evidence()
    assert boot_21.releases("tank/typed"), boot_21.evidence()
    answered = "tank/typed: answered the password question with the key server's key"
    assert answered in boot_21.report["journal"], boot_21.evidence()
    unit = boot_21.report["units"]["zfs-load-key@tank-typed.service"]
    assert unit.get("ActiveState") == "active" and unit.get("Result") == "success", (
        boot_21.evidence()
    )
    assert "zfs-unlock-agent.conf" not in unit.get("DropInPaths", ""), boot_21.evidence()


def test_zfs_list_cache_units_leave_the_agents_mounts_alone(boot_21: Boot) -> None:
    """5. With zfs-list.cache, zfs-mount-generator made tank's mount unit; none for the
    managed tank/secure, which the agent mounts and systemd leaves mounted (a unit bound to
    an unstarted zfs-load-key@ would unmount it)."""
    assert boot_21.report["zfs_list_cache"] == ["rpool", "tank"], boot_21.evidence()
    units = boot_21.report["mount_units"]
    assert "SourcePath=/etc/zfs/zfs-list.cache/tank" in units, boot_21.evidence()
    assert boot_21.report["zfs"]["tank/secure"]["mounted"] == "yes", boot_21.evidence()
    # systemd 252 says "Bound to unit X, but unit isn't active" (or "bound to inactive unit")
    bound = [
        line
        for line in boot_21.report["journal"].splitlines()
        if re.search(r"bound to (unit|inactive)", line, re.IGNORECASE)
    ]
    assert not bound, f"{bound}\n{boot_21.evidence()}"


def test_initramfs_sizes(tier: Tier) -> None:
    """4. Each initramfs with our integration against the same tree's without it."""
    for variant, prepared in tier.prepared.items():
        grown = prepared.initrd_bytes - prepared.baseline_bytes
        print(
            f"{variant}: {prepared.baseline_bytes} bytes without, {prepared.initrd_bytes} with"
            f" (+{grown} bytes); prepare {prepared.seconds}"
        )
        assert grown > 0, f"{variant}: the initramfs did not grow; is our integration in it?"
