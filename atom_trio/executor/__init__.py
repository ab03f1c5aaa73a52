"""Where the model runs: in-process on a thread (`ThreadExecutor`) or in worker subprocesses (`ProcessExecutor`)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING

from atom_trio.executor.base import Executor as Executor
from atom_trio.executor.preflight import check_device as check_device
from atom_trio.executor.process import ProcessExecutor as ProcessExecutor
from atom_trio.executor.process import open_process_executor as open_process_executor
from atom_trio.executor.thread import ThreadExecutor as ThreadExecutor

if TYPE_CHECKING:
    from atom_trio.config import EngineConfig

__all__ = [
    "Executor",
    "ProcessExecutor",
    "ThreadExecutor",
    "check_device",
    "open_executor",
    "open_process_executor",
    "runs_on_gpu",
    "wants_async_scheduling",
    "wants_processes",
]


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
    return runs_on_gpu(config)


def wants_async_scheduling(config: EngineConfig) -> bool:
    """``config.async_scheduling``, by default on a GPU.

    Planning step N+1 while step N runs hides the host's share of a step
    behind the device's. On the CPU the runner computes a step before it
    returns from launching it, so there is nothing to hide, and results would
    only come a step later.
    """
    return runs_on_gpu(config) if config.async_scheduling is None else config.async_scheduling


def runs_on_gpu(config: EngineConfig) -> bool:
    if config.device != "auto":
        return config.device.startswith("cuda")
    import torch

    return torch.cuda.is_available()
