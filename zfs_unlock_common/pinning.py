"""Public-key pins: base64 of SHA-256 over the certificate's SubjectPublicKeyInfo.

An SPKI pin survives certificate renewal with the same key pair (unlike a pin of
the whole certificate), and it is the format curl's --pinnedpubkey uses
("sha256//<base64>"), so operators can check a pin with standard tools.

The SubjectPublicKeyInfo is cut out of the certificate's DER by position
(zfs_unlock_common.der), without an X.509 library on the unlock path. A certificate
we cannot walk matches no pin: the answer is then "refuse".
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
from collections.abc import Iterable

from zfs_unlock_common.der import CertificateFormatError, subject_public_key_info

PIN_PREFIX = "sha256//"


class PinError(ValueError):
    """A configured pin is malformed."""


def spki_sha256(cert_der: bytes) -> bytes:
    return hashlib.sha256(subject_public_key_info(cert_der)).digest()


def format_pin(digest: bytes) -> str:
    return PIN_PREFIX + base64.b64encode(digest).decode("ascii")


def pin_of_certificate(cert_der: bytes) -> str:
    return format_pin(spki_sha256(cert_der))


def parse_pin(text: str) -> bytes:
    """Accept 'sha256//BASE64' or bare BASE64 of exactly 32 bytes; return the digest."""
    body = text.removeprefix(PIN_PREFIX)
    try:
        digest = base64.b64decode(body, validate=True)
    except (binascii.Error, ValueError):
        raise PinError("pin is not valid base64") from None
    if len(digest) != hashlib.sha256().digest_size:
        raise PinError("pin must be the base64 SHA-256 (32 bytes) of a public key")
    return digest


def matches(cert_der: bytes, pins: Iterable[bytes]) -> bool:
    """True when the certificate's public key equals one of the pinned digests."""
    try:
        actual = spki_sha256(cert_der)
    except CertificateFormatError:
        return False
    found = False
    for pin in pins:
        # Compare against every pin so timing says nothing about which one matched.
        found |= hmac.compare_digest(actual, pin)
    return found
