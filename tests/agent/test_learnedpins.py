"""The learned-pin store on its own: what an announcement adds, what it leaves to agent.toml,
when an unannounced pin is forgotten, and that the file round-trips."""

from __future__ import annotations

from pathlib import Path

from zfs_unlock_agent import learnedpins
from zfs_unlock_common import pinning

A = pinning.format_pin(bytes(32))
B = pinning.format_pin(bytes([1] * 32))
C = pinning.format_pin(bytes([2] * 32))
DAY = 86400


def dirty(store: learnedpins.LearnedPins) -> bool:
    """Read afresh each time (mypy would keep an earlier assert's answer)."""
    return store.dirty


def test_an_announcement_adds_new_pins_but_not_the_configured_ones(tmp_path: Path) -> None:
    store = learnedpins.load(tmp_path)
    assert store.announced == {}
    assert store.learn([A, B], configured=[A], now=1000)
    assert store.announced == {B: 1000}
    assert not store.learn([A, B], configured=[A], now=1060)  # nothing new


def test_a_pin_no_server_announces_for_thirty_days_is_forgotten(tmp_path: Path) -> None:
    store = learnedpins.load(tmp_path)
    store.learn([B, C], configured=[], now=0)
    assert not store.learn([C], configured=[], now=29 * DAY)  # B unannounced, kept for now
    assert store.learn([C], configured=[], now=31 * DAY)
    assert set(store.announced) == {C}


def test_the_file_round_trips_and_is_saved_only_when_it_would_change(tmp_path: Path) -> None:
    store = learnedpins.load(tmp_path)
    store.learn([B], configured=[], now=5 * DAY)
    assert dirty(store)
    store.save()
    assert not dirty(store)
    again = learnedpins.load(tmp_path)
    assert again.announced == {B: 5 * DAY}
    again.learn([B], configured=[], now=5 * DAY + 3600)
    assert not dirty(again)  # an hour later: the file's time is still fresh enough
    again.learn([B], configured=[], now=6 * DAY)
    assert dirty(again)
