"""The backup, backup verify and restore commands: their parsers and what they print."""

from __future__ import annotations

import argparse
import datetime
import os
import pwd
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from zfs_unlock_server import (
    backup,
    backupformat,
    backuprotation,
    privileges,
    restore,
    sealing,
    secretfile,
)
from zfs_unlock_server.cliargs import whole_number
from zfs_unlock_server.datadir import AdminInputs
from zfs_unlock_server.errors import CannotCreate, UsageError
from zfs_unlock_server.sealing import Sealer

Handler = Callable[[argparse.Namespace, AdminInputs], int]
_SAMPLE = "/var/backups/zfs-unlock-server/" + backuprotation.name_for(
    datetime.datetime(2025, 1, 31, 2, 3, 4, tzinfo=datetime.UTC)
)
_MASTER_KEY = str(sealing.DEFAULT_CREDENTIAL_FILE)


def _say(message: str) -> None:
    print(message, file=sys.stderr)


_keep = whole_number(1)


def cmd_backup(args: argparse.Namespace, inputs: AdminInputs) -> int:
    if (args.out is None) == (args.dir is None):
        raise UsageError("backup needs one of --out FILE and --dir DIR")
    if args.keep is not None and args.dir is None:
        raise UsageError("--keep goes with --dir")
    if args.force and args.dir is not None:
        raise UsageError("--force goes with --out (--dir names each backup anew)")
    now = datetime.datetime.now(datetime.UTC)
    out = Path(args.out) if args.out else Path(args.dir) / backuprotation.name_for(now)
    try:
        written = backup.take(args.data_dir, out, args.force)
    except CannotCreate as exc:
        if privileges.invoking_uid() == os.getuid():
            raise
        owner = pwd.getpwuid(os.getuid()).pw_name
        raise CannotCreate(
            f"{exc} (backup writes as the data directory's owner, {owner})"
        ) from None
    manifest = written.archive.manifest
    _say(
        f"backup written to {out}: {manifest['hosts']} host(s), {manifest['keys']} key(s),"
        f" {written.size} bytes, SHA-256 {written.archive.checksum}; the master key is not in"
        " it: keep it apart"
    )
    if args.keep is not None:
        removed = backuprotation.prune(Path(args.dir), args.keep)
        if removed:
            _say(f"removed {len(removed)} older backup(s) from {args.dir}, keeping {args.keep}")
    print(out)
    return 0


def _given_master_key(path: str | None) -> tuple[Sealer, bytes | None] | None:
    """The master key from --master-key PATH (and its bytes), else from the credential."""
    if path is not None:
        material = secretfile.read_private(Path(path))
        return Sealer(material, path), material
    sealer = sealing.load_credential()
    return None if sealer is None else (sealer, None)


def cmd_backup_verify(args: argparse.Namespace, inputs: AdminInputs) -> int:
    where = args.file
    archive = backupformat.parse(Path(where).read_bytes(), where)
    backup.check_image(archive.members["keys.db"], where)
    print(f"{where}: intact, SHA-256 {archive.checksum}")
    print(backup.manifest_summary(archive.manifest))
    given = _given_master_key(args.master_key)
    if given is None:
        print(
            "keys not opened: no master key given (--master-key FILE, or the credential"
            f" {sealing.CREDENTIAL_NAME})"
        )
        return 0
    sealer = given[0]
    per_host = backup.open_keys(archive, sealer, where)
    for host, count in per_host.items():
        print(f"host {host}: {count} key(s) open")
    print(f"every key opens under {sealer.source}: {sum(per_host.values())} key(s)")
    return 0


