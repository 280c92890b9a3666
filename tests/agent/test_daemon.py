"""`zfs-unlock-agent daemon` against the real key server and the fake zfs, as systemd runs it.

Each test starts the console script with NOTIFY_SOCKET (and WATCHDOG_USEC) pointing at
a datagram socket it reads (tests/agent/daemon_harness.py), changes the world the way
an operator or a boot would (the server goes down and comes back, a pool appears, a
key is revoked and restored, the configuration changes, signals arrive) and checks
what the daemon did: the fake zfs's state, the server's audit log, the daemon's log
and the notify messages. Waits are bounded; no assertion is about speed.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from bench.common import free_port, machine_id_for
from tests.agent.daemon_harness import WAIT, DaemonProcess, Daemons, Message, daemon_table
from tests.agent.harness import AgentHost
from tests.agent.test_transport import assert_absent
from tests.fakes.stub_https import StubHTTPS, json_reply, self_signed_cert
from tests.keyserver import KeyServer
from zfs_unlock_agent import config
from zfs_unlock_agent.daemon import Daemon, Signals
from zfs_unlock_agent.notify import Notifier
from zfs_unlock_agent.udev import PoolDiskWatch
from zfs_unlock_agent.unlock import RootResult
from zfs_unlock_common import pinning

WATCHDOG_USEC = 2_000_000  # the daemon pets it every second
EX_CONFIG = 78

# Small enough that a test sees several retries, rescans and check-ins in seconds.
FAST = {
    "boot_deadline": 3,
    "retry_initial": 1,
    "retry_max": 2,
    "rescan_interval": 1,
    "checkin_interval": 0,
    "initramfs_update": [],  # never this machine's own update-initramfs
}
# A server that does not answer costs this long per pass (harness default: 6 s).
SHORT_NETWORK = {"deadline": 2, "connect_timeout": 1, "read_timeout": 2}


# Helpers


def new_host(
    server: KeyServer,
    tmp_path: Path,
    name: str,
    daemon: dict[str, Any] | None = None,
    network: dict[str, Any] | None = None,
    extra: str = "",
    host_options: tuple[str, ...] = (),
) -> tuple[AgentHost, str]:
    """A host with pool tank and a config whose [daemon] table is FAST updated by DAEMON."""
    host = AgentHost.create(tmp_path, server, name, *host_options)  # options of 'host add'
    configure(host, daemon, network, extra)
    return host, host.zfs.add_pool("tank")


def configure(
    host: AgentHost,
    daemon: dict[str, Any] | None = None,
    network: dict[str, Any] | None = None,
    extra: str = "",
    urls: list[str] | None = None,
) -> None:
    host.write_config(
        urls=urls, network=network, extra=extra + daemon_table(**{**FAST, **(daemon or {})})
    )


def keystatus(host: AgentHost, name: str) -> str:
    return host.zfs.keystatus(name)


def mounted(host: AgentHost, name: str) -> bool:
    return bool(host.zfs.dataset(name)["mounted"])


def wait_unlocked(host: AgentHost, name: str, daemon: DaemonProcess, timeout: float = WAIT) -> None:
    end = time.monotonic() + timeout
    while keystatus(host, name) != "available":
        assert daemon.alive(), f"daemon exited ({daemon.process.returncode}):\n{daemon.log()}"
        assert time.monotonic() < end, f"{name} still locked after {timeout} s:\n{daemon.log()}"
        time.sleep(0.1)


def pings(messages: list[Message]) -> list[Message]:
    return [m for m in messages if m.has("WATCHDOG", "1")]


def key_id(server: KeyServer, host: AgentHost, dataset: str) -> str:
    keys = json.loads(server.must("key", "list", "--host", host.creds.name, "--json"))
    (found,) = [k["key_id"] for k in keys if k["dataset"] == dataset]
    return str(found)


def release_decisions(server: KeyServer, host: AgentHost) -> list[tuple[str, str]]:
    return [
        (str(r["decision"]), str(r.get("reason", "")))
        for r in server.audit_records()
        if r.get("event") == "release" and r.get("host") == host.creds.name
    ]


def appear(host: AgentHost, pool: str, name: str, managed: bool = True) -> bytes:
    """Pool POOL, with encryption root NAME whose key the server already holds, shows up."""
    pool_guid, dataset_guid = str(next(_guids)), str(next(_guids))
    key = os.urandom(32)
    host.server_key(pool_guid, dataset_guid, name, "raw", key)
    host.zfs.add_pool(pool, pool_guid)
    host.zfs.add_encrypted(name, key, managed=managed, guid=dataset_guid)
    return key


_guids = itertools.count(8100000000000000001)  # apart from FakeZfs's own


def assert_key_not_in(daemon: DaemonProcess, keys: list[bytes]) -> None:
    assert_absent(daemon.log_path.read_bytes(), keys, "the daemon's stdout and stderr")
    raw = b"\n".join(m.data for m in daemon.notify.received(lambda m: True))
    assert_absent(raw, keys, "the notify messages")


# Start-up: READY after the boot pass


@pytest.mark.slow  # real waits of several seconds: left out of make unit
def test_ready_after_the_boot_pass_then_idle_pings_and_a_clean_stop(
    shared_keyserver: KeyServer, tmp_path: Path, daemons: Daemons
) -> None:
    host, pool = new_host(shared_keyserver, tmp_path, "d-ready", {"rescan_interval": 1})
    key = host.encrypted_dataset("tank/secret", pool)
    host.zfs.add_child("tank/secret/child")

    daemon = daemons.start(host, "-v", watchdog_usec=WATCHDOG_USEC)
    ready = daemon.expect_ready()

    # The boot pass is over when READY arrives: the key is loaded and everything mounted.
    assert keystatus(host, "tank/secret") == "available"
    assert mounted(host, "tank/secret") and mounted(host, "tank/secret/child")
    assert ready.status == "1 of 1 managed encryption roots unlocked"
    before = daemon.notify.messages[: daemon.notify.messages.index(ready)]
    assert any(m.status and "boot pass" in m.status for m in before)
    assert not any(m.ready for m in before)

    idle = daemon.notify.collect(5)
    assert len(pings(idle)) >= 3, [m.raw for m in idle]
    assert not any(m.ready for m in idle)
    # Rescans happened, and cost an unlocked root neither a fetch nor a load-key.
    assert len(host.zfs.calls("zfs", "list")) >= 4
    assert len(host.zfs.calls("zfs", "load-key")) == 1
    assert release_decisions(shared_keyserver, host) == [("allow", "ok")]

    assert daemon.terminate() == 0
    assert daemon.notify.received(lambda m: m.has("STOPPING", "1"))
    assert "stopping" in daemon.log()
    assert "Traceback" not in daemon.log()
    assert_key_not_in(daemon, [key])


def test_the_textfile_tells_node_exporter_the_roots_and_the_last_failure(
    shared_keyserver: KeyServer, tmp_path: Path, daemons: Daemons
) -> None:
    textfile = tmp_path / "node-exporter" / "zfs_unlock_agent.prom"
    textfile.parent.mkdir()
    host, pool = new_host(shared_keyserver, tmp_path, "d-textfile", {"textfile": str(textfile)})
    key = host.encrypted_dataset("tank/secret", pool)
    daemon = daemons.start(host)
    daemon.expect_ready()
    text = textfile.read_text()
    assert 'zfs_unlock_agent_roots{state="unlocked"} 1\n' in text
    assert 'zfs_unlock_agent_roots{state="locked"} 0\n' in text
    assert "zfs_unlock_agent_last_success_timestamp_seconds 1" in text
    assert "last_error" not in text
    assert textfile.stat().st_mode & 0o777 == 0o644  # node_exporter is another user

    # A root whose key the server does not hold: refused at the next rescan.
    host.zfs.add_pool("other")
    unknown = os.urandom(32)
    host.zfs.add_encrypted("other/locked", unknown)
    deadline = time.monotonic() + WAIT
    while 'state="locked"} 1' not in textfile.read_text():
        assert time.monotonic() < deadline, textfile.read_text()
        time.sleep(0.1)
    text = textfile.read_text()
    assert 'zfs_unlock_agent_roots{state="unlocked"} 1\n' in text
    assert re.search(r'zfs_unlock_agent_last_error_info\{message="other/locked: [^"]+"\} 1', text)
    assert_absent(text.encode(), [key, unknown], "the textfile")
    assert [p.name for p in textfile.parent.iterdir()] == [textfile.name]  # no leftovers

    promtool = shutil.which("promtool")
    assert promtool, "promtool (Debian's prometheus) is missing: scripts/test.sh installs it"
    checked = subprocess.run(
        [promtool, "check", "metrics"], input=text, capture_output=True, text=True, check=False
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert daemon.terminate() == 0


# The server is down at boot, or answers "no"


@pytest.mark.slow  # real waits of several seconds: left out of make unit
def test_degraded_boot_then_the_server_comes_back(
    keyserver: KeyServer, tmp_path: Path, daemons: Daemons
) -> None:
    """The boot pass gives up after boot_deadline (2 s), not the network deadline (20 s)."""
    keyserver.start()
    host, pool = new_host(
        keyserver,
        tmp_path,
        "d-degraded",
        {"boot_deadline": 2, "rescan_interval": 3600},
        {**SHORT_NETWORK, "deadline": 20},
    )
    key = host.encrypted_dataset("tank/secret", pool)
    host.zfs.add_child("tank/secret/child")
    keyserver.stop()  # the port stays this server's: start() reuses it

    daemon = daemons.start(host, watchdog_usec=WATCHDOG_USEC)
    ready = daemon.expect_ready(timeout=12)

    assert keystatus(host, "tank/secret") == "unavailable"
    assert ready.status is not None
    assert ready.status.startswith("0 of 1 managed encryption roots unlocked; 1 locked"), ready
    daemon.wait_log(r"tank/secret: trying again in 1 s")
    time.sleep(3)  # down for a while: the daemon is in its next pass, retrying
    assert daemon.alive(), daemon.log()

    keyserver.start()
    wait_unlocked(host, "tank/secret", daemon)
    daemon.expect(lambda m: m.status == "1 of 1 managed encryption roots unlocked")

    assert mounted(host, "tank/secret") and mounted(host, "tank/secret/child")
    assert daemon.alive()  # the same process: no restart was needed
    assert ("allow", "ok") in release_decisions(keyserver, host)
    assert daemon.terminate() == 0
    assert_key_not_in(daemon, [key])


def test_a_trickling_server_cannot_hold_the_boot_pass_past_boot_deadline(
    shared_keyserver: KeyServer, tmp_path: Path, daemons: Daemons
) -> None:
    """The pinned server answers one byte every 0.25 s, so the 3 s read timeout never fires
    and the answer would take a minute: READY still comes once boot_deadline (2 s) is over."""
    boot_deadline = 2
    host, _ = new_host(shared_keyserver, tmp_path, "d-trickle")
    host.zfs.add_encrypted("tank/secret", os.urandom(32))  # a key only the test knows
    tls = self_signed_cert(tmp_path / "tls", "slow")
    answer = json_reply({"keys": [], "denied": [], "padding": "p" * 100})
    with StubHTTPS(tls, [answer], trickle=0.25) as slow:
        host.write_config(
            urls=[slow.url],
            pins=[tls.pin],
            network={"deadline": 20, "connect_timeout": 1, "read_timeout": 3},
            extra=daemon_table(**{**FAST, "boot_deadline": boot_deadline, "rescan_interval": 3600}),
        )

        daemon = daemons.start(host)
        # Start-up (interpreter, imports, the fake zfs inventory) takes a second or two.
        ready = daemon.expect_ready(timeout=boot_deadline + 4)

        assert ready.status is not None
        assert ready.status.startswith("0 of 1 managed encryption roots unlocked; 1 locked"), ready
        assert keystatus(host, "tank/secret") == "unavailable"
        daemon.wait_log(r"timed out")
        assert daemon.terminate() == 0


@pytest.mark.slow  # real waits of several seconds: left out of make unit
def test_retry_pauses_double_up_to_retry_max_and_a_restored_key_unlocks(
    shared_keyserver: KeyServer, tmp_path: Path, daemons: Daemons
) -> None:
    host, pool = new_host(
        shared_keyserver,
        tmp_path,
        "d-backoff",
        {"retry_initial": 1, "retry_max": 5, "rescan_interval": 3600},
    )
    host.encrypted_dataset("tank/secret", pool)
    revoked = key_id(shared_keyserver, host, "tank/secret")
    shared_keyserver.must("key", "revoke", revoked)

    daemon = daemons.start(host)
    ready = daemon.expect_ready()
    assert ready.status is not None and "1 locked" in ready.status
    tries = daemon.wait_log(r"^.*tank/secret: trying again in (\d+) s$", count=4, timeout=60)
    failures = re.findall(r"ERROR: tank/secret: (.*)$", daemon.log(), re.MULTILINE)

    assert [int(m.group(1)) for m in tries[:4]] == [1, 2, 4, 5]
    assert failures and all("refused" in f for f in failures), failures
    assert keystatus(host, "tank/secret") == "unavailable"
    denied = release_decisions(shared_keyserver, host)
    assert len(denied) >= 4 and set(denied) == {("deny", "key_revoked")}, denied

    shared_keyserver.must("key", "restore", revoked)
    wait_unlocked(host, "tank/secret", daemon)

    assert release_decisions(shared_keyserver, host)[-1] == ("allow", "ok")
    assert daemon.terminate() == 0


# Pools that appear later


def test_a_pool_that_appears_later_is_unlocked_at_the_next_rescan(
    shared_keyserver: KeyServer, tmp_path: Path, daemons: Daemons
) -> None:
    host, _ = new_host(shared_keyserver, tmp_path, "d-later", {"rescan_interval": 1})

    daemon = daemons.start(host)
    ready = daemon.expect_ready()
    assert ready.status == "no managed encryption roots yet; watching for pools"

    key = appear(host, "backup", "backup/secret")
    host.zfs.add_child("backup/secret/data")
    unmanaged_key = appear(host, "usb", "usb/private", managed=False)
    wait_unlocked(host, "backup/secret", daemon)

    daemon.expect(lambda m: m.status == "1 of 1 managed encryption roots unlocked")
    assert mounted(host, "backup/secret") and mounted(host, "backup/secret/data")
    assert keystatus(host, "usb/private") == "unavailable"  # not managed: left alone
    assert release_decisions(shared_keyserver, host) == [("allow", "ok")]
    assert daemon.terminate() == 0
    assert_key_not_in(daemon, [key, unmanaged_key])


# Reloading the configuration


def test_sighup_with_a_valid_config_takes_effect(
    shared_keyserver: KeyServer, tmp_path: Path, daemons: Daemons
) -> None:
    slow = {"rescan_interval": 3600}  # only the reload can make it look again
    host, pool = new_host(shared_keyserver, tmp_path, "d-reload", slow)
    host.encrypted_dataset("tank/secret", pool)
    host.encrypted_dataset("tank/listed", pool, managed=False)

    daemon = daemons.start(host)
    assert daemon.expect_ready().status == "1 of 1 managed encryption roots unlocked"
    assert keystatus(host, "tank/listed") == "unavailable"

    configure(host, slow, extra='[datasets]\ninclude = ["tank/listed"]\n')
    daemon.send(signal.SIGHUP)

    reloading = daemon.expect(lambda m: m.has("RELOADING", "1"))
    assert re.fullmatch(r"\d+", reloading.fields.get("MONOTONIC_USEC", "")), reloading
    daemon.expect_ready()
    wait_unlocked(host, "tank/listed", daemon)
    daemon.expect(lambda m: m.status == "2 of 2 managed encryption roots unlocked")
    assert "configuration reloaded" in daemon.log()
    assert daemon.terminate() == 0


def test_sighup_with_a_broken_config_keeps_the_running_one(
    shared_keyserver: KeyServer, tmp_path: Path, daemons: Daemons
) -> None:
    host, pool = new_host(shared_keyserver, tmp_path, "d-badreload", {"rescan_interval": 1})
    host.encrypted_dataset("tank/secret", pool)
    daemon = daemons.start(host)
    daemon.expect_ready()

    host.config_path.write_text("[[server]\nurl = 'not even TOML'\n")
    daemon.send(signal.SIGHUP)

    reloading = daemon.expect(lambda m: m.has("RELOADING", "1"))
    ready = daemon.expect_ready()
    assert ready.at >= reloading.at
    daemon.wait_log(r"ERROR: reload refused; the running configuration stays: .*agent\.toml")
    assert daemon.alive()
    # Still the old configuration's server, pins, zfs and rescans: a new root is unlocked.
    appear(host, "backup", "backup/secret")
    wait_unlocked(host, "backup/secret", daemon)
    assert daemon.terminate() == 0


# Stopping


def test_sigterm_in_the_boot_pass_backoff_exits_0_promptly(
    shared_keyserver: KeyServer, tmp_path: Path, daemons: Daemons
) -> None:
    """The boot pass has 60 s to reach a server that is not there; between two tries it
    sleeps (up to 3 s, jittered). SIGTERM ends it there, before READY."""
    host, pool = new_host(shared_keyserver, tmp_path, "d-term-boot", {"boot_deadline": 60})
    network = {**SHORT_NETWORK, "deadline": 60, "backoff_initial": 3, "backoff_max": 3}
    configure(host, {"boot_deadline": 60}, network, urls=[f"https://127.0.0.1:{free_port()}"])
    host.encrypted_dataset("tank/secret", pool)

    daemon = daemons.start(host)
    daemon.expect(lambda m: m.status is not None and "boot pass" in m.status)
    time.sleep(1.5)  # a refused try takes milliseconds: it is sleeping between tries

    assert daemon.terminate(timeout=10) == 0
    assert not daemon.notify.received(lambda m: m.ready)
    assert daemon.notify.received(lambda m: m.has("STOPPING", "1"))
    assert keystatus(host, "tank/secret") == "unavailable"


@pytest.mark.slow  # real waits of several seconds: left out of make unit
def test_sigterm_in_the_pause_between_retries_exits_0_promptly(
    shared_keyserver: KeyServer, tmp_path: Path, daemons: Daemons
) -> None:
    """After a failed boot pass the next try is 60 s away; meanwhile the watchdog is
    petted, and SIGTERM ends the wait."""
    host, pool = new_host(shared_keyserver, tmp_path, "d-term-pause")
    # One try in the boot pass: its first backoff (jittered, up to 5 s) rarely fits into 1 s.
    network = {**SHORT_NETWORK, "deadline": 1, "backoff_initial": 5, "backoff_max": 5}
    settings = {"boot_deadline": 1, "retry_initial": 60, "retry_max": 60}
    configure(host, settings, network, urls=[f"https://127.0.0.1:{free_port()}"])
    host.encrypted_dataset("tank/secret", pool)

    daemon = daemons.start(host, watchdog_usec=WATCHDOG_USEC)
    ready = daemon.expect_ready()
    daemon.wait_log(r"tank/secret: trying again in 60 s")
    waiting = daemon.notify.collect(4)

    assert ready.status is not None and "1 locked, next try in" in ready.status
    assert len(pings(waiting)) >= 3, [m.raw for m in waiting]
    assert daemon.terminate(timeout=10) == 0
    assert daemon.notify.received(lambda m: m.has("STOPPING", "1"))
    assert keystatus(host, "tank/secret") == "unavailable"


def test_a_config_error_at_start_exits_78_without_ready(
    shared_keyserver: KeyServer, tmp_path: Path, daemons: Daemons
) -> None:
    host, pool = new_host(
        shared_keyserver, tmp_path, "d-badconf", {"retry_initial": 10, "retry_max": 5}
    )
    host.encrypted_dataset("tank/secret", pool)

    daemon = daemons.start(host, watchdog_usec=WATCHDOG_USEC)

    assert daemon.wait_exit() == EX_CONFIG
    assert "daemon.retry_max" in daemon.log()
    assert daemon.notify.received(lambda m: True) == []
    assert host.zfs.calls() == []


# Check-ins and the dead-man switch


@pytest.mark.slow  # real waits of several seconds: left out of make unit
def test_checkins_keep_the_dead_man_switch_satisfied(
    shared_keyserver: KeyServer, tmp_path: Path, daemons: Daemons
) -> None:
    deadman = ("--deadman-timeout", "3")
    host, _ = new_host(
        shared_keyserver, tmp_path, "d-checkin", {"checkin_interval": 1}, host_options=deadman
    )
    silent = shared_keyserver.add_host("d-checkin-silent", *deadman)

    daemon = daemons.start(host)
    daemon.expect_ready()
    time.sleep(7)  # more than twice the dead-man timeout

    def show(name: str) -> dict[str, Any]:
        shown: dict[str, Any] = json.loads(shared_keyserver.must("host", "show", name, "--json"))
        return shown

    assert show(host.creds.name)["enabled"] is True
    assert (show(silent.name)["enabled"], show(silent.name)["disabled_reason"]) == (
        False,
        "deadman",
    )
    audited = [
        json.loads(line)
        for line in shared_keyserver.must(
            "audit", "--host", host.creds.name, "--event", "checkin", "--json"
        ).splitlines()
    ]
    assert len(audited) >= 5, audited
    assert {r["decision"] for r in audited} == {"allow"}
    assert daemon.alive()
    assert "check-in failed" not in daemon.log()
    assert daemon.terminate() == 0


# Mounting at boot: leave it to zfs-mount.service when systemd has it queued


@pytest.mark.parametrize(
    ("invocation_id", "queued", "mounts"),
    [
        pytest.param("0123abcd", True, False, id="systemd-zfs-mount-queued"),
        pytest.param("0123abcd", False, True, id="systemd-no-zfs-mount-job"),
        pytest.param(None, True, True, id="by-hand"),
    ],
)
def test_boot_pass_leaves_mounting_to_a_queued_zfs_mount_service(
    shared_keyserver: KeyServer,
    tmp_path: Path,
    daemons: Daemons,
    invocation_id: str | None,
    queued: bool,
    mounts: bool,
) -> None:
    host, pool = new_host(
        shared_keyserver, tmp_path, f"d-mount-{invocation_id}-{queued}", {"rescan_interval": 3600}
    )
    host.encrypted_dataset("tank/secret", pool)
    host.zfs.add_child("tank/secret/child")
    fake_bin = tmp_path / "fake-bin"
    fake_bin.mkdir()
    asked = tmp_path / "systemctl-calls"
    job = "'42 zfs-mount.service start waiting'" if queued else "''"
    (fake_bin / "systemctl").write_text(
        "#!/bin/sh\n"
        f'echo "$*" >>"{asked}"\n'
        'case "$*" in *list-jobs*zfs-mount.service*)'
        f" [ -n {job} ] && echo {job} ;; esac\n"
        "exit 0\n"
    )
    (fake_bin / "systemctl").chmod(0o755)

    daemon = daemons.start(
        host,
        env={"PATH": f"{fake_bin}:{os.environ['PATH']}", "INVOCATION_ID": invocation_id},
    )
    daemon.expect_ready()

    assert keystatus(host, "tank/secret") == "available"
    assert mounted(host, "tank/secret") is mounts
    assert mounted(host, "tank/secret/child") is mounts
    assert bool(host.zfs.calls("zfs", "mount")) is mounts
    calls = asked.read_text().splitlines() if asked.exists() else []
    if invocation_id:
        assert calls == ["list-jobs --no-legend --plain zfs-mount.service"]
    else:
        assert calls == []  # started by hand: nobody else will mount, so it does
    assert daemon.terminate() == 0


# A watchdog ping that falls due during a slow try


@pytest.mark.slow  # real waits of several seconds: left out of make unit
def test_a_ping_that_fell_due_during_a_slow_try_does_not_kill_the_daemon(
    shared_keyserver: KeyServer, tmp_path: Path, daemons: Daemons
) -> None:
    """A server that accepts connections and never answers: each try lasts read_timeout
    (1.5 s), longer than the ping interval (1 s). The daemon must go on retrying and pinging."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(64)  # the kernel completes handshakes; nobody ever reads
        url = f"https://127.0.0.1:{silent.getsockname()[1]}"
        host, pool = new_host(shared_keyserver, tmp_path, "d-hang")
        configure(
            host,
            {"boot_deadline": 4},
            {"deadline": 4, "connect_timeout": 1.5, "read_timeout": 1.5},
            urls=[url],
        )
        host.encrypted_dataset("tank/secret", pool)

        daemon = daemons.start(host, "-v", watchdog_usec=WATCHDOG_USEC)
        ready = daemon.expect_ready()
        window = daemon.notify.collect(8)

        assert ready.status is not None and "1 locked" in ready.status
        assert daemon.alive(), daemon.log()
        assert len(pings(window)) >= 3
        assert daemon.terminate() == 0


