"""Model building blocks, each running its kernels on the backend captured when it was built."""

from __future__ import annotations

from .attention import (
    Attention,
    CachedAttention,
    ForwardContext,
    forward_context,
    get_forward_context,
    take_kv_scales,
)
from .embedding import ParallelLMHead, VocabParallelEmbedding
from .layernorm import RMSNorm
from .linear import (
    ColumnParallelLinear,
    MergedColumnParallelLinear,
    QKVParallelLinear,
    ReplicatedLinear,
    RowParallelLinear,
)
from .mla import MLAAttention
from .moe import FusedMoE, select_experts, use_expert_parallel
from .rotary import RotaryEmbedding, get_rope

__all__ = [
    "Attention",
    "CachedAttention",
    "ColumnParallelLinear",
    "ForwardContext",
    "FusedMoE",
    "MLAAttention",
    "MergedColumnParallelLinear",
    "ParallelLMHead",
    "QKVParallelLinear",
    "RMSNorm",
    "ReplicatedLinear",
    "RotaryEmbedding",
    "RowParallelLinear",
    "VocabParallelEmbedding",
    "forward_context",
    "get_forward_context",
    "get_rope",
    "select_experts",
    "take_kv_scales",
    "use_expert_parallel",
]
