"""The only module that holds the master key: seals and opens dataset keys.

AES-256-GCM with a fresh random 96-bit nonce per seal. The associated data
names the key's owner (host, pool GUID, dataset GUID or legacy name, key id,
keyformat), so a sealed value copied into another row does not open.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from zfs_unlock_server import secretfile
from zfs_unlock_server.errors import ConfigError, IntegrityError

MASTER_KEY_BYTES = 32
NONCE_BYTES = 12
FORMAT_V1 = b"\x01"
CREDENTIAL_NAME = "master-key"
# Where systemd/zfs-unlock-server.service loads the credential from (LoadCredential=).
DEFAULT_CREDENTIAL_FILE = Path("/etc/zfs-unlock-server") / CREDENTIAL_NAME


@dataclass(frozen=True)
class KeyContext:
    """Everything a sealed key is bound to."""

    host: str
    pool_guid: str
    dataset_guid: str  # "" for keys imported by legacy name only
    legacy_name: str  # "" for keys enrolled by dataset GUID
    key_id: str
    keyformat: str

    def associated_data(self) -> bytes:
        fields = (
            self.host,
            self.pool_guid,
            self.dataset_guid,
            self.legacy_name,
            self.key_id,
            self.keyformat,
        )
        # NUL cannot occur in any validated field, so the encoding is unambiguous.
        return b"zfs-unlock-key/v1\0" + "\0".join(fields).encode("ascii")


@dataclass(frozen=True)
class MasterKeyCheck:
    """The context of the data directory's master key check value (masterkey.py): its
    associated data is unlike any key's, so neither opens in the other's place."""

    key_id: str = "master-key-check"

    def associated_data(self) -> bytes:
        return b"zfs-unlock-master-key-check/v1"


class Sealer:
    def __init__(self, master_key: bytes, source: str = "the master key given") -> None:
        if len(master_key) != MASTER_KEY_BYTES:
            raise ConfigError(f"master key must be {MASTER_KEY_BYTES} bytes")
        self._aead = AESGCM(master_key)
        self._master_key = bytes(master_key)
        self.source = source  # where it was read from, for messages

    def master_key(self) -> bytes:
        """The master key itself: for `master-key export` (recovery.py) only."""
        return self._master_key

    def seal(self, material: bytes | bytearray, context: KeyContext | MasterKeyCheck) -> bytes:
        nonce = os.urandom(NONCE_BYTES)
        aad = FORMAT_V1 + context.associated_data()
        return FORMAT_V1 + nonce + self._aead.encrypt(nonce, bytes(material), aad)

    def open(self, sealed: bytes, context: KeyContext | MasterKeyCheck) -> bytes:
        if sealed[:1] != FORMAT_V1 or len(sealed) < 1 + NONCE_BYTES + 16:
            raise IntegrityError("sealed key has an unknown format")
        nonce = sealed[1 : 1 + NONCE_BYTES]
        aad = FORMAT_V1 + context.associated_data()
        try:
            return self._aead.decrypt(nonce, sealed[1 + NONCE_BYTES :], aad)
        except InvalidTag:
            raise IntegrityError(f"sealed key {context.key_id} failed authentication") from None


def new_master_key() -> bytes:
    return os.urandom(MASTER_KEY_BYTES)


def credential() -> Path | None:
    """$CREDENTIALS_DIRECTORY/master-key, when systemd (or an admin, by hand) provides it."""
    directory = os.environ.get("CREDENTIALS_DIRECTORY")
    if directory and (Path(directory) / CREDENTIAL_NAME).exists():
        return Path(directory) / CREDENTIAL_NAME
    return None


def load_credential() -> Sealer | None:
    """The master key from the credential, or None when there is none."""
    path = credential()
    if path is None:
        return None
    secretfile.check_credential(path)
    return Sealer(path.read_bytes(), f"the credential {CREDENTIAL_NAME} ({path})")


def load_master_key(path: Path) -> Sealer:
    """Read the master key from systemd's credential directory when present, else PATH."""
    sealer = load_credential()
    if sealer is not None:
        return sealer
    if not path.exists() and not path.is_symlink():
        raise ConfigError(
            f"{path}: missing. A master key kept outside the data directory comes in as the"
            f" credential {CREDENTIAL_NAME}: the systemd unit loads it from"
            f" {DEFAULT_CREDENTIAL_FILE}; for admin commands that seal keys, set"
            f" CREDENTIALS_DIRECTORY={DEFAULT_CREDENTIAL_FILE.parent}"
        )
    return Sealer(secretfile.read_private(path), str(path))
