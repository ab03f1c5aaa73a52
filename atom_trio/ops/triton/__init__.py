"""Triton kernels (CUDA and ROCm): the fast path behind `KernelBackend`.

Portable Triton only (no inline PTX, no ``tl.extra.cuda``), so the same
source compiles for NVIDIA and AMD GPUs.
"""

from __future__ import annotations

from .attention import MAX_SPLITS, MIN_SPLIT_TOKENS, TritonAttentionPlan, launch_config
from .backend import TritonBackend
from .sampling import cutoffs, sample

__all__ = ["MAX_SPLITS", "MIN_SPLIT_TOKENS", "TritonAttentionPlan", "TritonBackend", "cutoffs", "launch_config", "sample"]
