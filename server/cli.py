"""zfs-unlock-server: the command line. The only place that maps errors to exit codes."""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import sqlite3
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

from zfs_unlock_common import protocol, validate
from zfs_unlock_common.protocol import DatasetRef
from zfs_unlock_server import admin, audit, prestart, privileges, sealing, simplezfs
from zfs_unlock_server import config as server_config
from zfs_unlock_server.datadir import AdminInputs, Output, Wants, enter_data_dir
from zfs_unlock_server.deadman import deadman_timeout
from zfs_unlock_server.errors import EX_IOERR, EX_USAGE, ConfigError, DataError, ServerError
from zfs_unlock_server.store import Host, KeyRecord

Handler = Callable[[argparse.Namespace, AdminInputs], int]


def _when(stamp: int) -> str:
    return datetime.datetime.fromtimestamp(stamp, datetime.UTC).isoformat(timespec="seconds")


def _emit_certificate(cert_pem: bytes, out: str | None) -> None:
    if out:
        Path(out).write_bytes(cert_pem)
        print(f"client certificate written to {out}", file=sys.stderr)
    else:
        sys.stdout.write(cert_pem.decode("ascii"))


# Commands


def cmd_init(args: argparse.Namespace, inputs: AdminInputs) -> int:
    master_key_out = Path(args.master_key_out) if args.master_key_out else None
    pin = admin.init_data_dir(
        args.data_dir,
        args.server_name,
        Path(args.server_cert) if args.server_cert else None,
        Path(args.server_key) if args.server_key else None,
        master_key_out,
        enter=lambda: privileges.become_owner(args.data_dir),
    )
    print(f"created {args.data_dir}", file=sys.stderr)
    if master_key_out:
        print(
            f"master key written to {master_key_out}, not into the data directory; serve and"
            f" the admin commands that seal keys read it as the credential"
            f" {sealing.CREDENTIAL_NAME} ($CREDENTIALS_DIRECTORY/{sealing.CREDENTIAL_NAME};"
            f" the systemd unit loads it from {sealing.DEFAULT_CREDENTIAL_FILE})",
            file=sys.stderr,
        )
    print(f"server public-key pin (put it in each agent's config): {pin}", file=sys.stderr)
    print(pin)
    return 0


def cmd_pin(args: argparse.Namespace, inputs: AdminInputs) -> int:
    layout = server_config.Layout(args.data_dir)
    server_config.load(layout)  # not a data directory: the same error as every other command
    print(admin.server_pin(layout))
    return 0


def cmd_serve(args: argparse.Namespace, inputs: AdminInputs) -> int:
    privileges.refuse_root(args.allow_root)  # before anything is read or created
    # Imported here so that admin commands work without gunicorn installed.
    try:
        from zfs_unlock_server import serve  # noqa: PLC0415
    except ImportError as exc:
        raise ConfigError(
            f"cannot serve: {exc.name} is not installed (pip install 'zfs-unlock-agent[server]')"
        ) from None
    from zfs_unlock_server.app import build_app  # noqa: PLC0415

    layout = server_config.Layout(args.data_dir)
    config = server_config.load(layout)
    prestart.check_data_dir(layout, config)
    listen = args.listen or list(config.listen)
    serve.run(build_app(args.data_dir, config), listen, args.workers or config.workers)
    return 0


def _host_json(
    host: Host, certificates: Sequence[tuple[str, int]], default_timeout: int
) -> dict[str, Any]:
    timeout = deadman_timeout(host, default_timeout)
    return {
        "name": host.name,
        "machine_id": host.machine_id,
        "enabled": host.enabled,
        "disabled_reason": host.disabled_reason or None,
        "allowed_networks": list(host.allowed_networks),
        "pools": list(host.pools),
        "deadman_timeout": timeout,
        "created_at": _when(host.created_at),
        "last_seen": _when(host.last_seen),
        "certificates": [{"sha256": fp, "not_after": _when(na)} for fp, na in certificates],
    }


