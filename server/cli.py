"""zfs-unlock-server: the command line. The only place that maps errors to exit codes."""

from __future__ import annotations

import argparse
import json
import logging
import sqlite3
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn, TypeVar

from zfs_unlock_common import protocol, validate
from zfs_unlock_common.protocol import DatasetRef
from zfs_unlock_server import (
    __version__,
    admin,
    audit,
    auditprune,
    database,
    masterrotate,
    prestart,
    privileges,
    recovery,
    sealing,
    simplezfs,
)
from zfs_unlock_server import config as server_config
from zfs_unlock_server.approvalcommands import (
    add_admin_commands,
    add_approval_commands,
    add_policy_commands,
)
from zfs_unlock_server.approvalcommands import describe as describe_policy
from zfs_unlock_server.approvalrows import HOST_WIDE
from zfs_unlock_server.backupcommands import OWN_DATA_DIR, add_backup_commands
from zfs_unlock_server.cliargs import whole_number
from zfs_unlock_server.clitext import table, when
from zfs_unlock_server.datadir import AdminInputs, Output, Wants, enter_data_dir
from zfs_unlock_server.deadman import deadman_timeout
from zfs_unlock_server.errors import (
    EX_IOERR,
    EX_USAGE,
    ConfigError,
    DataError,
    NotFound,
    ServerError,
    UsageError,
)
from zfs_unlock_server.outputs import OutputFile
from zfs_unlock_server.rollovercommands import add_rollover_commands
from zfs_unlock_server.store import Host, KeyRecord

Handler = Callable[[argparse.Namespace, AdminInputs], int]


def _say(message: str) -> None:
    """What a command did, for the admin: on standard error, so that scripts reading
    standard output see only the command's result."""
    print(message, file=sys.stderr)


def _emit_certificate(cert_pem: bytes, out: OutputFile | None) -> None:
    if out is not None:
        out.write(cert_pem)
        _say(f"client certificate written to {out.path}")
    else:
        sys.stdout.write(cert_pem.decode("ascii"))


def _duration(seconds: int) -> str:
    """SECONDS in the largest whole unit: '30 days', '12 hours', '90 seconds'."""
    for unit, size in (("day", 86400), ("hour", 3600), ("minute", 60)):
        if seconds >= size and seconds % size == 0:
            count = seconds // size
            return f"{count} {unit}{'s' if count != 1 else ''}"
    return f"{seconds} second{'s' if seconds != 1 else ''}"


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
        database_url=args.database or "",
    )
    print(f"created {args.data_dir}", file=sys.stderr)
    if args.database:
        layout = server_config.Layout(args.data_dir)
        config = server_config.load(layout)
        _say(
            f"hosts, keys and the audit trail are in {database.describe(layout, config)};"
            " further nodes take a copy of this data directory"
        )
    if master_key_out:
        print(
            f"master key written to {master_key_out}, not into the data directory; serve and"
            f" the admin commands that seal keys read it as the credential"
            f" {sealing.CREDENTIAL_NAME} ($CREDENTIALS_DIRECTORY/{sealing.CREDENTIAL_NAME};"
            f" the systemd unit loads it from {sealing.DEFAULT_CREDENTIAL_FILE})",
            file=sys.stderr,
        )
    _say(
        f"dead-man switch: a host not heard from for"
        f" {_duration(server_config.NEW_DEADMAN_TIMEOUT)} is disabled; the agent's daemon checks"
        " in every 15 minutes; change deadman_timeout in server.toml"
    )
    print(f"server public-key pin (put it in each agent's config): {pin}", file=sys.stderr)
    print(pin)
    return 0


def cmd_migrate(args: argparse.Namespace, inputs: AdminInputs) -> int:
    layout = server_config.Layout(args.data_dir)
    config = server_config.load(layout)
    store = database.open_store(layout, config, migrate=True)
    try:
        where = database.describe(layout, config)
        if store.migrated is None:
            _say(f"{where}: schema is current ({store.schema_version()}); nothing to do")
        else:
            old, new = store.migrated
            _say(f"{where}: schema migrated from {old} to {new}")
    finally:
        store.close()
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
    listen = args.listen or list(config.listen)
    # Before the start is recorded: one clear error, at once.
    beside = [config.metrics.listen, config.approval.page_listen]
    serve.check_listen([*listen, *(address for address in beside if address)])
    prestart.check_data_dir(layout, config)
    metrics_directory = serve.prepare_metrics_directory(config)  # before build_app
    serve.run(
        build_app(args.data_dir, config), listen, args.workers or config.workers, metrics_directory
    )
    return 0


