"""Where the model runs: in-process on a thread (`ThreadExecutor`) or in worker subprocesses (`ProcessExecutor`)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING

from atom_trio.executor.base import Executor as Executor
from atom_trio.executor.process import ProcessExecutor as ProcessExecutor
from atom_trio.executor.process import open_process_executor as open_process_executor
from atom_trio.executor.thread import ThreadExecutor as ThreadExecutor

if TYPE_CHECKING:
    from atom_trio.config import EngineConfig

__all__ = ["Executor", "ProcessExecutor", "ThreadExecutor", "open_executor", "open_process_executor", "wants_processes"]


@asynccontextmanager
async def open_executor(config: EngineConfig) -> AsyncIterator[Executor]:
    """The executor ``config`` asks for, alive for the ``async with`` block.

    The model is released when the block ends, however it ends.
    """
    if wants_processes(config):
        async with open_process_executor(config) as executor:
            yield executor
        return
    executor = await ThreadExecutor.create(config)
    try:
        yield executor
    finally:
        await executor.aclose()


def wants_processes(config: EngineConfig) -> bool:
    """Worker processes for ``executor="process"``, for tensor parallelism, and by default on a GPU.

    On a GPU the server's event loop and the model's Python then never share a
    GIL; on the CPU the model needs every core, so it stays on a thread.
    """
    if config.executor != "auto" or config.tensor_parallel_size > 1:
        return config.executor == "process" or config.tensor_parallel_size > 1
    if config.device != "auto":
        return config.device.startswith("cuda")
    import torch

    return torch.cuda.is_available()