# Units the subprocess cannot reach


class FakeDevice(dict[str, str]):
    """What pyudev hands out: a mapping of udev properties with an action."""

    def __init__(self, action: str, **properties: str) -> None:
        super().__init__(properties)
        self.action = action


class FakeMonitor:
    def __init__(self, *devices: object) -> None:
        self.queue = list(devices)

    def poll(self, timeout: float) -> object:
        assert timeout == 0  # draining must never block the loop
        return self.queue.pop(0) if self.queue else None

    def fileno(self) -> int:
        return 1234


def watch_with(monitor: FakeMonitor | None) -> PoolDiskWatch:
    watch = PoolDiskWatch.__new__(PoolDiskWatch)  # without a real udev monitor
    watch._monitor = monitor
    return watch


@pytest.mark.parametrize(
    ("devices", "seen"),
    [
        pytest.param([FakeDevice("add", ID_FS_TYPE="zfs_member")], True, id="add-zfs"),
        pytest.param([FakeDevice("change", ID_FS_TYPE="zfs_member")], True, id="change-zfs"),
        pytest.param([FakeDevice("remove", ID_FS_TYPE="zfs_member")], False, id="remove-zfs"),
        pytest.param([FakeDevice("bind", ID_FS_TYPE="zfs_member")], False, id="bind-zfs"),
        pytest.param([FakeDevice("add", ID_FS_TYPE="ext4")], False, id="add-ext4"),
        pytest.param([FakeDevice("add")], False, id="add-unlabelled"),
        pytest.param([object()], False, id="not-a-device"),
        pytest.param(
            [
                FakeDevice("add", ID_FS_TYPE="ext4"),
                FakeDevice("add", ID_FS_TYPE="zfs_member"),
                FakeDevice("remove", ID_FS_TYPE="zfs_member"),
            ],
            True,
            id="one-of-several",
        ),
    ],
)
def test_pool_disk_watch_reports_only_added_or_changed_zfs_members(
    devices: list[object], seen: bool
) -> None:
    monitor = FakeMonitor(*devices)
    watch = watch_with(monitor)

    assert watch.drain() is seen
    assert monitor.queue == []  # every queued event is consumed, not just up to a match
    assert watch.drain() is False
    assert watch.fileno() == 1234


