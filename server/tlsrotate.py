"""The server's TLS key rollover, for `zfs-unlock-server tls next | status | activate`.

`next` makes the next key and certificate beside the served ones and publishes their pin;
every node then announces it in each check-in's answer, inside the channel the hosts
already pin. Agents keep the pins they learn, put them into their initramfs, and report
the pins they hold at their next check-in. `activate` moves the next pair into place once
every enabled host holds its pin (or with --force); serving workers take it up within a
second (serve.py). A crash between activate's two renames is finished by running it again
(rollover.py).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

from zfs_unlock_server import atomicfile, pki, rollover, tlspins
from zfs_unlock_server.admin import Admin
from zfs_unlock_server.errors import CannotCreate, ConfigError
from zfs_unlock_server.store import Host


@dataclass(frozen=True)
class TlsStatus:
    served: str  # the pin of server.crt
    next: str  # the pin of server-next.crt; "" when there is none here
    announced: list[str]  # the next pins every node announces (the database's)
    waiting: list[Host]  # enabled hosts that have not reported holding every next pin


def _pin_of(path: os.PathLike[str]) -> str:
    with open(path, "rb") as file:
        return tlspins.pin_of_pem(file.read())


def make_next(ops: Admin, names: list[str]) -> str:
    """Make the next key pair (for NAMES, or the served certificate's names) and announce
    its pin; returns the pin. Refused while a next pair exists."""
    layout = ops.layout
    if layout.next_server_cert.exists():
        made = _pin_of(layout.next_server_cert)
        if made in tlspins.next_pins(ops.store):
            raise CannotCreate(
                f"{layout.next_server_cert} exists: a rollover is under way"
                " ('zfs-unlock-server tls status' shows it; 'tls activate' finishes it)"
            )
        with ops.granting("tls_next_created", pin=made):  # made by a run that was killed
            tlspins.change_pins(ops.store, tlspins.NEXT_META, add=made, alone=True)
        return made
    pair = pki.create_server_certificate(names or pki.server_names(layout.server_cert.read_bytes()))
    pin = tlspins.pin_of_pem(pair.cert_pem)
    with ops.granting("tls_next_created", pin=pin):
        # The key first, the certificate last: the certificate's presence means "made".
        atomicfile.write_whole(layout.next_server_key, pair.key_pem, 0o400, replace=True)
        atomicfile.write_whole(layout.next_server_cert, pair.cert_pem, 0o644)
        # One rollover at a time: a pin announced by a rollover that lost its files (a
        # backup restored meanwhile) is announced no more.
        tlspins.change_pins(ops.store, tlspins.NEXT_META, add=pin, alone=True)
    return pin


def status(ops: Admin) -> TlsStatus:
    layout = ops.layout
    announced = tlspins.next_pins(ops.store)
    upcoming = _pin_of(layout.next_server_cert) if layout.next_server_cert.exists() else ""
    wanted = [p for p in [upcoming, *announced] if p]
    reports = ops.store.host_reports()
    waiting = [
        h
        for h in ops.store.hosts()
        if h.enabled and not (h.id in reports and tlspins.holds_all(reports[h.id].pins, wanted))
    ]
    return TlsStatus(_pin_of(layout.server_cert), upcoming, announced, waiting)


def activate(ops: Admin, force: bool, say: Callable[[str], None]) -> tuple[str, str]:
    """Serve the next pair from now on; returns (old pin, new pin). Refused (NotYet) while
    an enabled host has not reported holding the new pin, unless FORCE."""
    layout = ops.layout
    if not layout.next_server_cert.exists():
        raise ConfigError(f"{layout.next_server_cert}: missing; 'zfs-unlock-server tls next' first")
    pair = rollover.Pair(
        layout.next_server_cert, layout.next_server_key, layout.server_cert, layout.server_key
    )
    pair.check()
    new = _pin_of(layout.next_server_cert)
    found = status(ops)
    missing = [h.name for h in found.waiting]
    rollover.refuse_while_waiting(
        missing,
        "have not reported holding the next pin: {hosts}. Each learns it at its next"
        " check-in; 'zfs-unlock-server tls status' lists them. --force switches anyway, and"
        " those hosts then fail to connect until their agent.toml is given the new pin",
        # Half moved, the live pair is broken (or the CA pair mixed): finish, never wait.
        force or pair.half_moved(),
    )
    old = found.served
    with ops.granting(
        "tls_activated",
        pin=new,
        previous_pin=old,
        forced=int(bool(missing)),
        unconfirmed=len(missing),
    ):
        pair.move_into_place()
        tlspins.change_pins(ops.store, tlspins.NEXT_META, remove=new)
        tlspins.change_pins(ops.store, tlspins.SERVED_META, add=new, remove=old)
    if missing:
        say(f"switched with {len(missing)} host(s) that do not hold the new pin")
    return old, new
