"""`RunnerThread`: one OS thread that runs a model runner's work, one call at a time, in the order called.

trio's `trio.to_thread.run_sync` lends any idle thread of its pool (the
tokenizer's and the file system's work share it), so consecutive steps may
run on different threads. The model does not mind, but torch's profiler
records only the thread that started it. On one thread, a profiler started
between two steps records every step after it, and the steps never overlap.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from typing import Any, TypeVar

import outcome
import trio

T = TypeVar("T")


class RunnerThread:
    """A daemon thread fed by a queue; `run` awaits a call's outcome without blocking the event loop.

    A cancelled `run` still waits for its call to finish, and the
    cancellation is delivered at the caller's next checkpoint (as with
    ``trio.to_thread.run_sync(abandon_on_cancel=False)``): nothing touches
    the runner after its caller believes the call is over. `aclose` ends the
    thread once the calls queued before it have run, and waits until it has:
    a daemon thread still inside torch when the interpreter finalizes is
    killed as it takes the GIL back, and libstdc++ aborts the process
    ("terminate called without an active exception", pytorch#38228).
    """

    def __init__(self, name: str) -> None:
        self._calls: queue.SimpleQueue[Callable[[], None] | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._serve, name=name, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while (call := self._calls.get()) is not None:
            call()

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)`` on the thread; its result, or its exception raised here."""
        token = trio.lowlevel.current_trio_token()
        task = trio.lowlevel.current_task()

        def call() -> None:
            result = outcome.capture(fn, *args)
            try:
                token.run_sync_soon(trio.lowlevel.reschedule, task, result)
            except trio.RunFinishedError:  # the event loop is gone (interrupted): nobody waits
                pass

        self._calls.put(call)
        return await trio.lowlevel.wait_task_rescheduled(lambda _: trio.lowlevel.Abort.FAILED)

    async def aclose(self) -> None:
        """End the thread after the calls queued so far; return once it has ended."""
        self._calls.put(None)
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(self._thread.join, thread_name="atom-trio runner join")
