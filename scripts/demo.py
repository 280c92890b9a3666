"""The main job, end to end on embedded defaults: start a key server, enrol a host, fetch a key.

Everything runs on this machine, on 127.0.0.1, in a temporary directory that is
removed afterwards. Key material is never printed: only a short fingerprint.
"""

from __future__ import annotations

import base64
import hashlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import requests

from zfs_unlock_agent import keyclient, pinning
from zfs_unlock_agent.identity import new_key_and_csr

BIN = Path(sys.executable).parent
SERVER = str(BIN / "zfs-unlock-server")
DEMO_POOL_GUID = "9461416713813557291"
DEMO_DATASET_GUID = "1234567890123456789"
DEMO_DATASET = "tank/secret"


def step(text: str) -> None:
    print(f"\n\033[1m==> {text}\033[0m", flush=True)


def show(command: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
    printable = " ".join(c if c != SERVER else "zfs-unlock-server" for c in command)
    print(f"    $ {printable}", flush=True)
    result = subprocess.run(command, check=True, text=True, capture_output=True, **kwargs)
    for line in (result.stdout + result.stderr).splitlines():
        print(f"      {line}")
    return result


def fingerprint(material: bytes) -> str:
    return hashlib.sha256(material).hexdigest()[:16]


def machine_id() -> str:
    try:
        value = Path("/etc/machine-id").read_text().strip()
    except OSError:
        value = ""
    return value if re.fullmatch(r"[0-9a-f]{32}", value) else os.urandom(16).hex()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def start_server(data_dir: Path, port: int, log: Path) -> subprocess.Popen[bytes]:
    notify_path = data_dir.parent / "notify.sock"
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(notify_path))
    notify.settimeout(30)
    command = [SERVER, "--data-dir", str(data_dir), "serve", "--listen", f"127.0.0.1:{port}"]
    print(f"    $ zfs-unlock-server --data-dir {data_dir} serve --listen 127.0.0.1:{port} &")
    with log.open("wb") as out:
        process = subprocess.Popen(
            command, stdout=out, stderr=out, env={**os.environ, "NOTIFY_SOCKET": str(notify_path)}
        )
    try:
        notify.recv(1024)  # READY=1, the same signal systemd waits for
    finally:
        notify.close()
    print(f"      ready: HTTPS with client certificates on 127.0.0.1:{port}")
    return process


