"""`identity` makes the host's key pair once and tells the admin how to enroll it; logs suit journald."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
from pathlib import Path

from cryptography import x509

from tests.agent.harness import AGENT_BIN, AgentHost
from tests.certs import spki
from tests.keyserver import KeyServer, run_admin_line


def test_identity_creates_a_private_key_and_csr_once(
    shared_keyserver: KeyServer, tmp_path: Path
) -> None:
    host = AgentHost.create(tmp_path, shared_keyserver, "identity-host")
    pool_guid = host.zfs.add_pool("tank")
    fresh_key = tmp_path / "fresh" / "client.key"
    host.write_config(extra="")
    text = host.config_path.read_text().replace(str(host.creds.key), str(fresh_key))
    host.config_path.write_text(text)

    first = host.run("identity", "--name", "web7")
    assert first.returncode == 0, first.stderr
    assert stat.S_IMODE(os.stat(fresh_key).st_mode) == 0o400
    csr = x509.load_pem_x509_csr(fresh_key.with_suffix(".csr").read_bytes())
    assert csr.subject.rfc4514_string() == "CN=web7" and csr.is_signature_valid
    command = first.stdout.strip()
    assert command.startswith("zfs-unlock-server host add web7 ")
    assert f"--machine-id {host.creds.machine_id}" in command
    assert f"--pool {pool_guid}" in command

    key_before = fresh_key.read_bytes()
    again = host.run("identity", "--name", "web7")
    assert again.returncode == 0 and "not replaced" in again.stderr
    assert fresh_key.read_bytes() == key_before

    # The printed command, run by a shell as written in the directory the admin copied
    # the CSR to, enrolls the host (CSR in, certificate out through the shell); the
    # harness had enrolled this machine-id under another name already.
    shared_keyserver.must("host", "remove", "identity-host")
    assert command.endswith(" --csr web7.csr > web7.crt")
    shutil.copy(fresh_key.with_suffix(".csr"), tmp_path / "web7.csr")
    enrolled = run_admin_line(shared_keyserver, command, tmp_path)
    assert enrolled.returncode == 0, enrolled.stderr
    cert = x509.load_pem_x509_certificate((tmp_path / "web7.crt").read_bytes())
    assert spki(cert.public_key()) == spki(csr.public_key())


def test_logs_carry_journald_priorities_under_systemd(
    shared_keyserver: KeyServer, tmp_path: Path
) -> None:
    host = AgentHost.create(tmp_path, shared_keyserver, "journal-host")
    host.encrypted_dataset("tank/j", host.zfs.add_pool("tank"))
    env = {**os.environ, "JOURNAL_STREAM": "8:1234"}
    result = subprocess.run(
        [str(AGENT_BIN), "-c", str(host.config_path), "unlock"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr.startswith("<6>tank/j: unlocked")
    plain = host.run("--dataset", "tank/j")
    assert plain.stderr.startswith("zfs-unlock-agent: INFO: tank/j: available")


def test_agent_process_is_not_dumpable() -> None:
    code = (
        "from zfs_unlock_agent.cli import harden_process; harden_process(); "
        "import resource; print(resource.getrlimit(resource.RLIMIT_CORE)); "
        "import ctypes; print('dumpable', ctypes.CDLL(None).prctl(3, 0, 0, 0, 0))"  # PR_GET_DUMPABLE
    )
    result = subprocess.run(
        [str(AGENT_BIN.with_name("python")), "-c", code],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    assert "(0, 0)" in result.stdout
    assert "dumpable 0" in result.stdout
