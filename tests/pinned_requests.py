"""A requests session that trusts nothing but a pinned key: the tests' own HTTPS client
for talking to the key server (the agent has its own, zfs_unlock_agent.transport).

The server's public key must match a pin right after the TLS handshake, before a
request byte is written; the client certificate is always presented; no redirects,
and no proxies or CA bundles from the environment.
"""

from __future__ import annotations

import ssl
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import requests
from requests.adapters import HTTPAdapter
from urllib3.connection import HTTPSConnection
from urllib3.connectionpool import HTTPSConnectionPool

from zfs_unlock_common import pinning


class PinMismatch(Exception):
    """The server presented a public key that matches no pin."""


class PinnedHTTPSConnection(HTTPSConnection):
    pinned: tuple[bytes, ...] = ()

    def connect(self) -> None:
        super().connect()
        sock = self.sock
        der = sock.getpeercert(binary_form=True) if isinstance(sock, ssl.SSLSocket) else None
        if not der or not pinning.matches(der, self.pinned):
            self.close()
            raise PinMismatch(f"server {self.host}:{self.port} presented an unpinned public key")
        # The pin is the verification; tell urllib3 so it does not warn.
        self.is_verified = True


def _pool_class(pins: Sequence[bytes]) -> type[HTTPSConnectionPool]:
    connection = type("PinnedConnection", (PinnedHTTPSConnection,), {"pinned": tuple(pins)})
    return type("PinnedPool", (HTTPSConnectionPool,), {"ConnectionCls": connection})


class PinnedAdapter(HTTPAdapter):
    def __init__(self, pins: Sequence[bytes], source_address: tuple[str, int] | None = None):
        if not pins:
            raise ValueError("at least one pin is required")
        self._pins = tuple(pins)
        self._source_address = source_address
        super().__init__(max_retries=0)

    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        # Trust comes from the pin alone: chain and hostname checks are off.
        kwargs["cert_reqs"] = ssl.CERT_NONE
        kwargs["assert_hostname"] = False
        if self._source_address is not None:
            kwargs["source_address"] = self._source_address
        super().init_poolmanager(*args, **kwargs)
        self.poolmanager.pool_classes_by_scheme = {"https": _pool_class(self._pins)}
        self.poolmanager.key_fn_by_scheme = {"https": self.poolmanager.key_fn_by_scheme["https"]}


def pinned_session(
    pins: Sequence[bytes],
    client_cert: Path,
    client_key: Path,
    source_address: tuple[str, int] | None = None,
) -> requests.Session:
    session = requests.Session()
    session.trust_env = False  # no proxies, CA bundles or netrc from the environment
    session.cert = (str(client_cert), str(client_key))
    session.verify = False  # replaced by the pin check in PinnedHTTPSConnection
    session.max_redirects = 0
    for prefix in list(session.adapters):
        del session.adapters[prefix]
    session.mount("https://", PinnedAdapter(pins, source_address))
    return session
