"""The CA of the approval page's admins: apart from the hosts' CA, so that no host
certificate opens the page and no admin certificate fetches a key.

`admin add` makes it on first use (admin-ca.key 0400, admin-ca.crt in the data
directory) and issues each admin a key pair and certificate, bundled as PKCS#12 for a
browser or a phone, under a passphrase made here. The key pair is made here and leaves
only in that bundle.
"""

from __future__ import annotations

import secrets

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import pkcs12

from zfs_unlock_common.csr import new_key_and_csr
from zfs_unlock_server import pki, secretfile
from zfs_unlock_server.config import Layout

ADMIN_CERT_DAYS = 397  # what browsers accept of a leaf certificate, a year and a month


def ensure_ca(layout: Layout) -> pki.KeyPair:
    """The admin CA, made now if the data directory has none yet."""
    if not layout.admin_ca_cert.exists():
        made = pki.create_ca("zfs-unlock admin CA")
        secretfile.write_new(layout.admin_ca_key, made.key_pem, 0o400)
        secretfile.write_new(layout.admin_ca_cert, made.cert_pem, 0o644)
    return pki.KeyPair(
        secretfile.read_private(layout.admin_ca_key), layout.admin_ca_cert.read_bytes()
    )


def issue(layout: Layout, name: str) -> tuple[bytes, bytes]:
    """A new key pair for admin NAME and its certificate: (key PEM, certificate PEM)."""
    key_pem, csr_pem = new_key_and_csr(name)
    cert_pem = pki.sign_host_certificate(
        ensure_ca(layout), pki.load_csr(csr_pem), name, days=ADMIN_CERT_DAYS
    )
    return key_pem, cert_pem


def bundle(name: str, key_pem: bytes, cert_pem: bytes, ca_pem: bytes) -> tuple[bytes, str]:
    """The PKCS#12 file a browser imports, and the passphrase it is sealed with."""
    passphrase = secrets.token_urlsafe(15)
    key = serialization.load_pem_private_key(key_pem, password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise TypeError("an admin key is an EC key")
    data = pkcs12.serialize_key_and_certificates(
        name.encode(),
        key,
        x509.load_pem_x509_certificate(cert_pem),
        [x509.load_pem_x509_certificate(ca_pem)],
        serialization.BestAvailableEncryption(passphrase.encode()),
    )
    return data, passphrase
