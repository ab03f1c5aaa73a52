"""``/start_profile`` and ``/stop_profile``: one torch profiler session at a time, on every rank of the engine.

The ranks do the profiling (`AsyncEngine.start_profile`: each starts torch's
profiler on the thread that runs its steps and writes a trace of its own).
The server adds one session at a time, the traces' names under
``--profile-dir``, and a time limit: a session ends at ``/stop_profile`` or
after ``--profile-max-seconds``, whichever comes first, and each rank records
at most 256 steps of it (`atom_trio.runner.profiling.MAX_STEPS`). The traces of
a session that reached its time limit wait for the next ``/stop_profile``.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Awaitable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import trio

from ..errors import ProfilerError
from .errors import ApiError

if TYPE_CHECKING:
    from ..config import ServerSettings
    from ..engine import AsyncEngine

log = logging.getLogger("atom_trio.server")

T = TypeVar("T")


class Profiler:
    """The profiling sessions of one server; its methods answer the routes."""

    def __init__(self, settings: ServerSettings) -> None:
        self.directory = Path(settings.profile_dir or ".")
        self.max_seconds = settings.profile_max_seconds
        self._lock = trio.Lock()  # a start, a stop and the time limit never interleave
        self._session: trio.CancelScope | None = None  # the running session's time limit
        self._ended: dict[str, Any] | None = None  # the answer due for a session that reached its time limit
        self._count = 0

    async def start(self, engine: AsyncEngine, nursery: trio.Nursery) -> dict[str, Any]:
        async with self._lock:
            if self._session is not None:
                raise ApiError(409, "a profile is already running; POST /stop_profile first", code="profile_running")
            self._count += 1
            prefix = self.directory / f"atom_trio-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}-{self._count}"
            traces = await _to_the_end(engine.start_profile(str(prefix)))
            self._ended = None
            self._session = trio.CancelScope(deadline=trio.current_time() + self.max_seconds)
            nursery.start_soon(self._time_limit, engine, self._session)
        return {"status": "profiling", "traces": traces, "max_seconds": self.max_seconds}

    async def stop(self, engine: AsyncEngine) -> dict[str, Any]:
        async with self._lock:
            if self._session is not None:
                return await self._end(engine, "request")
            answer, self._ended = self._ended, None
        if answer is None:
            raise ApiError(409, "no profile is running; POST /start_profile first", code="profile_not_running")
        return answer

    async def _end(self, engine: AsyncEngine, stopped_by: str) -> dict[str, Any]:
        """Stop the running session and write its traces (with the lock held)."""
        assert self._session is not None
        self._session.cancel()
        self._session = None
        traces = await _to_the_end(engine.stop_profile())
        return {"status": "stopped", "stopped_by": stopped_by, "traces": traces}

    async def _time_limit(self, engine: AsyncEngine, session: trio.CancelScope) -> None:
        with session:
            await trio.sleep_forever()
        async with self._lock:
            if self._session is not session:  # stopped by a request meanwhile
                return
            try:
                self._ended = ended = await self._end(engine, "time limit")
            except Exception as exc:
                log.warning("a profile reached its time limit of %s s; stopping it failed: %s", self.max_seconds, exc)
                return
        log.info("a profile reached its time limit of %s s; traces: %s", self.max_seconds, ended["traces"])


async def _to_the_end(call: Awaitable[T]) -> T:
    """Await an engine's profiler call, shielded: a client that leaves must not leave the ranks half started.

    Raises:
        ApiError: a rank's profiler failed (500; the engine serves on).
    """
    with trio.CancelScope(shield=True):
        try:
            return await call
        except ProfilerError as exc:
            raise ApiError(500, f"The profiler failed: {exc}", type="server_error", code="profiler_failed") from exc