def _host_json(
    host: Host, certificates: Sequence[tuple[str, int]], default_timeout: int, approval: str
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
        "created_at": when(host.created_at),
        "last_seen": when(host.last_seen),
        "certificates": [{"sha256": fp, "not_after": when(na)} for fp, na in certificates],
        "approval": approval,
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
            inputs.outputs.bundle,
        )
    finally:
        ops.close()
    _say(f"host {host.name} added")
    if not host.allowed_networks:
        _say(f"host {host.name}: may fetch keys from any address; --allow-ip CIDR narrows it")
    if not host.pools:
        _say(f"host {host.name}: may fetch keys for any pool; --pool GUID narrows it")
    if inputs.outputs.bundle is not None:
        bundle = inputs.outputs.bundle.directory
        _say(f"key and certificate written to {bundle}/client.key, {bundle}/client.crt")
        if inputs.outputs.file("--cert-out") is not None:
            _emit_certificate(cert_pem, inputs.outputs.file("--cert-out"))
    else:
        _emit_certificate(cert_pem, inputs.outputs.file("--cert-out"))
    return 0


def cmd_host_cert(args: argparse.Namespace, inputs: AdminInputs) -> int:
    ops = admin.Admin.open(args.data_dir)
    try:
        if inputs.csr_pem is None:
            raise DataError("--csr is required")  # argparse makes it so
        cert_pem = ops.add_certificate(args.name, inputs.csr_pem)
    finally:
        ops.close()
    _emit_certificate(cert_pem, inputs.outputs.file("--cert-out"))
    return 0


@dataclass(frozen=True)
class HostView:
    """A host as the listing commands show it."""

    host: Host
    certificates: Sequence[tuple[str, int]]
    timeout: int  # its dead-man timeout, its own or server.toml's
    key_states: Sequence[str]
    approval: str  # its approval policy, described

    def json(self) -> dict[str, Any]:
        return _host_json(self.host, self.certificates, self.timeout, self.approval)


def _host_views(args: argparse.Namespace, name: str | None) -> list[HostView]:
    ops = admin.Admin.open(args.data_dir)
    try:
        # Show the dead-man switch's verdict, not a state it would change on the next request.
        for expired in ops.expire_silent_hosts():
            _say(f"host {expired}: disabled now by the dead-man switch")
        hosts = [ops.store.host_by_name(name)] if name else ops.store.hosts()
        policies = ops.approval_policies()
        return [
            HostView(
                h,
                ops.store.certificates(h.id),
                deadman_timeout(h, ops.config.deadman_timeout),
                [k.state for k in ops.store.keys(h.id)] if name else [],
                describe_policy(policies.get(h.id, {}), HOST_WIDE),
            )
            for h in hosts
        ]
    finally:
        ops.close()


def cmd_host_list(args: argparse.Namespace, inputs: AdminInputs) -> int:
    views = _host_views(args, None)
    if args.json:
        print(json.dumps([v.json() for v in views], indent=2))
        return 0
    if not views:
        _say("no hosts")
        return 0
    now = int(time.time())
    table(
        ("NAME", "STATE", "MACHINE-ID", "LAST SEEN", "CERT EXPIRES", "ALLOWED", "POOLS"),
        [
            (
                v.host.name,
                _state(v.host),
                v.host.machine_id,
                when(v.host.last_seen),
                _expiry(v.certificates, now),
                ",".join(v.host.allowed_networks) or "any-address",
                ",".join(v.host.pools) or "any-pool",
            )
            for v in views
        ],
    )
    return 0


def _expiry(certificates: Sequence[tuple[str, int]], now: int) -> str:
    """When the host's last certificate to expire does: what keeps it unlocking. Within
    protocol.CERTIFICATE_WARNING (when the agent's `check` fails) it says so."""
    if not certificates:
        return "no-certificate"
    last = max(not_after for _, not_after in certificates)
    day = when(last)[:10]
    if last <= now:
        return f"{day} (expired)"
    if last - now <= protocol.CERTIFICATE_WARNING:
        return f"{day} (in {_age(last - now)})"
    return day


def _age(seconds: int) -> str:
    """A duration the way a listing shows an age: its largest whole unit."""
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{max(seconds, 0)}s"


def _state(host: Host) -> str:
    return "enabled" if host.enabled else f"DISABLED ({host.disabled_reason})"


def cmd_host_show(args: argparse.Namespace, inputs: AdminInputs) -> int:
    (view,) = _host_views(args, args.name)
    if args.json:
        print(json.dumps(view.json(), indent=2))
        return 0
    host = view.host
    why = {"admin": "no, disabled by an admin", "deadman": "no, disabled by the dead-man switch"}
    timeout = f"{view.timeout} s ({_duration(view.timeout)})" if view.timeout else "off"
    if host.deadman_timeout is None:
        timeout += ", server.toml's deadman_timeout"
    certificates = [f"{fp}  expires {when(na)}" for fp, na in view.certificates] or ["none"]
    fields = [
        ("name", host.name),
        ("enabled", "yes" if host.enabled else why.get(host.disabled_reason, "no")),
        ("machine-id", host.machine_id),
        ("allowed networks", ", ".join(host.allowed_networks) or "any address"),
        ("pools", ", ".join(host.pools) or "any pool"),
        ("dead-man timeout", timeout),
        ("last seen", when(host.last_seen)),
        ("created", when(host.created_at)),
        ("certificates", certificates[0]),
        *(("", line) for line in certificates[1:]),
        ("keys", _key_count(view.key_states)),
        ("approval", view.approval),
    ]
    width = max(len(label) for label, _ in fields) + 2
    for label, value in fields:
        print(f"{label + ':' if label else '':<{width}}{value}".rstrip())
    return 0


