"""`BetweenSteps`: work for the executor that runs in the step loop, between two steps, with none launched.

A profiler's start or stop must bracket whole steps on every rank, and reach
each worker process while it owes no answer to a step (its answer would come
in the middle of the steps' answers). So the step loop runs such work itself:
with some pending it launches no new step, collects those in flight, runs the
work, and goes on; a pipelined engine pays one step's bubble per call.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any

import attrs
import outcome
import trio


@attrs.define(eq=False)
class _Call:
    work: Callable[[], Awaitable[Any]]
    done: trio.Event = attrs.Factory(trio.Event)
    result: outcome.Outcome | None = None


class BetweenSteps:
    """The calls waiting for the step loop; ``wake`` rouses the loop when it sleeps for want of work."""

    def __init__(self, wake: Callable[[], None]) -> None:
        self._wake = wake
        self._calls: deque[_Call] = deque()

    @property
    def pending(self) -> bool:
        return bool(self._calls)

    async def call(self, work: Callable[[], Awaitable[Any]]) -> outcome.Outcome | None:
        """What ``await work()`` gave, once the step loop ran it; None if the loop stopped first.

        A caller cancelled before its call started takes it back; once
        started, the call runs to its end (a profiler must not be left half
        started) and only its result is lost.
        """
        call = _Call(work)
        self._calls.append(call)
        self._wake()
        try:
            await call.done.wait()
        finally:
            if call in self._calls:
                self._calls.remove(call)
        return call.result

    async def run_pending(self) -> None:
        """Run the pending calls in order (the step loop, with no step in flight)."""
        while self._calls:
            call = self._calls.popleft()
            try:
                call.result = outcome.Value(await call.work())
            except Exception as exc:  # the caller's error, not the step loop's
                call.result = outcome.Error(exc)
            finally:
                call.done.set()

    def close(self) -> None:
        """The step loop has stopped: wake the callers whose calls will never run."""
        while self._calls:
            self._calls.popleft().done.set()
