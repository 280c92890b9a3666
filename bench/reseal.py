"""Master key rotation: how long re-sealing a fleet's keys takes, and what it costs the
releases made meanwhile, against the same server with no rotation, in the same run.

Rotations of one data directory (SQLite) holding KEYS keys, with the server running.
The first runs alone and times the re-seal (from the new key's publication to the last
value re-sealed, as `master-key rotate` reports them). Then ROUNDS pairs (one in the smoke
run): a window of load with no rotation, and the same load over a window as long as that
re-seal, started when a rotation publishes its new key. The re-seal is short, so the
windows are; the pairs add them up.
"""

from __future__ import annotations

import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from bench import common, loadgen
from zfs_unlock_server import admin
from zfs_unlock_server.sealing import KeyContext
from zfs_unlock_server.service import generate_material, new_key_id
from zfs_unlock_server.store import KeyRecord

CONCURRENCY = 8
ROUNDS = 5  # a full run's; the smoke run makes one
SETTLE = "2"  # the server is busy: its workers look at the ring every second
LIMITS = {"per_certificate_burst": 1e6, "per_certificate_rate": 1e6}


@dataclass(frozen=True)
class ResealResults:
    keys: int
    concurrency: int
    reseal_alone: float  # seconds, the first rotation
    reseal_loaded: list[float]  # seconds, each rotation under load
    window: float  # seconds of each load window
    rounds: int
    idle_rate: float  # releases/s, no rotation
    during_rate: float  # releases/s while rotations re-seal
    during_failed: int

    @property
    def vs_idle(self) -> float:
        return common.ratio(self.during_rate, self.idle_rate)


def fill(server: common.KeyServer, count: int) -> None:
    """COUNT active keys of one more host, sealed and inserted in bulk."""
    ops = admin.Admin.open(server.data)
    try:
        host, _ = ops.add_host(
            "fleet", common.machine_id_for("fleet"), [], [], None, None, server.hosts_dir / "fleet"
        )
        sealer = ops.sealer()
        for start in range(0, count, 1000):
            records = []
            for n in range(start, min(count, start + 1000)):
                key_id = new_key_id()
                context = KeyContext(host.name, "1", str(10_000 + n), "", key_id, "raw")
                records.append(
                    KeyRecord(
                        key_id=key_id,
                        host_id=host.id,
                        host=host.name,
                        pool_guid="1",
                        dataset_guid=str(10_000 + n),
                        legacy_name="",
                        dataset=f"tank/d{n}",
                        keyformat="raw",
                        state="active",
                        origin="generated",
                        sealed=sealer.seal(generate_material("raw"), context),
                        created_at=0,
                        updated_at=0,
                    )
                )
            ops.store.insert_keys(records)
    finally:
        ops.close()


@dataclass
class Rotation:
    """`master-key rotate` running, with when it published and when it finished re-sealing."""

    process: subprocess.Popen[str]
    published: threading.Event
    times: dict[str, float]

    @classmethod
    def start(cls, server: common.KeyServer) -> Rotation:
        process = subprocess.Popen(
            [
                *(str(common.SERVER_BIN), "--data-dir", str(server.data)),
                *("master-key", "rotate", "--settle", SETTLE),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        rotation = cls(process, threading.Event(), {})
        threading.Thread(target=rotation._follow, daemon=True).start()
        return rotation

    def _follow(self) -> None:
        for line in self.process.stderr or ():
            if "published" in line:
                self.times["published"] = time.monotonic()
                self.published.set()
            elif line.startswith("re-sealed") and "resealed" not in self.times:
                self.times["resealed"] = time.monotonic()

    def finish(self) -> float:
        """Wait for the end; the seconds from publication to the last value re-sealed."""
        if self.process.wait(timeout=600) != 0:
            raise RuntimeError(f"master-key rotate failed ({self.process.returncode})")
        time.sleep(0.1)  # the reader thread takes the last lines
        return self.times["resealed"] - self.times["published"]


def run(work: Path, keys: int, rounds: int = ROUNDS) -> ResealResults:
    server = common.KeyServer(work / "reseal", rate_limits=LIMITS)
    host = server.add_hosts(["steady"])[0]
    fill(server, keys)
    request = work / "reseal.http"
    request.write_bytes(common.release_request(host))
    client = loadgen.Client(host.cert, host.key, common.pin_hex(server.pin))
    with server.serving() as serving:

        def load(warmup: float, window: float) -> loadgen.Run:
            args: list[str | Path | float | int] = [CONCURRENCY, warmup, window, request]
            args += [client.cert, client.key, client.pin_hex]
            return loadgen.run("steady", serving.port, args)

        alone = Rotation.start(server)
        reseal_alone = alone.finish()
        window = max(reseal_alone, 0.1)
        idle_ok = during_ok = failed = 0
        reseal_loaded = []
        for _ in range(rounds):
            idle_ok += int(load(0.3, window).output["ok"])
            loaded = Rotation.start(server)
            if not loaded.published.wait(timeout=60):
                raise RuntimeError("master-key rotate published no key")
            during = load(0.0, window)
            reseal_loaded.append(loaded.finish())
            during_ok += int(during.output["ok"])
            outcomes: dict[str, int] = during.output["outcomes"]
            failed += sum(v for k, v in outcomes.items() if k != "ok")
    return ResealResults(
        keys=keys + 1,
        concurrency=CONCURRENCY,
        reseal_alone=reseal_alone,
        reseal_loaded=reseal_loaded,
        window=window,
        rounds=rounds,
        idle_rate=idle_ok / (window * rounds),
        during_rate=during_ok / (window * rounds),
        during_failed=failed,
    )
