"""The commands of approval: the policies (host set, key set) and the requests that wait
(approval list | approve | deny): their parsers and what they print."""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Mapping
from typing import Any

from zfs_unlock_server import admin, approval
from zfs_unlock_server.approval import Policy, PolicyError
from zfs_unlock_server.approvalrows import HOST_WIDE, Approval
from zfs_unlock_server.clitext import table, when
from zfs_unlock_server.datadir import AdminInputs
from zfs_unlock_server.errors import DataError

Add = Callable[..., argparse.ArgumentParser]
_ID = "a-3f9c2e81d0b4"


def _say(message: str) -> None:
    print(message, file=sys.stderr)


def _policy(args: argparse.Namespace) -> Policy | None:
    """The policy the options describe; None for a key's `inherit`."""
    if args.approval == "inherit":
        if args.approval_unless_from or args.approval_silent or args.approval_hours:
            raise DataError("conditions go with --approval conditional only")
        return None
    try:
        return Policy(
            mode=args.approval,
            unless_from=tuple(args.approval_unless_from),
            silent=args.approval_silent or 0,
            hours=args.approval_hours or "",
            timeout=args.approval_timeout,
        )
    except PolicyError as exc:
        raise DataError(str(exc)) from None


def describe(policies: Mapping[tuple[str, str], Policy], ref: tuple[str, str]) -> str:
    """The policy a dataset (or, REF = HOST_WIDE, the host) follows, as listings say it."""
    own = policies.get(ref)
    if own is not None:
        return own.describe()
    host = policies.get(HOST_WIDE, approval.NONE).describe()
    return host if ref == HOST_WIDE else f"{host} (the host's)"


def cmd_host_set(args: argparse.Namespace, inputs: AdminInputs) -> int:
    policy = _policy(args)
    ops = admin.Admin.open(args.data_dir)
    try:
        ops.set_approval_policy(args.name, policy)
    finally:
        ops.close()
    shown = (policy or approval.NONE).describe()
    _say(f"host {args.name}: approval {shown}, from its next request")
    return 0


def cmd_key_set(args: argparse.Namespace, inputs: AdminInputs) -> int:
    policy = _policy(args)
    ops = admin.Admin.open(args.data_dir)
    try:
        record = ops.store.key_by_id(args.key_id)
        ops.set_approval_policy(record.host, policy, args.key_id)
    finally:
        ops.close()
    shown = "as its host's" if policy is None else policy.describe()
    _say(f"dataset {record.dataset} of host {record.host}: approval {shown}, from its next request")
    return 0


def cmd_approval_list(args: argparse.Namespace, inputs: AdminInputs) -> int:
    ops = admin.Admin.open(args.data_dir)
    try:
        found = ops.approvals(args.host)
    finally:
        ops.close()
    now = int(time.time())
    if not args.all:
        found = [a for a in found if a.status(now) in ("pending", "approved")]
    if args.json:
        print(json.dumps([a.as_json(now) for a in found], indent=2))
        return 0
    if not found:
        _say("no approval requests" if args.all else "no approval requests are open")
        return 0
    table(
        ("ID", "STATE", "HOST", "ASKED", "EXPIRES", "FROM", "WHY", "DATASETS"),
        [
            (
                a.id,
                a.status(now),
                a.host,
                when(a.created_at),
                when(a.expires_at),
                a.source_ip,
                ",".join(a.reasons),
                ",".join(d.dataset for d in a.datasets),
            )
            for a in found
        ],
    )
    return 0


def _decided(request: Approval, verb: str) -> str:
    names = ", ".join(d.dataset for d in request.datasets)
    return f"approval {request.id} {verb}: host {request.host}, {names}"


def cmd_approval_approve(args: argparse.Namespace, inputs: AdminInputs) -> int:
    ops = admin.Admin.open(args.data_dir)
    try:
        request = ops.approve(args.id, args.reason)
    finally:
        ops.close()
    _say(
        _decided(request, "approved")
        + f"; its agent receives the keys at its next ask, once, until {when(request.expires_at)}"
    )
    return 0


