"""The CPU's fused experts: each expert runs once, on the tokens that chose it.

The reference runs every expert on every token; here the (token, choice)
pairs are sorted by expert (one sort of the ids), so each expert's
tokens are one contiguous block of rows and the expert is one gate/up
matmul, SiLU-and-mul and one down matmul over that block. Experts no token
chose, and those another rank holds, cost nothing. The weighted sum is one
float32 ``index_add_`` of the rows back onto their tokens. A token's rows
sit in expert order, so its sum runs in the reference's order whatever
else is in the batch.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F


def sorted_fused_experts(
    hidden: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    expert_offset: int,
    activation: Callable[[torch.Tensor], torch.Tensor],
    *,
    w13_bias: torch.Tensor | None = None,
    w2_bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """`KernelBackend.fused_experts` with ``activation`` (SiLU-and-mul, or GPT-OSS's clamped SwiGLU)."""
    num_tokens, top_k = topk_ids.shape
    num_experts = w13.shape[0]
    experts, slots = (topk_ids.reshape(-1) - expert_offset).sort()  # (token, choice) pairs by expert
    # Expert e's pairs are [bounds[e], bounds[e + 1]); those before bounds[0] and from bounds[-1] on are held elsewhere.
    bounds = torch.searchsorted(experts, torch.arange(num_experts + 1, dtype=experts.dtype)).tolist()
    held = slots[bounds[0] : bounds[-1]]
    tokens = held // top_k
    x = hidden.index_select(0, tokens)
    y = torch.empty_like(x)
    for expert in range(num_experts):
        start, end = bounds[expert] - bounds[0], bounds[expert + 1] - bounds[0]
        if start < end:
            gate_up = F.linear(x[start:end], w13[expert], None if w13_bias is None else w13_bias[expert])
            y[start:end] = F.linear(activation(gate_up), w2[expert], None if w2_bias is None else w2_bias[expert])
    out = torch.zeros(num_tokens, hidden.shape[1], dtype=torch.float32)
    out.index_add_(0, tokens, y.float() * topk_weights.reshape(-1)[held, None].float())
    return out.to(hidden.dtype)
