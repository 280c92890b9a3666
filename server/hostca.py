"""The CA that signs the hosts' client certificates, as its files in the data directory
hold it: `host add` and `host cert` (admin) and a host's own renewal (serve) sign here."""

from __future__ import annotations

from zfs_unlock_server import pki, secretfile
from zfs_unlock_server.config import Layout


def sign(layout: Layout, host_name: str, csr_pem: bytes) -> bytes:
    """A client certificate for HOST_NAME over the CSR's key (DataError for a bad CSR)."""
    ca = pki.KeyPair(secretfile.read_private(layout.ca_key), layout.ca_cert.read_bytes())
    return pki.sign_host_certificate(ca, pki.load_csr(csr_pem), host_name)
