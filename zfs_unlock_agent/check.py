"""`zfs-unlock-agent check`: ask every configured key server, once, whether this host
could fetch its keys now, and say what stands in the way in the admin's terms.

One request per server (the server's answer about this host's own enrollment, which
changes nothing and releases no key), no retries: each failure is the answer. Every
class of failure has its own exit status (CHECKS), so a script can tell a server that
is down from a host that is not enrolled; the first failure found decides it.
"""

from __future__ import annotations

import datetime
import json
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

from zfs_unlock_agent import transport
from zfs_unlock_agent.config import Config, ServerSettings, client_context
from zfs_unlock_common import pinning, protocol


class Check(NamedTuple):
    exit_code: int
    meaning: str  # as the man page's table says it


# Every class of failure, in the order they are found; the man page lists the same.
CHECKS: dict[str, Check] = {
    "dns": Check(10, "the server's name does not resolve"),
    "refused": Check(11, "the connection was refused (nothing listens on that port)"),
    "unreachable": Check(12, "the network or the server's host is unreachable"),
    "timeout": Check(13, "no answer in time (connect_timeout, read_timeout)"),
    "connection": Check(14, "the connection failed otherwise, or the answer was not HTTP"),
    "tls": Check(15, "the TLS handshake failed"),
    "pin": Check(16, "the server's public key matches no configured pin"),
    "client-certificate": Check(17, "the server's TLS layer refused this host's certificate"),
    "not-enrolled": Check(18, "the server does not know this host's certificate"),
    "disabled": Check(19, "the host is enrolled but disabled"),
    "machine-id": Check(20, "this host's machine-id is not the enrolled one"),
    "address": Check(21, "the host's address is not in its allowed networks"),
    "pool": Check(22, "a managed encryption root is on a pool the host may not unlock"),
    "expiry": Check(23, "the client certificate expires within 30 days"),
    "clock": Check(24, "this host's clock is more than 5 minutes from the server's"),
    "server": Check(25, "the server answered with an error (5xx, 429, or 404: wrong URL path)"),
}

CLOCK_TOLERANCE = 300.0  # seconds of skew: certificates and audit times stop agreeing
# How long to give the server to refuse this host's certificate before the request goes
# out; a server that accepts it says nothing, so every check of a good server waits this.
LISTEN_FIRST = 1.0


class Report:
    """The lines of one server's report and the first failure among them."""

    def __init__(self, say: Callable[[str], None]) -> None:
        self.say = say
        self.failure = ""

    def ok(self, text: str) -> None:
        self.say(f"  ok    {text}")

    def fail(self, kind: str, text: str) -> None:
        self.failure = self.failure or kind
        self.say(f"  FAIL  {text} [exit {CHECKS[kind].exit_code}]")

    def note(self, text: str) -> None:
        self.say(f"        {text}")


def check_servers(
    config: Config,
    machine_id: str,
    pools: Mapping[str, str],
    managed_pools: Sequence[str],
    say: Callable[[str], None],
    clock: Callable[[], float] = time.time,
) -> int:
    """Check each server in turn; POOLS maps the imported pools' GUIDs to their names,
    MANAGED_POOLS are the GUIDs of the pools that hold managed encryption roots. Returns
    0, or the exit status of the first failure."""
    context = client_context(config.client_certificate, config.client_key)
    failures: list[str] = []
    for settings in config.trusted_servers():
        say(settings.url)
        report = Report(say)
        server = transport.PinnedServer(settings.url, settings.pins, context)
        _check_one(server, settings, config, machine_id, pools, managed_pools, report, clock)
        if report.failure:
            failures.append(report.failure)
    good = len(config.servers) - len(failures)
    say(f"{good} of {len(config.servers)} key server(s) would release this host's keys now")
    return CHECKS[failures[0]].exit_code if failures else 0


def _check_one(
    server: transport.PinnedServer,
    settings: ServerSettings,
    config: Config,
    machine_id: str,
    pools: Mapping[str, str],
    managed_pools: Sequence[str],
    report: Report,
    clock: Callable[[], float],
) -> None:
    network = config.network
    sent = clock()
    try:
        response = server.request(
            "POST",
            protocol.ROUTE_HOST_STATUS,
            json.dumps({"machine_id": machine_id}).encode(),
            connect_timeout=network.connect_timeout,
            read_timeout=network.read_timeout,
            max_body=protocol.MAX_BODY_BYTES,
            deadline=time.monotonic() + network.connect_timeout + 3 * network.read_timeout,
            listen_first=min(LISTEN_FIRST, network.read_timeout),
        )
    except transport.PinMismatch as exc:
        report.ok(f"reachable: TCP and TLS to {server.host}:{server.port}")
        report.fail("pin", "the server's public key matches no configured pin")
        report.note(f"it presented:  {exc.presented}")
        for pin in settings.pins:
            report.note(f"configured:    {pinning.format_pin(pin)}")
        report.note("on the key server, 'zfs-unlock-server pin' prints its pin")
        return
    except transport.TransportError as exc:
        _transport_failure(exc, server, config, report, clock)
        return
    answered = clock()
    report.ok(f"reachable: TCP and TLS to {server.host}:{server.port}")
    report.ok("pin matches the server's public key")
    report.ok("client certificate accepted by the server's TLS layer")
    if response.status == 403:
        report.fail("not-enrolled", "the server does not know this host's client certificate")
        report.note(
            "enroll the host ('zfs-unlock-server host add ... --csr'), or check that"
            f" {config.client_certificate} is the certificate the server issued for it"
        )
        return
    if response.status != 200:
        report.fail("server", f"the server answered HTTP {response.status}")
        if response.status == 404:
            report.note("a wrong path in the URL, or a server older than this agent")
        return
    try:
        status = json.loads(response.body)
    except ValueError:
        status = None
    if not isinstance(status, dict):
        report.fail("server", "the server's answer is not a JSON object")
        return
    _enrollment(status, pools, managed_pools, report)
    _timing(status, (sent + answered) / 2, report)


