"""Everything one run measured, and its JSON form: the report can be rendered again from a
saved run (`python -m bench --render build/bench/run/results.json`) without measuring."""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.agent import AgentResults
from bench.ha import HaResults
from bench.memory import Memory
from bench.reseal import ResealResults
from bench.storm import Storms
from bench.throughput import Plan, Window


@dataclass(frozen=True)
class Results:
    quick: bool
    date: str  # UTC, ISO 8601, when the run started
    seconds: float  # the whole run, set-up included
    cores: int
    machine: dict[str, str]
    versions: dict[str, str]
    workers: int  # the key server's worker processes (its default: two per core)
    steady_limits: dict[str, float]  # the raised per-certificate rate limits of part 1
    storm_cached: bool  # the storm's enrolled hosts came from an earlier run's cache
    plan: Plan
    windows: list[Window]
    memory: Memory
    storms: Storms
    agent: AgentResults
    floor_workers: int = 0  # bench/pyfloor.py's processes; 0 in runs saved before it
    # Several nodes on PostgreSQL (bench/ha.py); None in runs saved before it. The steady
    # windows of a node on PostgreSQL are among `windows`, system "pg".
    ha: HaResults | None = None
    # Master key rotation (bench/reseal.py); None in runs saved before it.
    reseal: ResealResults | None = None


def save(results: Results, path: Path) -> None:
    path.write_text(json.dumps(dataclasses.asdict(results), indent=1) + "\n")


def load(path: Path) -> Results:
    results: Results = _build(Results, json.loads(path.read_text()))
    return results


def _build(kind: Any, data: Any) -> Any:
    """DATA (parsed JSON) as an instance of the type KIND: dataclasses, named tuples,
    lists, tuples, dicts with string keys, optionals and plain values."""
    if dataclasses.is_dataclass(kind) and isinstance(kind, type):
        hints = typing.get_type_hints(kind)
        return kind(
            **{
                f.name: _build(hints[f.name], data[f.name])
                for f in dataclasses.fields(kind)
                if f.init and f.name in data
            }
        )
    if isinstance(kind, type) and issubclass(kind, tuple) and hasattr(kind, "_fields"):
        hints = typing.get_type_hints(kind)  # a NamedTuple, saved as a list
        # Not strict: fields added since the run was saved keep their defaults.
        pairs = zip(kind._fields, data, strict=False)
        return kind(*(_build(hints[name], item) for name, item in pairs))
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin in (types.UnionType, typing.Union):
        if data is None:
            return None
        return _build(next(a for a in args if a is not type(None)), data)
    if origin is list:
        return [_build(args[0], item) for item in data]
    if origin is tuple:
        items = args if not (len(args) == 2 and args[1] is Ellipsis) else (args[0],) * len(data)
        return tuple(_build(a, item) for a, item in zip(items, data, strict=True))
    if origin is dict:
        return {key: _build(args[1], value) for key, value in data.items()}
    if kind is float:
        return float(data)
    return data
