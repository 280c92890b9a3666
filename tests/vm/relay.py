"""Relay one guest connection to a TCP port on 127.0.0.1.

QEMU user networking runs this once per guest connection, with the connection on
standard input and output (`guestfwd=tcp:ADDR:PORT-cmd:python3 relay.py PORT`). The
chardev form of guestfwd (`...-tcp:127.0.0.1:PORT`) carries only the first
connection of a boot, hence this.

Usage: python3 relay.py PORT
"""

from __future__ import annotations

import os
import selectors
import socket
import sys

CHUNK = 65536


def relay(guest: socket.socket, host: socket.socket) -> None:
    """Copy both ways until both sides have closed; pass half-closes on."""
    peers = {guest: host, host: guest}
    selector = selectors.DefaultSelector()
    for sock in peers:
        selector.register(sock, selectors.EVENT_READ)
    open_reads = 2
    while open_reads:
        for key, _ in selector.select():
            source: socket.socket = key.fileobj  # type: ignore[assignment]
            try:
                data = source.recv(CHUNK)
            except OSError:
                data = b""
            if data:
                peers[source].sendall(data)
                continue
            selector.unregister(source)
            open_reads -= 1
            try:
                peers[source].shutdown(socket.SHUT_WR)
            except OSError:
                return


def main() -> int:
    # Standard error is the guest's connection too: nothing may be written there.
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    port = int(sys.argv[1])
    guest = socket.socket(fileno=os.dup(0))
    try:
        host = socket.create_connection(("127.0.0.1", port), timeout=10)
    except OSError:
        return 1  # closing the guest's connection is the only way to say so
    host.settimeout(None)
    with guest, host:
        try:
            relay(guest, host)
        except OSError:
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
