"""The Python floor: the key server's own TLS settings and worker model, with no application.

A diagnostic baseline, not a product: pre-forked processes that each accept a
connection, complete the same mutual-TLS handshake as the key server (its
certificate, CA and SSLContext), read the request head and answer a fixed 64-byte
body. The gap between this and nginx is what Python's TLS and process model cost; the
gap between this and the key server is what releasing a key costs (HTTP reader,
rate limit, database, unsealing, the durable audit record).

    python -m bench.pyfloor DATA_DIR PORT WORKERS
"""

from __future__ import annotations

import os
import signal
import socket
import sys
from pathlib import Path

from zfs_unlock_server.config import Layout
from zfs_unlock_server.tlsctx import server_context

BODY = b"0123456789abcdef" * 4
RESPONSE = (
    b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n"
    b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(BODY), BODY)
)


def serve(listener: socket.socket, data_dir: Path) -> None:
    context = server_context(Layout(data_dir))
    while True:
        client, _ = listener.accept()
        client.settimeout(10)
        try:
            with context.wrap_socket(client, server_side=True) as tls:
                head = b""
                while b"\r\n\r\n" not in head and len(head) < 65536:
                    chunk = tls.recv(16384)
                    if not chunk:
                        break
                    head += chunk
                tls.sendall(RESPONSE)
        except OSError:
            client.close()


def main() -> None:
    data_dir, port, workers = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    listener = socket.create_server(("127.0.0.1", port), backlog=2048)
    children = []
    for _ in range(workers):
        pid = os.fork()
        if pid == 0:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            serve(listener, data_dir)
        children.append(pid)

    def stop(_signum: int, _frame: object) -> None:
        for child in children:
            os.kill(child, signal.SIGTERM)
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, stop)
    for _ in children:
        os.wait()


if __name__ == "__main__":
    main()
