"""The VM tier's switchable forwarder, on the host alone (no guest, fast)."""

from __future__ import annotations

import json
import re
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.keyserver import SERVER_BIN, KeyServer, running
from tests.vm.vm import Forwarder, SimpleZfsImporter


@pytest.fixture
def echo_port() -> Iterator[int]:
    """A one-line echo server on 127.0.0.1 standing in for the key server."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.2)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            with conn, conn.makefile("rb") as reader:
                conn.sendall(reader.readline())

    thread = threading.Thread(target=serve)
    thread.start()
    yield listener.getsockname()[1]
    stop.set()
    thread.join()
    listener.close()


def ask(port: int, line: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(line)
        with sock.makefile("rb") as reader:
            return reader.readline()


def test_the_guest_switches_the_server_off_and_on(echo_port: int) -> None:
    with Forwarder(echo_port) as forwarder:
        assert ask(forwarder.port, b"hello\n") == b"hello\n"
        assert ask(forwarder.control_port, b"down\n") == b"ok\n"
        assert not forwarder.up
        with pytest.raises(ConnectionError):  # reset, as by a host that is gone
            ask(forwarder.port, b"hello\n")
        assert ask(forwarder.control_port, b"up\n") == b"ok\n"
        assert ask(forwarder.port, b"again\n") == b"again\n"
        assert ask(forwarder.control_port, b"sideways\n") == b"error\n"
        assert [e.split(" ", 1)[1] for e in forwarder.events] == [
            "down",
            "reset a connection (down)",
            "up",
        ]


def test_the_guest_asks_for_a_simplezfs_key(echo_port: int) -> None:
    """ "legacy POOL_GUID NAME" reaches the importer only with a valid GUID and name."""
    asked: list[tuple[str, str]] = []
    with Forwarder(echo_port, legacy=lambda pool, name: asked.append((pool, name))) as forwarder:
        assert ask(forwarder.control_port, b"legacy 42 kvm-100\n") == b"ok\n"
        assert ask(forwarder.control_port, b"legacy 042 kvm-100\n") == b"error\n"
        assert ask(forwarder.control_port, b"legacy 42 ../x\n") == b"error\n"
        assert ask(forwarder.control_port, b"legacy 42\n") == b"error\n"
    assert asked == [("42", "kvm-100")]
    with Forwarder(echo_port) as forwarder:  # no importer: refused
        assert ask(forwarder.control_port, b"legacy 42 kvm-100\n") == b"error\n"


def test_the_simplezfs_importer_uses_the_admin_command(tmp_path: Path) -> None:
    """The host imports a 32-hex-character raw key with `zfs-unlock-server import-simplezfs`;
    the server then serves it on the SimpleZFSKeySystem route, and the file is gone."""
    server = KeyServer(tmp_path / "keyserver")
    server.configure(simplezfs_route=True)
    host = server.add_host("legacyhost")
    workdir = tmp_path / "simplezfs"
    SimpleZfsImporter(SERVER_BIN, server.data_dir, host.machine_id, workdir)("42", "kvm-100")

    (key,) = json.loads(server.must("key", "list", "--json"))
    assert (key["legacy_name"], key["pool_guid"], key["keyformat"], key["state"]) == (
        "kvm-100",
        "42",
        "raw",
        "active",
    )
    assert list(workdir.iterdir()) == []  # the key file went after the import
    with running(server), server.session(host) as session:
        response = session.get(server.url(f"/{host.machine_id}/42/kvm-100"), timeout=10)
    assert response.status_code == 200
    assert re.fullmatch(rb"[0-9a-f]{32}", response.content)
