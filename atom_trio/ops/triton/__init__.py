"""Triton kernels (CUDA and ROCm): the fast path behind `KernelBackend`.

Portable Triton only (no inline PTX, no ``tl.extra.cuda``), so the same
source compiles for NVIDIA and AMD GPUs.
"""

from __future__ import annotations

from .attention import MAX_SPLITS, MIN_SPLIT_TOKENS, TritonAttentionPlan, launch_config
from .backend import TritonBackend
from .moe import MoeTileConfig, fused_experts, moe_align_block_size
from .sampling import cutoffs, sample

__all__ = [
    "MAX_SPLITS",
    "MIN_SPLIT_TOKENS",
    "MoeTileConfig",
    "TritonAttentionPlan",
    "TritonBackend",
    "cutoffs",
    "fused_experts",
    "launch_config",
    "moe_align_block_size",
    "sample",
]
