"""The real-OpenZFS tier: the agent on OpenZFS in a QEMU guest, against the real key server.

Debian 12's two OpenZFS lines each get a guest: 2.3 (bookworm-backports) and 2.1.11
(bookworm's own, what most Debian 12 hosts run). A guest boots once and runs every
scenario of tests/vm/guest/cases, in the order of their one list (cases/__init__.py, which
this module reads too); each test here asserts on one scenario's result on one line, so a
failure names both and prints the guest's console. The benchmark runs on 2.3 only: it
measures, it does not check behaviour. The tier fails when it cannot run (not root, no QEMU and apt fails, the image
does not build); ZUA_SKIP_VM=1 skips it instead, saying so.
The first run builds the image (about 5-8 minutes, mostly the DKMS build of zfs.ko).
The last scenario is a benchmark: native keylocation=https:// against the agent; bench/vm.py
renders its timings, which ZUA_WRITE_BENCHMARKS=1 writes to docs/benchmarks-vm.md.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

import bench.vm
from bench.common import machine_id_for
from tests.keyserver import SERVER_BIN, HostCreds, KeyServer
from tests.vm.guest.cases import SCENARIOS
from tests.vm.keeper import Keeper
from tests.vm.vm import (
    GIB,
    SERVER_ADDRESS,
    ZFS_LINES,
    Forwarder,
    Guest,
    GuestRun,
    SimpleZfsImporter,
    VmError,
    build_image,
    progress_printer,
    write_guest_agent_config,
)

pytestmark = pytest.mark.vm

GUEST_DIR = Path(__file__).resolve().parent / "guest"
REPO = Path(__file__).resolve().parents[2]
MACHINE_ID = machine_id_for("zfs-unlock-agent-vm-guest")
BENCHMARKS = REPO / "docs" / "benchmarks-vm.md"
BENCHMARK = "bench_native_vs_agent"


def scenarios_of(zfs: str) -> list[str]:
    """What the guest of the OpenZFS line ZFS runs: every scenario; the benchmark on 2.3.
    ZUA_VM_SCENARIOS (names, space-separated) narrows a development run to those."""
    only = os.environ.get("ZUA_VM_SCENARIOS", "").split()
    return [
        name
        for name in SCENARIOS
        if (zfs == "2.3" or name != BENCHMARK) and (not only or name in only)
    ]


@dataclass
class Outcome:
    zfs: str  # the OpenZFS line
    expected: list[str]  # the scenarios its guest ran
    run: GuestRun
    results: dict[str, dict[str, Any]]  # by scenario name
    guest: dict[str, Any]  # the results file's kernel and zfs_version
    server_log: Path
    forwarder_events: list[str]

    def report(self) -> str:
        server_log = self.server_log.read_text(errors="replace") if self.server_log.exists() else ""
        return (
            f"guest exit: {self.run.rc} (qemu {self.run.qemu_rc}, {self.run.seconds:.0f} s)\n"
            f"forwarder: {self.forwarder_events}\n"
            f"--- key server log (tail) ---\n{server_log[-3000:]}\n"
            f"--- guest console ({self.run.console_path}) ---\n{self.run.console}"
        )


def write_agent_files(directory: Path, server: KeyServer, creds: HostCreds) -> None:
    """The guest's /etc/zfs-unlock-agent: agent.toml, client.crt, client.key; and the
    server's certificate, server.crt, for ZFS's own keylocation=https:// (SSL_CA_CERT_FILE)."""
    # TCG is slow; the deadline bounds the server-down scenario.
    write_guest_agent_config(
        directory,
        server,
        creds,
        "connect_timeout = 5\nread_timeout = 30\ndeadline = 20\n"
        "backoff_initial = 0.5\nbackoff_max = 2\n",
    )
    shutil.copyfile(server.data_dir / "server.crt", directory / "server.crt")


