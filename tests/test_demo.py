"""The demo's host-side pieces (scripts/demo.py), without ZFS or a VM: the admin channel
runs only what the demo's admin does, and the screen renders the ZFS host's lines.
The whole demo is `bash scripts/demo.sh` (real ZFS here, or in the test tier's VM)."""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from scripts.demo import AdminChannel, Screen, server_env
from scripts.demo_zfs_host import CHECKS, MARKER
from tests.keyserver import KeyServer


def ask(port: int, request: dict[str, Any]) -> dict[str, Any]:
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(json.dumps(request).encode() + b"\n")
        with sock.makefile("rb") as reader:
            answer: dict[str, Any] = json.loads(reader.readline())
            return answer


@pytest.fixture
def admin(keyserver: KeyServer, tmp_path: Path) -> Iterator[AdminChannel]:
    with AdminChannel(tmp_path / "exchange", server_env(keyserver.data_dir)) as channel:
        yield channel


@pytest.mark.parametrize(
    ("argv", "refusal"),
    [
        (["zfs-unlock-server", "key", "delete", "k-1"], "not something"),
        (["zfs-unlock-server", "import-simplezfs", "x.db"], "not something"),
        (["sh", "-c", "id"], "not something"),
        (["zfs-unlock-server", "--data-dir", "/", "key", "list"], "not something"),
        (["zfs-unlock-server", "key", "list", "--data-dir=/"], "--data-dir"),
        (
            ["zfs-unlock-server", "host", "add", "h", "--csr", "../x.csr", "--cert-out", "c"],
            "--csr",
        ),
        (["zfs-unlock-server", "host", "add", "h", "--issue-key", "d"], "--issue-key"),
    ],
)
def test_the_admin_channel_runs_only_what_the_demo_admin_does(
    admin: AdminChannel, argv: list[str], refusal: str
) -> None:
    answer = ask(admin.port, {"argv": argv})
    assert refusal in answer["error"]


def test_the_admin_enrols_a_host_from_its_csr_and_sends_the_certificate_back(
    admin: AdminChannel, keyserver: KeyServer
) -> None:
    from zfs_unlock_common.csr import new_key_and_csr

    _, csr = new_key_and_csr("web1")
    # As setup prints it: "... --csr web1.csr > web1.crt", the redirection the admin's shell's.
    line = "host add web1 --machine-id " + "ab" * 16 + " --csr web1.csr"
    answer = ask(
        admin.port,
        {
            "argv": ["zfs-unlock-server", *line.split()],
            "files": {"web1.csr": csr.decode()},
            "stdout": "web1.crt",
        },
    )
    assert answer["rc"] == 0, answer["output"]
    assert answer["argv"][-4:] == ["--allow-ip", "127.0.0.1/32", ">", "web1.crt"]
    assert answer["files"]["web1.crt"].startswith("-----BEGIN CERTIFICATE-----")
    refused = {"argv": ["zfs-unlock-server", *line.split()], "stdout": "../web1.crt"}
    assert "plain names" in ask(admin.port, refused)["error"]
    assert "web1" in keyserver.must("host", "list")
    assert ask(admin.port, {"argv": ["zfs-unlock-server", "audit", "--last", "1"]})["rc"] == 0
    assert "bad request" in ask(admin.port, {"argv": 3})["error"]


def test_the_screen_shows_marked_lines_and_hides_the_rest_of_a_console(
    capsys: pytest.CaptureFixture[str],
) -> None:
    screen = Screen(show_unmarked=False)
    for line in [
        "[    2.1] virtio_net: kernel noise\r",
        f"{MARKER} step The host does something",
        f"{MARKER} cmd host zfs-unlock-agent unlock",
        f"{MARKER} out zfs-unlock-agent: INFO: unlocked",
        f"{MARKER} check ok unlocked\texit 0, mounted",
        f"{MARKER} check BAD verify\texit 79",
        f"{MARKER} end 0",
    ]:
        screen.feed(line)
    shown = capsys.readouterr().out
    assert "kernel noise" not in shown
    assert screen.unmarked == ["[    2.1] virtio_net: kernel noise"]
    assert "==> 1. The host does something" in shown
    assert "    host# zfs-unlock-agent unlock" in shown
    assert "      zfs-unlock-agent: INFO: unlocked" in shown
    assert f"[ok] {CHECKS['unlocked']}: exit 0, mounted" in shown
    assert screen.checks["verify"] == (False, "exit 79")
    assert screen.host_rc == 0
    assert not screen.summary(1.0, "test")  # most checks never reported, one BAD
    summary = capsys.readouterr().out
    assert "not reached" in summary
    assert "demo FAILED" in summary