def cmd_host_add(args: argparse.Namespace, inputs: AdminInputs) -> int:
    ops = admin.Admin.open(args.data_dir)
    try:
        host, cert_pem = ops.add_host(
            args.name,
            args.machine_id,
            args.allow_ip,
            args.pool,
            args.deadman_timeout,
            inputs.csr_pem,
            Path(args.issue_key) if args.issue_key else None,
        )
    finally:
        ops.close()
    print(f"host {host.name} added", file=sys.stderr)
    if args.issue_key:
        print(
            f"key and certificate written to {args.issue_key}/client.key, client.crt",
            file=sys.stderr,
        )
    else:
        _emit_certificate(cert_pem, args.cert_out)
    return 0


def cmd_host_cert(args: argparse.Namespace, inputs: AdminInputs) -> int:
    ops = admin.Admin.open(args.data_dir)
    try:
        if inputs.csr_pem is None:
            raise DataError("--csr is required")  # argparse makes it so
        cert_pem = ops.add_certificate(args.name, inputs.csr_pem)
    finally:
        ops.close()
    _emit_certificate(cert_pem, args.cert_out)
    return 0


def cmd_host_list(args: argparse.Namespace, inputs: AdminInputs) -> int:
    ops = admin.Admin.open(args.data_dir)
    try:
        # Show the dead-man switch's verdict, not a state it would change on the next request.
        for name in ops.expire_silent_hosts():
            print(f"host {name}: disabled now by the dead-man switch", file=sys.stderr)
        hosts = [
            _host_json(h, ops.store.certificates(h.id), ops.config.deadman_timeout)
            for h in ops.store.hosts()
            if not getattr(args, "name", None) or h.name == args.name
        ]
        if getattr(args, "name", None) and not hosts:
            ops.store.host_by_name(args.name)  # raises NotFound
    finally:
        ops.close()
    if args.json:
        print(json.dumps(hosts if not getattr(args, "name", None) else hosts[0], indent=2))
        return 0
    for h in hosts:
        state = "enabled" if h["enabled"] else f"DISABLED ({h['disabled_reason']})"
        print(f"{h['name']:<24} {h['machine_id']}  {state:<20} last seen {h['last_seen']}")
        if getattr(args, "name", None):
            for key, value in h.items():
                if key not in {"name", "machine_id", "enabled"}:
                    print(f"  {key}: {value}")
    return 0


def cmd_host_enable(args: argparse.Namespace, inputs: AdminInputs) -> int:
    return _with_admin(args, lambda ops: ops.set_enabled(args.name, True))


def cmd_host_disable(args: argparse.Namespace, inputs: AdminInputs) -> int:
    return _with_admin(args, lambda ops: ops.set_enabled(args.name, False))


def cmd_host_remove(args: argparse.Namespace, inputs: AdminInputs) -> int:
    return _with_admin(args, lambda ops: ops.remove_host(args.name, args.delete_keys))


def _with_admin(args: argparse.Namespace, action: Callable[[admin.Admin], object]) -> int:
    ops = admin.Admin.open(args.data_dir)
    try:
        action(ops)
    finally:
        ops.close()
    return 0


def _key_json(record: KeyRecord) -> dict[str, Any]:
    return {
        "key_id": record.key_id,
        "host": record.host,
        "pool_guid": record.pool_guid,
        "dataset_guid": record.dataset_guid or None,
        "legacy_name": record.legacy_name or None,
        "dataset": record.dataset,
        "keyformat": record.keyformat,
        "state": record.state,
        "origin": record.origin,
        "created_at": _when(record.created_at),
        "updated_at": _when(record.updated_at),
    }


def cmd_key_list(args: argparse.Namespace, inputs: AdminInputs) -> int:
    ops = admin.Admin.open(args.data_dir)
    try:
        host_id = ops.store.host_by_name(args.host).id if args.host else None
        keys = [_key_json(k) for k in ops.store.keys(host_id)]
    finally:
        ops.close()
    if args.json:
        print(json.dumps(keys, indent=2))
        return 0
    for k in keys:
        where = f"{k['pool_guid']}/{k['dataset_guid'] or k['legacy_name']}"
        print(
            f"{k['key_id']}  {k['state']:<8} {k['host']:<20} {k['dataset']:<30} {where} {k['keyformat']}"
        )
    return 0