@pytest.fixture(scope="module", params=ZFS_LINES, ids=[f"openzfs-{z}" for z in ZFS_LINES])
def outcome(
    request: pytest.FixtureRequest,
    tmp_path_factory: pytest.TempPathFactory,
    pytestconfig: pytest.Config,
) -> Iterator[Outcome]:
    zfs: str = request.param
    if os.environ.get("ZUA_SKIP_VM") == "1":
        pytest.skip("ZUA_SKIP_VM=1: the real-OpenZFS tier was switched off")
    if os.geteuid() != 0:
        pytest.fail("the real-OpenZFS tier needs root (apt, DKMS); or set ZUA_SKIP_VM=1")
    progress = progress_printer(pytestconfig, f"vm {zfs}")
    started = time.monotonic()
    try:
        image = build_image(progress, zfs)
    except (VmError, OSError) as exc:
        pytest.fail(f"cannot build the guest image: {exc}")
    progress(f"image ready in {time.monotonic() - started:.1f} s: {image.directory}")

    root = tmp_path_factory.mktemp("vm")
    # The guest's libcurl (keylocation=https://) checks the address it connects to.
    server = KeyServer(root / "keyserver", ["localhost", "127.0.0.1", SERVER_ADDRESS[0]])
    server.configure(simplezfs_route=True)  # every other setting: its default
    creds = server.add_host("zfsvm", "--allow-ip", "127.0.0.1/32", machine_id=MACHINE_ID)
    share = root / "share"
    write_agent_files(share / "agent", server, creds)
    expected = scenarios_of(zfs)
    (share / "scenarios").write_text(" ".join(expected) + "\n")  # run.sh passes them on
    # The benchmark case's rounds: five for docs/benchmarks-vm.md, else one proves it.
    (share / "bench-rounds").write_text("5\n" if writes_benchmarks() else "1\n")
    keeper = Keeper(root / "keeper", share, server)

    def importer(pool_guid: str, name: str) -> None:
        """Into the server the guest reaches now: a restored one, after a restore."""
        data_dir = keeper.current.data_dir
        SimpleZfsImporter(SERVER_BIN, data_dir, MACHINE_ID, root / "simplezfs")(pool_guid, name)

    server.start()
    try:
        with Forwarder(server.port, legacy=importer, hooks=keeper.hooks()) as forwarder:
            keeper.forwarder = forwarder
            guest = Guest(
                image,
                GUEST_DIR,
                share,
                root / "guest",
                server_port=forwarder.port,
                control_port=forwarder.control_port,
                machine_id=MACHINE_ID,
                disks=(GIB, GIB, GIB),  # tank, tank2, and one for export_import_rename's pool
                read_only_shares={"src": REPO, "site": image.site},
            )
            progress("booting the guest (TCG) and running the scenarios")
            with guest:
                run = guest.run()
    finally:
        keeper.stop()
    progress(f"guest exit {run.rc} after {run.seconds:.1f} s; console: {run.console_path}")
    results_file = share / "results.json"
    document: dict[str, Any] = {}
    if results_file.exists():
        document = json.loads(results_file.read_text())
    results = {r["name"]: r for r in document.get("scenarios", [])}
    guest_facts = {k: v for k, v in document.items() if k != "scenarios"}
    yield Outcome(zfs, expected, run, results, guest_facts, server.log_path, forwarder.events)


@pytest.mark.parametrize("name", SCENARIOS)
def test_scenario(outcome: Outcome, name: str) -> None:
    if name not in outcome.expected:
        pytest.skip(f"{name} is not in this run (the benchmark runs on OpenZFS 2.3 only)")
    result = outcome.results.get(name)
    if result is None or result["status"] != "PASS":
        print(outcome.report())
    assert result is not None, f"{name}: the guest reported no result (exit {outcome.run.rc})"
    assert result["status"] == "PASS", f"{name}: {result['reason']}"


def test_every_scenario_ran_and_guest_exited_cleanly(outcome: Outcome) -> None:
    if list(outcome.results) != outcome.expected or outcome.run.rc != 0:
        print(outcome.report())
    assert list(outcome.results) == outcome.expected, "not the scenarios cases/__init__.py lists"
    assert outcome.run.rc == 0


def test_guest_runs_its_openzfs_line(outcome: Outcome) -> None:
    """The tools and the kernel module are both of the line under test (a mismatch would
    test neither)."""
    versions = outcome.guest.get("zfs_version", [])
    assert len(versions) == 2, versions
    assert versions[0].startswith(f"zfs-{outcome.zfs}."), versions
    assert versions[1].startswith(f"zfs-kmod-{outcome.zfs}."), versions


def writes_benchmarks() -> bool:
    return os.environ.get("ZUA_WRITE_BENCHMARKS") == "1"


def host_cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.machine()


def test_benchmarks_document(outcome: Outcome) -> None:
    """The benchmark's timings render; written to docs/benchmarks-vm.md only when asked."""
    if BENCHMARK not in outcome.expected:
        pytest.skip(f"{BENCHMARK} runs on OpenZFS 2.3 only")
    result = outcome.results.get(BENCHMARK)
    write = writes_benchmarks()
    if result is None or result["status"] != "PASS":
        message = "bench_native_vs_agent did not pass (its own test says why)"
        if write:
            pytest.fail(f"docs/benchmarks-vm.md not written: {message}")
        pytest.skip(message)
    machine = bench.vm.Machine(
        kernel=str(outcome.guest.get("kernel", "?")),
        zfs_version=" / ".join(outcome.guest.get("zfs_version", [])),
        host_cpus=os.cpu_count() or 0,
        host_cpu_model=host_cpu_model(),
        date=time.strftime("%Y-%m-%d"),
    )
    text = bench.vm.render(result.get("data", {}), machine)
    if write:
        BENCHMARKS.write_text(text)