def _transport_failure(
    exc: transport.TransportError,
    server: transport.PinnedServer,
    config: Config,
    report: Report,
    clock: Callable[[], float],
) -> None:
    where = f"{server.host}:{server.port}"
    kind = exc.kind if exc.kind in CHECKS else "connection"
    if kind == "dns":
        report.fail(kind, f"{exc.detail}")
    elif kind in ("refused", "unreachable", "connection"):
        report.fail(kind, f"cannot reach {where}: {exc.reason}")
    elif kind == "timeout":
        report.fail(kind, f"{where}: no answer within the time limits ({exc.reason})")
    elif kind == "client-certificate":
        report.ok(f"reachable: TCP and TLS to {where}")
        report.ok("pin matches the server's public key")
        report.fail(kind, f"{exc.reason}")
        expiry = certificate_expiry(config)
        if expiry is not None and expiry <= clock():
            report.note(f"{config.client_certificate} expired on {_day(expiry)}")
        report.note(
            "a certificate another CA issued, or one that expired; the server's"
            " 'zfs-unlock-server host cert NAME --csr FILE' issues a new one"
        )
    else:
        report.fail(kind, f"{where}: {exc.reason}")


def _enrollment(
    status: dict[str, Any],
    pools: Mapping[str, str],
    managed_pools: Sequence[str],
    report: Report,
) -> None:
    name = str(status.get("host", "?"))
    if status.get("enabled") is True:
        report.ok(f"enrolled as {name}, enabled")
    else:
        reason = str(status.get("disabled_reason") or "by an admin")
        report.fail("disabled", f"enrolled as {name}, but disabled ({reason})")
        report.note(f"on the key server: zfs-unlock-server host enable {name}")
    if status.get("machine_id_matches") is True:
        report.ok("machine-id matches the enrollment")
    else:
        report.fail("machine-id", "this host's machine-id is not the one enrolled")
        report.note(f"see 'zfs-unlock-server host show {name}' on the key server")
    source = str(status.get("source_ip", "?"))
    if status.get("address_allowed") is True:
        report.ok(f"requests from {source} are allowed")
    else:
        report.fail("address", f"requests from {source} are not in the host's allowed networks")
    allowed = [str(p) for p in status.get("pools", [])]
    if status.get("any_pool") is True:
        report.ok("may unlock datasets on any pool")
    else:
        named = ", ".join(f"{g} ({pools.get(g, 'not imported here')})" for g in allowed)
        report.ok(f"may unlock datasets on pools {named or 'none'}")
        for guid in managed_pools:
            if guid not in allowed:
                report.fail(
                    "pool",
                    f"pool {pools.get(guid, '?')} ({guid}) holds a managed encryption root,"
                    " but the host may not unlock datasets on it",
                )
    report.note(f"to see why a key is refused: zfs-unlock-server audit --host {name} --last 5")


def _timing(status: dict[str, Any], local_midpoint: float, report: Report) -> None:
    not_after, server_time = status.get("certificate_not_after"), status.get("server_time")
    if not isinstance(not_after, int | float) or not isinstance(server_time, int | float):
        report.fail("server", "the server's answer lacks the certificate's expiry or its time")
        return
    left = not_after - server_time
    if left < protocol.CERTIFICATE_WARNING:
        report.fail("expiry", f"client certificate expires on {_day(not_after)}, in {_days(left)}")
        report.note("renew it: zfs-unlock-server host cert NAME --csr FILE")
    else:
        report.ok(f"client certificate valid until {_day(not_after)} ({_days(left)})")
    skew = local_midpoint - server_time
    ahead = "ahead of" if skew > 0 else "behind"
    if abs(skew) > CLOCK_TOLERANCE:
        report.fail("clock", f"this host's clock is {abs(skew):.0f} s {ahead} the server's")
    else:
        report.ok(f"clock within {max(abs(skew), 0.1):.1f} s of the server's")


def certificate_expiry(config: Config) -> float | None:
    """When the local client certificate expires (None if it cannot be read)."""
    # Here only: the X.509 library is large, and the unlock path never needs it.
    from cryptography import x509  # noqa: PLC0415

    try:
        cert = x509.load_pem_x509_certificate(config.client_certificate.read_bytes())
    except (OSError, ValueError):
        return None
    # not_valid_after_utc from cryptography 42; Debian 12's 38 has the naive one only.
    utc = getattr(cert, "not_valid_after_utc", None)
    return (utc or cert.not_valid_after.replace(tzinfo=datetime.UTC)).timestamp()


def _day(stamp: float) -> str:
    return datetime.datetime.fromtimestamp(stamp, datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")


def _days(seconds: float) -> str:
    days = seconds / 86400
    return f"{days:.0f} days" if days >= 2 else f"{seconds / 3600:.0f} hours"
