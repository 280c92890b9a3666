"""The conversation with the key servers: retries, failover, strict parsing.

Each request goes out on its own pinned, mutually authenticated connection
(zfs_unlock_agent.transport); this module decides what an answer means and when
to try again.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import os
import ssl
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple, Self

from zfs_unlock_agent import config, transport
from zfs_unlock_agent.errors import (
    AgentError,
    BadKeyData,
    ServerRefused,
    ServerUnavailable,
)
from zfs_unlock_agent.log import log
from zfs_unlock_agent.secret import Secret
from zfs_unlock_common import der as der_fields
from zfs_unlock_common import pinning, protocol, validate
from zfs_unlock_common.protocol import DatasetRef

if TYPE_CHECKING:
    from zfs_unlock_agent.config import NetworkSettings, ServerSettings

# Answers carry at most a batch of keys; anything larger is not one of ours.
MAX_ANSWER_BYTES = protocol.MAX_BODY_BYTES * 4
# What a 403 names when this host's certificate does not say its enrolled name.
UNKNOWN_NAME = "<this host's enrolled name>"


class ReleasedKey(NamedTuple):
    ref: DatasetRef
    key_id: str
    keyformat: str
    state: str  # pending or active; "next" for a rotation's next key
    secret: Secret
    # The dataset's next key while a rotation runs: it opens the dataset once the agent
    # that rotates it has changed the key and before the server has made it active.
    next: ReleasedKey | None = None

    def wipe(self) -> None:
        self.secret.wipe()
        if self.next is not None:
            self.next.secret.wipe()


class Answer(NamedTuple):
    status: int
    body: dict[str, Any]


# The longest pause between two asks while a release waits for approval, whatever the
# server says.
MAX_APPROVAL_POLL = 60.0


class Pending(NamedTuple):
    """The server keeps keys back until a person approves request ID."""

    id: str
    refs: list[DatasetRef]
    retry_after: float


class Batch(NamedTuple):
    """A release's outcome: the keys, the datasets refused, and those still waiting for
    approval APPROVAL when the deadline came."""

    released: dict[DatasetRef, ReleasedKey]
    denied: list[DatasetRef]
    waiting: tuple[DatasetRef, ...] = ()
    approval: str = ""


class ApprovalTicket:
    """The nonce an agent's releases carry. The server binds a release that waits for
    approval to it (and to this host's certificate): the agent keeps it while its
    request waits, so that asking again, even in a later call, finds the same request,
    and takes a new one once the request is decided."""

    def __init__(self) -> None:
        self.nonce = ""
        self.told = ""
        self.pending: frozenset[DatasetRef] = frozenset()  # what its open request names
        self.renew()

    def renew(self) -> None:
        self.nonce = os.urandom(16).hex()
        self.pending = frozenset()

    def cover(self, refs: Sequence[DatasetRef]) -> None:
        """Before a release of REFS: its open request (if any) serves them only if it names
        them all. A dataset it does not name would be refused under this nonce, so the
        release becomes a new request, under a new nonce."""
        if self.pending and not set(refs) <= self.pending:
            self.renew()

    def note(self, pending: Pending) -> None:
        """Say once per request, on the terminal and in the journal, what waits and for
        what, so that the person who approves it knows which request is this host's."""
        self.pending = frozenset(pending.refs) | self.pending
        if pending.id == self.told:
            return
        self.told = pending.id
        log.warning(
            "the key server holds %d key(s) until a person approves request %s"
            " (on the key server: zfs-unlock-server approval approve %s)",
            len(pending.refs),
            pending.id,
            pending.id,
        )


def retry_delay(
    network: NetworkSettings, attempt: int, jitter: float, wait_hint: float = 0.0
) -> float:
    """The pause after failed round ATTEMPT (1, 2, ...): capped exponential backoff with
    full jitter (JITTER in [0, 1)), never shorter than the server's Retry-After."""
    ceiling = min(network.backoff_max, network.backoff_initial * 2.0 ** (attempt - 1))
    return max(jitter * ceiling, wait_hint)


def uniform() -> float:
    """A number in [0, 1) from the operating system's generator: the jitter of a pause.
    Not the random module, whose import costs every cold start about 1.5 ms."""
    return int.from_bytes(os.urandom(7), "big") / (1 << 56)


def summarize(problems: Sequence[str]) -> str:
    """Each distinct problem once, in the order first seen, with how often it happened.
    The last attempt may have had only the deadline's last moments and timed out; what
    the servers said before must still reach the operator."""
    counts = dict.fromkeys(problems, 0)
    for problem in problems:
        counts[problem] += 1
    return "; ".join(p if n == 1 else f"{p} (x{n})" for p, n in counts.items()) or "none"


def seconds(value: float) -> str:
    """A span for a person: 0.25, 1.2, 57 (the precision by the rounded value: never 1.00)."""
    if value < 0.995:
        return f"{value:.2f}"
    return f"{value:.1f}" if value < 9.95 else f"{value:.0f}"


def pem_certificate_der(pem: bytes) -> bytes:
    """The DER of a PEM certificate (ValueError when it is not one)."""
    return ssl.PEM_cert_to_DER_cert(pem.decode("ascii"))


def expired_certificate(certificate: Path, now: float) -> str:
    """When a TLS refusal of our certificate is its expiry: the message that says so and
    how to recover; "" otherwise (or when it cannot be read)."""
    try:
        not_after = der_fields.validity(pem_certificate_der(certificate.read_bytes()))[1]
    except (OSError, ValueError):
        return ""
    if now < not_after:
        return ""
    day = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(not_after))
    name = enrolled_name(certificate)
    return (
        f"this host's client certificate {certificate} expired on {day}, and the key server"
        " refuses it (it was not renewed in time: 'zfs-unlock-agent renew', which the daemon"
        " runs by itself, needs the certificate still valid). To recover: on this host run"
        f" 'zfs-unlock-agent identity --name {name}', which writes a CSR for the same key"
        f" beside it; copy that CSR to the key server as {name}.csr and run 'zfs-unlock-server"
        f" host cert {name} --csr {name}.csr --cert-out {name}.crt' there; install"
        f" {name}.crt here as {certificate}"
    )