def cmd_restore(args: argparse.Namespace, inputs: AdminInputs) -> int:
    given = _given_master_key(args.master_key)
    master = None if given is None else restore.MasterKey(*given)
    archive = restore.restore(
        Path(args.file),
        args.data_dir,
        master,
        enter=lambda: privileges.become_owner(args.data_dir),
    )
    manifest = archive.manifest
    _say(
        f"restored {args.data_dir} from {args.file}: {manifest['hosts']} host(s),"
        f" {manifest['keys']} key(s); the server's key and pin are the backup's, so agents"
        " keep theirs"
    )
    if master is None:
        _say(
            "master key not checked: serve needs it as the credential"
            f" {sealing.CREDENTIAL_NAME} (the systemd unit loads it from {_MASTER_KEY}) or as"
            f" {args.data_dir / 'master.key'}; 'backup verify --master-key FILE' checks it"
        )
    elif master.material is not None:
        _say(f"master key checked and placed as {args.data_dir / 'master.key'}")
    else:
        _say(f"master key checked: {master.sealer.source} opens the restored keys")
    print(manifest["server_pin"])
    return 0


# Commands that do not enter an existing data directory (main skips enter_data_dir).
OWN_DATA_DIR = (cmd_backup_verify, cmd_restore)


def add_backup_commands(sub: Any, add: Callable[..., argparse.ArgumentParser]) -> None:
    """Add the commands to SUB with the command line's ADD(parent, name, handler, help,
    examples, description)."""
    p = add(
        sub,
        "backup",
        cmd_backup,
        "write a backup of the data directory while it serves (never the master key)",
        [
            "zfs-unlock-server backup --out /root/zfs-unlock-server.tar",
            "zfs-unlock-server backup --dir /var/backups/zfs-unlock-server --keep 14",
        ],
        description="Write one file holding the database (a consistent copy, taken while"
        " serve runs), the CA's and the server's keys and certificates and server.toml,"
        " mode 0600, atomically. The master key is never in it: keep it apart. 'backup"
        " verify' checks a backup.",
    )
    target = p.add_mutually_exclusive_group()
    target.add_argument("--out", metavar="FILE", help="write the backup to FILE (a new file)")
    target.add_argument(
        "--dir",
        metavar="DIR",
        help=f"write it into DIR as {backuprotation.PREFIX}YYYYMMDDTHHMMSSZ{backuprotation.SUFFIX}",
    )
    p.add_argument(
        "--keep",
        type=_keep,
        metavar="N",
        help="with --dir: then remove all but the newest N backups there",
    )
    p.add_argument("--force", action="store_true", help="with --out: replace an existing FILE")
    actions = p.add_subparsers(
        dest="backup_command", metavar="ACTION", help="or check a backup (verify)"
    )
    p = add(
        actions,
        "verify",
        cmd_backup_verify,
        "check a backup file, and with the master key open every key in it",
        [
            f"zfs-unlock-server backup verify {_SAMPLE}",
            f"zfs-unlock-server backup verify backup.tar --master-key {_MASTER_KEY}",
        ],
        description="Check a backup file's structure and checksum (no master key needed;"
        " exit 65 if damaged). With the master key (--master-key, or the credential"
        f" {sealing.CREDENTIAL_NAME}), also open every sealed key in memory and count them"
        " per host; no key is printed. A master key that is not the backup's: exit 78.",
    )
    p.add_argument("file", help="the backup file")
    p.add_argument(
        "--master-key", metavar="FILE", help="the master key (0400/0600) to open the keys with"
    )
    p = add(
        sub,
        "restore",
        cmd_restore,
        "make a new data directory from a backup (never overwrites)",
        [
            "zfs-unlock-server --data-dir /var/lib/zfs-unlock-server restore backup.tar",
            f"zfs-unlock-server restore backup.tar --data-dir /srv/zus --master-key {_MASTER_KEY}",
        ],
        description="Make the data directory (missing or empty) from a backup file, with the"
        " modes init gives; the whole file is checked first (exit 65) and nothing is written"
        " if it fails. The master key is not in a backup: --master-key FILE checks it and"
        " places it as master.key; the credential master-key, when present, is checked.",
    )
    p.add_argument("file", help="the backup file")
    p.add_argument(
        "--master-key",
        metavar="FILE",
        help="check this master key (0400/0600) and place it as master.key",
    )
