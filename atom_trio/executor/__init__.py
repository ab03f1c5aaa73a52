"""Where the model runs: in-process on a thread (`ThreadExecutor`) or in worker subprocesses (`ProcessExecutor`)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING

from atom_trio.executor.base import Executor as Executor
from atom_trio.executor.thread import ThreadExecutor as ThreadExecutor

if TYPE_CHECKING:
    from atom_trio.config import EngineConfig

__all__ = ["Executor", "ThreadExecutor", "open_executor"]


@asynccontextmanager
async def open_executor(config: EngineConfig) -> AsyncIterator[Executor]:
    """The executor ``config`` asks for, alive for the ``async with`` block.

    Worker processes when ``executor="process"`` or ``tensor_parallel_size > 1``;
    otherwise the model runs in this process on a thread. The model is
    released when the block ends, however it ends.
    """
    if config.executor == "process" or config.tensor_parallel_size > 1:
        from atom_trio.executor.process import open_process_executor

        async with open_process_executor(config) as executor:
            yield executor
        return
    executor = await ThreadExecutor.create(config)
    try:
        yield executor
    finally:
        await executor.aclose()
