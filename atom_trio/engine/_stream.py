"""The two ends of one request's output: the engine's buffer and the caller's async iterator.

The engine never waits for a reader. It puts each step's delta into the
request's `OutputBuffer`; if the reader has not taken the previous delta
yet, the two merge into one (`RequestOutput.add`), so a slow reader costs
one pending output, not a growing queue.

The reader holds a `RequestStream`, and only the reader does: the engine
keeps the buffer, never the stream. So when the reader goes away (breaks
out of ``async for``, is cancelled, or drops the stream), the stream
notices and aborts the request, and the scheduler frees its KV blocks at
the next step. A plain object with ``__anext__`` and ``aclose`` does this
more predictably under trio than an async generator would: no generator
finalizer, no "garbage collected before exhausted" warnings.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

import trio

if TYPE_CHECKING:
    from types import TracebackType

    from atom_trio.outputs import RequestOutput


class OutputBuffer:
    """The engine's side of a request's output: at most one pending (merged) delta, or an error."""

    __slots__ = ("_error", "_finished", "_pending", "_wakeup")

    def __init__(self) -> None:
        self._pending: RequestOutput | None = None
        self._error: BaseException | None = None
        self._finished = False
        self._wakeup: trio.Event | None = None

    def put(self, delta: RequestOutput) -> None:
        """Hand a delta to the reader, merging it into one the reader has not taken yet."""
        if self._pending is None:
            self._pending = delta
        else:
            self._pending.add(delta)
        self._wake()

    def fail(self, error: BaseException) -> None:
        """End the stream with ``error`` (after any output still pending)."""
        if self._error is None and not self._finished:
            self._error = error
            self._wake()

    def _wake(self) -> None:
        if self._wakeup is not None:
            self._wakeup.set()

    async def get(self) -> RequestOutput:
        """Wait for the next (merged) delta; `StopAsyncIteration` after the final one."""
        await trio.lowlevel.checkpoint_if_cancelled()
        while self._pending is None:
            if self._finished:
                raise StopAsyncIteration
            if self._error is not None:
                raise self._error
            self._wakeup = trio.Event()
            await self._wakeup.wait()
        output, self._pending = self._pending, None
        self._finished = output.finished
        return output

    @property
    def finished(self) -> bool:
        """The final output has been taken, or the stream failed."""
        return self._finished or self._error is not None


class RequestStream:
    """What `AsyncEngine.generate` returns: an async iterator of a request's `RequestOutput` deltas.

    Admission happens at the first ``__anext__``, so admission errors
    (`InvalidRequest`, `ContextLengthExceeded`, `EngineOverloaded`,
    `EngineDeadError`) raise there, before any output. Leaving early aborts
    the request: call `aclose` (or use ``async with``), or just break out of
    the loop and drop the stream; cancellation while waiting aborts too.
    """

    def __init__(
        self,
        admit: Callable[[], Awaitable[tuple[OutputBuffer, Callable[[], None]]]],
        token: trio.lowlevel.TrioToken,
    ) -> None:
        self._admit: Callable[[], Awaitable[tuple[OutputBuffer, Callable[[], None]]]] | None = admit
        self._token = token
        self._buffer: OutputBuffer | None = None
        self._abort: Callable[[], None] | None = None

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> RequestOutput:
        if self._admit is not None:
            admit, self._admit = self._admit, None
            self._buffer, self._abort = await admit()
        if self._buffer is None:  # closed before admission
            raise StopAsyncIteration
        try:
            return await self._buffer.get()
        except trio.Cancelled:
            self._abort_if_running()
            raise

    async def aclose(self) -> None:
        """Stop reading; if the request is still running, abort it."""
        self._admit = None
        self._abort_if_running()
        await trio.lowlevel.checkpoint()

    async def __aenter__(self) -> RequestStream:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    def _abort_if_running(self) -> None:
        abort, self._abort = self._abort, None
        if abort is not None and self._buffer is not None and not self._buffer.finished:
            abort()

    def __del__(self) -> None:
        # The reader dropped the stream without closing it (a `break` out of
        # `async for`). The garbage collector may run this on any thread, so
        # the abort is handed to the trio thread.
        abort, self._abort = self._abort, None
        if abort is not None and self._buffer is not None and not self._buffer.finished:
            try:
                self._token.run_sync_soon(abort)
            except trio.RunFinishedError:
                pass
