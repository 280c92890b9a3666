"""The only module that holds master keys: seals and opens dataset keys.

AES-256-GCM with a fresh random 96-bit nonce per seal. The associated data
names the key's owner (host, pool GUID, dataset GUID or legacy name, key id,
keyformat), so a sealed value copied into another row does not open.

A sealed value names the master key that sealed it (format 2: its 8-byte id), so that
while a master key is rotated (masterrotate.py) values under the old key and the new one
live side by side, each opened by its own key. Format 1, written before rotation existed,
names none: it opens under whichever held key it was sealed with.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from zfs_unlock_server import secretfile
from zfs_unlock_server.errors import ConfigError, IntegrityError

MASTER_KEY_BYTES = 32
NONCE_BYTES = 12
TAG_BYTES = 16
FORMAT_V1 = b"\x01"
FORMAT_V2 = b"\x02"
KEY_ID_BYTES = 8
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


@dataclass(frozen=True)
class MasterKeyWrap:
    """The context of a master key sealed under another one, while a rotation needs both."""

    wrapped_id: str  # hex id of the master key inside

    @property
    def key_id(self) -> str:
        return f"master key {self.wrapped_id}"

    def associated_data(self) -> bytes:
        return b"zfs-unlock-master-key-wrap/v2\0" + self.wrapped_id.encode("ascii")


Context = KeyContext | MasterKeyCheck | MasterKeyWrap


class UnknownMasterKey(IntegrityError):
    """A value sealed under a master key this process does not hold (yet): a rotation's
    new key, learned from the ring (masterring.py), or a retired one, never again."""

    def __init__(self, key_id: str) -> None:
        super().__init__(f"sealed under master key {key_id}, which is not held here")
        self.key_id = key_id


def key_id_of(master_key: bytes) -> str:
    """A master key's public name (16 hex digits): a hash, so it tells nothing of the key."""
    digest = hashlib.sha256(b"zfs-unlock-master-key-id\0" + master_key).digest()
    return digest[:KEY_ID_BYTES].hex()


def sealed_by(sealed: bytes) -> str | None:
    """The id of the master key that sealed SEALED, or None for format 1 (names none)."""
    if sealed[:1] == FORMAT_V2 and len(sealed) > 1 + KEY_ID_BYTES:
        return sealed[1 : 1 + KEY_ID_BYTES].hex()
    return None


@dataclass(frozen=True)
class Ring:
    """The master keys a data directory's sealed values may need, as kept in its database:
    the one that seals, and while a rotation runs the one before it. Each key of two is
    stored sealed under the other, so a process given either learns both."""

    sealing: str  # hex id of the key new values are sealed under
    wrapped: dict[str, bytes]  # hex id -> that key sealed under the other (b"" when alone)

    META_NAME = "master_key_ring"

    def encode(self) -> bytes:
        keys = {kid: wrapped.hex() for kid, wrapped in sorted(self.wrapped.items())}
        return json.dumps({"sealing": self.sealing, "keys": keys}, sort_keys=True).encode()

    @classmethod
    def decode(cls, raw: bytes) -> Ring:
        try:
            data = json.loads(raw)
            ring = cls(str(data["sealing"]), {k: bytes.fromhex(v) for k, v in data["keys"].items()})
        except (ValueError, KeyError, TypeError, AttributeError):
            raise IntegrityError("the database's master key ring is unreadable") from None
        if ring.sealing not in ring.wrapped:
            raise IntegrityError("the database's master key ring names no sealing key")
        return ring

    def admits(self, sealed: bytes) -> bool:
        """May SEALED be written now? A value named by a key outside the ring would be
        lost once its key is gone; format 1 values come only from copies of old rows."""
        named = sealed_by(sealed)
        return named is None or named in self.wrapped


class Sealer:
    """The master keys this process holds: the one it was given, and those it learned from
    the ring (masterring.py). Seals under the ring's sealing key; opens under any."""

    def __init__(
        self, master_key: bytes, source: str = "the master key given", path: Path | None = None
    ) -> None:
        if len(master_key) != MASTER_KEY_BYTES:
            raise ConfigError(f"master key must be {MASTER_KEY_BYTES} bytes")
        self.source = source  # where it was read from, for messages
        self.path = path  # the file it was read from, when it was: where rotation writes
        self.own_id = key_id_of(master_key)
        self._keys: dict[str, bytes] = {self.own_id: bytes(master_key)}
        self._aeads: dict[str, AESGCM] = {self.own_id: AESGCM(master_key)}
        self.sealing_id = self.own_id

    def master_key(self) -> bytes:
        """The key new values are sealed under (the one a rotation keeps), else the one
        given: for `master-key export` (recovery.py) only."""
        return self._keys.get(self.sealing_id, self._keys[self.own_id])

    def material(self, kid: str) -> bytes:
        """A held key itself: for rotation (masterrotate.py) only."""
        try:
            return self._keys[kid]
        except KeyError:
            raise UnknownMasterKey(kid) from None

    def held(self) -> set[str]:
        return set(self._keys)

    def add(self, master_key: bytes) -> str:
        kid = key_id_of(master_key)
        self._keys[kid] = bytes(master_key)
        self._aeads[kid] = AESGCM(master_key)
        return kid

    def forget(self, kid: str) -> None:
        """Drop a learned key (the one given stays: it is what this process was started with)."""
        if kid != self.own_id:
            self._keys.pop(kid, None)
            self._aeads.pop(kid, None)

    def seal(self, material: bytes | bytearray, context: Context) -> bytes:
        return self.seal_under(self.sealing_id, material, context)

    def seal_under(self, kid: str, material: bytes | bytearray, context: Context) -> bytes:
        aead = self._aeads.get(kid)
        if aead is None:
            raise UnknownMasterKey(kid)
        nonce = os.urandom(NONCE_BYTES)
        header = FORMAT_V2 + bytes.fromhex(kid)
        return (
            header
            + nonce
            + aead.encrypt(nonce, bytes(material), header + context.associated_data())
        )

    def open(self, sealed: bytes, context: Context) -> bytes:
        named = sealed_by(sealed)
        if named is not None:
            aead = self._aeads.get(named)
            if aead is None:
                raise UnknownMasterKey(named)
            header = sealed[: 1 + KEY_ID_BYTES]
            candidates = [(aead, header)]
        elif sealed[:1] == FORMAT_V1:
            header = FORMAT_V1
            # The given key first: it sealed them, unless a rotation is re-sealing.
            order = [self.own_id, *(k for k in self._aeads if k != self.own_id)]
            candidates = [(self._aeads[k], header) for k in order]
        else:
            raise IntegrityError("sealed key has an unknown format")
        nonce = sealed[len(header) : len(header) + NONCE_BYTES]
        body = sealed[len(header) + NONCE_BYTES :]
        if len(nonce) != NONCE_BYTES or len(body) < TAG_BYTES:
            raise IntegrityError("sealed key has an unknown format")
        for aead, aad_header in candidates:
            try:
                return aead.decrypt(nonce, body, aad_header + context.associated_data())
            except InvalidTag:
                continue
        raise IntegrityError(f"sealed key {context.key_id} failed authentication")


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
    return Sealer(path.read_bytes(), f"the credential {CREDENTIAL_NAME} ({path})", path)


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
    return Sealer(secretfile.read_private(path), str(path), path)
