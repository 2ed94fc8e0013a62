"""Counters of calls for live status: how many of each kind, how they failed, how long they took.

Pure and cheap on the hot path (a dict increment and a deque append per call); percentiles are
computed only when a status snapshot is asked for.
"""

from __future__ import annotations

import time
from collections import Counter, deque
from dataclasses import dataclass

from .pcsc import PCSCError, rv_name

RECENT = 512  # durations kept per call kind for the percentiles


@dataclass(frozen=True)
class Latency:
    count: int
    p50_ms: float
    p90_ms: float
    p99_ms: float
    max_ms: float


class CallStats:
    """Calls by kind, failures by return code, latency of the recent calls of each kind."""

    def __init__(self) -> None:
        self.calls: Counter[str] = Counter()
        self.errors: Counter[str] = Counter()
        self.in_flight = 0
        self._recent: dict[str, deque[float]] = {}

    def timing(self, kind: str) -> _Timing:
        """`with stats.timing(kind):` counts one call of `kind` and its duration; a
        PCSCError's code counts as an error. (A class, not a generator: it is on every
        call's path.)"""
        return _Timing(self, kind)

    def record(self, kind: str, seconds: float) -> None:
        self.calls[kind] += 1
        recent = self._recent.get(kind)
        if recent is None:
            recent = self._recent[kind] = deque(maxlen=RECENT)
        recent.append(seconds)

    def error(self, rv: int) -> None:
        self.errors[rv_name(rv)] += 1

    def latency(self) -> dict[str, Latency]:
        return {kind: _latency(recent) for kind, recent in sorted(self._recent.items())}

    def snapshot(self) -> dict[str, object]:
        return {
            "calls": dict(sorted(self.calls.items())),
            "errors": dict(sorted(self.errors.items())),
            "in_flight": self.in_flight,
            "latency_ms": {kind: vars(value) for kind, value in self.latency().items()},
        }


class _Timing:
    __slots__ = ("kind", "started", "stats")

    def __init__(self, stats: CallStats, kind: str) -> None:
        self.stats, self.kind = stats, kind

    def __enter__(self) -> None:
        self.stats.in_flight += 1
        self.started = time.perf_counter()

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        stats = self.stats
        stats.in_flight -= 1
        stats.record(self.kind, time.perf_counter() - self.started)
        if isinstance(exc, PCSCError):
            stats.errors[rv_name(exc.rv)] += 1


def _latency(durations: deque[float]) -> Latency:
    ordered = sorted(durations)

    def at(fraction: float) -> float:
        return round(ordered[min(len(ordered) - 1, int(fraction * len(ordered)))] * 1000, 3)

    return Latency(len(ordered), at(0.5), at(0.9), at(0.99), round(ordered[-1] * 1000, 3))
