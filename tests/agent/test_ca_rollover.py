"""A rollover of the CA that signs host certificates, with two hosts, against the real
server and the real agent daemon (fake zfs; a stand-in for update-initramfs that copies
the certificate as the hooks do). `ca next` makes the servers trust both CAs and has each
check-in ask an old-CA host to renew; its daemon does at once, under the next CA. `ca
activate` waits for the host that was off, then retires the old CA: its certificates are
refused, and every host unlocks with its renewed one, from the initramfs too."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from cryptography import x509

from tests.agent.daemon_harness import Daemons
from tests.agent.harness import AgentHost
from tests.agent.test_renew import renewing_host, unlock
from tests.keyserver import KeyServer, wait_for
from zfs_unlock_agent import errors
from zfs_unlock_server.errors import EX_TEMPFAIL


def issuer(host: AgentHost, cert: Path | None = None) -> str:
    found = x509.load_pem_x509_certificate((cert or host.creds.cert).read_bytes())
    return found.issuer.rfc4514_string()


def waiting(server: KeyServer) -> list[str]:
    found: list[str] = json.loads(server.must("ca", "status", "--json"))["waiting"]
    return found


@pytest.mark.slow  # daemons through a whole rollover: about 10 s
def test_hosts_renew_under_the_next_ca_and_the_old_one_retires_without_a_lockout(
    keyserver: KeyServer, tmp_path: Path, daemons: Daemons
) -> None:
    keyserver.start()
    online = renewing_host(keyserver, tmp_path, "app1", checkin_interval=1)
    away = renewing_host(keyserver, tmp_path, "app2", checkin_interval=1)
    old_issuer = issuer(online)
    before_rollover = away.creds.cert.read_bytes()
    first = daemons.start(online)
    first.expect_ready()

    next_id = keyserver.must("ca", "next").strip()
    first.wait_log("client certificate renewed")
    assert issuer(online) != old_issuer and issuer(online).startswith("CN=zfs-unlock host CA ")
    assert issuer(online, online.root / "initramfs" / "client.crt") == issuer(online)
    wait_for(lambda: waiting(keyserver) == ["app2"])
    assert unlock(away).returncode == 0  # the old CA is still trusted meanwhile
    assert unlock(online).returncode == 0

    code, _, err = keyserver.admin("ca", "activate")
    assert code == EX_TEMPFAIL and "app2" in err, err

    second = daemons.start(away)  # back: renewed at its first check-in
    second.wait_log("client certificate renewed")
    wait_for(lambda: waiting(keyserver) == [])
    assert keyserver.must("ca", "activate").strip() == next_id
    for daemon in (first, second):
        assert daemon.terminate() == 0
    for host in (online, away):
        wait_for(lambda h=host: unlock(h).returncode == 0, timeout=15)
        assert (host.root / "initramfs" / "client.crt").read_bytes() == host.creds.cert.read_bytes()

    # A certificate of the retired CA is refused by the TLS layer now.
    assert issuer_of(keyserver.add_host("late").cert) == issuer(online)  # the one CA left
    away.creds.cert.write_bytes(before_rollover)
    refused = unlock(away)
    assert refused.returncode == errors.EX_TEMPFAIL, refused.stderr
    assert "refused this host's client certificate (tlsv1_alert_unknown_ca)" in refused.stderr


def issuer_of(cert: Path) -> str:
    return x509.load_pem_x509_certificate(cert.read_bytes()).issuer.rfc4514_string()
