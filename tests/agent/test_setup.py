"""`zfs-unlock-agent setup`: a host's first run, from nothing to a passing `check`."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
from pathlib import Path

from tests.agent.harness import AGENT_BIN
from tests.fakes import FakeZfs
from tests.keyserver import KeyServer, run_admin_line

BAD_PIN = "sha256//not-a-pin"


def agent(etc: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(AGENT_BIN), "-c", str(etc / "agent.toml"), *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def fresh_host(tmp_path: Path) -> tuple[Path, FakeZfs]:
    """An empty configuration directory, and a host whose zfs is the fake, with a pool.
    The fake and the machine-id are named where setup looks for them: in PATH and in
    the configuration's default, which the test then points at its own file."""
    etc = tmp_path / "etc" / "zfs-unlock-agent"
    zfs = FakeZfs(tmp_path / "zfs")
    zfs.add_pool("tank")
    return etc, zfs


def setup_args(server: KeyServer, *extra: str) -> list[str]:
    return ["setup", "--server", server.url(""), "--pin", server.pin, "--name", "web9", *extra]


def test_setup_writes_the_config_and_identity_and_the_printed_line_enrolls_the_host(
    shared_keyserver: KeyServer, tmp_path: Path
) -> None:
    etc, zfs = fresh_host(tmp_path)
    result = agent(etc, *setup_args(shared_keyserver))
    assert result.returncode == 0, result.stderr
    config = etc / "agent.toml"
    assert stat.S_IMODE(config.stat().st_mode) == 0o644
    assert stat.S_IMODE((etc / "client.key").stat().st_mode) == 0o400
    assert (etc / "client.csr").is_file()
    assert f'url = "{shared_keyserver.url("")}"' in config.read_text()
    assert f'pins = ["{shared_keyserver.pin}"]' in config.read_text()
    assert f"# wrote {config} (1 server(s))" in result.stderr
    assert f"copy {etc}/client.csr to the key server as web9.csr" in result.stderr
    assert f"copy web9.crt back here as {etc}/client.crt" in result.stderr
    line = result.stdout.strip()
    assert line.startswith("zfs-unlock-server host add web9 --machine-id ")
    assert line.endswith(" --csr web9.csr > web9.crt")

    # The machine-id the test host has, then the admin's side, as the steps say.
    machine_id = line.split("--machine-id ")[1].split()[0]
    admin_dir = tmp_path / "admin"
    admin_dir.mkdir()
    shutil.copy(etc / "client.csr", admin_dir / "web9.csr")
    enrolled = run_admin_line(shared_keyserver, line, admin_dir)
    assert enrolled.returncode == 0, enrolled.stderr
    shutil.copy(admin_dir / "web9.crt", etc / "client.crt")
    (tmp_path / "machine-id").write_text(machine_id + "\n")
    config.write_text(
        f'machine_id_file = "{tmp_path}/machine-id"\n{config.read_text()}'
        f'[zfs]\nzfs = "{zfs.zfs}"\nzpool = "{zfs.zpool}"\n'
    )
    check = agent(etc, "check")
    assert check.returncode == 0, check.stdout + check.stderr
    assert "ok    enrolled as web9, enabled" in check.stdout


def test_setup_never_replaces_a_config_unless_forced(
    shared_keyserver: KeyServer, tmp_path: Path
) -> None:
    etc, _ = fresh_host(tmp_path)
    etc.mkdir(parents=True)
    config = etc / "agent.toml"
    config.write_text("# the admin's own\n")
    refused = agent(etc, *setup_args(shared_keyserver))
    assert refused.returncode == 73
    assert f"{config} exists; not replaced (--force replaces it)" in refused.stderr
    assert config.read_text() == "# the admin's own\n"
    assert sorted(p.name for p in etc.iterdir()) == ["agent.toml"]  # no key, no temporary

    forced = agent(etc, *setup_args(shared_keyserver, "--force"))
    assert forced.returncode == 0, forced.stderr
    assert "[[server]]" in config.read_text()
    key = (etc / "client.key").read_bytes()
    again = agent(etc, *setup_args(shared_keyserver, "--force"))
    assert again.returncode == 0 and "exists; not replaced" in again.stderr
    assert (etc / "client.key").read_bytes() == key  # the identity is never replaced


def test_setup_takes_several_servers_in_order(shared_keyserver: KeyServer, tmp_path: Path) -> None:
    etc, _ = fresh_host(tmp_path)
    second = "sha256//" + "B" * 43 + "="
    result = agent(
        etc,
        *setup_args(shared_keyserver),
        "--server",
        "https://keys2.example.net:8443",
        "--pin",
        second,
    )
    assert result.returncode == 0, result.stderr
    text = (etc / "agent.toml").read_text()
    assert text.index(shared_keyserver.url("")) < text.index("https://keys2.example.net:8443")
    assert f'pins = ["{second}"]' in text


def test_setup_with_bad_input_says_why_and_writes_nothing(
    shared_keyserver: KeyServer, tmp_path: Path
) -> None:
    etc, _ = fresh_host(tmp_path)
    cases = {
        ("--server", shared_keyserver.url(""), "--pin", BAD_PIN): "not-a-pin",
        ("--server", "http://keys.example.net", "--pin", shared_keyserver.pin): "https://",
        (
            "--server",
            shared_keyserver.url(""),
            "--server",
            "https://b.example",
            "--pin",
            shared_keyserver.pin,
        ): ("give one --pin for each --server"),
    }
    for args, words in cases.items():
        result = agent(etc, "setup", *args)
        assert result.returncode == 64, (args, result.stderr)
        assert words in result.stderr, (args, result.stderr)
        assert not etc.exists() or not any(etc.iterdir()), args
    missing = agent(etc, "setup", "--pin", shared_keyserver.pin)
    assert missing.returncode == 64 and "--server" in missing.stderr


def test_identity_without_a_config_says_to_run_setup(tmp_path: Path) -> None:
    result = agent(tmp_path / "nowhere", "identity")
    assert result.returncode == 78
    assert "missing" in result.stderr and "zfs-unlock-agent setup" in result.stderr
    assert not os.path.exists(tmp_path / "nowhere")
