"""The CPU thread governor: torch's threads follow the cores other processes leave free."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from atom_trio.config import EngineConfig
from atom_trio.runner import ModelRunner
from atom_trio.runner.cpu_threads import (
    SAMPLE_SECONDS,
    busy_seconds,
    process_cpu_seconds,
    threads_for,
)
from benchmarks.benchmark_latency import runner_latency

TICKS = os.sysconf("SC_CLK_TCK")
CPUS = sorted(os.sched_getaffinity(0))


def test_busy_time_counts_the_named_cores_and_steal_but_not_idle_or_iowait():
    stat = (
        "cpu  900 900 900 900 900 900 900 900 0 0\n"
        "cpu0 1 2 3 1000 2000 4 5 6 0 0\n"  # user nice system idle iowait irq softirq steal guest guest_nice
        "cpu1 10 20 30 1000 2000 40 50 60 0 0\n"
        "intr 12345 0 0\n"
    )
    assert busy_seconds(frozenset({0}), stat) == pytest.approx(21 / TICKS)
    assert busy_seconds(frozenset({1}), stat) == pytest.approx(210 / TICKS)
    assert busy_seconds(frozenset({0, 1}), stat) == pytest.approx(231 / TICKS)


@given(st.floats(-1, 300, allow_nan=False), st.integers(1, 256))
def test_thread_count_is_the_nearest_whole_core_within_bounds(free, max_threads):
    threads = threads_for(free, max_threads)
    assert 1 <= threads <= max_threads
    assert threads_for(free + 1, max_threads) >= threads
    if 0.5 <= free < max_threads:
        assert abs(threads - free) <= 0.5


def test_a_process_cpu_time_counts_all_its_threads():
    child = subprocess.Popen(
        [sys.executable, "-c", "import time\nend = time.process_time() + 0.6\nwhile time.process_time() < end: pass"]
    )
    try:
        child.wait(timeout=60)
        assert child.returncode == 0
    finally:
        child.kill()
    # A finished child is gone from /proc: measure ourselves instead, against the clock Python reads.
    before, mine = process_cpu_seconds(os.getpid()), time.process_time()
    end = time.process_time() + 0.5
    while time.process_time() < end:
        pass
    assert process_cpu_seconds(os.getpid()) - before == pytest.approx(time.process_time() - mine, abs=0.05)


def busy_loop(cpu: int) -> subprocess.Popen:
    """A process that keeps core ``cpu`` busy until killed."""
    return subprocess.Popen(
        [sys.executable, "-c", f"import os\nos.sched_setaffinity(0, {{{cpu}}})\nwhile True: pass"]
    )


def step_for(runner: ModelRunner, seconds: float) -> None:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        runner_latency(runner, [[5, 6, 7, 8]], output_len=4)


@pytest.fixture
def restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.mark.skipif(len(CPUS) < 2, reason="needs two cores")
def test_runner_takes_one_thread_while_other_processes_hold_the_cores(tiny_llama_dir, restore_threads):
    torch.set_num_threads(len(CPUS))  # what a fresh process has (an earlier test may have left fewer)
    runner = ModelRunner(EngineConfig(model=str(tiny_llama_dir), dtype="float32", num_kv_blocks=8, block_size=16))
    governor = runner.cpu_threads
    assert governor is not None and governor.threads == governor.max_threads == torch.get_num_threads()
    neighbours = [busy_loop(cpu) for cpu in CPUS]
    try:
        time.sleep(0.3)  # the neighbours are running
        step_for(runner, 3 * SAMPLE_SECONDS)
        assert governor.threads == 1
        assert torch.get_num_threads() == 1  # the steps' thread is this one
        assert governor.last_free_cores < 1.5
    finally:
        for process in neighbours:
            process.kill()
            process.wait()


def test_a_fixed_thread_count_is_kept(tiny_llama_dir, restore_threads):
    runner = ModelRunner(
        EngineConfig(model=str(tiny_llama_dir), dtype="float32", num_kv_blocks=8, block_size=16, cpu_threads=3)
    )
    assert runner.cpu_threads is None
    step_for(runner, 0.2)
    assert torch.get_num_threads() == 3
