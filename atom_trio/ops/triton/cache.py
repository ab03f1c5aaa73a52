"""Writing a step's keys and values into the paged KV cache.

`slot_row`, `load_rows` and `store_rows` are the store's body, shared with
the rotary kernel that writes its rotated keys and the values in the same pass.
An FP8 (e4m3) cache holds ``x / scale`` with one per-tensor scale for the keys
and one for the values (`to_cache_dtype`); the attention kernel multiplies them back.
The scales are float32 device tensors the kernels load, never host floats
passed by value: a CUDA graph captures their address, so it replays with the
values the layer holds (`kv_scale_args`).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from .fp8 import to_fp8


FP8_CACHE_DTYPE = torch.float8_e4m3fn


@functools.lru_cache(maxsize=8)
def _unit_scale(device: torch.device) -> torch.Tensor:
    return torch.ones(1, dtype=torch.float32, device=device)


def kv_scale_args(cache: torch.Tensor, *scales: torch.Tensor | None) -> tuple[torch.Tensor, ...]:
    """The scale tensors a kernel writing or reading ``cache`` takes, in order.

    An FP8 cache gets each scale (float32 ``[1]``), 1.0 where None; any other
    cache reads none of them, so the cache itself stands in for each pointer.
    """
    if cache.dtype != FP8_CACHE_DTYPE:
        return (cache,) * len(scales)
    return tuple(_unit_scale(cache.device) if scale is None else scale for scale in scales)


def cache_strides(k_cache: torch.Tensor, v_cache: torch.Tensor) -> tuple[int, ...]:
    """The block, slot and head strides of both caches ``[blocks, block_size, kv_heads, head_dim]``, K's first."""
    return (*k_cache.stride()[:3], *v_cache.stride()[:3])


@triton.jit
def slot_row(cache_ptr, slot, block_size, stride_block, stride_slot):
    """Where ``slot``'s row (its token's heads) starts in a cache: token ``slot % block_size`` of block ``slot // block_size``."""
    return cache_ptr + (slot // block_size) * stride_block + (slot % block_size) * stride_slot


@triton.jit
def _head_offsets(
    stride_h, NUM_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, HEADS_P2: tl.constexpr, HEAD_DIM_P2: tl.constexpr
):
    """The offsets of one token's ``[heads, head_dim]`` elements from its row at head stride ``stride_h``, and which are real."""
    heads = tl.arange(0, HEADS_P2)[:, None]
    dims = tl.arange(0, HEAD_DIM_P2)[None, :]
    return heads * stride_h + dims, (heads < NUM_HEADS) & (dims < HEAD_DIM)


@triton.jit
def load_rows(
    row_ptr, stride_h, NUM_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, HEADS_P2: tl.constexpr, HEAD_DIM_P2: tl.constexpr
):
    """One token's ``[heads, head_dim]`` keys or values (padded to powers of two) from its row."""
    offsets, mask = _head_offsets(stride_h, NUM_HEADS, HEAD_DIM, HEADS_P2, HEAD_DIM_P2)
    return tl.load(row_ptr + offsets, mask=mask)


@triton.jit
def to_cache_dtype(x, cache_ptr, scale_ptr):
    """``x`` as a cache of ``cache_ptr``'s dtype holds it: ``fp8(x / scale)`` in an FP8 cache, else ``x`` cast.

    ``scale_ptr`` (a float32 scalar) is read only for an FP8 cache."""
    if cache_ptr.dtype.element_ty == tl.float8e4nv:
        y = to_fp8(x, tl.load(scale_ptr))
    else:
        y = x.to(cache_ptr.dtype.element_ty)
    return y


@triton.jit
def store_rows(
    row_ptr, rows, stride_h, scale_ptr,
    NUM_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, HEADS_P2: tl.constexpr, HEAD_DIM_P2: tl.constexpr,
):
    """`load_rows`' ``rows`` into a cache row (from `slot_row`), in the cache's dtype (`to_cache_dtype`)."""
    offsets, mask = _head_offsets(stride_h, NUM_HEADS, HEAD_DIM, HEADS_P2, HEAD_DIM_P2)
    tl.store(row_ptr + offsets, to_cache_dtype(rows, row_ptr, scale_ptr), mask=mask)


@triton.jit
def _store_kv_kernel(
    key_ptr,
    value_ptr,
    k_cache_ptr,
    v_cache_ptr,
    slot_mapping_ptr,
    block_size,
    k_scale_ptr,
    v_scale_ptr,
    stride_kt,
    stride_kh,
    stride_vt,
    stride_vh,
    stride_kcb,
    stride_kcs,
    stride_kch,
    stride_vcb,
    stride_vcs,
    stride_vch,
    NUM_KV_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    HEADS_P2: tl.constexpr,
    HEAD_DIM_P2: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_mapping_ptr + token).to(tl.int64)
    if slot < 0:  # a padding token (a CUDA graph's spare batch rows) owns no slot
        return
    k = load_rows(key_ptr + token * stride_kt, stride_kh, NUM_KV_HEADS, HEAD_DIM, HEADS_P2, HEAD_DIM_P2)
    v = load_rows(value_ptr + token * stride_vt, stride_vh, NUM_KV_HEADS, HEAD_DIM, HEADS_P2, HEAD_DIM_P2)
    k_row = slot_row(k_cache_ptr, slot, block_size, stride_kcb, stride_kcs)
    v_row = slot_row(v_cache_ptr, slot, block_size, stride_vcb, stride_vcs)
    store_rows(k_row, k, stride_kch, k_scale_ptr, NUM_KV_HEADS, HEAD_DIM, HEADS_P2, HEAD_DIM_P2)
    store_rows(v_row, v, stride_vch, v_scale_ptr, NUM_KV_HEADS, HEAD_DIM, HEADS_P2, HEAD_DIM_P2)


def store_kv(
    key: torch.Tensor,
    value: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
) -> None:
    """One program per token; tokens whose slot is negative are skipped. The scales matter to an FP8 cache only."""
    key, value = (t if t.stride(-1) == 1 else t.contiguous() for t in (key, value))
    num_tokens, num_kv_heads, head_dim = key.shape
    if num_tokens == 0:
        return
    _store_kv_kernel[(num_tokens,)](
        key,
        value,
        k_cache,
        v_cache,
        slot_mapping,
        k_cache.shape[1],
        *kv_scale_args(k_cache, k_scale, v_scale),
        key.stride(0),
        key.stride(1),
        value.stride(0),
        value.stride(1),
        *cache_strides(k_cache, v_cache),
        NUM_KV_HEADS=num_kv_heads,
        HEAD_DIM=head_dim,
        HEADS_P2=triton.next_power_of_2(num_kv_heads),
        HEAD_DIM_P2=triton.next_power_of_2(head_dim),
    )
