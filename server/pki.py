"""The server's private CA for host client certificates, and its TLS certificate.

EC P-256 throughout: small, fast handshakes, supported by every TLS stack a
host might use (Python's ssl, libcurl in ZFS's native keylocation=https).
"""

from __future__ import annotations

import datetime
import hashlib
import ipaddress
import socket
from dataclasses import dataclass
from typing import TYPE_CHECKING

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from zfs_unlock_server.errors import DataError

if TYPE_CHECKING:  # the name is cryptography 40's; the module runs on 38 too
    from cryptography.hazmat.primitives.asymmetric.types import PublicKeyTypes

HOST_CERT_DAYS = 5 * 365
CA_DAYS = 20 * 365
SERVER_CERT_DAYS = 10 * 365


@dataclass(frozen=True)
class KeyPair:
    key_pem: bytes
    cert_pem: bytes


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _private_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _ski(key: ec.EllipticCurvePublicKey) -> x509.SubjectKeyIdentifier:
    return x509.SubjectKeyIdentifier.from_public_key(key)


def create_ca(common_name: str = "zfs-unlock host CA") -> KeyPair:
    key = ec.generate_private_key(ec.SECP256R1())
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(_name(common_name))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=CA_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(_ski(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return KeyPair(_private_pem(key), cert.public_bytes(serialization.Encoding.PEM))


def default_server_names() -> list[str]:
    return sorted({"localhost", "127.0.0.1", "::1", socket.getfqdn(), socket.gethostname()})


def _san(names: list[str]) -> x509.SubjectAlternativeName:
    entries: list[x509.GeneralName] = []
    for name in names:
        try:
            entries.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            entries.append(x509.DNSName(name))
    return x509.SubjectAlternativeName(entries)


def create_server_certificate(names: list[str]) -> KeyPair:
    """A self-signed server certificate. Agents trust it by its pinned public key."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(names[0]))
        .issuer_name(_name(names[0]))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=SERVER_CERT_DAYS))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(_san(names), critical=False)
        .sign(key, hashes.SHA256())
    )
    return KeyPair(_private_pem(key), cert.public_bytes(serialization.Encoding.PEM))


def server_names(cert_pem: bytes) -> list[str]:
    """The names and addresses a server certificate is valid for, as create_server_certificate
    takes them (the subject's name first)."""
    cert = x509.load_pem_x509_certificate(cert_pem)
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        san = x509.SubjectAlternativeName([])
    names = [str(n) for n in san.get_values_for_type(x509.DNSName)]
    names += [str(a) for a in san.get_values_for_type(x509.IPAddress)]
    subject = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    first = [str(subject[0].value)] if subject else []
    return list(dict.fromkeys([*first, *names])) or default_server_names()


def load_csr(pem: bytes) -> x509.CertificateSigningRequest:
    try:
        csr = x509.load_pem_x509_csr(pem)
    except ValueError:
        raise DataError("not a PEM certificate signing request") from None
    if not csr.is_signature_valid:
        raise DataError("the CSR's signature is invalid")
    public_key = csr.public_key()
    if not isinstance(public_key, ec.EllipticCurvePublicKey | rsa.RSAPublicKey):
        raise DataError("the CSR must carry an EC or RSA public key")
    if isinstance(public_key, rsa.RSAPublicKey) and public_key.key_size < 2048:
        raise DataError("RSA keys must have at least 2048 bits")
    return csr


def sign_host_certificate(
    ca: KeyPair, csr: x509.CertificateSigningRequest, host_name: str, days: int = HOST_CERT_DAYS
) -> bytes:
    """Issue a client certificate for HOST_NAME over the public key in CSR.

    The subject is ours (the host name), not the CSR's: a host cannot choose
    what its certificate says.
    """
    ca_key = serialization.load_pem_private_key(ca.key_pem, password=None)
    ca_cert = x509.load_pem_x509_certificate(ca.cert_pem)
    if not isinstance(ca_key, ec.EllipticCurvePrivateKey):
        raise DataError("CA key must be an EC key")
    now = _now()
    public_key = csr.public_key()
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(host_name))
        .issuer_name(ca_cert.subject)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.PEM)


def certificate_fingerprint(cert_der: bytes) -> str:
    """SHA-256 of the whole certificate, hex: how the server recognises a host."""
    return hashlib.sha256(cert_der).hexdigest()


def check_key_pair(cert_pem: bytes, key_pem: bytes) -> None:
    """Refuse a server certificate that is not PEM or whose private key is not KEY_PEM."""
    try:
        cert = x509.load_pem_x509_certificate(cert_pem)
    except ValueError:
        raise DataError("--server-cert is not a PEM certificate") from None
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError):
        raise DataError("--server-key is not an unencrypted PEM private key") from None
    if _spki(key.public_key()) != _spki(cert.public_key()):
        raise DataError("--server-key is not the private key of --server-cert")


def _spki(public_key: PublicKeyTypes) -> bytes:
    """The key as DER SubjectPublicKeyInfo: comparable on every cryptography version
    (public key objects compare equal only since 41)."""
    return public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def pem_to_der(cert_pem: bytes) -> bytes:
    return x509.load_pem_x509_certificate(cert_pem).public_bytes(serialization.Encoding.DER)


def not_after(cert_pem: bytes) -> int:
    cert = x509.load_pem_x509_certificate(cert_pem)
    # not_valid_after_utc came with cryptography 42; Debian 12's 38 has only the naive
    # UTC one, which 42 and later deprecate.
    if hasattr(cert, "not_valid_after_utc"):
        return int(cert.not_valid_after_utc.timestamp())
    return int(cert.not_valid_after.replace(tzinfo=datetime.UTC).timestamp())
