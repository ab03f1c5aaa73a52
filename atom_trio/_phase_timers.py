"""Per-step phase timers cheap enough to leave on: the last durations of each phase in a ring buffer.

At batch 256 a small model's decode step takes a few milliseconds of device
time, so the host work around it (scheduling, input preparation, sampling
set-up, detokenization, delivery) must stay well below that; these timers
show where it goes without a profiler. Recording one duration is a
``perf_counter_ns`` call and a list store (well under a microsecond), so the
engine and the runner time every step. Each phase keeps its own ring: the
phases of one step happen on different tasks (the delivery of step N runs
while step N+1 computes), so they are summarised per phase, not per step.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence

import attrs

CAPACITY = 4096
"""Durations each phase keeps: tens of seconds of steps at batch 256."""


@attrs.frozen
class PhaseStats:
    """One phase's recorded durations, in microseconds (``count``: how many are summarised)."""

    count: int
    median_us: float
    p90_us: float
    mean_us: float
    max_us: float


class PhaseTimers:
    """Named phases, each with a ring of its last `CAPACITY` durations in nanoseconds.

    Time a phase with ``t = timers.since("schedule", t)``: it records the time
    since ``t`` and returns now, ready to start the next phase.
    """

    __slots__ = ("_capacity", "_counts", "_rings", "phases")

    def __init__(self, phases: Sequence[str], capacity: int = CAPACITY) -> None:
        self.phases = tuple(phases)
        self._capacity = capacity
        self._rings: dict[str, list[int]] = {phase: [0] * capacity for phase in self.phases}
        self._counts = dict.fromkeys(self.phases, 0)

    def record(self, phase: str, duration_ns: int) -> None:
        count = self._counts[phase]
        self._rings[phase][count % self._capacity] = duration_ns
        self._counts[phase] = count + 1

    def since(self, phase: str, start_ns: int) -> int:
        """Record the time from ``start_ns`` (a `time.perf_counter_ns` reading) to now; return now."""
        now = time.perf_counter_ns()
        self.record(phase, now - start_ns)
        return now

    def durations_ns(self, phase: str) -> list[int]:
        """The phase's kept durations, oldest first."""
        count, ring = self._counts[phase], self._rings[phase]
        if count <= self._capacity:
            return ring[:count]
        start = count % self._capacity
        return ring[start:] + ring[:start]

    def summary(self) -> dict[str, PhaseStats]:
        """Median, 90th percentile, mean and maximum of each phase that ran."""
        stats = {}
        for phase in self.phases:
            values = sorted(self.durations_ns(phase))
            if values:
                stats[phase] = PhaseStats(
                    count=len(values),
                    median_us=statistics.median(values) / 1e3,
                    p90_us=values[min(len(values) - 1, (9 * len(values)) // 10)] / 1e3,
                    mean_us=statistics.fmean(values) / 1e3,
                    max_us=values[-1] / 1e3,
                )
        return stats

    def clear(self) -> None:
        """Forget every duration (a benchmark clears them after its warm-up)."""
        self._counts = dict.fromkeys(self.phases, 0)
