"""The VM tier's switchable forwarder, on the host alone (no guest, fast)."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator

import pytest

from tests.vm.vm import Forwarder


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
