"""The only module that talks HTTPS: a requests session that trusts nothing but a pinned key.

The server's public key must match a configured pin right after the TLS
handshake, before a single request byte is written; a certificate that a
system CA signed gains nothing. The client certificate is always presented.
No redirects, no proxies or CA bundles from the environment, https only.
"""

from __future__ import annotations

import base64
import binascii
import random
import ssl
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Self
from urllib.parse import urlsplit

import requests
from requests.adapters import HTTPAdapter
from urllib3.connection import HTTPSConnection
from urllib3.connectionpool import HTTPSConnectionPool

from zfs_unlock_agent import pinning, protocol, validate
from zfs_unlock_agent.errors import (
    AgentError,
    BadKeyData,
    ServerRefused,
    ServerUnavailable,
)
from zfs_unlock_agent.secret import Secret

if TYPE_CHECKING:
    from zfs_unlock_agent.config import Network, Server


class PinMismatch(Exception):
    """The server presented a public key that matches no configured pin."""


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
        super().__init__(max_retries=0)  # retries are the caller's policy, not urllib3's

    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        # Trust comes from the pin alone: the server certificate is usually
        # self-signed, so chain and hostname checks would only add a way to fail.
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


def check_url(url: str) -> str:
    parts = urlsplit(url)
    if parts.scheme != "https" or not parts.hostname:
        raise ValueError("server URL must be https://HOST[:PORT]")
    if parts.username or parts.password or parts.query or parts.fragment:
        raise ValueError("server URL must not carry credentials, a query or a fragment")
    return url.rstrip("/")


# The conversation with the key servers: retries, failover, strict parsing.


@dataclass(frozen=True)
class DatasetRef:
    pool_guid: str
    dataset_guid: str


@dataclass
class ReleasedKey:
    ref: DatasetRef
    key_id: str
    keyformat: str
    state: str
    secret: Secret


@dataclass(frozen=True)
class Answer:
    status: int
    body: dict[str, Any]


def retry_delay(network: Network, attempt: int, jitter: float, wait_hint: float = 0.0) -> float:
    """The pause after failed round ATTEMPT (1, 2, ...): capped exponential backoff with
    full jitter (JITTER in [0, 1)), never shorter than the server's Retry-After."""
    ceiling = min(network.backoff_max, network.backoff_initial * 2.0 ** (attempt - 1))
    return max(jitter * ceiling, wait_hint)


