"""Part 3: the peak resident memory of each server worker after the load, against nginx's."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from bench import common


@dataclass(frozen=True)
class Memory:
    ours_kib: list[int]  # VmHWM of each key-server worker after the steady benchmark
    nginx_kib: list[int]  # VmHWM of each nginx worker after the same rounds


def measure(ours: Sequence[int], nginx: Sequence[int]) -> Memory:
    """VmHWM of the worker processes OURS and NGINX, read while they still run."""
    return Memory(
        [common.peak_rss_kib(pid) for pid in ours],
        [common.peak_rss_kib(pid) for pid in nginx],
    )
