"""A rollover of the server's TLS key with three hosts, against the real server and the
real agent daemon (fake zfs; a stand-in for update-initramfs that copies what the real
hooks copy).

Each daemon learns the next pin at its check-in, keeps it in its state directory, has its
"initramfs" rebuilt and reports the pin back; `tls activate` waits for the host that was
offline during the announcement. Through the whole rollover every host unlocks, and after
it each boots (an unlock with the initramfs's copy of the state directory) with agent.toml
still naming only the old pin.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from tests.agent.daemon_harness import Daemons
from tests.agent.harness import AGENT_BIN, AgentHost
from tests.agent.test_daemon import new_host
from tests.agent.test_enroll import unload_key
from tests.keyserver import KeyServer, wait_for
from zfs_unlock_agent import errors
from zfs_unlock_agent.initramfs import STALE_MARK
from zfs_unlock_agent.learnedpins import FILE_NAME
from zfs_unlock_server.errors import EX_TEMPFAIL

DATASET = "tank/data"


def fake_update_initramfs(root: Path) -> list[str]:
    """A command that does what update-initramfs does with our hook, for the pins: copies
    the state directory's pin file into the image (ROOT/initramfs), and counts the runs."""
    script = root / "update-initramfs"
    script.write_text(
        "#!/bin/sh\nset -e\n"
        f'mkdir -p "{root}/initramfs/state"\n'
        f'cp "{root}/state/{FILE_NAME}" "{root}/initramfs/state/{FILE_NAME}"\n'
        f'echo rebuilt >> "{root}/initramfs.log"\n'
    )
    script.chmod(0o755)
    return [str(script)]


def rollover_host(server: KeyServer, tmp_path: Path, name: str) -> AgentHost:
    root = tmp_path / name
    root.mkdir()
    host, pool = new_host(
        server,
        root,
        name,
        {"checkin_interval": 1, "initramfs_update": fake_update_initramfs(root)},
    )
    host.encrypted_dataset(DATASET, pool)
    return host


