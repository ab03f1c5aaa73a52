"""One rank's torch profiler session, run on the thread that runs the rank's steps.

torch's profiler records the operators of the thread that started it and
nothing else (a session started on the event loop's thread holds none of the
model's). So each rank starts, feeds and stops its own session on the thread
that runs its steps: the `ThreadExecutor`'s runner thread, or a worker
process's main thread; and each writes its own trace, the rank in its name.

Every step is marked in the trace as a range named `STEP_EVENT`, and a
session stops recording after `MAX_STEPS` steps, so that one left running
under load holds a bounded trace and stops slowing the steps down; the trace
is written when the session is stopped.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from atom_trio.errors import ProfilerError

MAX_STEPS = 256
"""Steps a session records at most: a few seconds of decoding, a trace of tens of MB for a 30-layer model."""

STEP_EVENT = "atom_trio::step"
"""The name of the range that marks one step (a plan launched or executed) in a trace."""

RUNNER_PHASES = ("inputs", "forward", "sample", "wait")
"""The runner's timed phases (`ModelRunner.phases`, an `atom_trio._phase_timers.PhaseTimers`): ``inputs``
the plan recorded into the token histories and laid out as the flat batch; ``forward`` the whole forward
on the host, ``inputs`` included (on a GPU it only queues the kernels or replays a graph); ``sample`` the
sampler's host work and launches; ``wait`` how long `ModelRunner.collect` waits for the step's tokens."""


def trace_path(trace_prefix: str, rank: int) -> Path:
    """Where rank ``rank`` writes the trace of a session started with ``trace_prefix``."""
    return Path(f"{trace_prefix}-rank{rank}.trace.json")


class RankProfiler:
    """At most one torch profiler session at a time for one rank; call every method from the steps' thread."""

    def __init__(self, rank: int) -> None:
        self.rank = rank
        self._session: Any = None  # a torch.profiler.profile between start and stop
        self._path = Path()
        self._recording = False
        self._steps = 0

    def start(self, trace_prefix: str) -> str:
        """Start recording; return the path that `stop` will write."""
        if self._session is not None:
            raise ProfilerError(f"rank {self.rank} is already profiling")
        import torch

        activities = [torch.profiler.ProfilerActivity.CPU]
        if torch.cuda.is_available():
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        session = torch.profiler.profile(activities=activities)
        try:
            session.start()
        except Exception as exc:
            raise ProfilerError(f"rank {self.rank} could not start the torch profiler: {exc}") from exc
        self._session, self._path, self._recording, self._steps = session, trace_path(trace_prefix, self.rank), True, 0
        return str(self._path)

    @contextmanager
    def step(self) -> Iterator[None]:
        """Wrap one step: while recording, mark it in the trace, and stop recording after `MAX_STEPS` of them."""
        if not self._recording:
            yield
            return
        import torch

        with torch.profiler.record_function(STEP_EVENT):
            yield
        self._steps += 1
        if self._steps >= MAX_STEPS:
            self._recording = False
            self._session.stop()

    def stop(self) -> str:
        """End the session and write its trace (Chrome trace JSON); return the trace's path."""
        session, self._session = self._session, None
        if session is None:
            raise ProfilerError(f"rank {self.rank} is not profiling")
        try:
            if self._recording:
                self._recording = False
                session.stop()
            self._path.parent.mkdir(parents=True, exist_ok=True)
            session.export_chrome_trace(str(self._path))
        except Exception as exc:
            raise ProfilerError(f"rank {self.rank} could not write its trace {self._path}: {exc}") from exc
        return str(self._path)
