"""Triton kernels (CUDA and ROCm): the fast path behind `KernelBackend`.

Portable Triton only (no inline PTX, no ``tl.extra.cuda``), so the same
source compiles for NVIDIA and AMD GPUs.
"""

from __future__ import annotations

from .attention import MAX_SPLITS, MIN_SPLIT_TOKENS, TritonAttentionPlan, launch_config
from .backend import TritonBackend
from .mla import DEFAULT_MLA_TILES, WIDE_MLA_TILES, MLALaunchConfig, mla_decode, mla_num_splits, mla_tiles
from .moe import MoeTileConfig, fused_experts, moe_align_block_size
from .sampling import cutoffs, sample

__all__ = [
    "DEFAULT_MLA_TILES",
    "MAX_SPLITS",
    "MIN_SPLIT_TOKENS",
    "MLALaunchConfig",
    "WIDE_MLA_TILES",
    "MoeTileConfig",
    "TritonAttentionPlan",
    "TritonBackend",
    "cutoffs",
    "fused_experts",
    "launch_config",
    "mla_decode",
    "mla_num_splits",
    "mla_tiles",
    "moe_align_block_size",
    "sample",
]
