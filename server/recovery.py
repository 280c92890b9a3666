"""Break-glass exports for when the key server is gone: the master key, and a recovery
kit of dataset keys, both encrypted to an age recipient whose identity the server never
holds (docs/recovery-kit.md describes the kit's plaintext). Plaintext only in memory,
given to `age` on its standard input; each export is audited before it is written.
"""

from __future__ import annotations

import base64
import datetime
import socket
from dataclasses import dataclass

from zfs_unlock_common import age
from zfs_unlock_server.admin import Admin
from zfs_unlock_server.errors import DataError, Unavailable, UsageError
from zfs_unlock_server.service import context_of

KIT_MAGIC = "# zfs-unlock-recovery-kit version 1"
KIT_COLUMNS = (
    "host",
    "machine_id",
    "pool_guid",
    "dataset_guid",
    "keyformat",
    "key_id",
    "state",
    "key_base64",
    "dataset",
)
# Revoked keys stay out: a kit releases keys, and a revoked key is one the admin
# decided not to release. A pending key is in: after an enrollment interrupted between
# `zfs change-key` and its activation it may be the only key that opens its dataset.
# A rotation's next key too: the dataset opens with it once the rotation changed the key.
KIT_STATES = ("active", "pending", "next")


@dataclass(frozen=True)
class Kit:
    encrypted: bytes
    count: int


def recipient(text: str) -> str:
    try:
        return age.check_recipient(text)
    except ValueError as exc:
        raise UsageError(f"--recipient: {exc}") from None


def _encrypt(plaintext: bytes | bytearray, to: str) -> bytes:
    try:
        return age.encrypt(plaintext, to)
    except age.AgeFailed as exc:
        if exc.reason == "missing":
            raise Unavailable(str(exc)) from None
        raise DataError(f"--recipient: {exc}") from None


def export_master_key(ops: Admin, to: str) -> bytes:
    """The master key (checked to be this data directory's) encrypted to TO; audited."""
    sealer = ops.sealer()
    with ops.granting("master_key_exported", recipient=to):
        return _encrypt(sealer.master_key(), to)


def build_kit(ops: Admin, to: str, host_name: str | None) -> Kit:
    """Every active and pending key (or HOST_NAME's) in the kit's plaintext, encrypted to
    TO; audited. The plaintext lives in one bytearray, wiped before this returns."""
    host_id = ops.store.host_by_name(host_name).id if host_name else None
    records = [r for r in ops.store.keys(host_id) if r.state in KIT_STATES]
    machine_ids = {h.name: h.machine_id for h in ops.store.hosts()}
    sealer = ops.sealer()
    created = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    plaintext = bytearray()
    try:
        plaintext += (
            f"{KIT_MAGIC}\n# created {created} on {socket.gethostname()} ({ops.layout.root})\n"
            f"# columns, tab-separated: {' '.join(KIT_COLUMNS)}\n"
        ).encode()
        for record in records:
            material = bytearray(sealer.open(record.sealed, context_of(record)))
            try:
                fields = (
                    record.host,
                    machine_ids.get(record.host, "-"),
                    record.pool_guid,
                    record.dataset_guid or "-",
                    record.keyformat,
                    record.key_id,
                    record.state,
                )
                plaintext += "\t".join(fields).encode() + b"\t"
                plaintext += base64.b64encode(material)
                plaintext += f"\t{record.dataset}\n".encode()
            finally:
                material[:] = bytes(len(material))
        plaintext += f"# end of kit: {len(records)} keys\n".encode()
        with ops.granting(
            "recovery_kit_exported", recipient=to, host_filter=host_name, count=len(records)
        ):
            encrypted = _encrypt(plaintext, to)
    finally:
        plaintext[:] = bytes(len(plaintext))
    return Kit(encrypted, len(records))
