"""Hosts need none of the key server's dependencies; the server has its own import name.

Which package may import which is checked by import-linter's contracts in pyproject.toml.
"""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

from tests.keyserver import ROOT_ONLY, KeyServer
from tests.vm.vm import ZFS_LINES

ROOT = Path(__file__).parents[1]

# Importing with gunicorn blocked, as on a host without the "server" extra.
WITHOUT_GUNICORN = "import sys; sys.modules['gunicorn'] = None\n"


def run_python(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", WITHOUT_GUNICORN + code],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_server_admin_works_without_gunicorn_and_serve_says_what_is_missing(
    keyserver: KeyServer,
) -> None:
    data = str(keyserver.data_dir)
    listed = run_python(
        f"from zfs_unlock_server.cli import main; sys.exit(main(['--data-dir', {data!r},"
        " 'host', 'list']))"
    )
    assert listed.returncode == 0, listed.stderr
    served = run_python(
        "from zfs_unlock_server.cli import main;"
        f" sys.exit(main(['--data-dir', {data!r}, 'serve', *{ROOT_ONLY!r}]))"
    )
    assert served.returncode == 78
    assert "gunicorn" in served.stderr and "[server]" in served.stderr


def test_distribution_layout() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert project["tool"]["setuptools"]["package-dir"]["zfs_unlock_server"] == "server"
    assert "server" not in project["tool"]["setuptools"]["packages"]
    assert not any("gunicorn" in dep for dep in project["project"]["dependencies"])
    scripts = project["project"]["scripts"]
    assert set(scripts) == {"zfs-unlock-agent", "zfs-unlock-server"}


def test_the_agent_depends_on_the_openzfs_range_the_vm_tier_proves() -> None:
    """debian/control's zfsutils-linux range is what the real-OpenZFS tiers run: from
    Debian 12's own 2.1.11 up to the newest line tested (ZFS_LINES), not past it."""
    control = (ROOT / "debian" / "control").read_text()
    agent = next(s for s in control.split("\n\n") if s.startswith("Package: zfs-unlock-agent\n"))
    depends = agent.split("\nDepends:", 1)[1].split("\nRecommends:", 1)[0]
    zfs = sorted(w.strip(" ,") for w in depends.splitlines() if "zfsutils-linux" in w)
    newest = max(ZFS_LINES, key=lambda line: tuple(map(int, line.split("."))))
    major, minor = newest.split(".")
    assert min(ZFS_LINES) == "2.1"
    assert zfs == [f"zfsutils-linux (<< {major}.{int(minor) + 1}~)", "zfsutils-linux (>= 2.1.11)"]