class KeyClient:
    """Talks to the configured servers in turn, within one overall deadline.

    Connection errors, timeouts, 5xx and 429 are retried with capped exponential
    backoff and full jitter (honouring Retry-After); a pin mismatch, a redirect,
    403 and 404 end the conversation at once.
    """

    def __init__(
        self,
        servers: Sequence[Server],
        client_cert: Path,
        client_key: Path,
        network: Network,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
        jitter: Callable[[], float] = random.random,
    ) -> None:
        self.servers = tuple(servers)
        self.network = network
        self._clock = clock
        self._sleep = sleep
        self._jitter = jitter
        self._sessions = [pinned_session(s.pins, client_cert, client_key) for s in servers]
        self.requests_sent = 0

    def close(self) -> None:
        for session in self._sessions:
            session.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _send(
        self, index: int, method: str, path: str, body: dict[str, Any], remaining: float
    ) -> requests.Response:
        timeout = (
            min(self.network.connect_timeout, remaining),
            min(self.network.read_timeout, remaining),
        )
        self.requests_sent += 1
        return self._sessions[index].request(
            method,
            self.servers[index].url + path,
            json=body,
            timeout=timeout,
            allow_redirects=False,
        )

    def call(
        self, method: str, path: str, body: dict[str, Any], accept: tuple[int, ...] = (200, 201)
    ) -> Answer:
        deadline = self._clock() + self.network.deadline
        attempt = 0
        problems: list[str] = []
        while True:
            wait_hint = 0.0
            for index, server in enumerate(self.servers):
                remaining = deadline - self._clock()
                if remaining <= 0:
                    break
                try:
                    response = self._send(index, method, path, body, remaining)
                except PinMismatch as exc:
                    raise ServerRefused(f"{server.url}: {exc}; refusing to talk to it") from None
                except requests.TooManyRedirects as exc:
                    # max_redirects = 0 makes requests raise this for any 3xx with a
                    # Location, even with allow_redirects=False: a redirect, not an outage.
                    status = exc.response.status_code if exc.response is not None else 0
                    raise ServerRefused(
                        f"{server.url}: answered with a redirect ({status}); refused"
                    ) from None
                except requests.RequestException as exc:
                    problems.append(f"{server.url}: {_describe(exc)}")
                    continue
                status = response.status_code
                if status in accept:
                    return Answer(status, _json_object(response, server.url))
                if 300 <= status < 400:
                    raise ServerRefused(
                        f"{server.url}: answered with a redirect ({status}); refused"
                    )
                if status == 429 or status >= 500:
                    wait_hint = max(wait_hint, _retry_after(response))
                    problems.append(f"{server.url}: HTTP {status}")
                    continue
                if status == 403:
                    raise ServerRefused(f"{server.url}: the server refused (403)")
                if status == 404:
                    raise ServerRefused(f"{server.url}: {path} not found (404); wrong URL?")
                raise AgentError(f"{server.url}: unexpected HTTP {status} for {path}")
            attempt += 1
            delay = retry_delay(self.network, attempt, self._jitter(), wait_hint)
            if self._clock() + delay >= deadline:
                last = problems[-1] if problems else "no server answered"
                raise ServerUnavailable(
                    f"no key server answered within {self.network.deadline:g} s"
                    f" ({len(problems)} failed attempt(s); last: {last})"
                )
            self._sleep(delay)

    # Routes

    def release(
        self, machine_id: str, refs: Sequence[DatasetRef]
    ) -> tuple[dict[DatasetRef, ReleasedKey], list[DatasetRef]]:
        """Every requested key in one request. Returns (released, denied)."""
        answer = self.call(
            "POST",
            protocol.ROUTE_RELEASE_BATCH,
            {
                "machine_id": machine_id,
                "datasets": [
                    {"pool_guid": r.pool_guid, "dataset_guid": r.dataset_guid} for r in refs
                ],
            },
        )
        keys = answer.body.get("keys")
        denied = answer.body.get("denied")
        if not isinstance(keys, list) or not isinstance(denied, list):
            raise BadKeyData("server answer lacks 'keys' or 'denied'")
        released: dict[DatasetRef, ReleasedKey] = {}
        try:
            for item in keys:
                key = _released_key(item)
                if key.ref not in refs:
                    key.secret.wipe()
                    raise BadKeyData("server sent a key that was not asked for")
                released[key.ref] = key
            refused = [_ref(item) for item in denied]
        except BadKeyData:
            for key in released.values():
                key.secret.wipe()
            raise
        return released, refused

    def enrol(self, machine_id: str, ref: DatasetRef, dataset: str, keyformat: str) -> ReleasedKey:
        answer = self.call(
            "POST",
            protocol.ROUTE_ENROL,
            {
                "machine_id": machine_id,
                "pool_guid": ref.pool_guid,
                "dataset_guid": ref.dataset_guid,
                "dataset": dataset,
                "keyformat": keyformat,
            },
            accept=(200, 201, 409),
        )
        if answer.status == 409:
            raise ServerRefused(
                f"{dataset}: the server already holds a key for this dataset (active, revoked,"
                " or pending with another keyformat); it never issues a second one"
            )
        key = _released_key(answer.body)
        if key.ref != ref or key.keyformat != keyformat:
            key.secret.wipe()
            raise BadKeyData("server answered for another dataset or keyformat")
        return key

    def activate(self, machine_id: str, ref: DatasetRef, key_id: str) -> None:
        self.call(
            "POST",
            protocol.ROUTE_ACTIVATE,
            {
                "machine_id": machine_id,
                "pool_guid": ref.pool_guid,
                "dataset_guid": ref.dataset_guid,
                "key_id": key_id,
            },
        )

    def checkin(self, machine_id: str) -> None:
        self.call("POST", protocol.ROUTE_CHECKIN, {"machine_id": machine_id})


def _describe(exc: requests.RequestException) -> str:
    if isinstance(exc, requests.Timeout):
        return "timed out"
    if isinstance(exc, requests.exceptions.SSLError):
        return "TLS handshake failed"
    if isinstance(exc, requests.ConnectionError):
        return "cannot connect"
    return type(exc).__name__


def _retry_after(response: requests.Response) -> float:
    value = response.headers.get("Retry-After", "")
    return float(value) if value.isdigit() and len(value) < 6 else 0.0


def _json_object(response: requests.Response, url: str) -> dict[str, Any]:
    if response.headers.get("Content-Type", "").split(";")[0].strip() != "application/json":
        raise BadKeyData(f"{url}: answer is not JSON")
    if len(response.content) > protocol.MAX_BODY_BYTES * 4:
        raise BadKeyData(f"{url}: answer is too large")
    try:
        body = response.json()
    except ValueError:
        raise BadKeyData(f"{url}: answer is not valid JSON") from None
    if not isinstance(body, dict):
        raise BadKeyData(f"{url}: answer is not a JSON object")
    return body


def _ref(item: Any) -> DatasetRef:
    if not isinstance(item, dict):
        raise BadKeyData("malformed dataset reference in the answer")
    try:
        return DatasetRef(
            validate.guid(item.get("pool_guid")), validate.guid(item.get("dataset_guid"))
        )
    except validate.InvalidInput:
        raise BadKeyData("malformed dataset reference in the answer") from None


def _released_key(item: Any) -> ReleasedKey:
    ref = _ref(item)
    keyformat, state, key_id, encoded = (
        item.get("keyformat"),
        item.get("state"),
        item.get("key_id"),
        item.get("key"),
    )
    if keyformat not in protocol.KEY_FORMATS or state not in ("pending", "active"):
        raise BadKeyData("answer has an unknown keyformat or state")
    if not isinstance(key_id, str) or not isinstance(encoded, str) or len(encoded) > 1024:
        raise BadKeyData("answer lacks key_id or key")
    try:
        validate.key_id(key_id)
        secret = Secret(base64.b64decode(encoded, validate=True))
    except (validate.InvalidInput, binascii.Error, ValueError):
        raise BadKeyData("answer carries a malformed key_id or key") from None
    return ReleasedKey(ref, key_id, keyformat, state, secret)