def cmd_approval_deny(args: argparse.Namespace, inputs: AdminInputs) -> int:
    ops = admin.Admin.open(args.data_dir)
    try:
        request = ops.deny(args.id, args.reason)
    finally:
        ops.close()
    _say(_decided(request, "denied"))
    return 0


def cmd_admin_add(args: argparse.Namespace, inputs: AdminInputs) -> int:
    if sys.stdout.isatty():
        raise DataError(
            "the admin's PKCS#12 file goes to standard output: redirect it to a file"
            f" ('zfs-unlock-server admin add {args.name} > {args.name}.p12')"
        )
    ops = admin.Admin.open(args.data_dir)
    try:
        bundle, passphrase = ops.add_admin(args.name)
    finally:
        ops.close()
    sys.stdout.buffer.write(bundle)
    sys.stdout.flush()
    _say(
        f"admin {args.name} added: the PKCS#12 file (its key and certificate) is sealed with"
        f" the passphrase {passphrase}; import it into the admin's browser, then delete it"
    )
    return 0


def cmd_admin_list(args: argparse.Namespace, inputs: AdminInputs) -> int:
    ops = admin.Admin.open(args.data_dir)
    try:
        found = ops.store.admins()
    finally:
        ops.close()
    if args.json:
        listed = [{"name": n, "sha256": fp, "not_after": when(na)} for n, fp, na in found]
        print(json.dumps(listed, indent=2))
        return 0
    if not found:
        _say("no admins")
        return 0
    table(("NAME", "CERT EXPIRES", "SHA256"), [(n, when(na), fp) for n, fp, na in found])
    return 0


def cmd_admin_remove(args: argparse.Namespace, inputs: AdminInputs) -> int:
    ops = admin.Admin.open(args.data_dir)
    try:
        ops.remove_admin(args.name)
    finally:
        ops.close()
    _say(f"admin {args.name} removed: the approval page refuses its certificate from now on")
    return 0


def _policy_options(p: argparse.ArgumentParser, modes: tuple[str, ...], help_text: str) -> None:
    p.add_argument("--approval", required=True, choices=modes, help=help_text)
    p.add_argument(
        "--approval-unless-from",
        action="append",
        default=[],
        metavar="CIDR",
        help="conditional: approval is needed when the request comes from outside these"
        " networks (repeatable)",
    )
    p.add_argument(
        "--approval-silent",
        type=int,
        metavar="SECONDS",
        help="conditional: approval is needed once the host was unseen this long (at least"
        " 60); it stays needed until an approved release",
    )
    p.add_argument(
        "--approval-hours",
        metavar="HH:MM-HH:MM",
        help="conditional: approval is needed outside this window of the server's local time",
    )
    p.add_argument(
        "--approval-timeout",
        type=int,
        default=approval.DEFAULT_TIMEOUT,
        metavar="SECONDS",
        help=f"a request not approved within this is denied (default {approval.DEFAULT_TIMEOUT})",
    )


def add_policy_commands(hosts: Any, keys: Any, add: Add) -> None:
    """`host set` and `key set`, under the command line's HOSTS and KEYS."""
    p = add(
        hosts,
        "set",
        cmd_host_set,
        "change a host's approval policy",
        [
            "zfs-unlock-server host set web1 --approval required",
            (
                "zfs-unlock-server host set web1 --approval conditional \\\n"
                "--approval-unless-from 192.0.2.0/24 --approval-hours 07:00-19:00"
            ),
        ],
        description="Set whether the host's keys are released only after a person approves"
        " each release ('approval approve'): never (none), always (required), or when a"
        " condition holds (conditional). A dataset's own policy ('key set') wins over it.",
    )
    p.add_argument("name", help="the host's name")
    _policy_options(p, approval.MODES, "none, required or conditional")
    p = add(
        keys,
        "set",
        cmd_key_set,
        "change the approval policy of a key's dataset",
        [
            "zfs-unlock-server key set k-0123456789abcdef01234567 --approval required",
            "zfs-unlock-server key set k-0123456789abcdef01234567 --approval inherit",
        ],
        description="Give the key's dataset an approval policy of its own, which wins over"
        " its host's; 'inherit' makes it follow its host's again. The policy stays with the"
        " dataset when its key is rotated.",
    )
    p.add_argument("key_id", help="the key's id, as 'key list' shows it")
    _policy_options(p, (*approval.MODES, "inherit"), "none, required, conditional or inherit")


