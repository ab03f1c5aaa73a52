"""Run one API request's prompts on the engine and hand their outputs to the HTTP side.

Why producer tasks: the status line of a streaming response goes out before
its body is read, yet admission errors (queue full, context too long, engine
dead) must become 429/400/503 statuses. So each prompt's ``engine.generate``
runs in a task that reports "admitted" with its first output; the handler waits
for every prompt to be admitted (or for the first failure, which cancels the
others) and only then commits to a status. Later outputs flow through an
unbounded channel (bounded in practice by ``max_tokens``) that the response body
drains.

The tasks live in the app's nursery, each request under its own cancel scope:
`Generation.cancel` (called when the client goes away, or when the body
finishes) cancels them, ``engine.generate`` sees ``Cancelled`` and aborts the
request, and the engine frees its KV blocks.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import attrs
import trio

if TYPE_CHECKING:
    from ..engine import AsyncEngine, Prompt
    from ..sampling_params import SamplingParams
    from .metrics import ServerMetrics


@attrs.frozen
class PromptFailed:
    """An error raised by a prompt's generation after it was admitted."""

    error: BaseException


@attrs.define(eq=False)
class Activity:
    """How many prompts are generating, so a shutdown can wait for them to wind down."""

    running: int = 0

    async def wait_idle(self) -> None:
        while self.running:
            await trio.sleep(0.05)


@attrs.define(eq=False)
class Generation:
    """The running prompts of one API request."""

    outputs: trio.MemoryReceiveChannel[tuple[int, Any]]
    cancel_scope: trio.CancelScope

    def cancel(self) -> None:
        """Stop the prompts (the engine aborts them and frees their KV blocks); idempotent."""
        self.cancel_scope.cancel()
        self.outputs.close()

    def __aiter__(self) -> Generation:
        return self

    async def __anext__(self) -> tuple[int, Any]:
        """The next ``(prompt_index, RequestOutput)``; a failure after admission re-raises here."""
        try:
            index, item = await self.outputs.receive()
        except (trio.EndOfChannel, trio.ClosedResourceError):
            raise StopAsyncIteration from None
        if isinstance(item, PromptFailed):
            self.cancel()
            raise item.error
        return index, item


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
    send, receive = trio.open_memory_channel[tuple[int, Any]](math.inf)
    scope = trio.CancelScope()
    admitted = [trio.Event() for _ in prompts]
    refused: list[BaseException] = []

    async def produce(index: int, prompt: Prompt, send: trio.MemorySendChannel[tuple[int, Any]]) -> None:
        last = arrival
        activity.running += 1
        async with send:
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
                        send.send_nowait((index, output))
            except trio.BrokenResourceError:
                pass  # the reader went away; leaving the stream aborted the request
            except Exception as exc:  # for the handler: before admission as a status, after it in-band
                if admitted[index].is_set():
                    with contextlib.suppress(trio.BrokenResourceError):
                        send.send_nowait((index, PromptFailed(exc)))
                else:
                    refused.append(exc)
                    scope.cancel()
            finally:
                admitted[index].set()
                activity.running -= 1

    async def produce_all() -> None:
        # One cancel scope for the request's prompts; the producers catch their errors, so nothing
        # but cancellation (absorbed here) ever reaches the app's nursery.
        with scope:
            async with trio.open_nursery() as prompts_nursery, send:
                for index, prompt in enumerate(prompts):
                    prompts_nursery.start_soon(produce, index, prompt, send.clone())

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
    return Generation(receive, scope)
