"""KeyClient.call on its own: what the operator is told when the deadline runs out.
(The whole conversation against real servers is in test_transport.py.)"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.keyserver import KeyServer
from zfs_unlock_agent import transport
from zfs_unlock_agent.config import NetworkSettings, ServerSettings
from zfs_unlock_agent.errors import ServerUnavailable
from zfs_unlock_agent.keyclient import KeyClient, summarize


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
    time = FakeTime()
    network = NetworkSettings(deadline=10, backoff_initial=1, backoff_max=1)
    client = KeyClient(
        [ServerSettings("https://127.0.0.1:9", (b"\0" * 32,))],
        me.cert,
        me.key,
        network,
        clock=time.clock,
        sleep=time.sleep,
        jitter=lambda: 0.999,
    )
    outcomes: list[transport.Response | transport.TransportError] = [
        *(transport.Response(500, {}, bytearray()) for _ in range(3)),
        transport.TimedOut(),
        *(transport.Response(500, {}, bytearray()) for _ in range(20)),
    ]

    def scripted(*args: object, **kwargs: object) -> transport.Response:
        time.now += 2.0  # each exchange takes time; the fourth runs into the deadline
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
