"""Certificate checks that read the same on every cryptography the project supports,
from Debian 12's 38 on: public key objects compare equal only since 41, and the
timezone-aware validity dates came with 42, verify_directly_issued_by with 40."""

from __future__ import annotations

import datetime
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa


def spki(public_key: Any) -> bytes:
    """A public key as DER SubjectPublicKeyInfo, to compare two keys."""
    der: bytes = public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return der


def not_before(cert: x509.Certificate) -> datetime.datetime:
    """The start of the certificate's validity, timezone-aware (UTC)."""
    if hasattr(cert, "not_valid_before_utc"):
        return cert.not_valid_before_utc
    return cert.not_valid_before.replace(tzinfo=datetime.UTC)


def not_after(cert: x509.Certificate) -> datetime.datetime:
    """The end of the certificate's validity, timezone-aware (UTC)."""
    if hasattr(cert, "not_valid_after_utc"):
        return cert.not_valid_after_utc
    return cert.not_valid_after.replace(tzinfo=datetime.UTC)


def verify_issued_by(cert: x509.Certificate, issuer: x509.Certificate) -> None:
    """Raise unless CERT names ISSUER as its issuer and ISSUER's key signed it."""
    if cert.issuer != issuer.subject:
        raise ValueError(f"issued by {cert.issuer.rfc4514_string()}")
    key = issuer.public_key()
    algorithm = cert.signature_hash_algorithm
    if isinstance(key, ec.EllipticCurvePublicKey) and algorithm is not None:
        key.verify(cert.signature, cert.tbs_certificate_bytes, ec.ECDSA(algorithm))
    elif isinstance(key, rsa.RSAPublicKey) and algorithm is not None:
        key.verify(cert.signature, cert.tbs_certificate_bytes, padding.PKCS1v15(), algorithm)
    elif isinstance(key, ed25519.Ed25519PublicKey):
        key.verify(cert.signature, cert.tbs_certificate_bytes)
    else:
        raise TypeError(f"no check for {type(key).__name__} signatures here")
