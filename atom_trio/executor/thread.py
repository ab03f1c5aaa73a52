"""`ThreadExecutor`: the model runner in this process, each step on a worker thread.

A step is pure computation (torch releases the GIL inside its kernels), so
running it through `trio.to_thread.run_sync` keeps the event loop free for
intake, streaming and HTTP while the model computes. The executor has its
own `CapacityLimiter(1)`: steps never overlap and never wait behind trio's
shared pool of 40 threads (file I/O, DNS). ``abandon_on_cancel=False``: a
cancelled step still runs to its end before the cancellation is delivered,
so nothing touches the KV cache after the engine believes the step is over.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import trio

if TYPE_CHECKING:
    from atom_trio.config import EngineConfig
    from atom_trio.core.facts import ModelFacts
    from atom_trio.core.plan import StepPlan, StepResult


class ThreadExecutor:
    """Owns one `ModelRunner` and runs its work on a dedicated-capacity worker thread.

    Build it with `ThreadExecutor.create` (the model loads off the event
    loop) and always `aclose` it. ``runner`` is exposed for tests (for
    example the ``inject_step_fault`` fixture); the engine only uses `execute`.
    """

    def __init__(self, runner: Any, limiter: trio.CapacityLimiter) -> None:
        self.runner = runner
        self._limiter = limiter
        self.facts: ModelFacts = runner.facts
        self._launched: deque[Any] = deque()

    @classmethod
    async def create(cls, config: EngineConfig) -> ThreadExecutor:
        """Load the model and allocate its KV cache on the executor's thread."""
        from atom_trio.runner import ModelRunner  # torch is imported only when a model is wanted

        limiter = trio.CapacityLimiter(1)
        runner = await trio.to_thread.run_sync(ModelRunner, config, limiter=limiter, thread_name="atom-trio model load")
        return cls(runner, limiter)

    @property
    def failure(self) -> None:
        """Always None: an in-process runner cannot die between steps; a failing step raises instead."""
        return None

    async def execute(self, plan: StepPlan) -> StepResult:
        return await self._run(self.runner.execute, plan)

    async def launch(self, plan: StepPlan) -> None:
        self._launched.append(await self._run(self.runner.launch, plan))

    async def collect(self) -> StepResult:
        return await self._run(self.runner.collect, self._launched.popleft())

    async def _run(self, work: Callable[[Any], Any], arg: Any) -> Any:
        return await trio.to_thread.run_sync(
            work, arg, limiter=self._limiter, abandon_on_cancel=False, thread_name="atom-trio step"
        )

    async def aclose(self) -> None:
        runner, self.runner = self.runner, None
        if runner is None:
            return
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(runner.close, limiter=self._limiter, thread_name="atom-trio model close")
