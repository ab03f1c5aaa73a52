"""The host-work benchmarks: the per-phase step benchmark runs every phase, and the trace summary reads gaps right."""

from __future__ import annotations

import argparse

import pytest
import trio

from benchmarks.benchmark_scheduler import PHASES, measure, summarize
from benchmarks.step_timeline import GAP_US, device_timeline

STEP = "atom_trio::step"


def test_device_timeline_merges_overlaps_and_measures_the_gaps():
    kernels = [(0, 100), (50, 150), (150, 200), (230, 300), (1300, 1400)]  # µs: one overlap, one touch, two gaps
    trace = {
        "traceEvents": [
            *({"ph": "X", "cat": "kernel", "name": "k", "ts": a, "dur": b - a} for a, b in kernels),
            {"ph": "X", "cat": "gpu_memcpy", "name": "Memcpy HtoD", "ts": 1400, "dur": 10},
            {"ph": "X", "cat": "cpu_op", "name": "aten::mm", "ts": 0, "dur": 5000},  # host events are no device time
            {"ph": "X", "cat": "user_annotation", "name": STEP, "ts": 0, "dur": 700},
            {"ph": "X", "cat": "user_annotation", "name": STEP, "ts": 700, "dur": 800},
        ]
    }
    timeline = device_timeline(trace, STEP)
    assert timeline["steps"] == 2 and timeline["step_host_median_us"] == 800
    assert timeline["window_us"] == 1410
    assert timeline["busy_us"] == 200 + 70 + 110
    assert timeline["largest_gaps_us"] == [1000, 30]
    assert timeline["idle_gaps_over_threshold"] == sum(g >= GAP_US for g in (1000, 30))
    assert timeline["busy_fraction"] == pytest.approx(380 / 1410)
    assert timeline["device_time_per_step_us"] == 190
    assert device_timeline({"traceEvents": trace["traceEvents"][-3:]}, STEP) == {"steps": 2, "step_host_median_us": 800}


def test_the_host_step_benchmark_times_every_phase_of_pure_decode_steps(default_model_dir):
    args = argparse.Namespace(
        num_seqs=6, prompt_len=40, steps=5, block_size=16, vocab=300, enable_prefix_caching=True, seed=0
    )
    recorded = trio.run(measure, args, set(PHASES))
    assert set(recorded) == set(PHASES)
    assert all(len(values) == 5 and min(values) >= 0 for values in recorded.values())
    summary = summarize(recorded)
    assert all(0 <= row["median_us"] <= row["p90_us"] for row in summary.values())