def test_pool_disk_watch_without_udev_reports_nothing() -> None:
    watch = watch_with(None)
    assert watch.fileno() is None
    assert watch.drain() is False


def unit_config(tmp_path: Path, **daemon: float) -> config.Config:
    (tmp_path / "machine-id").write_text(machine_id_for("unit") + "\n")
    text = (
        f'machine_id_file = "{tmp_path / "machine-id"}"\n'
        f'[[server]]\nurl = "https://127.0.0.1:9"\npins = ["{pinning.format_pin(bytes(32))}"]\n'
        '[client]\ncertificate = "client.crt"\nkey = "client.key"\n' + daemon_table(**daemon)
    )
    return config.parse(text, tmp_path / "agent.toml", check_files=False)


@pytest.fixture
def signals() -> Iterator[Signals]:
    handlers = Signals()
    yield handlers
    handlers.close()


def test_retry_pause_doubles_up_to_retry_max_and_resets_after_success(
    tmp_path: Path, signals: Signals
) -> None:
    now = [1000.0]
    cfg = unit_config(tmp_path, retry_initial=1.5, retry_max=10)
    daemon = Daemon(cfg, Notifier({}), signals, watch_with(None), clock=lambda: now[0])
    failed = RootResult("tank/x", "failed", 75, "no key server answered")

    pauses = []
    for attempt in range(6):
        if attempt:
            now[0] = daemon.retries["guid-x"].due  # the try that was due fails again
        daemon._record("guid-x", failed)
        retry = daemon.retries["guid-x"]
        assert retry.due == now[0] + retry.pause
        pauses.append(retry.pause)
    daemon.managed = 2
    summary = daemon.summary()

    assert pauses == [1.5, 3, 6, 10, 10, 10]
    assert summary == "1 of 2 managed encryption roots unlocked; 1 locked, next try in 10 s"
    daemon._record("guid-x", RootResult("tank/x", "unlocked"))
    assert "guid-x" not in daemon.retries
    assert daemon.summary() == "2 of 2 managed encryption roots unlocked"
    daemon._record("guid-x", failed)
    assert daemon.retries["guid-x"].pause == 1.5  # a new failure starts over


