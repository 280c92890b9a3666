"""The tls next, tls status and tls activate commands: their parsers and what they print."""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from collections.abc import Callable
from typing import Any

from zfs_unlock_server import admin, tlsrotate
from zfs_unlock_server.datadir import AdminInputs


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
    if not found.waiting:
        print("every enabled host holds the next pin: 'zfs-unlock-server tls activate' is safe")
        return 0
    print(f"{len(found.waiting)} enabled host(s) do not hold the next pin yet:")
    for host in found.waiting:
        print(f"  {host.name}  (last seen {_seen(host.last_seen)})")
    return 0


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


def add_tls_commands(sub: Any, add: Callable[..., argparse.ArgumentParser], missing: Any) -> None:
    """Add the commands to SUB with the command line's ADD(parent, name, handler, help,
    examples, description); MISSING is the handler of a command given no action."""
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
