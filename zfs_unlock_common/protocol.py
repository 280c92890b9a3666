"""Wire contract between agent and key server (docs/protocol.md is the prose).

Both sides import these names so that a route, a limit or a key format can
only change in one place.
"""

from __future__ import annotations

from typing import Final, Literal, NamedTuple

API_PREFIX: Final = "/v1"
ROUTE_CHECKIN: Final = "/v1/checkin"
ROUTE_ENROLL: Final = "/v1/keys"
ROUTE_ACTIVATE: Final = "/v1/keys/activate"
ROUTE_NEXT_KEY: Final = "/v1/keys/next"  # a rotation's next key
ROUTE_RELEASE_BATCH: Final = "/v1/keys/release"
ROUTE_HOST_STATUS: Final = "/v1/host"  # the caller's own enrollment, for `check`
ROUTE_RENEW: Final = "/v1/certificate"  # a new client certificate for the caller
# GET /v1/hosts/{machine_id}/keys/{pool_guid}/{dataset_guid}
ROUTE_RELEASE_ONE_PREFIX: Final = "/v1/hosts/"

MAX_BODY_BYTES: Final = 64 * 1024
# The longest CSR a renewal may send (PEM text); an EC or 4096-bit RSA one is far less.
MAX_CSR_CHARS: Final = 8192
# Server pins a check-in may report as held, and a check-in's answer may announce.
MAX_REPORTED_PINS: Final = 32
MAX_BATCH: Final = 256
# Seconds before a client certificate expires that the agent's `check` fails and the
# server's `host list` says so.
CERTIFICATE_WARNING: Final = 30 * 86400


class DatasetRef(NamedTuple):
    """Which dataset a key belongs to, as both sides name it: its pool's GUID and its own."""

    pool_guid: str
    dataset_guid: str


KeyFormat = Literal["raw", "hex", "passphrase"]
KEY_FORMATS: Final[tuple[KeyFormat, ...]] = ("raw", "hex", "passphrase")
KeyState = Literal["pending", "active", "revoked", "next", "retired"]

RAW_KEY_BYTES: Final = 32
PASSPHRASE_MIN: Final = 8
PASSPHRASE_MAX: Final = 512
_HEX_DIGITS: Final = frozenset(b"0123456789abcdefABCDEF")


class KeyMaterialError(ValueError):
    """Key bytes do not fit their keyformat. The message never includes the bytes."""


def check_key_material(material: bytes | bytearray, keyformat: str) -> None:
    """Refuse key bytes that `zfs load-key -L prompt` would misread or reject.

    raw: exactly 32 bytes (newlines allowed: zfs reads raw keys as bytes).
    hex: exactly 64 hex digits. passphrase: 8 to 512 bytes, no newline or NUL,
    because zfs reads both with getline() and cuts at the first newline.
    """
    size = len(material)
    if keyformat == "raw":
        if size != RAW_KEY_BYTES:
            raise KeyMaterialError(f"raw key must be exactly {RAW_KEY_BYTES} bytes, got {size}")
    elif keyformat == "hex":
        if size != 2 * RAW_KEY_BYTES or any(b not in _HEX_DIGITS for b in material):
            raise KeyMaterialError("hex key must be exactly 64 hexadecimal digits")
    elif keyformat == "passphrase":
        if not PASSPHRASE_MIN <= size <= PASSPHRASE_MAX:
            raise KeyMaterialError(
                f"passphrase must be {PASSPHRASE_MIN} to {PASSPHRASE_MAX} bytes, got {size}"
            )
        if b"\n" in material or b"\0" in material or b"\r" in material:
            raise KeyMaterialError("passphrase must not contain newline, carriage return or NUL")
    else:
        raise KeyMaterialError("unknown keyformat")
