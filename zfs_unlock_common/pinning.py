"""Public-key pins: base64 of SHA-256 over the certificate's SubjectPublicKeyInfo.

An SPKI pin survives certificate renewal with the same key pair (unlike a pin of
the whole certificate), and it is the format curl's --pinnedpubkey uses
("sha256//<base64>"), so operators can check a pin with standard tools.

The SubjectPublicKeyInfo is cut out of the certificate's DER by position, without
interpreting it: hashing needs its bytes only, and that keeps a large X.509 library
off the path every unlock takes (the initramfs copies what this path imports). A
certificate we cannot walk matches no pin: the answer is then "refuse".
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
from collections.abc import Iterable

PIN_PREFIX = "sha256//"

_SEQUENCE, _INTEGER, _VERSION = 0x30, 0x02, 0xA0


class PinError(ValueError):
    """A configured pin is malformed."""


class CertificateFormatError(ValueError):
    """The bytes are not a DER certificate we can find a public key in."""


def _element(der: bytes, offset: int, tag: int, limit: int) -> tuple[int, int]:
    """Start of the value and end of the DER element at OFFSET, which must have TAG
    and end at or before LIMIT (definite lengths only, as DER requires)."""
    if offset + 2 > limit or der[offset] != tag:
        raise CertificateFormatError("unexpected element")
    length, start = der[offset + 1], offset + 2
    if length & 0x80:
        count = length & 0x7F
        if not 1 <= count <= 4 or start + count > limit:
            raise CertificateFormatError("bad length")
        length = int.from_bytes(der[start : start + count], "big")
        start += count
    if start + length > limit:
        raise CertificateFormatError("element overruns its container")
    return start, start + length


def subject_public_key_info(cert_der: bytes) -> bytes:
    """The DER of the SubjectPublicKeyInfo in an X.509 certificate (RFC 5280, 4.1):
    Certificate = SEQUENCE { tbsCertificate SEQUENCE { [0] version OPTIONAL, serial,
    signature, issuer, validity, subject, subjectPublicKeyInfo, ... }, ... }."""
    body, end = _element(cert_der, 0, _SEQUENCE, len(cert_der))
    if end != len(cert_der):
        raise CertificateFormatError("trailing bytes after the certificate")
    position, tbs_end = _element(cert_der, body, _SEQUENCE, end)
    if position < tbs_end and cert_der[position] == _VERSION:
        position = _element(cert_der, position, _VERSION, tbs_end)[1]
    for tag in (_INTEGER, _SEQUENCE, _SEQUENCE, _SEQUENCE, _SEQUENCE):
        position = _element(cert_der, position, tag, tbs_end)[1]
    spki_end = _element(cert_der, position, _SEQUENCE, tbs_end)[1]
    return cert_der[position:spki_end]


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
