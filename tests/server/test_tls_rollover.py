"""The server's TLS key rollover as the real server runs it, on both stores: `tls next`
announces the next pin in every check-in's answer, hosts report the pins they hold,
`tls status` lists who does not hold it yet, and `tls activate` refuses to lock them out
(unless --force), then switches the serving workers to the new key without a restart."""

from __future__ import annotations

import json
import os
import socket
import ssl
import time
from typing import Any

import requests

from tests.keyserver import HostCreds, KeyServer, run_serve
from tests.pinned_requests import pinned_session
from zfs_unlock_common import pinning
from zfs_unlock_server import admin, tlspins
from zfs_unlock_server.errors import EX_CANTCREAT, EX_CONFIG, EX_TEMPFAIL

BOTH_STORES = True


def checkin(
    server: KeyServer, host: HostCreds, pins: Any = None, trust: str | None = None
) -> requests.Response:
    body: dict[str, Any] = {"machine_id": host.machine_id}
    if pins is not None:
        body["pins"] = pins
    session = pinned_session([pinning.parse_pin(trust or server.pin)], host.cert, host.key)
    with session:
        return session.post(server.url("/v1/checkin"), json=body, timeout=10)


def presented_pin(server: KeyServer, host: HostCreds) -> str:
    """The pin of the key the server presents to a new connection now."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.load_cert_chain(host.cert, host.key)
    with (
        socket.create_connection(("127.0.0.1", server.port), timeout=10) as raw,
        context.wrap_socket(raw) as tls,
    ):
        der = tls.getpeercert(binary_form=True)
    assert der
    return pinning.pin_of_certificate(der)


def status(server: KeyServer) -> dict[str, Any]:
    found: dict[str, Any] = json.loads(server.must("tls", "status", "--json"))
    return found


def records(server: KeyServer, event: str) -> list[dict[str, Any]]:
    return [r for r in server.audit_records() if r.get("event") == event]


def test_next_is_announced_inside_the_pinned_channel_and_status_lists_who_lacks_it(
    keyserver: KeyServer,
) -> None:
    holder = keyserver.add_host("holder")
    lagging = keyserver.add_host("lagging")
    keyserver.add_host("quiet")
    keyserver.must("host", "disable", "quiet")  # a disabled host holds nothing up
    keyserver.start()
    assert checkin(keyserver, holder).json()["pins"] == {"current": [keyserver.pin], "next": []}

    new_pin = keyserver.must("tls", "next").strip()
    data = keyserver.data_dir
    assert (data / "server-next.key").stat().st_mode & 0o777 == 0o400
    assert new_pin == pinning.pin_of_certificate(
        ssl.PEM_cert_to_DER_cert((data / "server-next.crt").read_text())
    )
    assert presented_pin(keyserver, holder) == keyserver.pin  # announced, not served
    answer = checkin(keyserver, holder, [keyserver.pin])
    assert answer.json()["pins"] == {"current": [keyserver.pin], "next": [new_pin]}
    assert [r["pin"] for r in records(keyserver, "tls_next_created")] == [new_pin]

    assert status(keyserver) == {
        "served": keyserver.pin,
        "next": new_pin,
        "announced": [new_pin],
        "waiting": ["holder", "lagging"],
    }
    assert checkin(keyserver, holder, [new_pin, keyserver.pin]).status_code == 200
    assert checkin(keyserver, lagging, [keyserver.pin]).status_code == 200  # the old one only
    assert status(keyserver)["waiting"] == ["lagging"]

    code, _, err = keyserver.admin("tls", "next")  # one rollover at a time
    assert code == EX_CANTCREAT and "under way" in err, err


def test_a_malformed_pin_report_is_refused_and_changes_nothing(keyserver: KeyServer) -> None:
    host = keyserver.add_host("reporter")
    keyserver.start()
    new_pin = keyserver.must("tls", "next").strip()
    assert checkin(keyserver, host, [new_pin]).status_code == 200
    for bad in ("sha256//AAAA", [new_pin, 7], ["sha256//AAAA"], [new_pin] * 33, {"pin": new_pin}):
        assert checkin(keyserver, host, bad).status_code == 400, bad
    assert status(keyserver)["waiting"] == []  # what it reported before stands


def test_activate_waits_for_every_enabled_host_then_workers_switch_without_restart(
    keyserver: KeyServer,
) -> None:
    ready = keyserver.add_host("ready")
    offline = keyserver.add_host("offline")
    keyserver.start(workers=2)
    old_pin = keyserver.pin
    new_pin = keyserver.must("tls", "next").strip()
    checkin(keyserver, ready, [old_pin, new_pin])

    code, out, err = keyserver.admin("tls", "activate")
    assert code == EX_TEMPFAIL and "offline" in err and "ready" not in err, err
    assert out == ""
    assert (keyserver.data_dir / "server-next.crt").exists()
    assert presented_pin(keyserver, ready) == old_pin

    checkin(keyserver, offline, [new_pin])  # back, and holding it
    served_before = keyserver.process.pid if keyserver.process else 0
    assert keyserver.must("tls", "activate").strip() == new_pin
    assert not (keyserver.data_dir / "server-next.crt").exists()
    assert (keyserver.data_dir / "server.key").stat().st_mode & 0o777 == 0o400
    # Every worker takes the new pair up within a second or so; the same processes serve.
    deadline = time.monotonic() + 10
    seen: set[str] = set()
    while time.monotonic() < deadline:
        seen = {presented_pin(keyserver, ready) for _ in range(8)}
        if seen == {new_pin}:
            break
        time.sleep(0.2)
    assert seen == {new_pin}
    assert keyserver.process is not None and keyserver.process.pid == served_before
    assert keyserver.process.poll() is None
    # The new pin is what the server announces now; the old key is gone from the answer.
    answer = checkin(keyserver, ready, [new_pin], trust=new_pin)
    assert answer.json()["pins"] == {"current": [new_pin], "next": []}
    [done] = records(keyserver, "tls_activated")
    assert (done["pin"], done["previous_pin"], done["forced"]) == (new_pin, old_pin, 0)
    assert status(keyserver) == {"served": new_pin, "next": "", "announced": [], "waiting": []}


def test_force_switches_with_hosts_left_behind_and_says_so(keyserver: KeyServer) -> None:
    behind = keyserver.add_host("behind")
    new_pin = keyserver.must("tls", "next").strip()
    code, out, err = keyserver.admin("tls", "activate", "--force")
    assert code == 0 and out.strip() == new_pin, err
    assert "1 host(s) that do not hold the new pin" in err
    [done] = records(keyserver, "tls_activated")
    assert (done["forced"], done["unconfirmed"]) == (1, 1)
    keyserver.start()
    assert presented_pin(keyserver, behind) == new_pin


def test_an_activate_killed_between_its_renames_is_finished_by_running_it_again(
    keyserver: KeyServer,
) -> None:
    host = keyserver.add_host("patient")
    new_pin = keyserver.must("tls", "next").strip()
    checkin_pins = [new_pin]
    data = keyserver.data_dir
    # What a kill -9 after the first rename leaves: the new key, the old certificate.
    os.replace(data / "server-next.key", data / "server.key")
    code, err, _ = run_serve(keyserver)  # refuses the mismatched pair, and says why
    assert code == EX_CONFIG and "tls activate' was interrupted: run it again" in err, err
    # No --force, though the host never said it holds the pin: half moved, the live pair
    # is broken, so the command finishes rather than waits.
    assert keyserver.must("tls", "activate").strip() == new_pin
    keyserver.start()
    assert presented_pin(keyserver, host) == new_pin
    assert checkin(keyserver, host, checkin_pins, trust=new_pin).status_code == 200


def test_status_without_a_rollover_says_how_to_start_one(keyserver: KeyServer) -> None:
    code, out, err = keyserver.admin("tls", "status")
    assert code == 0, err
    assert f"served:    {keyserver.pin}" in out
    assert "tls next" in err
    code, _, err = keyserver.admin("tls", "activate")
    assert code != 0 and "tls next" in err


def test_every_node_s_served_pin_is_announced(keyserver: KeyServer) -> None:
    """With a key per node a host checks in with its first node only: it hears the others'
    pins all the same, as each node registers the pin it serves when it starts."""
    host = keyserver.add_host("listener")
    other_node = pinning.format_pin(bytes(range(32)))
    ops = admin.Admin.open(keyserver.data_dir)
    try:
        tlspins.change_pins(ops.store, tlspins.SERVED_META, add=other_node)  # as it would
    finally:
        ops.close()
    keyserver.start()
    announced = checkin(keyserver, host).json()["pins"]
    assert announced == {"current": sorted([keyserver.pin, other_node]), "next": []}
