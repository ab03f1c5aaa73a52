"""`ThreadExecutor`: the model runner in this process, its work on a thread of its own.

A step is pure computation (torch releases the GIL inside its kernels), so
running it on another thread keeps the event loop free for intake, streaming
and HTTP while the model computes. The executor has one thread
(`RunnerThread`) for the model's load, steps, profiler and close: steps never
overlap and never wait behind trio's shared pool (file I/O, DNS), and a
profiler started there records the steps (torch's records one thread). A
cancelled step still runs to its end before the cancellation is delivered,
so nothing touches the KV cache after the engine believes the step is over.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import trio

from atom_trio.executor._runner_thread import RunnerThread

if TYPE_CHECKING:
    from atom_trio.config import EngineConfig
    from atom_trio.core.facts import ModelFacts
    from atom_trio.core.plan import StepPlan, StepResult


class ThreadExecutor:
    """Owns one `ModelRunner` and runs its work on a thread of its own.

    Build it with `ThreadExecutor.create` (the model loads off the event
    loop) and always `aclose` it. ``runner`` is exposed for tests (for
    example the ``inject_step_fault`` fixture); the engine only uses `execute`.
    """

    def __init__(self, runner: Any, thread: RunnerThread) -> None:
        from atom_trio.runner import RankProfiler

        self.runner = runner
        self._thread = thread
        self._profiler = RankProfiler(rank=0)
        self.facts: ModelFacts = runner.facts
        self._launched: deque[Any] = deque()

    @classmethod
    async def create(cls, config: EngineConfig) -> ThreadExecutor:
        """Load the model and allocate its KV cache on the executor's thread."""
        from atom_trio.runner import ModelRunner  # torch is imported only when a model is wanted

        thread = RunnerThread("atom-trio runner")
        try:
            runner = await thread.run(ModelRunner, config)
        except BaseException:
            await thread.aclose()
            raise
        return cls(runner, thread)

    async def wait_failed(self) -> BaseException:
        """Never returns: an in-process runner cannot die between steps; a failing step raises instead."""
        await trio.sleep_forever()

    async def execute(self, plan: StepPlan) -> StepResult:
        return await self._thread.run(self._step, self.runner.execute, plan)

    async def launch(self, plan: StepPlan) -> None:
        self._launched.append(await self._thread.run(self._step, self.runner.launch, plan))

    async def collect(self) -> StepResult:
        return await self._thread.run(self.runner.collect, self._launched.popleft())

    def _step(self, work: Callable[[StepPlan], Any], plan: StepPlan) -> Any:
        with self._profiler.step():
            return work(plan)

    async def start_profile(self, trace_prefix: str) -> list[str]:
        """Start the torch profiler on the runner's thread; the path of the trace `stop_profile` writes."""
        return [await self._thread.run(self._profiler.start, trace_prefix)]

    async def stop_profile(self) -> list[str]:
        """Stop the profiler and write its trace; the trace's path."""
        return [await self._thread.run(self._profiler.stop)]

    async def aclose(self) -> None:
        runner, self.runner = self.runner, None
        if runner is None:
            return
        with trio.CancelScope(shield=True):
            try:
                await self._thread.run(runner.close)
            finally:
                await self._thread.aclose()
