"""Joining (and leaving) the torch.distributed process group that tensor-parallel ranks talk through.

The rendezvous is ``env://``: the process executor picks a free port and each
worker exports ``MASTER_ADDR``, ``MASTER_PORT``, ``RANK`` and ``WORLD_SIZE``
before it builds its runner, so the same code serves a worker and any other
launcher (torchrun, a test harness) that sets those variables.
"""

from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as dist

from .group import TensorParallelGroup


def init_distributed(group: TensorParallelGroup, device: torch.device, *, timeout_s: float) -> None:
    """Join ``group`` (gloo on CPU, NCCL on CUDA); a no-op for a single rank.

    ``timeout_s`` bounds the rendezvous and every collective, so a rank whose
    peer died fails instead of waiting forever. On CPU the ranks share the
    host's cores, so each takes its share of torch's threads rather than all
    of them contending for every core.
    """
    if group.size == 1:
        return
    missing = [name for name in ("MASTER_ADDR", "MASTER_PORT") if not os.environ.get(name)]
    if missing:
        raise RuntimeError(f"tensor parallelism needs {' and '.join(missing)} in the environment (the rendezvous)")
    if device.type == "cuda":
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        torch.set_num_threads(max(1, torch.get_num_threads() // group.size))
        backend = "gloo"
    dist.init_process_group(
        backend,
        init_method="env://",
        rank=group.rank,
        world_size=group.size,
        timeout=datetime.timedelta(seconds=timeout_s),
        device_id=device if device.type == "cuda" else None,
    )


def destroy_distributed() -> None:
    """Leave the process group, if this process joined one (idempotent)."""
    if dist.is_initialized():
        dist.destroy_process_group()