def cmd_key_create(args: argparse.Namespace, inputs: AdminInputs) -> int:
    imported = None
    if args.import_key:
        # Key material only ever arrives on stdin, never in argv.
        imported = sys.stdin.buffer.read()
        if args.keyformat != "raw" and imported.endswith(b"\n"):
            imported = imported[:-1]  # what `zfs load-key` does with one trailing newline
    ref = DatasetRef(
        validate.guid(args.pool_guid, "pool GUID"), validate.guid(args.dataset_guid, "dataset GUID")
    )
    ops = admin.Admin.open(args.data_dir, inputs.master)
    try:
        record = ops.create_key(args.host, ref, args.dataset, args.keyformat, imported)
    finally:
        ops.close()
    print(record.key_id)
    return 0


def cmd_key_delete(args: argparse.Namespace, inputs: AdminInputs) -> int:
    return _with_admin(args, lambda ops: ops.delete_key(args.key_id))


def cmd_host_cert_remove(args: argparse.Namespace, inputs: AdminInputs) -> int:
    return _with_admin(args, lambda ops: ops.remove_certificate(args.name, args.sha256))


def cmd_key_revoke(args: argparse.Namespace, inputs: AdminInputs) -> int:
    return _with_admin(args, lambda ops: ops.set_key_state(args.key_id, "revoked"))


def cmd_key_restore(args: argparse.Namespace, inputs: AdminInputs) -> int:
    return _with_admin(args, lambda ops: ops.set_key_state(args.key_id, "active"))


def cmd_audit(args: argparse.Namespace, inputs: AdminInputs) -> int:
    layout = server_config.Layout(args.data_dir)
    path = server_config.audit_path(layout, server_config.load(layout))
    records = [
        r
        for r in audit.read(path)
        if (not args.host or r.get("host") == args.host)
        and (not args.event or r.get("event") == args.event)
    ]
    for record in records[-args.last :] if args.last else records:
        if args.json:
            print(json.dumps(record, ensure_ascii=True, separators=(",", ":")))
        else:
            rest = " ".join(
                f"{k}={v}" for k, v in record.items() if k not in {"ts", "event", "decision"}
            )
            print(
                f"{record.get('ts', '?')} {record.get('event', '?'):<22} "
                f"{record.get('decision', ''):<6} {rest}"
            )
    return 0


def cmd_import_simplezfs(args: argparse.Namespace, inputs: AdminInputs) -> int:
    ops = admin.Admin.open(args.data_dir, inputs.master)
    try:
        result = simplezfs.import_simplezfs(
            ops, Path(args.file), inputs.simplezfs_rows, args.use_row
        )
    finally:
        ops.close()
    for left_out in result.left_out:
        print(left_out.explain(), file=sys.stderr)
    print(f"imported {result.keys} key(s)", file=sys.stderr)
    return 0


def wants_of(args: argparse.Namespace) -> Wants:
    """What the admin command ARGS names that must be read before, or checked after,
    it becomes the data directory's owner."""
    outputs = []
    if getattr(args, "cert_out", None):
        hint = "; without --cert-out the certificate goes to standard output"
        outputs.append(Output(Path(args.cert_out), "--cert-out", hint))
    if getattr(args, "issue_key", None):
        outputs.append(Output(Path(args.issue_key), "--issue-key"))
    return Wants(
        csr=getattr(args, "csr", None),
        simplezfs=Path(args.file) if args.handler is cmd_import_simplezfs else None,
        seals_keys=args.handler in (cmd_key_create, cmd_import_simplezfs),
        outputs=tuple(outputs),
    )


# Parser