@pytest.mark.parametrize(
    ("environ", "interval"),
    [
        pytest.param({"WATCHDOG_USEC": "3000000"}, 1.5, id="half-the-timeout"),
        pytest.param({"WATCHDOG_USEC": "3000000", "WATCHDOG_PID": "self"}, 1.5, id="our-pid"),
        pytest.param({"WATCHDOG_USEC": "3000000", "WATCHDOG_PID": "1"}, None, id="other-pid"),
        pytest.param({"WATCHDOG_USEC": "0"}, None, id="zero"),
        pytest.param({"WATCHDOG_USEC": "-5"}, None, id="negative"),
        pytest.param({}, None, id="unset"),
    ],
)
def test_watchdog_interval_follows_sd_watchdog_enabled(
    environ: dict[str, str], interval: float | None
) -> None:
    if environ.get("WATCHDOG_PID") == "self":
        environ = {**environ, "WATCHDOG_PID": str(os.getpid())}
    notifier = Notifier(environ)
    assert notifier.watchdog_interval == interval


ASKED = """[Ask]
PID={pid}
Socket=/run/zua-test/sck.1
NotAfter=0
Message=Enter passphrase for tank/secret:
Id=zfs:tank/secret
"""


def asked_host(
    server: KeyServer, tmp_path: Path, name: str, openzfs_prompt: str
) -> tuple[AgentHost, Path]:
    """A host whose locked tank/secret (hex) an OpenZFS prompt asks for, in an ask
    directory of the test's; that question's file."""
    host = AgentHost.create(tmp_path, server, name)
    pool = host.zfs.add_pool("tank")
    host.encrypted_dataset("tank/secret", pool, keyformat="hex")
    host.write_config(extra=f'[datasets]\nopenzfs_prompt = "{openzfs_prompt}"\n')
    asks = tmp_path / "ask"
    asks.mkdir()
    question = asks / "ask.x"
    question.write_text(ASKED.format(pid=os.getpid()))
    return host, question


