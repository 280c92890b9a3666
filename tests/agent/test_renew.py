"""`zfs-unlock-agent renew` and the daemon's own renewal, against the real server (fake
zfs; a stand-in for update-initramfs that copies what the real hooks copy): the same key,
a new certificate, the initramfs rebuilt before the new certificate is used, the old one
put back when that fails, and a certificate that expired while the host was off named as
such, with the way back."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from tests.agent.daemon_harness import Daemons
from tests.agent.harness import AgentHost
from tests.agent.test_daemon import new_host
from tests.agent.test_enroll import unload_key
from tests.faketime import faketime_env
from tests.keyserver import KeyServer, wait_for
from zfs_unlock_agent import errors
from zfs_unlock_agent.initramfs import STALE_MARK

DATASET = "tank/data"


def fake_update_initramfs(host: AgentHost, fail: bool = False) -> list[str]:
    """Copies what the hooks copy (the client certificate here) into ROOT/initramfs."""
    script = host.root / "update-initramfs"
    body = (
        "echo 'E: /boot is read-only' >&2\nexit 1\n"
        if fail
        else f'mkdir -p "{host.root}/initramfs"\ncp "{host.creds.cert}" "{host.root}/initramfs/"\n'
    )
    script.write_text(f'#!/bin/sh\nset -e\n{body}echo rebuilt >> "{host.root}/initramfs.log"\n')
    script.chmod(0o755)
    return [str(script)]


def renewing_host(
    server: KeyServer, tmp_path: Path, name: str, fail: bool = False, **daemon: object
) -> AgentHost:
    root = tmp_path / name
    root.mkdir()
    host, pool = new_host(
        server, root, name, {"initramfs_update": [str(root / "update-initramfs")], **daemon}
    )
    fake_update_initramfs(host, fail)
    host.encrypted_dataset(DATASET, pool)
    return host


def checkins(server: KeyServer, name: str) -> int:
    return sum(
        1 for r in server.audit_records() if r.get("event") == "checkin" and r.get("host") == name
    )


def unlock(host: AgentHost, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    unload_key(host, DATASET)
    return host.run("unlock", env=env)


def test_renew_replaces_the_certificate_for_the_same_key_and_rebuilds_the_initramfs(
    keyserver: KeyServer, tmp_path: Path
) -> None:
    keyserver.start()
    host = renewing_host(keyserver, tmp_path, "web1")
    old = host.creds.cert.read_bytes()
    key = host.creds.key.read_bytes()
    result = host.run("renew")
    assert result.returncode == 0, result.stderr
    assert "renewed, valid until" in result.stdout
    new = host.creds.cert.read_bytes()
    assert new != old and host.creds.key.read_bytes() == key
    assert (host.root / "initramfs" / "client.crt").read_bytes() == new  # before first use
    assert not (host.root / "state" / STALE_MARK).exists()
    assert unlock(host).returncode == 0  # the new certificate's first use ends the old one
    saved = host.root / "old.crt"
    saved.write_bytes(old)
    shutil.copy(saved, host.creds.cert)
    refused = unlock(host)
    assert refused.returncode == errors.EX_NOPERM, refused.stderr


def test_a_failed_initramfs_rebuild_puts_the_old_certificate_back(
    keyserver: KeyServer, tmp_path: Path
) -> None:
    keyserver.start()
    host = renewing_host(keyserver, tmp_path, "web2", fail=True)
    old = host.creds.cert.read_bytes()
    result = host.run("renew")
    assert result.returncode != 0
    assert "/boot is read-only" in result.stderr
    assert host.creds.cert.read_bytes() == old  # still valid: the new one was never used
    assert (host.root / "state" / STALE_MARK).exists()
    assert unlock(host).returncode == 0


def test_the_daemon_renews_at_two_thirds_of_the_lifetime(
    keyserver: KeyServer, tmp_path: Path, daemons: Daemons
) -> None:
    """Host certificates live five years: 3.4 years on, the daemon renews at its check-in
    (only the daemon's clock is moved; the server's is today's)."""
    keyserver.start()
    host = renewing_host(keyserver, tmp_path, "db1", checkin_interval=1)
    old = host.creds.cert.read_bytes()
    young = daemons.start(host, env=faketime_env("+1000d", sleeps=True))
    young.expect_ready()
    wait_for(lambda: checkins(keyserver, "db1") >= 2)  # the second after the first's work
    assert young.terminate() == 0
    assert host.creds.cert.read_bytes() == old  # 1000 days: not yet due
    daemon = daemons.start(host, env=faketime_env("+1250d", sleeps=True))
    daemon.wait_log(r"client certificate renewed, valid until \d{4}-\d\d-\d\d")
    assert daemon.terminate() == 0
    assert host.creds.cert.read_bytes() != old
    assert (host.root / "initramfs" / "client.crt").read_bytes() == host.creds.cert.read_bytes()
    assert unlock(host).returncode == 0


def test_a_certificate_that_expired_while_the_host_was_off_is_named_with_the_way_back(
    keyserver: KeyServer, tmp_path: Path
) -> None:
    """Six years on (the server's and the host's clocks), the host certificate is past its
    five years: the server's TLS refuses it, and the agent says why and what to do."""
    keyserver.start()
    host = renewing_host(keyserver, tmp_path, "old1")
    keyserver.stop()
    keyserver.start(env=faketime_env("+2200d", sleeps=True))
    result = unlock(host, env=faketime_env("+2200d", sleeps=True))
    assert result.returncode == errors.EX_NOPERM, result.stderr
    assert f"client certificate {host.creds.cert} expired on" in result.stderr
    assert "zfs-unlock-server host cert old1 --csr old1.csr" in result.stderr
    assert "zfs-unlock-agent identity --name old1" in result.stderr