def _count(text: str) -> int:
    """A whole number, 0 or more (workers, records)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, not {value}")
    return value


class _Parser(argparse.ArgumentParser):
    """Usage errors exit with EX_USAGE (64) like every other error here, not argparse's 2."""

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(EX_USAGE, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--data-dir",
        type=Path,
        default=argparse.SUPPRESS,
        help=f"data directory (default ${server_config.DATA_DIR_ENV} or "
        f"{server_config.DEFAULT_DATA_DIR})",
    )
    parser = _Parser(
        prog="zfs-unlock-server",
        parents=[common],
        description="Key server for zfs-unlock-agent: releases dataset keys to enrolled hosts.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(
        parent: Any, name: str, handler: Handler, help_text: str, description: str | None = None
    ) -> argparse.ArgumentParser:
        p: argparse.ArgumentParser = parent.add_parser(
            name, parents=[common], help=help_text, description=description
        )
        p.set_defaults(handler=handler)
        return p

    p = add(sub, "init", cmd_init, "create a data directory (never overwrites)")
    p.add_argument(
        "--server-name",
        action="append",
        default=[],
        metavar="NAME",
        help="DNS name or IP for the generated server certificate (repeatable)",
    )
    p.add_argument(
        "--server-cert", help="use this server certificate (PEM) instead of generating one"
    )
    p.add_argument("--server-key", help="private key (PEM, mode 0400/0600) of --server-cert")
    p.add_argument(
        "--master-key-out",
        metavar="FILE",
        help="write the master key here (0400, new file, outside the data directory) instead"
        " of into the data directory; serve then needs it as the credential master-key",
    )

    add(sub, "pin", cmd_pin, "print the server's public-key pin")

    p = add(sub, "serve", cmd_serve, "serve HTTPS with client certificates")
    p.add_argument(
        "--listen",
        action="append",
        metavar="ADDRESS:PORT",
        help="override 'listen' from server.toml (repeatable)",
    )
    p.add_argument(
        "--workers", type=_count, default=0, help="worker processes (default: server.toml)"
    )
    p.add_argument(
        "--allow-root",
        action="store_true",
        help="serve even as root (refused otherwise, exit 77)",
    )

    hosts = add(sub, "host", _missing_subcommand, "manage hosts").add_subparsers(
        dest="host_command", required=True, metavar="ACTION"
    )
    p = add(hosts, "add", cmd_host_add, "register a host and issue its client certificate")
    p.add_argument("name")
    p.add_argument("--machine-id", required=True)
    p.add_argument("--allow-ip", action="append", default=[], metavar="CIDR")
    p.add_argument("--pool", action="append", default=[], metavar="GUID")
    p.add_argument(
        "--deadman-timeout",
        type=int,
        default=None,
        metavar="SECONDS",
        help="disable the host when unseen this long (0 = off; default from server.toml)",
    )
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--csr", metavar="FILE", help="the host's CSR ('-' for stdin)")
    source.add_argument(
        "--issue-key",
        metavar="DIR",
        help="generate the host's key pair here instead (it must then be moved to the host)",
    )
    p.add_argument("--cert-out", metavar="FILE", help="write the certificate here, not to stdout")
    p = add(hosts, "cert", cmd_host_cert, "issue another certificate for a host (renewal)")
    p.add_argument("name")
    p.add_argument("--csr", required=True, metavar="FILE")
    p.add_argument("--cert-out", metavar="FILE")
    p = add(
        hosts,
        "cert-remove",
        cmd_host_cert_remove,
        "stop accepting one of a host's certificates (after a renewal, or a leak)",
    )
    p.add_argument("name")
    p.add_argument("sha256", help="the certificate's SHA-256 fingerprint, as 'host show' lists it")
    p = add(hosts, "list", cmd_host_list, "list hosts")
    p.add_argument("--json", action="store_true")
    p = add(hosts, "show", cmd_host_list, "show one host")
    p.add_argument("name")
    p.add_argument("--json", action="store_true")
    for name, handler, text in (
        ("disable", cmd_host_disable, "refuse every request of a host, from the next request on"),
        ("enable", cmd_host_enable, "re-enable a host (also after the dead-man switch fired)"),
    ):
        add(hosts, name, handler, text).add_argument("name")
    p = add(hosts, "remove", cmd_host_remove, "remove a host")
    p.add_argument("name")
    p.add_argument("--delete-keys", action="store_true", help="also delete its keys (irreversible)")

    keys = add(sub, "key", _missing_subcommand, "manage keys").add_subparsers(
        dest="key_command", required=True, metavar="ACTION"
    )
    p = add(keys, "list", cmd_key_list, "list keys (never their material)")
    p.add_argument("--host")
    p.add_argument("--json", action="store_true")
    p = add(keys, "create", cmd_key_create, "create or import an active key for a dataset")
    p.add_argument("--host", required=True)
    p.add_argument("--pool-guid", required=True)
    p.add_argument("--dataset-guid", required=True)
    p.add_argument("--dataset", required=True, help="the dataset's name (a label)")
    p.add_argument("--keyformat", choices=protocol.KEY_FORMATS, default="raw")
    p.add_argument(
        "--import",
        dest="import_key",
        action="store_true",
        help="read the existing key from stdin instead of generating one",
    )
    for name, handler, text in (
        ("revoke", cmd_key_revoke, "stop releasing a key, from the next request on"),
        ("restore", cmd_key_restore, "release a revoked key again"),
        ("delete", cmd_key_delete, "forget a revoked key for good (its dataset is gone)"),
    ):
        add(keys, name, handler, text).add_argument("key_id")

    p = add(sub, "audit", cmd_audit, "show the audit log")
    p.add_argument("--host")
    p.add_argument("--event")
    p.add_argument("--last", type=_count, default=0, metavar="N")
    p.add_argument("--json", action="store_true")

    p = add(
        sub,
        "import-simplezfs",
        cmd_import_simplezfs,
        "import the keys of a SimpleZFSKeySystem SQLite database",
        description="Import the keys of a SimpleZFSKeySystem SQLite database (its table"
        " 'key'), all or nothing; enroll their hosts first. The file is checked with"
        " PRAGMA integrity_check first, and a damaged one is refused (exit 65). Where"
        " several rows have the same machine, pool and name (two first requests that"
        " raced), the row SimpleZFSKeySystem serves, the one with the lowest id, is"
        " imported, and every other one is named by its id.",
    )
    p.add_argument("file", help="the SimpleZFSKeySystem database (keys.db)")
    p.add_argument(
        "--use-row",
        action="append",
        type=int,
        default=[],
        metavar="ID",
        help="import the row with this id instead of the one SimpleZFSKeySystem serves for"
        " its machine, pool and name (repeatable, one per key)",
    )
    return parser


