"""KeyClient.call on its own: what the operator is told when the deadline runs out.
(The whole conversation against real servers is in test_transport.py.)"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.fakes.stub_https import StubHTTPS, json_reply, make_ca, self_signed_cert
from tests.keyserver import KeyServer
from zfs_unlock_agent import transport
from zfs_unlock_agent.config import NetworkSettings, ServerSettings
from zfs_unlock_agent.errors import EX_NOPERM, BadKeyData, ServerRefused, ServerUnavailable
from zfs_unlock_agent.keyclient import (
    UNKNOWN_NAME,
    ApprovalTicket,
    KeyClient,
    enrolled_name,
    seconds,
    summarize,
    uniform,
)
from zfs_unlock_common import pinning
from zfs_unlock_common.protocol import DatasetRef


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
    assert message.startswith("no key server answered in 11 s, when the 10 s deadline ran out")
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


# What the operator sees while the client waits, and when it gives up


def scripted_client(
    tmp_path: Path,
    outcomes: list[transport.Response | transport.TransportError],
    urls: tuple[str, ...] = ("https://127.0.0.1:9",),
    step: float = 0.2,
    **network: float,
) -> tuple[KeyClient, list[str]]:
    """A client on a fake clock whose exchanges take STEP seconds each and end as OUTCOMES
    say, in turn; returns it and the list its progress lines go to."""
    tls = make_ca(tmp_path / "me", "kc-host")  # a certificate whose common name is kc-host
    clock = FakeTime()
    told: list[str] = []
    client = KeyClient(
        [ServerSettings(url, (b"\0" * 32,)) for url in urls],
        tls.cert,
        tls.key,
        NetworkSettings(**network),
        clock=clock.clock,
        sleep=clock.sleep,
        jitter=lambda: 0.5,
        report=told.append,
    )

    def scripted(*args: object, **kwargs: object) -> transport.Response:
        clock.now += step
        outcome = outcomes.pop(0)
        if isinstance(outcome, transport.TransportError):
            raise outcome
        return outcome

    for server in client._servers:
        server.request = scripted  # type: ignore[method-assign]
    return client, told


def refused() -> transport.ConnectFailed:
    return transport.ConnectFailed("connection refused")


def answer(status: int) -> transport.Response:
    return transport.Response(status, {"content-type": "application/json"}, bytearray(b"{}"))


def test_each_failed_attempt_says_why_and_when_the_next_comes(tmp_path: Path) -> None:
    client, told = scripted_client(
        tmp_path, [refused(), answer(503), answer(200)], deadline=10, backoff_initial=1
    )

    assert client.call("POST", "/v1/keys/release", {}).status == 200

    assert told == [
        (
            "https://127.0.0.1:9: cannot connect (connection refused);"
            " next try in 0.50 s (deadline in 9.8 s)"
        ),
        "https://127.0.0.1:9: HTTP 503; next try in 1.0 s (deadline in 9.1 s)",
    ]


def test_a_failed_server_names_the_one_tried_next(tmp_path: Path) -> None:
    client, told = scripted_client(
        tmp_path,
        [refused(), answer(500), answer(200)],
        urls=("https://a.example:8443", "https://b.example:8443"),
        deadline=10,
        backoff_initial=1,
    )

    assert client.call("POST", "/v1/keys/release", {}).status == 200

    assert told == [
        (
            "https://a.example:8443: cannot connect (connection refused);"
            " trying https://b.example:8443 now"
        ),
        "https://b.example:8443: HTTP 500; next try in 0.50 s (deadline in 9.6 s)",
    ]


def test_giving_up_early_gives_the_measured_time_not_the_deadline(tmp_path: Path) -> None:
    """Pauses of 1.5, 3 and 6 s: after 5.1 s the next try would come at 11.1 s, past the
    8 s deadline. The client stops there and says so, with the figures as they were."""
    client, told = scripted_client(
        tmp_path, [answer(500)] * 5, deadline=8, backoff_initial=3, backoff_max=12
    )

    with pytest.raises(ServerUnavailable) as raised:
        client.call("POST", "/v1/keys/release", {})

    assert str(raised.value) == (
        "no key server answered in 5.1 s of attempts (3 failed attempt(s):"
        " https://127.0.0.1:9: HTTP 500 (x3)); the next try, 6.0 s later,"
        " would have passed the 8 s deadline"
    )
    assert len(told) == 2  # the last failure is in the error itself


def test_a_deadline_that_ran_out_is_named_as_such(tmp_path: Path) -> None:
    client, _ = scripted_client(
        tmp_path, [answer(500), transport.TimedOut()], step=2, deadline=3, backoff_initial=1
    )

    with pytest.raises(ServerUnavailable) as raised:
        client.call("POST", "/v1/keys/release", {})

    assert str(raised.value) == (
        "no key server answered in 4.5 s, when the 3 s deadline ran out (2 failed attempt(s):"
        " https://127.0.0.1:9: HTTP 500; https://127.0.0.1:9: timed out)"
    )


def test_a_403_says_where_the_reason_is(tmp_path: Path) -> None:
    client, _ = scripted_client(tmp_path, [answer(403)], deadline=10)

    with pytest.raises(ServerRefused) as raised:
        client.call("POST", "/v1/keys/release", {})

    assert str(raised.value) == (
        "https://127.0.0.1:9: the key server refused (403); the reason is in its audit log:"
        " on the key server run 'zfs-unlock-server audit --host kc-host --last 5'"
    )
    assert raised.value.exit_code == EX_NOPERM


def test_the_enrolled_name_is_the_certificates_common_name(tmp_path: Path) -> None:
    tls = make_ca(tmp_path / "tls", "web-01")
    (tmp_path / "junk.crt").write_text("not a certificate\n")

    assert enrolled_name(tls.cert) == "web-01"
    assert enrolled_name(tmp_path / "junk.crt") == UNKNOWN_NAME
    assert enrolled_name(tmp_path / "missing.crt") == UNKNOWN_NAME


def test_spans_are_written_with_the_precision_of_their_rounded_value() -> None:
    values = (0.004, 0.25, 0.996, 1.04, 9.96, 57.4)
    assert [seconds(v) for v in values] == ["0.00", "0.25", "1.0", "1.0", "10", "57"]


# Releases that wait for approval, on the fake clock

REF = {"pool_guid": "1", "dataset_guid": "2"}
OTHER = {"pool_guid": "1", "dataset_guid": "3"}


def body(payload: dict[str, object]) -> transport.Response:
    return transport.Response(
        200, {"content-type": "application/json"}, bytearray(json.dumps(payload).encode())
    )


def waiting(
    retry_after: object = 5, datasets: object = (REF,), ident: str = "a-0123456789ab"
) -> transport.Response:
    pending = {"id": ident, "retry_after": retry_after, "datasets": list(datasets)}  # type: ignore[call-overload]
    return body({"keys": [], "denied": [], "pending": pending})


def test_a_waiting_release_is_asked_for_again_with_the_same_nonce_until_its_deadline(
    tmp_path: Path,
) -> None:
    client, told = scripted_client(tmp_path, [waiting() for _ in range(4)], deadline=20)
    sent: list[dict[str, object]] = []
    for server in client._servers:
        scripted = server.request

        def recording(
            *args: object, scripted: Callable[..., transport.Response] = scripted, **kwargs: object
        ) -> transport.Response:
            sent.append(json.loads(args[2]))  # type: ignore[arg-type]
            return scripted(*args, **kwargs)

        server.request = recording  # type: ignore[method-assign]
    ticket = ApprovalTicket()
    batch = client.release("0" * 32, [DatasetRef("1", "2")], ticket)
    assert batch.released == {} and batch.denied == []
    assert batch.waiting == (DatasetRef("1", "2"),) and batch.approval == "a-0123456789ab"
    assert len(sent) == 4  # at 0.2, 5.4, 10.6, 15.8 s; a fifth would pass 20 s
    assert {s["nonce"] for s in sent} == {ticket.nonce}, "one nonce for the whole wait"
    assert told == ["approval a-0123456789ab is pending; asking again in 5.0 s"] * 3


@pytest.mark.parametrize(
    ("pending", "said"),
    [
        (waiting(ident="a-XYZ"), "malformed approval id"),
        (waiting(retry_after=True), "malformed 'retry_after'"),
        (waiting(retry_after="5"), "malformed 'retry_after'"),
        (
            body(
                {
                    "keys": [],
                    "denied": [],
                    "pending": {
                        "id": "a-0123456789ab",
                        "datasets": [REF],
                        "retry_after": float("nan"),
                    },
                }
            ),
            "malformed 'retry_after'",
        ),
        (waiting(datasets=(OTHER,)), "not asked for"),
        (waiting(datasets=()), "not asked for"),
        (waiting(datasets=(REF, REF)), "not asked for"),
        (body({"keys": [], "denied": [], "pending": []}), "malformed 'pending'"),
    ],
    ids=["id", "bool", "string", "nan", "other", "none", "twice", "list"],
)
def test_a_malformed_pending_answer_is_bad_key_data(
    tmp_path: Path, pending: transport.Response, said: str
) -> None:
    client, _ = scripted_client(tmp_path, [pending], deadline=20)
    with pytest.raises(BadKeyData, match=said):
        client.release("0" * 32, [DatasetRef("1", "2")])


def test_a_ticket_takes_a_new_nonce_once_its_request_is_decided(tmp_path: Path) -> None:
    decided = body({"keys": [], "denied": [REF]})
    client, _ = scripted_client(tmp_path, [waiting(), decided], deadline=20)
    ticket = ApprovalTicket()
    first = ticket.nonce
    batch = client.release("0" * 32, [DatasetRef("1", "2")], ticket)
    assert batch.denied == [DatasetRef("1", "2")] and batch.waiting == ()
    assert ticket.nonce != first and len(ticket.nonce) == 32


def test_a_release_that_names_more_than_the_waiting_request_is_a_new_request(
    tmp_path: Path,
) -> None:
    """The open request names REF only: asking for REF and OTHER under its nonce would get
    OTHER refused (not covered), so the ticket takes a new nonce; REF alone keeps it."""
    client, _ = scripted_client(tmp_path, [waiting() for _ in range(3)], deadline=1)
    ticket = ApprovalTicket()
    client.release("0" * 32, [DatasetRef("1", "2")], ticket)
    first = ticket.nonce
    client.release("0" * 32, [DatasetRef("1", "2")], ticket)
    assert ticket.nonce == first
    client.release("0" * 32, [DatasetRef("1", "2"), DatasetRef("1", "3")], ticket)
    assert ticket.nonce != first


def test_stop_ends_the_wait_at_once(tmp_path: Path) -> None:
    client, told = scripted_client(tmp_path, [waiting()], deadline=60)
    batch = client.release("0" * 32, [DatasetRef("1", "2")], stop=lambda: True)
    assert batch.waiting == (DatasetRef("1", "2"),) and told == []
