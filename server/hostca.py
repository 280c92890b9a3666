"""The CA that signs the hosts' client certificates, as its files in the data directory
hold it: `host add` and `host cert` (admin) and a host's own renewal (serve) sign here.

During a CA rollover (`ca next` until `ca activate`) the next CA signs, and the TLS layer
trusts both (tlsctx.py). `ca activate` moves the next CA's key, then its certificate, over
the current ones; killed between the two renames, the current key is already the next
CA's while its certificate is still in ca-next.crt, which signing_pair() pairs up.
"""

from __future__ import annotations

from cryptography import x509

from zfs_unlock_server import pki, secretfile
from zfs_unlock_server.config import Layout
from zfs_unlock_server.filewatch import Derived


def signing_pair(layout: Layout) -> pki.KeyPair:
    """The CA that signs now: the next one while a rollover runs, else the current one."""
    if layout.next_ca_cert.exists():
        key = layout.next_ca_key if layout.next_ca_key.exists() else layout.ca_key
        return pki.KeyPair(secretfile.read_private(key), layout.next_ca_cert.read_bytes())
    return pki.KeyPair(secretfile.read_private(layout.ca_key), layout.ca_cert.read_bytes())


def sign(layout: Layout, host_name: str, csr_pem: bytes) -> bytes:
    """A client certificate for HOST_NAME over the CSR's key (DataError for a bad CSR)."""
    return pki.sign_host_certificate(signing_pair(layout), pki.load_csr(csr_pem), host_name)


def trusted(layout: Layout) -> list[str]:
    """The CA certificate files the TLS layer trusts: the current CA, and the next one."""
    files = [layout.ca_cert]
    if layout.next_ca_cert.exists():
        files.append(layout.next_ca_cert)
    return [str(f) for f in files]


def key_id(ca_cert_pem: bytes) -> str:
    """A CA's key identifier (hex), as its certificates name it (AuthorityKeyIdentifier)."""
    cert = x509.load_pem_x509_certificate(ca_cert_pem)
    return x509.SubjectKeyIdentifier.from_public_key(cert.public_key()).digest.hex()


def issuer_key_id(cert_der: bytes) -> str:
    """The key id of the CA that issued a host's certificate; "" when it names none."""
    try:
        cert = x509.load_der_x509_certificate(cert_der)
        found = cert.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier)
    except (ValueError, x509.ExtensionNotFound):
        return ""
    return (found.value.key_identifier or b"").hex()


def next_ca_key_id(layout: Layout) -> Derived[str]:
    """The next CA's key id while a CA rollover runs, "" otherwise, followed as `ca next`
    and `ca activate` change the files."""
    return Derived(layout.next_ca_cert, key_id, "")
