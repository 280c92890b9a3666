"""The rollover commands of the server's TLS key and of the hosts' CA (tls next | status |
activate, ca next | status | activate): their parsers and what they print."""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from collections.abc import Callable, Sequence
from typing import Any

from zfs_unlock_server import admin, carotate, tlsrotate
from zfs_unlock_server.datadir import AdminInputs
from zfs_unlock_server.store import Host


def _say(message: str) -> None:
    print(message, file=sys.stderr)


def cmd_tls_next(args: argparse.Namespace, inputs: AdminInputs) -> int:
    ops = admin.Admin.open(args.data_dir)
    try:
        pin = tlsrotate.make_next(ops, list(args.name))
    finally:
        ops.close()
    _say(
        f"next TLS key and certificate written to {ops.layout.next_server_cert} and its key;"
        " every node now announces the pin below at each check-in. 'zfs-unlock-server tls"
        " status' lists the hosts that do not hold it yet; 'tls activate' switches to it"
    )
    print(pin)
    return 0


def _seen(stamp: int) -> str:
    if not stamp:
        return "never"
    return datetime.datetime.fromtimestamp(stamp, datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")


def cmd_tls_status(args: argparse.Namespace, inputs: AdminInputs) -> int:
    ops = admin.Admin.open(args.data_dir)
    try:
        found = tlsrotate.status(ops)
    finally:
        ops.close()
    if args.json:
        document = {
            "served": found.served,
            "next": found.next,
            "announced": found.announced,
            "waiting": [h.name for h in found.waiting],
        }
        print(json.dumps(document, indent=2))
        return 0
    print(f"served:    {found.served}")
    print(f"next:      {found.next or '(none here)'}")
    extra = [p for p in found.announced if p != found.next]
    if extra:
        print(f"announced: {' '.join(extra)} (made on another node)")
    if not (found.next or found.announced):
        _say("no rollover under way: 'zfs-unlock-server tls next' starts one")
        return 0
    _print_waiting(found.waiting, "do not hold the next pin yet", "tls")
    return 0


def _print_waiting(waiting: Sequence[Host], what: str, command: str) -> None:
    if not waiting:
        print(f"no enabled host is waited for: 'zfs-unlock-server {command} activate' is safe")
        return
    print(f"{len(waiting)} enabled host(s) {what}:")
    for host in waiting:
        print(f"  {host.name}  (last seen {_seen(host.last_seen)})")


def cmd_tls_activate(args: argparse.Namespace, inputs: AdminInputs) -> int:
    ops = admin.Admin.open(args.data_dir)
    try:
        old, new = tlsrotate.activate(ops, args.force, _say)
    finally:
        ops.close()
    _say(
        f"now serving the key with pin {new} (was {old}); running servers take it up within"
        " a second. Other nodes sharing the key: copy server-next.crt and server-next.key"
        " to them first, then run 'tls activate' on each"
    )
    print(new)
    return 0


def cmd_ca_next(args: argparse.Namespace, inputs: AdminInputs) -> int:
    ops = admin.Admin.open(args.data_dir)
    try:
        made = carotate.make_next(ops)
    finally:
        ops.close()
    _say(
        f"next CA written to {ops.layout.next_ca_cert} and its key; it signs every host"
        " certificate from now on, servers trust it beside the current one within a second,"
        " and each host's daemon renews its certificate under it at its next check-in."
        " 'zfs-unlock-server ca status' lists the hosts still on the old CA"
    )
    print(made)
    return 0


def cmd_ca_status(args: argparse.Namespace, inputs: AdminInputs) -> int:
    ops = admin.Admin.open(args.data_dir)
    try:
        found = carotate.status(ops)
    finally:
        ops.close()
    if args.json:
        document = {
            "current": found.current,
            "next": found.next,
            "waiting": [h.name for h in found.waiting],
        }
        print(json.dumps(document, indent=2))
        return 0
    print(f"current:   {found.current}")
    print(f"next:      {found.next or '(none)'}")
    if not found.next:
        _say("no CA rollover under way: 'zfs-unlock-server ca next' starts one")
        return 0
    _print_waiting(found.waiting, "still on the old CA", "ca")
    return 0


def cmd_ca_activate(args: argparse.Namespace, inputs: AdminInputs) -> int:
    ops = admin.Admin.open(args.data_dir)
    try:
        old, new = carotate.activate(ops, args.force, _say)
    finally:
        ops.close()
    _say(
        f"the CA {new} is the only one now; {old or 'the old CA'} is retired and its"
        " certificates are refused from the next connection. Other nodes: copy ca-next.crt"
        " and ca-next.key to them first, then run 'ca activate' on each"
    )
    print(new)
    return 0


def add_rollover_commands(
    sub: Any, add: Callable[..., argparse.ArgumentParser], missing: Any
) -> None:
    """Add the commands to SUB with the command line's ADD(parent, name, handler, help,
    examples, description); MISSING is the handler of a command given no action."""
    _add_tls_commands(sub, add, missing)
    _add_ca_commands(sub, add, missing)


def _add_ca_commands(sub: Any, add: Callable[..., argparse.ArgumentParser], missing: Any) -> None:
    ca = add(
        sub,
        "ca",
        missing,
        "roll the CA of the hosts' certificates over, hosts renewing by themselves",
        ["zfs-unlock-server ca status"],
    ).add_subparsers(dest="ca_command", required=True, metavar="ACTION", help="what to do")
    add(
        ca,
        "next",
        cmd_ca_next,
        "make the next CA: trusted beside the current one, it signs from now on",
        ["zfs-unlock-server ca next"],
        description="Make the next CA (ca-next.key, ca-next.crt in the data directory). From"
        " now on the servers trust certificates of both CAs, the next CA signs every new"
        " host certificate (host add, host cert, renewals), and every check-in's answer"
        " asks a host whose certificate the old CA issued to renew it, which its daemon"
        " does at once. Prints the next CA's key id.",
    )
    p = add(
        ca,
        "status",
        cmd_ca_status,
        "show the CAs, and the enabled hosts still on the old one",
        ["zfs-unlock-server ca status", "zfs-unlock-server ca status --json"],
    )
    p.add_argument("--json", action="store_true", help="print JSON")
    p = add(
        ca,
        "activate",
        cmd_ca_activate,
        "retire the old CA (refused while a host still uses its certificates)",
        ["zfs-unlock-server ca activate", "zfs-unlock-server ca activate --force"],
        description="Move the next CA's key and certificate over the current ones: the old"
        " CA is no longer trusted, running servers within a second. Refused (exit 75)"
        " while an enabled host's last check-in used a certificate of the old CA; --force"
        " retires it anyway. Killed half way, running it again finishes. Prints the CA's"
        " key id.",
    )
    p.add_argument(
        "--force",
        action="store_true",
        help="retire the old CA even though some enabled hosts still use its certificates",
    )


def _add_tls_commands(sub: Any, add: Callable[..., argparse.ArgumentParser], missing: Any) -> None:
    tls = add(
        sub,
        "tls",
        missing,
        "roll the server's TLS key over without touching a host",
        ["zfs-unlock-server tls status"],
    ).add_subparsers(dest="tls_command", required=True, metavar="ACTION", help="what to do")
    p = add(
        tls,
        "next",
        cmd_tls_next,
        "make the next TLS key and certificate, and announce its pin to every host",
        [
            "zfs-unlock-server tls next",
            "zfs-unlock-server tls next --name keys.example.org --name 192.0.2.10",
        ],
        description="Make the next TLS key and certificate (server-next.key, server-next.crt"
        " in the data directory) and announce the new pin: from now on every check-in's"
        " answer carries it, inside the channel the host already pins. Agents keep the pins"
        " they learn in their state directory, put them into their initramfs, and report"
        " them back; 'tls status' shows who holds it. Prints the new pin.",
    )
    p.add_argument(
        "--name",
        action="append",
        default=[],
        metavar="NAME",
        help="DNS name or IP for the new certificate (repeatable; default: the served"
        " certificate's names)",
    )
    p = add(
        tls,
        "status",
        cmd_tls_status,
        "show the served and next pins, and the enabled hosts that do not hold the next yet",
        ["zfs-unlock-server tls status", "zfs-unlock-server tls status --json"],
    )
    p.add_argument("--json", action="store_true", help="print JSON")
    p = add(
        tls,
        "activate",
        cmd_tls_activate,
        "serve the next TLS key from now on (refused while a host does not hold its pin)",
        ["zfs-unlock-server tls activate", "zfs-unlock-server tls activate --force"],
        description="Move the next key and certificate into place. Running servers take"
        " them up within a second, without a restart. Refused (exit 75) while an enabled"
        " host has not reported holding the new pin, since such a host could not connect"
        " afterwards; --force switches anyway. Killed half way, running it again finishes"
        " the switch. Prints the new pin.",
    )
    p.add_argument(
        "--force",
        action="store_true",
        help="switch even though some enabled hosts do not hold the new pin",
    )