@pytest.mark.skipif(os.geteuid() != 0, reason="ask files are read only when root owns them")
def test_with_openzfs_prompt_answer_a_root_asked_for_is_left_to_the_password_agent(
    shared_keyserver: KeyServer, tmp_path: Path, signals: Signals
) -> None:
    host, question = asked_host(shared_keyserver, tmp_path, "daemon-asked", "answer")
    cfg = config.load(host.config_path)
    now = [1000.0]
    daemon = Daemon(
        cfg,
        Notifier({}),
        signals,
        watch_with(None),
        clock=lambda: now[0],
        ask_directory=question.parent,
    )

    daemon.unlock_pass(10)
    assert host.zfs.keystatus("tank/secret") == "unavailable"
    assert not host.zfs.calls("zfs", "load-key")
    assert daemon.summary() == (
        "0 of 1 managed encryption roots unlocked; 1 locked, next try in 5 s"
    )
    now[0] += 5  # still asked at the next look: still left alone
    daemon.unlock_pass(10)
    assert host.zfs.keystatus("tank/secret") == "unavailable"

    question.unlink()  # answered, timed out, or its unit gave up: the daemon takes over
    daemon.unlock_pass(10)
    assert host.zfs.keystatus("tank/secret") == "unavailable", "not before it is due"
    now[0] += 5
    daemon.unlock_pass(10)
    assert host.zfs.keystatus("tank/secret") == "available"


@pytest.mark.skipif(os.geteuid() != 0, reason="ask files are read only when root owns them")
def test_with_openzfs_prompt_skip_the_daemon_unlocks_whatever_is_asked(
    shared_keyserver: KeyServer, tmp_path: Path, signals: Signals
) -> None:
    host, question = asked_host(shared_keyserver, tmp_path, "daemon-skip", "skip")
    cfg = config.load(host.config_path)
    daemon = Daemon(cfg, Notifier({}), signals, watch_with(None), ask_directory=question.parent)

    daemon.unlock_pass(10)
    assert host.zfs.keystatus("tank/secret") == "available"
