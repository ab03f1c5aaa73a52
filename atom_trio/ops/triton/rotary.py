"""Rotary position embedding, rotate-half convention, query and key in one launch."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rotate_heads(dst_ptr, src_ptr, stride_h, cos, sin, NUM_HEADS: tl.constexpr, HALF: tl.constexpr, HEADS_P2: tl.constexpr, HALF_P2: tl.constexpr):
    heads = tl.arange(0, HEADS_P2)[:, None]
    dims = tl.arange(0, HALF_P2)[None, :]
    mask = (heads < NUM_HEADS) & (dims < HALF)
    src = src_ptr + heads * stride_h + dims
    x1 = tl.load(src, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(src + HALF, mask=mask, other=0.0).to(tl.float32)
    dst = dst_ptr + heads * (2 * HALF) + dims
    tl.store(dst, (x1 * cos - x2 * sin).to(dst_ptr.dtype.element_ty), mask=mask)
    tl.store(dst + HALF, (x2 * cos + x1 * sin).to(dst_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _rotary_kernel(
    q_out_ptr,
    k_out_ptr,
    q_ptr,
    k_ptr,
    positions_ptr,
    cos_sin_ptr,
    stride_qt,
    stride_qh,
    stride_kt,
    stride_kh,
    stride_cs,
    NUM_Q_HEADS: tl.constexpr,
    NUM_K_HEADS: tl.constexpr,
    HALF: tl.constexpr,
    Q_HEADS_P2: tl.constexpr,
    K_HEADS_P2: tl.constexpr,
    HALF_P2: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    pos = tl.load(positions_ptr + token).to(tl.int64)
    dims = tl.arange(0, HALF_P2)[None, :]
    cos = tl.load(cos_sin_ptr + pos * stride_cs + dims, mask=dims < HALF, other=0.0)
    sin = tl.load(cos_sin_ptr + pos * stride_cs + HALF + dims, mask=dims < HALF, other=0.0)
    _rotate_heads(
        q_out_ptr + token * (NUM_Q_HEADS * 2 * HALF), q_ptr + token * stride_qt, stride_qh, cos, sin,
        NUM_Q_HEADS, HALF, Q_HEADS_P2, HALF_P2,
    )
    _rotate_heads(
        k_out_ptr + token * (NUM_K_HEADS * 2 * HALF), k_ptr + token * stride_kt, stride_kh, cos, sin,
        NUM_K_HEADS, HALF, K_HEADS_P2, HALF_P2,
    )


def rotary_embedding(
    positions: torch.Tensor, query: torch.Tensor, key: torch.Tensor, cos_sin_cache: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """New, contiguous rotated copies of ``query``/``key`` (which may be strided views of a fused QKV)."""
    query, key = (t if t.stride(-1) == 1 else t.contiguous() for t in (query, key))
    num_tokens, num_q_heads, head_dim = query.shape
    num_k_heads = key.shape[1]
    q_out = torch.empty(query.shape, dtype=query.dtype, device=query.device)
    k_out = torch.empty(key.shape, dtype=key.dtype, device=key.device)
    if num_tokens:
        half = head_dim // 2
        _rotary_kernel[(num_tokens,)](
            q_out,
            k_out,
            query,
            key,
            positions,
            cos_sin_cache,
            query.stride(0),
            query.stride(1),
            key.stride(0),
            key.stride(1),
            cos_sin_cache.stride(0),
            NUM_Q_HEADS=num_q_heads,
            NUM_K_HEADS=num_k_heads,
            HALF=half,
            Q_HEADS_P2=triton.next_power_of_2(num_q_heads),
            K_HEADS_P2=triton.next_power_of_2(num_k_heads),
            HALF_P2=triton.next_power_of_2(half),
        )
    return q_out, k_out
