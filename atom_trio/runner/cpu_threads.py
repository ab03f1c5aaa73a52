"""`CpuThreads`: as many intra-op threads for a CPU model as there are cores to run them.

A CPU step is a few hundred OpenMP parallel regions (matmuls, norms, attention),
each ending in a barrier where every thread waits for the slowest. On a quiet box
that costs nothing. When another process keeps a core busy, the scheduler
time-slices one of our threads with it, and every region then waits out that
thread's lost slice: two threads on two shared cores run slower than one thread
would (on a 2-core box beside two busy processes, decode ran at 23-24% of its
quiet speed with two threads and at 37% with one; docs/performance.md). So the thread count follows the cores that other
processes leave free, measured between steps from the kernel's per-CPU busy
time (``/proc/stat``, host steal time included) minus this process's own, and
throughput degrades in proportion to the CPU actually available instead of
collapsing.

The process that feeds a worker process (the engine with its HTTP server) is no
neighbour: a worker counts its parent's CPU time as its own.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import attrs
import torch

logger = logging.getLogger(__name__)

SAMPLE_SECONDS = 0.5
"""Shortest window the free cores are measured over: long enough for the kernel's tick counters (100 Hz)."""

_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
_BUSY_FIELDS = (0, 1, 2, 5, 6, 7)
"""user, nice, system, irq, softirq, steal of a ``/proc/stat`` cpu line: time those cores were not ours to take."""


def busy_seconds(cpus: frozenset[int], stat: str) -> float:
    """Seconds cores ``cpus`` have been busy (steal included), from the text of ``/proc/stat``."""
    total = 0
    for line in stat.splitlines():
        name, *fields = line.split()
        if name.startswith("cpu") and name[3:].isdigit() and int(name[3:]) in cpus:
            total += sum(int(fields[i]) for i in _BUSY_FIELDS if i < len(fields))
    return total / _CLOCK_TICKS


def process_cpu_seconds(pid: int) -> float:
    """User plus system CPU seconds of process ``pid`` (all its threads), from ``/proc/<pid>/stat``."""
    text = Path(f"/proc/{pid}/stat").read_text()
    fields = text[text.rindex(")") + 2 :].split()  # the command name may hold spaces
    return (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS


def threads_for(free_cores: float, max_threads: int) -> int:
    """Threads to run on ``free_cores`` cores' worth of CPU: the nearest whole number, within [1, max_threads]."""
    return max(1, min(max_threads, int(free_cores + 0.5)))


@attrs.define
class CpuThreads:
    """Sets torch's intra-op threads between steps to the cores other processes leave free.

    Call `adjust` on the thread that runs the steps, before each one (OpenMP's
    thread count is that thread's setting); it measures at most every
    `SAMPLE_SECONDS` and costs two small file reads when it does.
    ``max_threads`` is torch's count at start-up (``OMP_NUM_THREADS``, else one
    per core); ``companions`` are processes whose CPU time counts as ours.
    """

    max_threads: int
    cpus: frozenset[int]
    companions: tuple[int, ...] = ()
    threads: int = attrs.field(init=False)
    last_free_cores: float | None = attrs.field(init=False, default=None)
    """The latest measurement of the cores other processes left free."""
    _last: tuple[float, float, float] | None = attrs.field(init=False, default=None)

    def __attrs_post_init__(self) -> None:
        self.threads = self.max_threads

    @classmethod
    def for_this_process(cls, *, companions: tuple[int, ...] = ()) -> CpuThreads | None:
        """A governor over the cores this process may run on; None where it cannot measure (no ``/proc/stat``)."""
        if not Path("/proc/stat").exists() or torch.get_num_threads() < 2:
            return None
        return cls(max_threads=torch.get_num_threads(), cpus=frozenset(os.sched_getaffinity(0)), companions=companions)

    def _sample(self) -> tuple[float, float, float]:
        ours = time.process_time() + sum(process_cpu_seconds(pid) for pid in self.companions)
        return time.monotonic(), busy_seconds(self.cpus, Path("/proc/stat").read_text()), ours

    def free_cores(self) -> float | None:
        """Cores' worth of CPU other processes left free since the last measurement; None before a full window."""
        now = time.monotonic()
        if self._last is not None and now - self._last[0] < SAMPLE_SECONDS:
            return None
        try:
            sample = self._sample()
        except (OSError, ValueError, IndexError):  # a companion that exited, an unreadable /proc
            self._last = None
            return None
        last, self._last = self._last, sample
        if last is None:
            return None
        wall, busy, ours = (s - t for s, t in zip(sample, last))
        others = max(0.0, busy - ours) / wall
        return len(self.cpus) - others

    def adjust(self) -> None:
        """Measure the free cores if a window has passed, and move torch's thread count to them."""
        free = self.free_cores()
        if free is None:
            return
        self.last_free_cores = free
        threads = threads_for(free, self.max_threads)
        if threads != self.threads:
            logger.debug("CPU threads %d -> %d (%.2f cores free of %d)", self.threads, threads, free, len(self.cpus))
            self.threads = threads
            torch.set_num_threads(threads)