def _key_count(states: Sequence[str]) -> str:
    counts = {state: states.count(state) for state in dict.fromkeys(sorted(states))}
    detail = ", ".join(f"{n} {state}" for state, n in counts.items())
    return f"{len(states)} ({detail})" if states else "0"


def cmd_host_enable(args: argparse.Namespace, inputs: AdminInputs) -> int:
    _with_admin(args, lambda ops: ops.set_enabled(args.name, True))
    _say(
        f"host {args.name} enabled: its keys are released again from the next request;"
        " its dead-man clock starts now"
    )
    return 0


def cmd_host_disable(args: argparse.Namespace, inputs: AdminInputs) -> int:
    _with_admin(args, lambda ops: ops.set_enabled(args.name, False))
    _say(f"host {args.name} disabled: its keys are refused from the next request")
    return 0


def cmd_host_remove(args: argparse.Namespace, inputs: AdminInputs) -> int:
    deleted = _with_admin(args, lambda ops: ops.remove_host(args.name, args.delete_keys))
    keys = f", and its {deleted} key(s) deleted for good" if deleted else ""
    _say(f"host {args.name} removed{keys}: its certificates are refused from the next request")
    return 0


T = TypeVar("T")


def _with_admin(args: argparse.Namespace, action: Callable[[admin.Admin], T]) -> T:
    ops = admin.Admin.open(args.data_dir)
    try:
        return action(ops)
    finally:
        ops.close()


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
        "created_at": when(record.created_at),
        "updated_at": when(record.updated_at),
    }


