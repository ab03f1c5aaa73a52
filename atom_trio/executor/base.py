"""The executor interface: how the engine runs a step plan on the model, wherever the model lives."""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from atom_trio.core.facts import ModelFacts
    from atom_trio.core.plan import StepPlan, StepResult


class Executor(Protocol):
    """Runs step plans on the model runner(s) without blocking the event loop.

    ``facts`` describe the model and its KV cache as the runner sized them;
    the engine builds its scheduler from them. One task at a time runs
    steps: ``execute`` (one step, start to end), or `launch` and `collect`,
    which let the next plan be launched before the previous step's tokens
    are read, so that the host's work overlaps the device's.
    """

    facts: ModelFacts

    async def wait_failed(self) -> BaseException:
        """Wait until the executor cannot run steps any more, even between steps; return why.

        The engine awaits it beside its step loop, so that a model that went
        away while no step ran (a worker process killed) kills the engine at
        once rather than at the next request. It never returns for an
        executor whose failures can only surface from a step.
        """
        ...

    async def execute(self, plan: StepPlan) -> StepResult:
        """Run one step and return what it sampled; an error here means the model is unusable."""
        ...

    async def launch(self, plan: StepPlan) -> None:
        """Start one step without waiting for its tokens (at most two launched steps await `collect`)."""
        ...

    async def collect(self) -> StepResult:
        """What the oldest launched step sampled; an error here means the model is unusable."""
        ...

    async def start_profile(self, trace_prefix: str) -> list[str]:
        """Start the torch profiler on every rank, where its steps run; the trace paths, by rank.

        Called by the task that runs the steps, with no step launched. Rank
        ``r`` writes ``{trace_prefix}-rank{r}.trace.json`` at `stop_profile`.
        Raises `ProfilerError` (the model stays usable) when a rank cannot.
        """
        ...

    async def stop_profile(self) -> list[str]:
        """Stop every rank's profiler and write its trace; the trace paths, by rank (as `start_profile`)."""
        ...

    async def aclose(self) -> None:
        """Release the model and its memory; safe to call twice, and runs to completion even when cancelled."""
        ...
