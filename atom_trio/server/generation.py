"""Run one API request's prompts on the engine and hand their outputs to the HTTP side.

Why producer tasks: the status line of a streaming response goes out before
its body is read, yet admission errors (queue full, context too long, engine
dead) must become 429/400/503 statuses. So each prompt's ``engine.generate``
runs in a task that reports "admitted" with its first output; the handler waits
for every prompt to be admitted (or for the first failure, which cancels the
others) and only then commits to a status. Later outputs wait in the
`Generation` until the response body takes them.

A slow reader costs O(1) memory: the response body waits on the client's socket,
so it may take outputs far more slowly than the engine makes them. The producers
never wait for it (their timings stay the engine's); each prompt keeps one
pending output, and a delta that arrives before the body took the previous one
merges into it (`RequestOutput.add`), as the engine's own `OutputBuffer` does.

The tasks live in the app's nursery, each request under its own cancel scope:
`Generation.cancel` (called when the client goes away, or when the body
finishes) cancels them, ``engine.generate`` sees ``Cancelled`` and aborts the
request, and the engine frees its KV blocks.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import attrs
import trio

if TYPE_CHECKING:
    from ..engine import AsyncEngine, Prompt
    from ..outputs import RequestOutput
    from ..sampling_params import SamplingParams
    from .metrics import ServerMetrics


@attrs.define(eq=False)
class Activity:
    """How many prompts are generating, so a shutdown can wait for them to wind down."""

    running: int = 0

    async def wait_idle(self) -> None:
        while self.running:
            await trio.sleep(0.05)


@attrs.define(eq=False)
class Generation:
    """The running prompts of one API request, and the outputs they made that the response has not taken.

    Iterate it for ``(prompt_index, RequestOutput)``, each output the merge of every delta of that prompt
    since the previous one taken; prompts take turns in the order their outputs arrived.
    """

    cancel_scope: trio.CancelScope
    producing: int
    """Prompts still generating."""
    _pending: dict[int, RequestOutput] = attrs.field(factory=dict, init=False)
    _failure: BaseException | None = attrs.field(default=None, init=False)
    _wakeup: trio.Event = attrs.field(factory=trio.Event, init=False)
    _closed: bool = attrs.field(default=False, init=False)

    @property
    def buffered(self) -> int:
        """Outputs waiting for the response: at most one per prompt, however slow the reader."""
        return len(self._pending)

    def put(self, index: int, output: RequestOutput) -> None:
        """Hand prompt ``index``'s next delta to the response, merged into one it has not taken yet."""
        if self._closed:
            return
        pending = self._pending.get(index)
        if pending is None:
            self._pending[index] = output
        else:
            pending.add(output)
        self._wakeup.set()

    def fail(self, error: BaseException) -> None:
        """A prompt failed after admission: the response raises ``error`` once it took what is pending."""
        if self._failure is None:
            self._failure = error
        self._wakeup.set()

    def prompt_done(self) -> None:
        self.producing -= 1
        self._wakeup.set()

    def cancel(self) -> None:
        """Stop the prompts (the engine aborts them and frees their KV blocks); idempotent."""
        self.cancel_scope.cancel()
        self._closed = True
        self._pending.clear()
        self._wakeup.set()

    def __aiter__(self) -> Generation:
        return self

    async def __anext__(self) -> tuple[int, RequestOutput]:
        """The next ``(prompt_index, RequestOutput)``; a failure after admission re-raises here."""
        await trio.lowlevel.checkpoint_if_cancelled()
        while not self._pending:
            if self._failure is not None:
                failure, self._failure = self._failure, None
                self.cancel()
                raise failure
            if self._closed or not self.producing:
                raise StopAsyncIteration
            self._wakeup = trio.Event()
            await self._wakeup.wait()
        index = next(iter(self._pending))
        return index, self._pending.pop(index)


async def start_generation(
    nursery: trio.Nursery,
    engine: AsyncEngine,
    prompts: Sequence[Prompt],
    params: SamplingParams,
    metrics: ServerMetrics,
    activity: Activity,
    **generate_kwargs: Any,
) -> Generation:
    """Start every prompt; return once all are admitted.

    Raises:
        Whatever ``engine.generate`` raised for the first prompt that failed
        before its first output (the others are cancelled).
    """
    arrival = time.monotonic()
    scope = trio.CancelScope()
    generation = Generation(scope, len(prompts))
    metrics.generations.add(generation)
    admitted = [trio.Event() for _ in prompts]
    refused: list[BaseException] = []

    async def produce(index: int, prompt: Prompt) -> None:
        last = arrival
        activity.running += 1
        try:
            async with engine.generate(prompt, params, **generate_kwargs) as stream:
                async for output in stream:
                    now = time.monotonic()
                    if not admitted[index].is_set():
                        metrics.time_to_first_token.observe(now - arrival)
                        admitted[index].set()
                    else:
                        metrics.inter_token_latency.observe(now - last)
                    last = now
                    if output.finished:
                        metrics.e2e_request_latency.observe(now - arrival)
                    generation.put(index, output)
        except Exception as exc:  # for the handler: before admission as a status, after it in-band
            if admitted[index].is_set():
                generation.fail(exc)
            else:
                refused.append(exc)
                scope.cancel()
        finally:
            admitted[index].set()
            activity.running -= 1
            generation.prompt_done()

    async def produce_all() -> None:
        # One cancel scope for the request's prompts; the producers catch their errors, so nothing
        # but cancellation (absorbed here) ever reaches the app's nursery.
        with scope:
            async with trio.open_nursery() as prompts_nursery:
                for index, prompt in enumerate(prompts):
                    prompts_nursery.start_soon(produce, index, prompt)

    nursery.start_soon(produce_all)
    try:
        for event in admitted:
            await event.wait()
    except BaseException:
        scope.cancel()
        raise
    if refused:
        scope.cancel()
        raise refused[0]
    return generation