def main() -> int:
    work = Path(tempfile.mkdtemp(prefix="zfs-unlock-demo-"))
    server: subprocess.Popen[bytes] | None = None
    summary: list[tuple[str, str, bool]] = []  # (what, observed, as expected)
    started = time.monotonic()
    try:
        data_dir, host_dir = work / "server", work / "host"
        host_dir.mkdir()

        step("1. Key server: create its data directory (master key, CA, TLS certificate, SQLite)")
        pin = show([SERVER, "--data-dir", str(data_dir), "init", "--server-name", "127.0.0.1"])
        server_pin = pin.stdout.strip()

        step("2. Host: make its own key pair and certificate request (the private key stays here)")
        key_pem, csr_pem = new_key_and_csr("demo-host")
        (host_dir / "client.key").write_bytes(key_pem)
        (host_dir / "client.key").chmod(0o400)
        (host_dir / "client.csr").write_bytes(csr_pem)
        mid = machine_id()
        print(f"      machine-id {mid}; wrote {host_dir}/client.key (0400) and client.csr")

        step("3. Admin: enrol the host (sign its CSR, bind it to its machine-id and pool)")
        show(
            [
                SERVER,
                "--data-dir",
                str(data_dir),
                "host",
                "add",
                "demo-host",
                "--machine-id",
                mid,
                "--pool",
                DEMO_POOL_GUID,
                "--allow-ip",
                "127.0.0.0/8",
                "--csr",
                str(host_dir / "client.csr"),
                "--cert-out",
                str(host_dir / "client.crt"),
            ]
        )

        step("4. Start the key server")
        port = free_port()
        server = start_server(data_dir, port, work / "server.log")
        url = f"https://127.0.0.1:{port}"

        session = keyclient.pinned_session(
            [pinning.parse_pin(server_pin)], host_dir / "client.crt", host_dir / "client.key"
        )

        def post(path: str, body: dict[str, Any]) -> requests.Response:
            return session.post(url + path, json=body, timeout=10, allow_redirects=False)

        step(f"5. Host: enrol a key for {DEMO_DATASET} (explicit POST; a GET never creates keys)")
        dataset = {"pool_guid": DEMO_POOL_GUID, "dataset_guid": DEMO_DATASET_GUID}
        enrolled = post(
            "/v1/keys", {"machine_id": mid, **dataset, "dataset": DEMO_DATASET, "keyformat": "raw"}
        )
        enrolled.raise_for_status()
        body = enrolled.json()
        key = base64.b64decode(body["key"])
        print(
            f"      {enrolled.status_code}: key {body['key_id']} ({len(key)} bytes, "
            f"sha256 {fingerprint(key)}…), state {body['state']}"
        )
        activated = post(
            "/v1/keys/activate", {"machine_id": mid, **dataset, "key_id": body["key_id"]}
        )
        activated.raise_for_status()
        print(
            f"      {activated.status_code}: host proved the key (zfs load-key -n); "
            f"state {activated.json()['state']}"
        )

        step("6. Host at boot: fetch its keys in one batch request, over pinned mutual TLS")
        released = post("/v1/keys/release", {"machine_id": mid, "datasets": [dataset]})
        released.raise_for_status()
        fetched = base64.b64decode(released.json()["keys"][0]["key"])
        same = fetched == key
        print(
            f"      {released.status_code}: got {len(fetched)} bytes, sha256 "
            f"{fingerprint(fetched)}…, identical to the enrolled key: {same}"
        )
        summary.append(("key released to the enrolled host", "yes" if same else "NO", same))

        step("7. The same request claiming another machine-id is refused, and says nothing more")
        refused = post("/v1/keys/release", {"machine_id": "0" * 32, "datasets": [dataset]})
        print(f"      {refused.status_code}: {refused.text}")
        summary.append(
            ("a wrong machine-id", f"HTTP {refused.status_code}", refused.status_code == 403)
        )

        step("8. Admin revokes the key: the next request is refused, no restart needed")
        show([SERVER, "--data-dir", str(data_dir), "key", "revoke", body["key_id"]])
        after = post("/v1/keys/release", {"machine_id": mid, "datasets": [dataset]})
        print(f"      {after.status_code}: denied {after.json()['denied']}")
        count = len(after.json()["keys"])
        summary.append(("keys released after revoke", str(count), count == 0))

        step("9. The audit log says who asked for what and why each answer was given")
        show([SERVER, "--data-dir", str(data_dir), "audit", "--last", "6"])

        step("10. What is on the server's disk: the database holds only sealed keys")
        db_bytes = (data_dir / "keys.db").read_bytes()
        wal = data_dir / "keys.db-wal"
        db_bytes += wal.read_bytes() if wal.exists() else b""
        leaked = key in db_bytes or key.hex().encode() in db_bytes
        print(f"      key bytes found in keys.db and its WAL: {'YES' if leaked else 'no'}")
        summary.append(("key readable in the database file", "YES" if leaked else "no", not leaked))
        session.close()
    finally:
        if server is not None:
            server.send_signal(signal.SIGTERM)
            server.wait(timeout=30)
        shutil.rmtree(work, ignore_errors=True)

    step("Summary")
    for what, observed, expected in summary:
        print(f"    {'ok ' if expected else 'BAD'} {what}: {observed}")
    ok = len(summary) == 4 and all(expected for _, _, expected in summary)
    elapsed = time.monotonic() - started
    print(f"\n    demo {'succeeded' if ok else 'FAILED'} in {elapsed:.1f} s")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
