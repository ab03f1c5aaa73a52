"""``/start_profile`` and ``/stop_profile``: a torch profiler session around live traffic."""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path
from typing import Any

import trio

from .errors import ApiError


class Profiler:
    """At most one torch profiler session at a time; traces go to ``directory`` as Chrome JSON."""

    def __init__(self, directory: str | None) -> None:
        self.directory = Path(directory) if directory else Path(tempfile.gettempdir()) / "atom_trio_profiles"
        self._session: Any = None

    def start(self) -> None:
        if self._session is not None:
            raise ApiError(409, "a profile is already running; POST /stop_profile first", code="profile_running")
        import torch

        activities = [torch.profiler.ProfilerActivity.CPU]
        if torch.cuda.is_available():
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        session = torch.profiler.profile(activities=activities)
        session.start()
        self._session = session

    async def stop(self) -> Path:
        session, self._session = self._session, None
        if session is None:
            raise ApiError(409, "no profile is running; POST /start_profile first", code="profile_not_running")
        self.directory.mkdir(parents=True, exist_ok=True)
        path = self.directory / f"atom_trio-{os.getpid()}-{time.strftime('%Y%m%d-%H%M%S')}.trace.json"

        session.stop()  # in the thread that started it, as the profiler expects
        # Writing a busy trace takes seconds; the event loop keeps serving meanwhile.
        await trio.to_thread.run_sync(session.export_chrome_trace, str(path))
        return path