def enrolled_name(certificate: Path) -> str:
    """The name the key server enrolled this host under: the server sets its certificate's
    common name. UNKNOWN_NAME when that cannot be read."""
    try:
        der = ssl.PEM_cert_to_DER_cert(certificate.read_text(encoding="ascii"))
        name = der_fields.subject_common_name(der)
        return validate.label(name or "", "host name")
    except (OSError, ValueError):  # UnicodeError, InvalidInput, CertificateFormatError
        return UNKNOWN_NAME


class KeyClient:
    """Talks to the configured servers in turn, within one overall deadline.

    Connection errors, timeouts, 5xx and 429 are retried with capped exponential
    backoff and full jitter (honouring Retry-After); a pin mismatch, a redirect,
    403 and 404 end the conversation at once.
    """

    def __init__(
        self,
        servers: Sequence[ServerSettings],
        client_cert: Path,
        client_key: Path,
        network: NetworkSettings,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
        jitter: Callable[[], float] = uniform,
        report: Callable[[str], None] = log.progress,
    ) -> None:
        self.servers = tuple(servers)
        self.network = network
        self._clock = clock
        self._sleep = sleep
        self._jitter = jitter
        self._report = report  # told of each failed attempt and what comes next
        self._client_cert = client_cert
        # One context for every server: it holds this host's certificate and key.
        context = config.client_context(client_cert, client_key)
        self._servers = [transport.PinnedServer(s.url, s.pins, context) for s in servers]
        self.requests_sent = 0

    def close(self) -> None:
        """Nothing stays open: every connection closes after its one request."""

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _send(
        self, index: int, method: str, path: str, body: dict[str, Any], remaining: float
    ) -> transport.Response:
        self.requests_sent += 1
        return self._servers[index].request(
            method,
            path,
            json.dumps(body, separators=(",", ":")).encode(),
            connect_timeout=self.network.connect_timeout,
            read_timeout=self.network.read_timeout,
            max_body=MAX_ANSWER_BYTES,
            # The transport cuts every wait to this; it keeps time by the monotonic
            # clock, whatever clock this client was given.
            deadline=time.monotonic() + remaining,
        )

    def call(
        self,
        method: str,
        path: str,
        body: dict[str, Any],
        accept: tuple[int, ...] = (200, 201),
        until: float | None = None,
    ) -> Answer:
        """UNTIL (this client's clock): an end earlier than the configured deadline's."""
        started = self._clock()
        deadline = started + self.network.deadline
        if until is not None:
            deadline = min(deadline, until)
        attempt = 0
        problems: list[str] = []
        # The last failed attempt, reported once it is known what comes next.
        untold = ""
        while True:
            wait_hint = 0.0
            for index, server in enumerate(self.servers):
                remaining = deadline - self._clock()
                if remaining <= 0:
                    break
                if untold:
                    self._report(f"{untold}; trying {server.url} now")
                    untold = ""
                try:
                    response = self._send(index, method, path, body, remaining)
                except transport.PinMismatch as exc:
                    raise ServerRefused(f"{server.url}: {exc}; refusing to talk to it") from None
                except transport.AnswerTooLarge:
                    raise BadKeyData(f"{server.url}: answer is too large") from None
                except transport.CertificateRefused as exc:
                    expired = expired_certificate(self._client_cert, time.time())
                    if expired:  # no server will take it, now or after any retry
                        raise ServerRefused(f"{server.url}: {expired}") from None
                    untold = f"{server.url}: {exc.reason}"
                    problems.append(untold)
                    continue
                except transport.TransportError as exc:
                    untold = f"{server.url}: {exc.reason}"
                    problems.append(untold)
                    continue
                status = response.status
                if status in accept:
                    return Answer(status, _json_object(response, server.url))
                if 300 <= status < 400:
                    raise ServerRefused(
                        f"{server.url}: answered with a redirect ({status}); refused"
                    )
                if status == 429 or status >= 500:
                    wait_hint = max(wait_hint, _retry_after(response))
                    untold = f"{server.url}: HTTP {status}"
                    problems.append(untold)
                    continue
                if status == 403:
                    raise ServerRefused(self._refused(server.url))
                if status == 404:
                    raise ServerRefused(f"{server.url}: {path} not found (404); wrong URL?")
                raise AgentError(f"{server.url}: unexpected HTTP {status} for {path}")
            attempt += 1
            delay = retry_delay(self.network, attempt, self._jitter(), wait_hint)
            now = self._clock()
            if now + delay >= deadline:
                raise ServerUnavailable(self._gave_up(problems, now - started, delay))
            if untold:
                self._report(
                    f"{untold}; next try in {seconds(delay)} s"
                    f" (deadline in {seconds(deadline - now)} s)"
                )
                untold = ""
            self._sleep(delay)

    def _gave_up(self, problems: Sequence[str], spent: float, delay: float) -> str:
        """What happened, in measured figures: the time the attempts took, and whether the
        deadline ran out or the next pause would have run past it."""
        limit = self.network.deadline
        tried = f"({len(problems)} failed attempt(s): {summarize(problems)})"
        if spent >= limit:
            return (
                f"no key server answered in {seconds(spent)} s, when the {limit:g} s deadline"
                f" ran out {tried}"
            )
        return (
            f"no key server answered in {seconds(spent)} s of attempts {tried}; the next try,"
            f" {seconds(delay)} s later, would have passed the {limit:g} s deadline"
        )

    def _refused(self, url: str) -> str:
        """A 403: the server never says why to the host; its audit log does."""
        return (
            f"{url}: the key server refused (403); the reason is in its audit log: on the key"
            f" server run 'zfs-unlock-server audit --host {enrolled_name(self._client_cert)}"
            " --last 5'"
        )

    # Routes

    def release(
        self,
        machine_id: str,
        refs: Sequence[DatasetRef],
        ticket: ApprovalTicket | None = None,
        stop: Callable[[], bool] = lambda: False,
    ) -> Batch:
        """Every requested key in one request; keys that wait for a person's approval are
        asked for again, as the server says, until they come, are refused, STOP says so,
        or the deadline comes (then they are in the answer's `waiting`, and TICKET keeps
        the nonce for the next call to find the same request)."""
        ticket = ticket or ApprovalTicket()
        ticket.cover(refs)
        until = self._clock() + self.network.deadline
        released: dict[DatasetRef, ReleasedKey] = {}
        denied: list[DatasetRef] = []
        asking = list(refs)
        try:
            while True:
                got, refused, pending = self._release_once(machine_id, asking, ticket.nonce, until)
                released |= got
                denied += refused
                if pending is None:
                    ticket.renew()  # decided: a later release is a new request
                    return Batch(released, denied)
                ticket.note(pending)
                asking = pending.refs
                pause = min(max(pending.retry_after, 1.0), MAX_APPROVAL_POLL)
                left = until - self._clock()
                if left <= pause or stop():
                    # The deadline is spent waiting, not returned early: a caller that asks
                    # again at once (the race, the password agent) would only ask too often.
                    if left > 0 and not stop():
                        self._sleep(left)
                    return Batch(released, denied, tuple(asking), pending.id)
                self._report(
                    f"approval {pending.id} is pending; asking again in {seconds(pause)} s"
                )
                self._sleep(pause)
                if stop():
                    return Batch(released, denied, tuple(asking), pending.id)
        except BaseException:
            for key in released.values():
                key.wipe()
            raise

    def _release_once(
        self, machine_id: str, refs: Sequence[DatasetRef], nonce: str, until: float
    ) -> tuple[dict[DatasetRef, ReleasedKey], list[DatasetRef], Pending | None]:
        answer = self.call(
            "POST",
            protocol.ROUTE_RELEASE_BATCH,
            {
                "machine_id": machine_id,
                "datasets": [
                    {"pool_guid": r.pool_guid, "dataset_guid": r.dataset_guid} for r in refs
                ],
                "nonce": nonce,
            },
            until=until,
        )
        keys = answer.body.get("keys")
        denied = answer.body.get("denied")
        upcoming = answer.body.get("next_keys", [])  # absent from servers without rotation
        if not isinstance(keys, list) or not isinstance(denied, list):
            raise BadKeyData("server answer lacks 'keys' or 'denied'")
        if not isinstance(upcoming, list):
            raise BadKeyData("server answer has a malformed 'next_keys'")
        released: dict[DatasetRef, ReleasedKey] = {}
        asked = set(refs)
        try:
            for item in keys:
                key = _released_key(item, ("pending", "active"))
                if key.ref not in asked or key.ref in released:
                    key.secret.wipe()
                    raise BadKeyData("server sent a key that was not asked for")
                released[key.ref] = key
            for item in upcoming:
                key = _released_key(item, ("next",))
                current = released.get(key.ref)
                if (
                    current is None
                    or current.next is not None
                    or key.keyformat != current.keyformat
                ):
                    key.secret.wipe()
                    raise BadKeyData("server sent a next key without its dataset's key")
                released[key.ref] = current._replace(next=key)
            refused = [_ref(item) for item in denied]
            pending = _pending(answer.body.get("pending"), asked - set(released))
        except BadKeyData:
            for key in released.values():
                key.wipe()
            raise
        return released, refused, pending

    def next_key(self, machine_id: str, ref: DatasetRef) -> ReleasedKey:
        """A rotation's next key for the dataset REF (the same one when asked again)."""
        answer = self.call(
            "POST",
            protocol.ROUTE_NEXT_KEY,
            {
                "machine_id": machine_id,
                "pool_guid": ref.pool_guid,
                "dataset_guid": ref.dataset_guid,
            },
            accept=(200, 201, 409),
        )
        if answer.status == 409:
            raise ServerRefused(
                "the server rotates only an active key: this dataset's key is pending or revoked"
            )
        key = _released_key(answer.body, ("next",))
        if key.ref != ref:
            key.secret.wipe()
            raise BadKeyData("server answered for another dataset")
        return key

    def enroll(self, machine_id: str, ref: DatasetRef, dataset: str, keyformat: str) -> ReleasedKey:
        answer = self.call(
            "POST",
            protocol.ROUTE_ENROLL,
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

    def renew(self, machine_id: str, csr_pem: bytes) -> bytes:
        """A new certificate for this host over the CSR's key (renew.py checks it)."""
        answer = self.call(
            "POST", protocol.ROUTE_RENEW, {"machine_id": machine_id, "csr": csr_pem.decode()}
        )
        certificate = answer.body.get("certificate")
        if not isinstance(certificate, str) or len(certificate) > protocol.MAX_CSR_CHARS:
            raise BadKeyData("server answer has no certificate")
        return certificate.encode("ascii", "replace")

    def checkin(self, machine_id: str, pins: Sequence[str] | None = None) -> CheckinAnswer:
        """Prove liveness, and tell the server which of its pins this host holds (PINS).
        The answer: which datasets' keys to rotate now, which pins to trust."""
        body: dict[str, Any] = {"machine_id": machine_id}
        if pins is not None:
            body["pins"] = sorted(pins)
        answer = self.call("POST", protocol.ROUTE_CHECKIN, body)
        due = answer.body.get("rotate", [])  # absent from servers without rotation
        if not isinstance(due, list):
            raise BadKeyData("server answer has a malformed 'rotate'")
        renew = answer.body.get("renew", False)  # absent from servers without CA rollover
        if not isinstance(renew, bool):
            raise BadKeyData("server answer has a malformed 'renew'")
        return CheckinAnswer([_ref(item) for item in due], _announced_pins(answer.body), renew)


class CheckinAnswer(NamedTuple):
    rotate: list[DatasetRef]
    # The pins the server vouches for (served and next); None from a server that does
    # not announce them.
    pins: list[str] | None
    # A CA rollover runs and this host's certificate is the old CA's: renew it now.
    renew: bool = False


def _announced_pins(body: dict[str, Any]) -> list[str] | None:
    announced = body.get("pins")
    if announced is None:
        return None
    malformed = BadKeyData("server answer has malformed 'pins'")
    if not isinstance(announced, dict):
        raise malformed
    found: list[str] = []
    for role in ("current", "next"):
        pins = announced.get(role, [])
        if not isinstance(pins, list) or len(pins) > protocol.MAX_REPORTED_PINS:
            raise malformed
        for pin in pins:
            if not isinstance(pin, str):
                raise malformed
            try:
                found.append(pinning.format_pin(pinning.parse_pin(pin)))
            except pinning.PinError:
                raise malformed from None
    return found


def _retry_after(response: transport.Response) -> float:
    value = response.headers.get("retry-after", "")
    return float(value) if value.isdigit() and len(value) < 6 else 0.0


def _json_object(response: transport.Response, url: str) -> dict[str, Any]:
    try:
        if response.headers.get("content-type", "").split(";")[0].strip() != "application/json":
            raise BadKeyData(f"{url}: answer is not JSON")
        try:
            body = json.loads(response.body)
        except ValueError:  # UnicodeDecodeError included
            raise BadKeyData(f"{url}: answer is not valid JSON") from None
    finally:
        response.body[:] = bytes(len(response.body))  # the keys' base64 was in it
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


def _released_key(item: Any, states: tuple[str, ...] = ("pending", "active")) -> ReleasedKey:
    ref = _ref(item)
    keyformat, state, key_id, encoded = (
        item.get("keyformat"),
        item.get("state"),
        item.get("key_id"),
        item.get("key"),
    )
    if keyformat not in protocol.KEY_FORMATS or state not in states:
        raise BadKeyData("answer has an unknown keyformat or state")
    if not isinstance(key_id, str) or not isinstance(encoded, str) or len(encoded) > 1024:
        raise BadKeyData("answer lacks key_id or key")
    try:
        validate.key_id(key_id)
        secret = Secret(base64.b64decode(encoded, validate=True))
    except (validate.InvalidInput, binascii.Error, ValueError):
        raise BadKeyData("answer carries a malformed key_id or key") from None
    return ReleasedKey(ref, key_id, keyformat, state, secret)


def _pending(item: Any, waiting: set[DatasetRef]) -> Pending | None:
    """The answer's "pending" (None when absent): datasets asked for and not released."""
    if item is None:
        return None
    if not isinstance(item, dict) or not isinstance(item.get("datasets"), list):
        raise BadKeyData("server answer has a malformed 'pending'")
    try:
        approval_id = validate.approval_id(item.get("id"))
    except validate.InvalidInput:
        raise BadKeyData("server answer has a malformed approval id") from None
    retry_after = item.get("retry_after")
    if (
        isinstance(retry_after, bool)
        or not isinstance(retry_after, int | float)
        or not math.isfinite(retry_after)
        or retry_after < 0
    ):
        raise BadKeyData("server answer has a malformed 'retry_after'")
    refs = [_ref(d) for d in item["datasets"]]
    if not refs or not set(refs) <= waiting or len(set(refs)) != len(refs):
        raise BadKeyData("server holds back datasets that were not asked for")
    return Pending(approval_id, refs, float(retry_after))
