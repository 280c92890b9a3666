"""KeyClient.call on its own: what the operator is told when the deadline runs out.
(The whole conversation against real servers is in test_transport.py.)"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from tests.fakes.stub_https import StubHTTPS, json_reply, self_signed_cert
from tests.keyserver import KeyServer
from zfs_unlock_agent import transport
from zfs_unlock_agent.config import NetworkSettings, ServerSettings
from zfs_unlock_agent.errors import ServerUnavailable
from zfs_unlock_agent.keyclient import KeyClient, summarize, uniform
from zfs_unlock_common import pinning


class FakeTime:
    def __init__(self) -> None:
        self.now = 0.0

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


def test_summarize_counts_each_problem_in_the_order_first_seen() -> None:
    problems = ["a: HTTP 500", "b: cannot connect", "a: HTTP 500", "a: timed out"]
    assert summarize(problems) == "a: HTTP 500 (x2); b: cannot connect; a: timed out"
    assert summarize([]) == "none"


def test_a_last_attempt_cut_short_does_not_hide_what_the_server_said(
    shared_keyserver: KeyServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Three answers of HTTP 500, then an attempt begun in the deadline's last moment that
    times out: the error names both, the 500s first."""
    me = shared_keyserver.add_host("kc-summary")
    clock = FakeTime()
    network = NetworkSettings(deadline=10, backoff_initial=1, backoff_max=1)
    client = KeyClient(
        [ServerSettings("https://127.0.0.1:9", (b"\0" * 32,))],
        me.cert,
        me.key,
        network,
        clock=clock.clock,
        sleep=clock.sleep,
        jitter=lambda: 0.999,
    )
    outcomes: list[transport.Response | transport.TransportError] = [
        *(transport.Response(500, {}, bytearray()) for _ in range(3)),
        transport.TimedOut(),
        *(transport.Response(500, {}, bytearray()) for _ in range(20)),
    ]

    def scripted(*args: object, **kwargs: object) -> transport.Response:
        clock.now += 2.0  # each exchange takes time; the fourth runs into the deadline
        outcome = outcomes.pop(0)
        if isinstance(outcome, transport.TransportError):
            raise outcome
        return outcome

    monkeypatch.setattr(client._servers[0], "request", scripted)
    with pytest.raises(ServerUnavailable) as raised:
        client.call("POST", "/v1/keys/release", {})
    message = str(raised.value)
    assert "(4 failed attempt(s): https://127.0.0.1:9: HTTP 500 (x3);" in message
    assert message.endswith("https://127.0.0.1:9: timed out)")


# The deadline against a server that is never quite silent


def test_a_trickling_pinned_server_cannot_hold_a_call_past_its_deadline(
    shared_keyserver: KeyServer, tmp_path: Path
) -> None:
    """One byte every 0.25 s never lets the 3 s read timeout fire, and the answer would take
    half a minute; the call still ends at its 1.5 s deadline, not when the answer is whole."""
    me = shared_keyserver.add_host("kc-trickle")
    tls = self_signed_cert(tmp_path / "tls", "slow")
    answer = json_reply({"keys": [], "denied": [], "padding": "p" * 60})
    network = NetworkSettings(deadline=1.5, connect_timeout=1, read_timeout=3)
    with StubHTTPS(tls, [answer], trickle=0.25) as slow:
        client = KeyClient(
            [ServerSettings(slow.url, (pinning.parse_pin(tls.pin),))], me.cert, me.key, network
        )
        started = time.monotonic()
        with pytest.raises(ServerUnavailable) as raised:
            client.call("POST", "/v1/keys/release", {})
        elapsed = time.monotonic() - started
    assert elapsed < network.deadline + 2.0
    assert "timed out" in str(raised.value)
    assert client.requests_sent == 1  # nothing was left for a second try


def test_the_jitter_is_uniform_in_zero_to_one() -> None:
    draws = [uniform() for _ in range(2000)]
    assert all(0 <= d < 1 for d in draws)
    assert len(set(draws)) == len(draws)
    # Each tenth of [0, 1) gets its share, give or take (p of a false alarm < 1e-9).
    for tenth in range(10):
        share = sum(tenth / 10 <= d < (tenth + 1) / 10 for d in draws)
        assert 100 < share < 320, (tenth, share)
