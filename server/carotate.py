"""A rollover of the CA that signs the hosts' client certificates, for `zfs-unlock-server
ca next | status | activate`.

`next` makes the next CA beside the current one: from then on the TLS layer trusts both,
the next CA signs every certificate (`host add`, `host cert`, renewals), and each
check-in's answer tells a host whose certificate the old CA issued to renew it, which
its daemon does at once. `status` lists the enabled hosts whose last check-in was still
with an old-CA certificate; `activate` retires the old CA (the next one's key and
certificate move over it) once there are none, or with --force. Serving workers follow
the files within a second (serve.py); a crash between activate's two renames is finished
by running it again (hostca.signing_pair() signs correctly in between).
"""

from __future__ import annotations

import datetime
from collections.abc import Callable
from dataclasses import dataclass

from zfs_unlock_server import atomicfile, hostca, pki, rollover
from zfs_unlock_server.admin import Admin
from zfs_unlock_server.errors import CannotCreate, ConfigError
from zfs_unlock_server.store import Host


@dataclass(frozen=True)
class CaStatus:
    current: str  # key id of the CA in ca.crt
    next: str  # key id of the CA in ca-next.crt; "" outside a rollover
    waiting: list[Host]  # enabled hosts whose last check-in used an old-CA certificate


def make_next(ops: Admin) -> str:
    """Make the next CA; returns its key id. Refused while one exists."""
    layout = ops.layout
    if layout.next_ca_cert.exists():
        raise CannotCreate(
            f"{layout.next_ca_cert} exists: a CA rollover is under way"
            " ('zfs-unlock-server ca status' shows it; 'ca activate' finishes it)"
        )
    day = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d")
    pair = pki.create_ca(f"zfs-unlock host CA {day}")
    made = hostca.key_id(pair.cert_pem)
    with ops.granting("ca_next_created", ca=made):
        # The key first, the certificate last: the certificate's presence means "made".
        atomicfile.write_whole(layout.next_ca_key, pair.key_pem, 0o400, replace=True)
        atomicfile.write_whole(layout.next_ca_cert, pair.cert_pem, 0o644)
    return made


def status(ops: Admin) -> CaStatus:
    layout = ops.layout
    current = hostca.key_id(layout.ca_cert.read_bytes())
    if not layout.next_ca_cert.exists():
        return CaStatus(current, "", [])
    upcoming = hostca.key_id(layout.next_ca_cert.read_bytes())
    reports = ops.store.host_reports()
    waiting = [
        h
        for h in ops.store.hosts()
        if h.enabled and (h.id not in reports or reports[h.id].issuer != upcoming)
    ]
    return CaStatus(current, upcoming, waiting)


def activate(ops: Admin, force: bool, say: Callable[[str], None]) -> tuple[str, str]:
    """Retire the current CA for the next; returns (old key id, new key id). Refused
    (NotYet) while an enabled host still checked in with an old-CA certificate, unless
    FORCE."""
    layout = ops.layout
    if not layout.next_ca_cert.exists():
        raise ConfigError(f"{layout.next_ca_cert}: missing; 'zfs-unlock-server ca next' first")
    pair = rollover.Pair(layout.next_ca_cert, layout.next_ca_key, layout.ca_cert, layout.ca_key)
    pair.check()
    found = status(ops)
    missing = [h.name for h in found.waiting]
    rollover.refuse_while_waiting(
        missing,
        "have not checked in with a certificate of the next CA: {hosts}. Their daemons"
        " renew at their next check-in; 'zfs-unlock-server ca status' lists them. --force"
        " retires the old CA anyway, and those hosts then need 'host cert'",
        # Half moved, the live pair is broken (or the CA pair mixed): finish, never wait.
        force or pair.half_moved(),
    )
    with ops.granting(
        "ca_activated",
        ca=found.next,
        previous_ca=found.current,
        forced=int(bool(missing)),
        unconfirmed=len(missing),
    ):
        pair.move_into_place()
    if missing:
        say(f"retired the old CA with {len(missing)} host(s) still holding its certificates")
    return found.current, found.next
