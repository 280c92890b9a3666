"""A PostgreSQL primary with a synchronous standby, killed with kill -9 while two key-server
nodes take enrolments: every enrolment a client was told about survives, byte for byte.

The nodes connect with a libpq URL that names both servers and asks for the one that
takes writes (target_session_attrs=read-write), as docs/high-availability.md advises: once
the standby is promoted, their next connection finds it, without a restart or a change
of configuration. Clients behave as the agent does: a node that fails or answers 503 is
followed by the other one, and an enrolment that got no answer is asked again (it is
idempotent while the key is pending).
"""

from __future__ import annotations

import base64
import shutil
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import requests

from bench import postgres
from tests.keyserver import HostCreds, KeyServer, enroll, release

POOL = "8888888888888888888"
ENROLMENTS = 200
KILL_AFTER = 80  # acknowledged enrolments before the primary dies
THREADS = 8
NO_RATE_LIMITS = {
    "per_certificate_burst": 100000,
    "per_certificate_rate": 10000.0,
    "per_address_burst": 100000,
    "per_address_rate": 10000.0,
}


@dataclass
class Tally:
    acknowledged: dict[str, bytes] = field(default_factory=dict)
    refused: int = 0  # 503s and connections that failed: asked again
    unexpected: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    killed_at: float = 0.0
    first_after_kill: float = 0.0


def enrol_until_acknowledged(
    nodes: list[KeyServer], host: HostCreds, guid: str, tally: Tally, deadline: float
) -> None:
    attempt = 0
    while time.monotonic() < deadline:
        node = nodes[attempt % len(nodes)]
        attempt += 1
        try:
            with node.session(host) as session:
                answer = enroll(session, node, host, POOL, guid)
        except requests.RequestException:
            answer = None
        # 201: enrolled now; 200: an earlier attempt committed but its answer was cut
        # off, and the server sends the same pending key again.
        if answer is not None and answer.status_code in (200, 201):
            with tally.lock:
                tally.acknowledged[guid] = base64.b64decode(answer.json()["key"])
                if tally.killed_at and not tally.first_after_kill:
                    tally.first_after_kill = time.monotonic()
            return
        if answer is not None and answer.status_code != 503:
            tally.unexpected.append(f"{guid}: {answer.status_code} {answer.text}")
            return
        with tally.lock:
            tally.refused += 1
        time.sleep(0.2)
    tally.unexpected.append(f"{guid}: never acknowledged")


@pytest.mark.slow
def test_kill_9_of_the_primary_loses_no_acknowledged_enrolment(tmp_path: Path) -> None:
    with postgres.replicated() as (primary, standby):
        primary.psql("CREATE DATABASE zfs_unlock")
        url = (
            f"postgresql://{postgres.ADMIN}@127.0.0.1:{primary.port},127.0.0.1:{standby.port}"
            f"/zfs_unlock?target_session_attrs=read-write&passfile={primary.passfile}"
        )
        first = KeyServer(tmp_path / "a", database_url=url)
        first.configure(rate_limits=NO_RATE_LIMITS)
        second_dir = tmp_path / "b" / "data"
        shutil.copytree(first.data_dir, second_dir)
        nodes = [first, KeyServer.over(tmp_path / "b", second_dir)]
        hosts = [first.add_host(f"fleet-{n}") for n in range(THREADS)]
        for node in nodes:
            node.start(workers=2)
        tally = Tally()
        deadline = time.monotonic() + 120

        def enrol_share(host: HostCreds, number: int) -> None:
            for guid in range(number + 1, ENROLMENTS + 1, THREADS):
                enrol_until_acknowledged(nodes, host, str(guid), tally, deadline)

        def crash_then_promote() -> None:
            while len(tally.acknowledged) < KILL_AFTER and time.monotonic() < deadline:
                time.sleep(0.01)
            primary.kill()
            tally.killed_at = time.monotonic()
            time.sleep(1.0)  # the HA manager's moment of doubt
            standby.promote()
            # What Patroni's synchronous_mode does next: the new primary has no standby
            # yet, and commits would wait for the one named in the copied setting.
            standby.psql("ALTER SYSTEM SET synchronous_standby_names = ''")
            standby.psql("SELECT pg_reload_conf()")

        workers = [
            threading.Thread(target=enrol_share, args=(host, n)) for n, host in enumerate(hosts)
        ]
        crasher = threading.Thread(target=crash_then_promote)
        for thread in [*workers, crasher]:
            thread.start()
        for thread in [*workers, crasher]:
            thread.join(timeout=180)

        try:
            assert tally.unexpected == []
            assert len(tally.acknowledged) == ENROLMENTS
            # Each key from the promoted standby, through either node, as the host sees it.
            lost = []
            for guid, key in tally.acknowledged.items():
                host = hosts[(int(guid) - 1) % THREADS]
                node = nodes[int(guid) % 2]
                with node.session(host) as session:
                    answer = release(session, node, host, POOL, guid)
                if answer.status_code != 200 or base64.b64decode(answer.json()["key"]) != key:
                    lost.append(guid)
            assert lost == []
            assert standby.psql("SELECT pg_is_in_recovery()") == "f"
            assert all(node.process is not None and node.process.poll() is None for node in nodes)
        finally:
            for node in nodes:
                node.stop()
        gap = tally.first_after_kill - tally.killed_at
        print(
            f"\nfailover: {ENROLMENTS} enrolments acknowledged ({KILL_AFTER} before the kill),"
            f" 0 lost; {tally.refused} attempts refused or cut off and asked again;"
            f" first acknowledgement {gap:.1f} s after kill -9 of the primary"
        )
