"""The server's TLS settings: 1.2 or newer, forward-secret AEAD suites, client certificate required."""

from __future__ import annotations

import ssl

from zfs_unlock_server import hostca, secretfile
from zfs_unlock_server.config import Layout
from zfs_unlock_server.errors import ConfigError

# TLS 1.2 suites; TLS 1.3 suites are all ECDHE/AEAD already.
TLS12_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20"


def server_context(layout: Layout) -> ssl.SSLContext:
    """The key server's: host certificates of the hosts' CA (or, during a rollover, of the
    next one too), required."""
    return _context(layout, hostca.trusted(layout), ssl.CERT_REQUIRED)


def admin_page_context(layout: Layout) -> ssl.SSLContext:
    """The approval page's: the same server certificate and suites; admin certificates of
    the admin CA, asked for but not required, so that a browser without one gets a page
    that says what it lacks instead of a TLS error."""
    if not layout.admin_ca_cert.exists():
        raise ConfigError(
            f"{layout.admin_ca_cert} is missing: 'zfs-unlock-server admin add NAME' makes it,"
            " and the first admin's certificate"
        )
    return _context(layout, [str(layout.admin_ca_cert)], ssl.CERT_OPTIONAL)


def _context(layout: Layout, trusted: list[str], verify: ssl.VerifyMode) -> ssl.SSLContext:
    secretfile.check_private(layout.server_key)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_ciphers(TLS12_CIPHERS)
    context.options |= (
        ssl.OP_NO_COMPRESSION | ssl.OP_CIPHER_SERVER_PREFERENCE | ssl.OP_NO_RENEGOTIATION
    )
    context.num_tickets = 0
    context.verify_mode = verify
    for ca in trusted:
        context.load_verify_locations(cafile=ca)
    try:
        context.load_cert_chain(str(layout.server_cert), str(layout.server_key))
    except ssl.SSLError as exc:
        interrupted = layout.next_server_cert.exists()
        raise ConfigError(
            f"{layout.server_cert} and {layout.server_key} cannot be used together"
            f" ({exc.reason or exc})"
            + (
                "; a 'zfs-unlock-server tls activate' was interrupted: run it again"
                if interrupted
                else ""
            )
        ) from None
    return context
