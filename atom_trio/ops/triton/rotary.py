"""Rotary position embedding, rotate-half convention: query and key in one launch, optionally storing K/V too.

With ``STORE_KV`` the same program also writes its token's rotated key and its
value into the paged cache (what `store_kv` does), so a decode step pays one
small kernel per layer for both instead of two.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .cache import cache_strides, kv_scale_args, load_rows, slot_row, store_rows, to_cache_dtype


@triton.jit
def _rotate_heads(
    dst_ptr, src_ptr, stride_src_h, stride_dst_h, cos, sin, scale_ptr,
    NUM_HEADS: tl.constexpr, HALF: tl.constexpr, HEADS_P2: tl.constexpr, HALF_P2: tl.constexpr,
):
    heads = tl.arange(0, HEADS_P2)[:, None]
    dims = tl.arange(0, HALF_P2)[None, :]
    mask = (heads < NUM_HEADS) & (dims < HALF)
    src = src_ptr + heads * stride_src_h + dims
    x1 = tl.load(src, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(src + HALF, mask=mask, other=0.0).to(tl.float32)
    dst = dst_ptr + heads * stride_dst_h + dims
    tl.store(dst, to_cache_dtype(x1 * cos - x2 * sin, dst_ptr, scale_ptr), mask=mask)
    tl.store(dst + HALF, to_cache_dtype(x2 * cos + x1 * sin, dst_ptr, scale_ptr), mask=mask)


@triton.jit
def _rotary_kernel(
    q_out_ptr,
    k_out_ptr,
    q_ptr,
    k_ptr,
    positions_ptr,
    cos_sin_ptr,
    v_ptr,
    slot_mapping_ptr,
    k_cache_ptr,
    v_cache_ptr,
    block_size,
    k_scale_ptr,
    v_scale_ptr,
    stride_qt,
    stride_qh,
    stride_kt,
    stride_kh,
    stride_vt,
    stride_vh,
    stride_cs,
    stride_kcb,
    stride_kcs,
    stride_kch,
    stride_vcb,
    stride_vcs,
    stride_vch,
    NUM_Q_HEADS: tl.constexpr,
    NUM_K_HEADS: tl.constexpr,
    HALF: tl.constexpr,
    Q_HEADS_P2: tl.constexpr,
    K_HEADS_P2: tl.constexpr,
    HALF_P2: tl.constexpr,
    STORE_KV: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    pos = tl.load(positions_ptr + token).to(tl.int64)
    dims = tl.arange(0, HALF_P2)[None, :]
    cos = tl.load(cos_sin_ptr + pos * stride_cs + dims, mask=dims < HALF, other=0.0)
    sin = tl.load(cos_sin_ptr + pos * stride_cs + HALF + dims, mask=dims < HALF, other=0.0)
    q_src = q_ptr + token * stride_qt
    k_src = k_ptr + token * stride_kt
    # The rotated copies are never FP8: no scale is read for them.
    _rotate_heads(
        q_out_ptr + token * (NUM_Q_HEADS * 2 * HALF), q_src, stride_qh, 2 * HALF, cos, sin, cos_sin_ptr,
        NUM_Q_HEADS, HALF, Q_HEADS_P2, HALF_P2,
    )
    _rotate_heads(
        k_out_ptr + token * (NUM_K_HEADS * 2 * HALF), k_src, stride_kh, 2 * HALF, cos, sin, cos_sin_ptr,
        NUM_K_HEADS, HALF, K_HEADS_P2, HALF_P2,
    )
    if STORE_KV:
        slot = tl.load(slot_mapping_ptr + token).to(tl.int64)
        if slot >= 0:  # a padding token (a CUDA graph's spare batch rows) owns no slot
            _rotate_heads(
                slot_row(k_cache_ptr, slot, block_size, stride_kcb, stride_kcs), k_src, stride_kh, stride_kch,
                cos, sin, k_scale_ptr, NUM_K_HEADS, HALF, K_HEADS_P2, HALF_P2,
            )
            v = load_rows(v_ptr + token * stride_vt, stride_vh, NUM_K_HEADS, 2 * HALF, K_HEADS_P2, 2 * HALF_P2)
            v_row = slot_row(v_cache_ptr, slot, block_size, stride_vcb, stride_vcs)
            store_rows(v_row, v, stride_vch, v_scale_ptr, NUM_K_HEADS, 2 * HALF, K_HEADS_P2, 2 * HALF_P2)


def rotary_embedding(
    positions: torch.Tensor,
    query: torch.Tensor,
    key: torch.Tensor,
    cos_sin_cache: torch.Tensor,
    store: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    kv_scales: tuple[torch.Tensor | None, torch.Tensor | None] = (None, None),
) -> tuple[torch.Tensor, torch.Tensor]:
    """New, contiguous rotated copies of ``query``/``key`` (which may be strided views of a fused QKV).

    ``store = (value, k_cache, v_cache, slot_mapping)`` also writes the rotated
    keys and the values to their cache slots, as `store_kv` would (with
    ``kv_scales``, the keys' and values' scale tensors of an FP8 cache).
    """
    query, key = (t if t.stride(-1) == 1 else t.contiguous() for t in (query, key))
    num_tokens, num_q_heads, head_dim = query.shape
    num_k_heads = key.shape[1]
    q_out = torch.empty(query.shape, dtype=query.dtype, device=query.device)
    k_out = torch.empty(key.shape, dtype=key.dtype, device=key.device)
    if store is None:
        value, k_cache, v_cache, slot_mapping = key, key, key, positions  # not read
        strides = (0,) * 6
        block_size = 1
        scale_ptrs = (key, key)  # not read
    else:
        value, k_cache, v_cache, slot_mapping = store
        value = value if value.stride(-1) == 1 else value.contiguous()
        strides = cache_strides(k_cache, v_cache)
        block_size = k_cache.shape[1]
        scale_ptrs = kv_scale_args(k_cache, *kv_scales)
    if num_tokens:
        half = head_dim // 2
        _rotary_kernel[(num_tokens,)](
            q_out,
            k_out,
            query,
            key,
            positions,
            cos_sin_cache,
            value,
            slot_mapping,
            k_cache,
            v_cache,
            block_size,
            *scale_ptrs,
            query.stride(0),
            query.stride(1),
            key.stride(0),
            key.stride(1),
            value.stride(0),
            value.stride(1),
            cos_sin_cache.stride(0),
            *strides,
            NUM_Q_HEADS=num_q_heads,
            NUM_K_HEADS=num_k_heads,
            HALF=half,
            Q_HEADS_P2=triton.next_power_of_2(num_q_heads),
            K_HEADS_P2=triton.next_power_of_2(num_k_heads),
            HALF_P2=triton.next_power_of_2(half),
            STORE_KV=store is not None,
        )
    return q_out, k_out
