"""Tensor parallelism: which shard a layer holds (`TensorParallelGroup`), and the process group behind it."""

from __future__ import annotations

from .group import SINGLE, TensorParallelGroup, current_tp_group, use_tp_group
from .process_group import destroy_distributed, init_distributed

__all__ = [
    "SINGLE",
    "TensorParallelGroup",
    "current_tp_group",
    "destroy_distributed",
    "init_distributed",
    "use_tp_group",
]