def _missing_subcommand(args: argparse.Namespace, inputs: AdminInputs) -> int:
    return EX_USAGE


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    parser = build_parser()
    args = parser.parse_args(argv)
    if "data_dir" not in args:
        args.data_dir = server_config.default_data_dir()
    try:
        inputs = AdminInputs()
        if args.handler not in (cmd_init, cmd_serve):
            inputs = enter_data_dir(args.data_dir, wants_of(args))
        result: int = args.handler(args, inputs)
    except ServerError as exc:
        print(f"zfs-unlock-server: {exc}", file=sys.stderr)
        return exc.exit_code
    except audit.AuditError as exc:
        print(
            f"zfs-unlock-server: {exc}. A change that grants access was not made; one that"
            " takes access away was made, but is not in the audit log.",
            file=sys.stderr,
        )
        return EX_IOERR
    except sqlite3.Error as exc:
        print(f"zfs-unlock-server: database: {exc}", file=sys.stderr)
        return EX_IOERR
    except validate.InvalidInput as exc:
        print(f"zfs-unlock-server: {exc}", file=sys.stderr)
        return DataError.exit_code
    except OSError as exc:
        print(f"zfs-unlock-server: {exc.filename or ''}: {exc.strerror}", file=sys.stderr)
        return EX_IOERR
    return result