def add_approval_commands(sub: Any, add: Add, missing: Any) -> None:
    group = add(
        sub,
        "approval",
        missing,
        "approve or deny releases that wait for a person",
        ["zfs-unlock-server approval list"],
    ).add_subparsers(dest="approval_command", required=True, metavar="ACTION", help="what to do")
    p = add(
        group,
        "list",
        cmd_approval_list,
        "list the requests that wait (or, --all, those decided lately)",
        ["zfs-unlock-server approval list", "zfs-unlock-server approval list --all --json"],
    )
    p.add_argument("--host", metavar="NAME", help="only this host's requests")
    p.add_argument("--all", action="store_true", help="also the closed ones of the last 7 days")
    p.add_argument("--json", action="store_true", help="a JSON array, one object per request")
    p = add(
        group,
        "approve",
        cmd_approval_approve,
        "release a request's keys to the agent that asked, once",
        [f"zfs-unlock-server approval approve {_ID} --reason 'planned reboot'"],
        description="Approve a pending request: its keys go to the agent that asked (the same"
        " certificate, with the same nonce), once, at its next ask before the request"
        " expires. Refused (exit 65) when the request is not pending, its host is disabled,"
        " or a key it names is no longer live.",
    )
    p.add_argument("id", help="the request's id, as 'approval list' shows it")
    p.add_argument("--reason", default="", help="why, for the audit log")
    p = add(
        group,
        "deny",
        cmd_approval_deny,
        "refuse a request's keys",
        [f"zfs-unlock-server approval deny {_ID} --reason 'nobody is rebooting web1'"],
    )
    p.add_argument("id", help="the request's id, as 'approval list' shows it")
    p.add_argument("--reason", default="", help="why, for the audit log")


def add_admin_commands(sub: Any, add: Add, missing: Any) -> None:
    group = add(
        sub,
        "admin",
        missing,
        "manage who may use the approval page",
        ["zfs-unlock-server admin list"],
    ).add_subparsers(dest="admin_command", required=True, metavar="ACTION", help="what to do")
    p = add(
        group,
        "add",
        cmd_admin_add,
        "issue an admin a certificate for the approval page (PKCS#12 on standard output)",
        ["zfs-unlock-server admin add alice > alice.p12"],
        description="Issue admin NAME a key pair and a certificate of the admin CA (made in"
        " the data directory on first use, apart from the hosts' CA), register it, and"
        " write both as a PKCS#12 file to standard output, sealed with a passphrase printed"
        " on standard error. Import it into the admin's browser or phone, then delete it.",
    )
    p.add_argument("name", help="the admin's name (letters, digits and _ . : -)")
    p = add(
        group,
        "list",
        cmd_admin_list,
        "list the admins and their certificates",
        ["zfs-unlock-server admin list", "zfs-unlock-server admin list --json"],
    )
    p.add_argument("--json", action="store_true", help="a JSON array, one object per admin")
    p = add(
        group,
        "remove",
        cmd_admin_remove,
        "refuse an admin's certificate on the approval page from now on",
        ["zfs-unlock-server admin remove alice"],
    )
    p.add_argument("name", help="the admin's name")
