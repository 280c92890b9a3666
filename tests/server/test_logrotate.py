"""The Debian package's logrotate configuration, run by Debian's logrotate against a
serving key server's audit log: no record is lost, the server carries on in a new file."""

from __future__ import annotations

import gzip
import json
import shutil
import subprocess
import time
from pathlib import Path

from tests.keyserver import KeyServer, enroll, release

CONFIG = Path(__file__).parents[2] / "debian" / "zfs-unlock-server.logrotate"
POOL = "7777777777777777777"


def logrotate(config: Path, state: Path, *options: str) -> subprocess.CompletedProcess[str]:
    binary = shutil.which("logrotate") or "/usr/sbin/logrotate"
    assert Path(binary).exists(), "logrotate is missing: scripts/test.sh installs it"
    return subprocess.run(
        [binary, *options, "-s", str(state), str(config)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_the_shipped_configuration_is_valid(tmp_path: Path) -> None:
    """As root: the package's system user is not on this machine (tests/deb checks the
    installed file with it)."""
    config = tmp_path / "zfs-unlock-server"
    config.write_text(CONFIG.read_text().replace("su zfs-unlock zfs-unlock", "su root root"))
    checked = logrotate(config, tmp_path / "state", "-d")
    assert checked.returncode == 0, checked.stderr
    assert "error" not in checked.stderr.lower(), checked.stderr
    assert "su zfs-unlock zfs-unlock" in CONFIG.read_text()


def test_a_rotation_loses_no_record_and_the_server_carries_on_in_a_new_file(
    keyserver: KeyServer, tmp_path: Path
) -> None:
    log = keyserver.data_dir / "audit.log"
    # The shipped file, for this data directory, run as root: the test's files are root's.
    config = tmp_path / "zfs-unlock-server"
    text = CONFIG.read_text().replace("/var/lib/zfs-unlock-server", str(keyserver.data_dir))
    config.write_text(text.replace("su zfs-unlock zfs-unlock", "su root root"))
    config.chmod(0o644)
    host = keyserver.add_host("rotated")
    keyserver.start(workers=2)
    with keyserver.session(host) as session:
        assert enroll(session, keyserver, host, POOL, "1").status_code == 201
    before = log.read_bytes().splitlines()

    for _ in range(2):  # rotated, then rotated again: the first one is compressed then
        time.sleep(1.1)  # each rotated file is named by the second it was rotated in
        rotated = logrotate(config, tmp_path / "state", "-f")
        assert rotated.returncode == 0, rotated.stderr
        with keyserver.session(host) as session:
            assert release(session, keyserver, host, POOL, "1").status_code == 200
    keyserver.stop()

    old = sorted(keyserver.data_dir.glob("audit.log-*"))
    assert len(old) == 2, old
    compressed = [p for p in old if p.suffix == ".gz"]
    assert len(compressed) == 1  # delaycompress: the newest old file stays plain
    lines = gzip.decompress(compressed[0].read_bytes()).splitlines()
    lines += next(p for p in old if p.suffix != ".gz").read_bytes().splitlines()
    lines += log.read_bytes().splitlines()
    assert lines[: len(before)] == before
    events = [json.loads(line)["event"] for line in lines]
    assert events.count("release") == 2 and events.count("enroll") == 1
    assert log.stat().st_mode & 0o777 == 0o600  # made by the server, not by logrotate
