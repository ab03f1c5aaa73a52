"""The phase timers: a ring of the last durations per phase, and summaries that describe them."""

from __future__ import annotations

import statistics
import time

import pytest
from hypothesis import given
from hypothesis import strategies as st

from atom_trio._phase_timers import PhaseTimers


@given(durations=st.lists(st.integers(0, 10**9), min_size=1, max_size=40), capacity=st.integers(1, 16))
def test_the_ring_keeps_the_last_durations_and_the_summary_describes_them(durations, capacity):
    timers = PhaseTimers(["a", "b"], capacity=capacity)
    for ns in durations:
        timers.record("a", ns)
    kept = durations[-capacity:]
    assert timers.durations_ns("a") == kept
    stats = timers.summary()
    assert "b" not in stats  # a phase that never ran is left out
    a = stats["a"]
    assert a.count == len(kept)
    assert a.median_us == pytest.approx(statistics.median(kept) / 1e3)
    assert a.mean_us == pytest.approx(statistics.fmean(kept) / 1e3)
    assert a.max_us == max(kept) / 1e3
    assert min(kept) / 1e3 <= a.median_us <= a.p90_us <= a.max_us
    timers.clear()
    assert timers.summary() == {} and timers.durations_ns("a") == []


def test_since_times_the_phase_and_starts_the_next():
    timers = PhaseTimers(["sleep", "rest"])
    start = time.perf_counter_ns()
    time.sleep(0.002)
    now = timers.since("sleep", start)
    assert now >= start + 2_000_000
    timers.since("rest", now)
    (slept,), (rest,) = timers.durations_ns("sleep"), timers.durations_ns("rest")
    assert slept == now - start and 0 <= rest < slept
    with pytest.raises(KeyError):
        timers.record("unknown", 1)