def cmd_key_list(args: argparse.Namespace, inputs: AdminInputs) -> int:
    ops = admin.Admin.open(args.data_dir)
    try:
        host_id = ops.store.host_by_name(args.host).id if args.host else None
        records = ops.store.keys(host_id)
        policies = ops.approval_policies()
    finally:
        ops.close()
    approvals = [
        describe_policy(policies.get(k.host_id, {}), (k.pool_guid, k.dataset_guid)) for k in records
    ]
    if args.json:
        print(
            json.dumps(
                [_key_json(k) | {"approval": a} for k, a in zip(records, approvals, strict=True)],
                indent=2,
            )
        )
        return 0
    if not records:
        _say(f"no keys for host {args.host}" if args.host else "no keys")
        return 0
    now = int(time.time())
    table(
        ("KEY-ID", "STATE", "AGE", "HOST", "DATASET", "POOL/DATASET-GUID", "FORMAT", "APPROVAL"),
        [
            (
                k.key_id,
                k.state,
                _age(now - k.created_at),
                k.host,
                k.dataset,
                f"{k.pool_guid}/{k.dataset_guid or k.legacy_name}",
                k.keyformat,
                approval,
            )
            for k, approval in zip(records, approvals, strict=True)
        ],
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


def _key_named(record: KeyRecord) -> str:
    return f"key {record.key_id} of host {record.host} ({record.dataset})"


def cmd_key_delete(args: argparse.Namespace, inputs: AdminInputs) -> int:
    record = _with_admin(args, lambda ops: ops.delete_key(args.key_id))
    _say(f"{_key_named(record)} deleted for good")
    return 0


def cmd_host_cert_remove(args: argparse.Namespace, inputs: AdminInputs) -> int:
    _with_admin(args, lambda ops: ops.remove_certificate(args.name, args.sha256))
    _say(
        f"host {args.name}: certificate {args.sha256.lower()} removed: it is refused from the"
        " next request"
    )
    return 0


def cmd_key_revoke(args: argparse.Namespace, inputs: AdminInputs) -> int:
    record = _with_admin(args, lambda ops: ops.set_key_state(args.key_id, "revoked"))
    _say(f"{_key_named(record)} revoked: it is refused from the next request")
    return 0


def cmd_key_rotate(args: argparse.Namespace, inputs: AdminInputs) -> int:
    marked = _with_admin(args, lambda ops: ops.request_rotation(args.host, args.dataset))
    if not marked:
        which = f"dataset {args.dataset}" if args.dataset else "any dataset"
        raise NotFound(f"host {args.host} has no active key for {which}")
    for record in marked:
        print(record.key_id)
    _say(
        f"{len(marked)} key(s) of {args.host} to be rotated by its daemon at its next check-in"
        " (every 15 minutes by default); 'key list' shows the new keys once done"
    )
    return 0


def cmd_key_restore(args: argparse.Namespace, inputs: AdminInputs) -> int:
    record = _with_admin(args, lambda ops: ops.set_key_state(args.key_id, "active"))
    _say(f"{_key_named(record)} restored: it is released again from the next request")
    return 0


def cmd_audit(args: argparse.Namespace, inputs: AdminInputs) -> int:
    layout = server_config.Layout(args.data_dir)
    records = [
        r
        for r in database.read_audit(layout, server_config.load(layout))
        if (not args.host or r.get("host") == args.host)
        and (not args.event or r.get("event") == args.event)
    ]
    if not records:
        filtered = args.host or args.event
        _say("no audit records match" if filtered else "no audit records")
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


def cmd_migrate_store(args: argparse.Namespace, inputs: AdminInputs) -> int:
    try:
        from zfs_unlock_server import migratestore  # noqa: PLC0415 (needs psycopg)
    except ImportError as exc:
        raise ConfigError(
            f"migrate-store needs {exc.name} (Debian: apt install python3-psycopg)"
        ) from None
    ops = admin.Admin.open(args.data_dir, inputs.master)
    try:
        sealer = ops.sealer()  # the data directory's own, or refused (exit 78)
        report = migratestore.migrate(ops.layout, ops.config, args.to, sealer)
    finally:
        ops.close()
    table(
        ["", "SQLite", "PostgreSQL"],
        [[what, str(before), str(after)] for what, before, after in report.counts],
    )
    keys = report.counts[2][2]
    print(f"keys that open under the master key in PostgreSQL: {report.keys_opened} of {keys}")
    if not report.matches:
        _say(
            f"the copy in {report.where} does not match (above); server.toml is unchanged and"
            " the server keeps using keys.db. Drop and re-create that database before trying"
            " again."
        )
        return DataError.exit_code
    _say(
        f"copied and checked; server.toml now names {report.where}: restart the server."
        " keys.db and the audit log are kept as they were (without the [database] table the"
        " server uses them again)"
    )
    return 0


def cmd_audit_prune(args: argparse.Namespace, inputs: AdminInputs) -> int:
    layout = server_config.Layout(args.data_dir)
    config = server_config.load(layout)
    pruned = auditprune.prune(layout, config, Path(args.export_dir), time.time())
    if pruned.file is None:
        _say(pruned.why_not)
        return 0
    _say(
        f"{pruned.records} audit record(s) older than"
        f" {config.database.audit_retention_days} day(s) exported to {pruned.file} and deleted"
    )
    print(pruned.file)
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


def _refuse_terminal(args: argparse.Namespace) -> None:
    """An age file is binary: without --out it goes to standard output, never a terminal."""
    if args.out is None and sys.stdout.isatty():
        raise UsageError(
            "refusing to write an age file (binary) to a terminal: give --out FILE,"
            " or redirect standard output"
        )


def _emit_secret(args: argparse.Namespace, inputs: AdminInputs, encrypted: bytes) -> str:
    """Write ENCRYPTED to --out (0600, whole or not at all) or standard output; say where."""
    if inputs.secret_out is not None:
        inputs.secret_out.write(encrypted)
        inputs.secret_out.commit()
        return str(inputs.secret_out.path)
    sys.stdout.flush()
    sys.stdout.buffer.write(encrypted)
    sys.stdout.flush()
    return "standard output"


def cmd_master_key_export(args: argparse.Namespace, inputs: AdminInputs) -> int:
    to = recovery.recipient(args.recipient)
    _refuse_terminal(args)
    ops = admin.Admin.open(args.data_dir, inputs.master)
    try:
        encrypted = recovery.export_master_key(ops, to)
    finally:
        ops.close()
    where = _emit_secret(args, inputs, encrypted)
    _say(f"master key, encrypted to {to}, written to {where}")
    return 0


def cmd_master_key_rotate(args: argparse.Namespace, inputs: AdminInputs) -> int:
    ops = admin.Admin.open(args.data_dir, inputs.master)
    try:
        settle = masterrotate.settle_seconds(ops) if args.settle is None else args.settle
        report = masterrotate.rotate(ops, inputs.secret_out, settle, _say)
    finally:
        ops.close()
    _say(
        f"master key {report.old} retired: {report.resealed} value(s) re-sealed under"
        f" {report.new} in {report.seconds:.1f} s. Restart each server when convenient"
        " (until then it holds the new key in memory), and export the new key and a"
        " recovery kit: old ones open only backups made before the rotation"
    )
    print(report.new)
    return 0


def cmd_master_key_status(args: argparse.Namespace, inputs: AdminInputs) -> int:
    ops = admin.Admin.open(args.data_dir)
    try:
        found = masterrotate.status(ops)
    finally:
        ops.close()
    ring = found.ring
    if ring is None:
        print("no master key ring yet: serve or any command that seals starts it")
        return 0
    rows = []
    for kid in sorted(ring.wrapped, key=lambda k: k != ring.sealing):
        role = "sealing" if kid == ring.sealing else "retiring"
        rows.append([kid, role, str(found.values.get(kid, 0))])
    for kid, count in sorted(found.values.items()):
        if kid not in ring.wrapped:
            rows.append([kid, "not in the ring", str(count)])
    table(["MASTER KEY", "ROLE", "VALUES"], rows)
    if len(ring.wrapped) > 1:
        _say("a rotation has not finished: 'zfs-unlock-server master-key rotate' resumes it")
    return 0


def cmd_recovery_kit(args: argparse.Namespace, inputs: AdminInputs) -> int:
    to = recovery.recipient(args.recipient)
    _refuse_terminal(args)
    ops = admin.Admin.open(args.data_dir, inputs.master)
    try:
        kit = recovery.build_kit(ops, to, args.host)
    finally:
        ops.close()
    where = _emit_secret(args, inputs, kit.encrypted)
    of = f" of host {args.host}" if args.host else ""
    _say(f"recovery kit with {kit.count} key(s){of}, encrypted to {to}, written to {where}")
    return 0


def wants_of(args: argparse.Namespace) -> Wants:
    """What the admin command ARGS names that must be read, or opened for writing,
    before it becomes the data directory's owner."""
    outputs = []
    if getattr(args, "issue_key", None):
        outputs.append(Output(Path(args.issue_key), "--issue-key", bundle=True))
    if getattr(args, "cert_out", None):
        outputs.append(Output(Path(args.cert_out), "--cert-out"))
    secret_out = None
    if args.handler in (cmd_master_key_export, cmd_recovery_kit) and args.out is not None:
        secret_out = (Output(Path(args.out), "--out"), bool(args.force))
    credential = sealing.credential()
    if args.handler is cmd_master_key_rotate and credential is not None:
        # Replaced with the new key: opened now, while the command may still be root.
        secret_out = (Output(credential, "the credential"), True)
    return Wants(
        csr=getattr(args, "csr", None),
        simplezfs=Path(args.file) if args.handler is cmd_import_simplezfs else None,
        seals_keys=args.handler
        in (
            cmd_key_create,
            cmd_import_simplezfs,
            cmd_master_key_export,
            cmd_master_key_rotate,
            cmd_recovery_kit,
            cmd_migrate_store,
        ),
        outputs=tuple(outputs),
        secret_out=secret_out,
    )


# Parser


_count = whole_number(0)  # workers, records


class _Parser(argparse.ArgumentParser):
    """Usage errors exit with EX_USAGE (64) like every other error here, not argparse's 2."""

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(EX_USAGE, f"{self.prog}: error: {message}\n")


def _examples(*examples: str) -> str:
    """An epilog of command lines; a backslash-newline inside one continues it."""
    lines = ["  " + x.replace("\n", "\n      ") for x in examples]
    return ("examples:\n" if len(examples) > 1 else "example:\n") + "\n".join(lines)


_MACHINE_ID = "0123456789abcdef0123456789abcdef"
_KEY_ID = "k-0123456789abcdef01234567"


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--data-dir",
        type=Path,
        metavar="DIR",
        default=argparse.SUPPRESS,
        help=f"data directory (default ${server_config.DATA_DIR_ENV} or "
        f"{server_config.DEFAULT_DATA_DIR})",
    )
    parser = _Parser(
        prog="zfs-unlock-server",
        parents=[common],
        description="Key server for zfs-unlock-agent: releases dataset keys to enrolled hosts.",
        epilog=_examples(
            (
                "zfs-unlock-server init --server-name keys.example.org \\\n"
                "--master-key-out /etc/zfs-unlock-server/master-key"
            ),
            "zfs-unlock-server host add --help    # each command's options and examples",
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--version", action="version", version=f"%(prog)s {__version__}", help="print the version"
    )
    sub = parser.add_subparsers(
        dest="command", required=True, metavar="COMMAND", help="what to do (COMMAND --help: more)"
    )

    def add(
        parent: Any,
        name: str,
        handler: Handler,
        help_text: str,
        examples: Sequence[str],
        description: str | None = None,
    ) -> argparse.ArgumentParser:
        p: argparse.ArgumentParser = parent.add_parser(
            name,
            parents=[common],
            help=help_text,
            description=description or help_text[0].upper() + help_text[1:] + ".",
            epilog=_examples(*examples),
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        p.set_defaults(handler=handler)
        return p

    p = add(
        sub,
        "init",
        cmd_init,
        "create a data directory (never overwrites)",
        [
            (
                "zfs-unlock-server init --server-name keys.example.org \\\n"
                "--master-key-out /etc/zfs-unlock-server/master-key"
            ),
        ],
    )
    p.add_argument(
        "--server-name",
        action="append",
        default=[],
        metavar="NAME",
        help="DNS name or IP for the generated server certificate (repeatable)",
    )
    p.add_argument(
        "--server-cert",
        metavar="FILE",
        help="use this server certificate (PEM) instead of generating one",
    )
    p.add_argument(
        "--server-key", metavar="FILE", help="private key (PEM, mode 0400/0600) of --server-cert"
    )
    p.add_argument(
        "--master-key-out",
        metavar="FILE",
        help="write the master key here (0400, new file, outside the data directory) instead"
        " of into the data directory; serve then needs it as the credential master-key",
    )
    p.add_argument(
        "--database",
        metavar="URL",
        help="keep hosts, keys and the audit trail in this PostgreSQL database"
        " (postgresql://USER@HOST/DB, no password in it; it must hold no other deployment)"
        " instead of SQLite in the data directory",
    )

    add(
        sub,
        "migrate",
        cmd_migrate,
        "bring the database's schema up to this server's version",
        ["zfs-unlock-server migrate    # the systemd unit runs it before serve"],
        description="Apply the schema migrations this server has and the database lacks, in"
        " one transaction each; a database already current is left alone. Several nodes"
        " migrating one PostgreSQL database at once take turns (an advisory lock). serve"
        " refuses a database at any other schema version.",
    )

    add(sub, "pin", cmd_pin, "print the server's public-key pin", ["zfs-unlock-server pin"])

    p = add(
        sub,
        "serve",
        cmd_serve,
        "serve HTTPS with client certificates",
        [
            "zfs-unlock-server serve    # as the data directory's owner; the unit does this",
            "zfs-unlock-server serve --listen 192.0.2.1:8443 --workers 4",
        ],
    )
    p.add_argument(
        "--listen",
        action="append",
        metavar="ADDRESS:PORT",
        help="override 'listen' from server.toml (repeatable)",
    )
    p.add_argument(
        "--workers",
        type=_count,
        default=0,
        metavar="N",
        help="worker processes (default: server.toml)",
    )
    p.add_argument(
        "--allow-root",
        action="store_true",
        help="serve even as root (refused otherwise, exit 77)",
    )

    hosts = add(
        sub,
        "host",
        _missing_subcommand,
        "manage hosts",
        ["zfs-unlock-server host list", "zfs-unlock-server host show web1"],
    ).add_subparsers(
        dest="host_command", required=True, metavar="ACTION", help="what to do with hosts"
    )
    p = add(
        hosts,
        "add",
        cmd_host_add,
        "register a host and issue its client certificate",
        [
            (
                f"zfs-unlock-server host add web1 --machine-id {_MACHINE_ID} \\\n"
                "--csr web1.csr --cert-out web1.crt \\\n"
                "--allow-ip 192.0.2.10/32 --pool 9461416713813557291"
            ),
            f"zfs-unlock-server host add web2 --machine-id {_MACHINE_ID} \\\n--issue-key ./web2",
        ],
    )
    p.add_argument("name", help="the host's name (letters, digits and _ . : -)")
    p.add_argument(
        "--machine-id", required=True, metavar="ID", help="the host's /etc/machine-id (required)"
    )
    p.add_argument(
        "--allow-ip",
        action="append",
        default=[],
        metavar="CIDR",
        help="accept the host's requests only from this network (repeatable; default: any)",
    )
    p.add_argument(
        "--pool",
        action="append",
        default=[],
        metavar="GUID",
        help="release keys only on the pool with this GUID (repeatable; default: any)",
    )
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
    p.add_argument(
        "--cert-out", metavar="FILE", help="also write the certificate here (not to stdout)"
    )
    p = add(
        hosts,
        "cert",
        cmd_host_cert,
        "issue another certificate for a host (renewal)",
        ["zfs-unlock-server host cert web1 --csr web1-2027.csr --cert-out web1-2027.crt"],
    )
    p.add_argument("name", help="the host's name")
    p.add_argument("--csr", required=True, metavar="FILE", help="the CSR ('-' for stdin)")
    p.add_argument("--cert-out", metavar="FILE", help="write the certificate here, not to stdout")
    p = add(
        hosts,
        "cert-remove",
        cmd_host_cert_remove,
        "stop accepting one of a host's certificates (after a renewal, or a leak)",
        [
            "zfs-unlock-server host show web1    # lists the fingerprints",
            (
                "zfs-unlock-server host cert-remove web1 \\\n"
                "6c1f0e5a0b3d9b8f4e2a7c5d1e9f8a7b6c5d4e3f2a1b0c9d8e7f6a5b4c3d2e1f"
            ),
        ],
    )
    p.add_argument("name", help="the host's name")
    p.add_argument("sha256", help="the certificate's SHA-256 fingerprint, as 'host show' lists it")
    p = add(
        hosts,
        "list",
        cmd_host_list,
        "list hosts",
        ["zfs-unlock-server host list", "zfs-unlock-server host list --json"],
    )
    p.add_argument("--json", action="store_true", help="a JSON array, one object per host")
    p = add(
        hosts,
        "show",
        cmd_host_show,
        "show one host",
        ["zfs-unlock-server host show web1"],
    )
    p.add_argument("name", help="the host's name")
    p.add_argument("--json", action="store_true", help="one JSON object, as in 'host list --json'")
    for name, handler, text in (
        ("disable", cmd_host_disable, "refuse every request of a host, from the next request on"),
        ("enable", cmd_host_enable, "re-enable a host (also after the dead-man switch fired)"),
    ):
        add(hosts, name, handler, text, [f"zfs-unlock-server host {name} web1"]).add_argument(
            "name", help="the host's name"
        )
    p = add(
        hosts,
        "remove",
        cmd_host_remove,
        "remove a host",
        ["zfs-unlock-server host remove web1", "zfs-unlock-server host remove web1 --delete-keys"],
    )
    p.add_argument("name", help="the host's name")
    p.add_argument("--delete-keys", action="store_true", help="also delete its keys (irreversible)")

    keys = add(
        sub,
        "key",
        _missing_subcommand,
        "manage keys",
        ["zfs-unlock-server key list --host web1"],
    ).add_subparsers(
        dest="key_command", required=True, metavar="ACTION", help="what to do with keys"
    )
    p = add(
        keys,
        "list",
        cmd_key_list,
        "list keys (never their material)",
        ["zfs-unlock-server key list", "zfs-unlock-server key list --host web1 --json"],
    )
    p.add_argument("--host", metavar="NAME", help="only this host's keys")
    p.add_argument("--json", action="store_true", help="a JSON array, one object per key")
    p = add(
        keys,
        "create",
        cmd_key_create,
        "create or import an active key for a dataset",
        [
            (
                "zfs-unlock-server key create --host web1 --pool-guid 9461416713813557291 \\\n"
                "--dataset-guid 1730281731023487 --dataset tank/secret"
            ),
            (
                "zfs-unlock-server key create --host web1 --pool-guid 9461416713813557291 \\\n"
                "--dataset-guid 88127403125 --dataset tank/old \\\n"
                "--keyformat passphrase --import < passphrase-file"
            ),
        ],
    )
    p.add_argument("--host", required=True, metavar="NAME", help="the host that owns the dataset")
    p.add_argument(
        "--pool-guid", required=True, metavar="GUID", help="the pool's GUID (zpool get guid)"
    )
    p.add_argument(
        "--dataset-guid", required=True, metavar="GUID", help="the dataset's GUID (zfs get guid)"
    )
    p.add_argument("--dataset", required=True, metavar="DS", help="the dataset's name (a label)")
    p.add_argument(
        "--keyformat",
        choices=protocol.KEY_FORMATS,
        default="raw",
        help="the dataset's keyformat (default raw)",
    )
    p.add_argument(
        "--import",
        dest="import_key",
        action="store_true",
        help="read the existing key from stdin instead of generating one",
    )
    p = add(
        keys,
        "rotate",
        cmd_key_rotate,
        "have a host's daemon give datasets new keys at its next check-in",
        [
            "zfs-unlock-server key rotate --host web1 --all",
            "zfs-unlock-server key rotate --host web1 --dataset 9876543210987654321",
        ],
    )
    p.add_argument("--host", required=True, metavar="NAME", help="the host")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--dataset", metavar="GUID", help="only this dataset's key")
    which.add_argument("--all", action="store_true", help="every active key of the host")
    for name, handler, text in (
        ("revoke", cmd_key_revoke, "stop releasing a key, from the next request on"),
        ("restore", cmd_key_restore, "release a revoked key again"),
        ("delete", cmd_key_delete, "forget a revoked key for good (its dataset is gone)"),
    ):
        add(keys, name, handler, text, [f"zfs-unlock-server key {name} {_KEY_ID}"]).add_argument(
            "key_id", help="the key's id, as 'key list' shows it"
        )

    p = add(
        sub,
        "audit",
        cmd_audit,
        "show the audit log",
        [
            "zfs-unlock-server audit --host web1 --last 20",
            "zfs-unlock-server audit --event key_released --json",
        ],
    )
    p.add_argument("--host", metavar="NAME", help="only records about this host")
    p.add_argument("--event", metavar="EVENT", help="only records of this event")
    p.add_argument(
        "--last", type=_count, default=0, metavar="N", help="only the last N records (0: all)"
    )
    p.add_argument(
        "--json", action="store_true", help="the records as stored, one JSON object per line"
    )

    p = add(
        sub,
        "migrate-store",
        cmd_migrate_store,
        "copy this SQLite server's hosts, keys and audit log into PostgreSQL, and use it",
        [
            "zfs-unlock-server migrate-store --to postgresql://zfs-unlock@db/zfs_unlock",
        ],
        description="Copy keys.db (one moment of it) and the audit log into an empty"
        " PostgreSQL database in one transaction, read the copy back and compare: hosts,"
        " certificates, keys and audit records counted on both sides, and every key opened"
        " under the master key. Prints both. Only when all match does server.toml name the"
        " database (a [database] table is added); keys.db and the audit log stay as they"
        " were. A database that holds anything is refused (exit 73); a copy that does not"
        " match leaves server.toml alone (exit 65). Stop the server first: what it changes"
        " after the copy's moment is not copied.",
    )
    p.add_argument("--to", required=True, metavar="URL", help="the PostgreSQL database (empty)")

    p = add(
        sub,
        "audit-prune",
        cmd_audit_prune,
        "export, then delete, audit records older than audit_retention_days",
        [
            "zfs-unlock-server audit-prune --export-dir /var/log/zfs-unlock-server",
        ],
        description="With the audit trail in PostgreSQL and [database] audit_retention_days"
        " above 0: write every record older than that many days to a new gzip-compressed"
        " file of JSON lines in the export directory (0600, synced), then delete them and"
        " record the export (event audit_exported, with the file, the count and its"
        " SHA-256), in one transaction. A failure deletes nothing. One node at a time"
        " prunes; another that runs meanwhile does nothing. Prints the file's path.",
    )
    p.add_argument(
        "--export-dir", required=True, metavar="DIR", help="where the exported file goes"
    )

    _add_recovery_commands(sub, add)

    p = add(
        sub,
        "import-simplezfs",
        cmd_import_simplezfs,
        "import the keys of a SimpleZFSKeySystem SQLite database",
        [
            "zfs-unlock-server import-simplezfs keys.db",
            "zfs-unlock-server import-simplezfs keys.db --use-row 17",
        ],
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
    add_backup_commands(sub, add)
    add_rollover_commands(sub, add, _missing_subcommand)
    add_policy_commands(hosts, keys, add)
    add_approval_commands(sub, add, _missing_subcommand)
    add_admin_commands(sub, add, _missing_subcommand)
    return parser


_RECIPIENT = "age1ql3z7hjy54pw3hyww5ayyfg7zqgvc7w3j2elw8zmrj2kg5sfn9aqmcac8p"


def _add_recovery_commands(sub: Any, add: Callable[..., argparse.ArgumentParser]) -> None:
    """master-key export and recovery-kit: break-glass copies, encrypted with age."""
    master = add(
        sub,
        "master-key",
        _missing_subcommand,
        "break-glass copies of the master key",
        [f"zfs-unlock-server master-key export --recipient {_RECIPIENT} --out master-key.age"],
    ).add_subparsers(dest="master_key_command", required=True, metavar="ACTION", help="what to do")
    p = add(
        master,
        "export",
        cmd_master_key_export,
        "write the master key encrypted to an age recipient (for beside the backups)",
        [
            (
                f"zfs-unlock-server master-key export --recipient {_RECIPIENT} \\\n"
                "--out /srv/backup/master-key.age"
            ),
        ],
    )
    _recovery_options(p)
    p = add(
        master,
        "rotate",
        cmd_master_key_rotate,
        "make a new master key, re-seal every key under it while serve runs, retire the old",
        [
            "zfs-unlock-server master-key rotate",
            "zfs-unlock-server master-key rotate --settle 0    # no server is running",
        ],
        description="Rotate the master key online. The new key is published in the database"
        " sealed under the old one (and the old under the new), so every running server"
        " learns it; it replaces the old key in the file the old one was read from (the"
        " credential, else the data directory's master-key); every sealed value is re-sealed"
        " under it; and once no value needs the old key, the old key is retired and opens"
        " nothing the database holds. Killed at any point, the server still starts with"
        " either key and releases every key, and running the command again finishes the"
        " rotation.",
    )
    p.add_argument(
        "--settle",
        type=float,
        metavar="SECONDS",
        help="how long running servers get to learn the new key before the old is retired"
        " (default: request_timeout/2 + 5)",
    )
    add(
        master,
        "status",
        cmd_master_key_status,
        "show the master keys in use and how many sealed values each holds",
        ["zfs-unlock-server master-key status"],
    )
    p = add(
        sub,
        "recovery-kit",
        cmd_recovery_kit,
        "write every active and pending key (or one host's) encrypted to an age recipient",
        [
            f"zfs-unlock-server recovery-kit --recipient {_RECIPIENT} --out kit.age",
            (
                f"zfs-unlock-server recovery-kit --recipient {_RECIPIENT} --host web1 \\\n"
                "--out web1-kit.age"
            ),
        ],
        description="Write a recovery kit: every active and pending key, and a rotation's"
        " next key (revoked and retired ones are"
        " left out), or those of one host, with its host, machine-id, pool and dataset GUIDs,"
        " dataset name, keyformat and key id, encrypted to an age recipient whose identity"
        " never touches the server. `zfs-unlock-agent recover` opens it on a host; so do"
        " age, awk, base64 and zfs by hand (docs/recovery-kit.md).",
    )
    p.add_argument("--host", metavar="NAME", help="only this host's keys")
    _recovery_options(p)


def _recovery_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--recipient",
        required=True,
        metavar="RECIPIENT",
        help="age recipient: age1... (age-keygen -y IDENTITY) or an SSH public key",
    )
    p.add_argument(
        "--out",
        metavar="FILE",
        help="write here (new file, 0600, whole or not at all); default: standard output,"
        " never a terminal",
    )
    p.add_argument("--force", action="store_true", help="replace an existing --out FILE")


def _missing_subcommand(args: argparse.Namespace, inputs: AdminInputs) -> int:
    return EX_USAGE


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    parser = build_parser()
    args = parser.parse_args(argv)
    if "data_dir" not in args:
        args.data_dir = server_config.default_data_dir()
    inputs = AdminInputs()
    result = 1
    try:
        if args.handler not in (cmd_init, cmd_serve, cmd_migrate, *OWN_DATA_DIR):
            inputs = enter_data_dir(args.data_dir, wants_of(args))
        result = int(args.handler(args, inputs))
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
    finally:
        # What the command line named to write is kept only when the command succeeded.
        inputs.finish(succeeded=result == 0)
    return result