def boots(host: AgentHost, from_initramfs: bool = False) -> subprocess.CompletedProcess[str]:
    """What a boot does: the key unloaded, then `unlock`; FROM_INITRAMFS: with the state
    directory as the initramfs holds it."""
    unload_key(host, DATASET)
    config = host.config_path
    if from_initramfs:
        config = host.root / "etc" / "initramfs-agent.toml"
        config.write_text(
            host.config_path.read_text().replace(
                f'state_directory = "{host.root}/state"',
                f'state_directory = "{host.root}/initramfs/state"',
            )
        )
    return subprocess.run(
        [str(AGENT_BIN), "-c", str(config), "unlock"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def assert_unlocks(host: AgentHost, from_initramfs: bool = False) -> None:
    result = boots(host, from_initramfs)
    assert result.returncode == 0, result.stderr
    assert host.zfs.keystatus(DATASET) == "available"


def waiting(server: KeyServer) -> list[str]:
    found: list[str] = json.loads(server.must("tls", "status", "--json"))["waiting"]
    return found


@pytest.mark.slow  # three daemons through a whole rollover: about 6 s
def test_three_hosts_one_offline_unlock_through_a_whole_rollover(
    keyserver: KeyServer, tmp_path: Path, daemons: Daemons
) -> None:
    keyserver.start()
    old_pin = keyserver.pin
    hosts = [rollover_host(keyserver, tmp_path, name) for name in ("web1", "web2", "db1")]
    web1, web2, offline = hosts
    running = {h.creds.name: daemons.start(h) for h in (web1, web2)}
    for daemon in running.values():
        daemon.expect_ready()
    assert not (web1.root / "state" / FILE_NAME).exists()  # nothing to learn yet

    new_pin = keyserver.must("tls", "next").strip()
    for host in (web1, web2):
        running[host.creds.name].wait_log("the initramfs holds the learned pins")
    wait_for(lambda: waiting(keyserver) == ["db1"])
    for host in hosts:
        assert_unlocks(host)  # the old key still serves everyone

    learned = json.loads((web1.root / "state" / FILE_NAME).read_text())
    assert list(learned["pins"]) == [new_pin]
    assert not (web1.root / "state" / STALE_MARK).exists()
    assert (web1.root / "state" / FILE_NAME).stat().st_mode & 0o777 == 0o644
    assert (web1.root / "initramfs.log").read_text() == "rebuilt\n"  # once, not per check-in
    assert old_pin in web1.config_path.read_text() and new_pin not in web1.config_path.read_text()

    code, _, err = keyserver.admin("tls", "activate")
    assert code == EX_TEMPFAIL and "db1" in err, err

    # db1 comes back: it learns the pin at its first check-in, before the switch.
    running["db1"] = daemons.start(offline)
    running["db1"].wait_log("the initramfs holds the learned pins")
    wait_for(lambda: waiting(keyserver) == [])
    assert keyserver.must("tls", "activate").strip() == new_pin

    # The workers switch within a second or so; every host keeps unlocking, now trusting
    # the new key by the pin it learned (agent.toml names only the old one).
    for host in hosts:
        wait_for(lambda h=host: boots(h).returncode == 0, timeout=15)
        assert_unlocks(host)
    for name, daemon in running.items():
        assert daemon.terminate() == 0, name
    for host in hosts:
        assert_unlocks(host, from_initramfs=True)  # the next boot's initramfs trusts it too

    # Without the learned pins, agent.toml's old pin alone is refused now: the switch
    # happened, and it is the learned pin that carried every host through it.
    (web1.root / "state" / FILE_NAME).unlink()
    result = boots(web1)
    assert result.returncode == errors.EX_NOPERM, result.stderr
    assert "presented an unpinned public key" in result.stderr


def test_a_failed_initramfs_rebuild_is_not_reported_as_holding_the_pin_and_is_retried(
    keyserver: KeyServer, tmp_path: Path, daemons: Daemons
) -> None:
    keyserver.start()
    host = rollover_host(keyserver, tmp_path, "stuck")
    script = host.root / "update-initramfs"
    working = script.read_text()
    script.write_text("#!/bin/sh\necho 'W: no space left on /boot' >&2\nexit 1\n")
    daemon = daemons.start(host)
    daemon.expect_ready()
    new_pin = keyserver.must("tls", "next").strip()
    daemon.wait_log(r"failed \(exit 1\): W: no space left on /boot; trying again", count=2)
    learned = json.loads((host.root / "state" / FILE_NAME).read_text())
    assert list(learned["pins"]) == [new_pin]
    assert (host.root / "state" / STALE_MARK).exists()
    assert waiting(keyserver) == ["stuck"]  # kept, but not in the initramfs: not reported
    code, _, err = keyserver.admin("tls", "activate")
    assert code == EX_TEMPFAIL and "stuck" in err

    script.write_text(working)  # space freed: the next check-in rebuilds and reports
    daemon.wait_log("the initramfs holds the learned pins")
    wait_for(lambda: waiting(keyserver) == [])
    assert daemon.terminate() == 0


def test_a_pin_file_others_may_write_is_refused(keyserver: KeyServer, tmp_path: Path) -> None:
    host = AgentHost.create(tmp_path, keyserver, "loose")
    state = host.root / "state"
    state.mkdir()
    pins = state / FILE_NAME
    pins.write_text('{"format": 1, "pins": {}}\n')
    pins.chmod(0o666)
    result = host.run("configcheck")
    assert result.returncode == errors.EX_CONFIG, result.stderr
    assert str(pins) in result.stderr and "others may change it" in result.stderr
    pins.chmod(0o644)
    pins.write_text('{"format": 1, "pins": {"not a pin": 1}}\n')
    result = host.run("configcheck")
    assert result.returncode == errors.EX_CONFIG and "not a pin file" in result.stderr
