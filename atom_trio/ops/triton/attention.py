"""Paged attention for the unified mixed batch, in one Triton kernel.

Every program owns one *query block* (up to ``BLOCK_Q`` consecutive query
tokens of one sequence) for one KV head, and packs the ``GROUP`` query heads
that share that KV head into the rows of its tile, so grouped-query attention
reads each KV tile once per KV head, not once per query head. Prefill chunks,
chunks over cached context and decode tokens are the same case: a query at
position ``p`` attends to cache positions ``[0, p]`` of its sequence, or with
a sliding window ``w`` to ``(p - w, p]``: a program reads no key before its
first query's window. Sinks (a logit per head with no value) join the
softmax's denominator once, at the end: in the kernel without splits, in the
merge with them.

The grid depends only on host integers (token count, sequence count, split
count), never on device values: sequence ``i``'s query blocks are numbered from
``cu_seqlens_q[i] // BLOCK_Q + i``, so ``num_tokens // BLOCK_Q + num_seqs``
programs cover any batch of that size, each finds its sequence by binary
search, and spare ones exit. That is what lets a CUDA graph captured for one
batch size replay for any lengths.

When that grid is too small to fill the GPU (a few decode tokens over long
contexts), each program's key range is cut into ``num_splits`` pieces run by
separate programs, which write unnormalised partial results; a second kernel
merges them (the two-phase, flash-decoding reduction).
"""

from __future__ import annotations

import functools

import attrs
import torch
import triton
import triton.language as tl

from ..interface import AttentionMetadata
from .cache import FP8_CACHE_DTYPE, cache_strides, kv_scale_args

# Finite, so that a row with no visible key yet never computes inf - inf.
_NEG_BIG = tl.constexpr(-1.0e30)
_LOG2E = 1.4426950408889634
_LOG2E_IN_KERNEL = tl.constexpr(_LOG2E)

# Below this many keys per split, another split costs more than it saves.
MIN_SPLIT_TOKENS = 128
MAX_SPLITS = 64


@attrs.frozen(kw_only=True)
class TritonAttentionPlan:
    """What `TritonBackend.paged_attention` needs besides the layer's tensors.

    Only host integers decide the launch; ``num_splits`` is fixed here (forced
    by the caller, e.g. a CUDA graph captured for the longest context, or
    chosen from this step's lengths).
    """

    cu_seqlens_q: torch.Tensor
    context_lens: torch.Tensor
    block_tables: torch.Tensor
    block_size: int
    num_seqs: int
    max_query_len: int
    max_context_len: int
    num_splits: int | None = None
    metadata: AttentionMetadata | None = None
    """The step's whole description, for kernels that split a mixed batch by kind on the host (latent attention)."""


@attrs.frozen
class LaunchConfig:
    block_m: int
    block_q: int
    block_n: int
    num_splits: int
    num_warps: int
    num_stages: int


@functools.lru_cache(maxsize=512)
def launch_config(
    *,
    num_tokens: int,
    num_seqs: int,
    max_query_len: int,
    max_context_len: int,
    group: int,
    head_dim: int,
    num_kv_heads: int,
    num_sms: int,
    num_splits: int | None,
) -> LaunchConfig:
    """Tile sizes and the split count for one batch shape (pure host arithmetic, cached)."""
    group_p2 = triton.next_power_of_2(group)
    if max_query_len <= 1:
        block_m = max(16, group_p2)  # one token's query heads; tl.dot needs 16 rows
    elif max_query_len * group <= 64:
        block_m = max(64, group_p2)
    else:
        block_m = max(128, group_p2)
    block_q = block_m // group
    # Measured on H100 (benchmark_kernels --tune): wide key tiles pay off once the query tile is 128 rows.
    block_n = (128 if block_m >= 128 else 64) if head_dim <= 128 else 32
    if num_splits is None:
        programs = (num_tokens // block_q + num_seqs) * num_kv_heads
        num_splits = 1
        if programs < num_sms:
            wanted = min(-(-2 * num_sms // programs), max_context_len // MIN_SPLIT_TOKENS, MAX_SPLITS)
            while num_splits * 2 <= wanted:
                num_splits *= 2
    num_warps = 8 if block_m >= 128 else 4
    return LaunchConfig(block_m, block_q, block_n, max(1, num_splits), num_warps, num_stages=3)


@triton.jit
def _find_seq(cu_seqlens_q, q_block, num_seqs, BLOCK_Q: tl.constexpr):
    """The sequence whose query blocks, numbered from ``cu_seqlens_q[i] // BLOCK_Q + i``, include ``q_block``."""
    lo: tl.int32 = 0
    hi = num_seqs
    while lo < hi:
        mid = (lo + hi) // 2
        first_block = tl.load(cu_seqlens_q + mid) // BLOCK_Q + mid
        if first_block <= q_block:
            lo = mid + 1
        else:
            hi = mid
    return lo - 1


@triton.jit
def _attend_tile(
    acc, m_i, l_i, q, q_pos, start, kv_end, table, k_head, v_head, stride_kb, stride_ks, stride_vb, stride_vs,
    scale_log2, dims, dim_valid, window,
    BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr, MASKED: tl.constexpr,
    HAS_WINDOW: tl.constexpr,
):
    """One online-softmax step over keys ``[start, start + BLOCK_N)``, gathered through the block table.

    A row may see none of the tile's keys (window, causality): its max stays finite (`_NEG_BIG`), so
    its probabilities are zeros, never NaN."""
    pos = start + tl.arange(0, BLOCK_N)
    pos_valid = pos < kv_end
    block = tl.load(table + pos // BLOCK_SIZE, mask=pos_valid, other=0).to(tl.int64)
    in_block = pos % BLOCK_SIZE
    kv_mask = pos_valid[:, None] & dim_valid[None, :]
    k_off = block * stride_kb + in_block * stride_ks
    k = tl.load(k_head + k_off[:, None] + dims[None, :], mask=kv_mask, other=0.0)
    s = tl.dot(q, tl.trans(k.to(q.dtype)), input_precision=DOT_PRECISION) * scale_log2
    if MASKED:
        visible = (pos[None, :] <= q_pos[:, None]) & pos_valid[None, :]
        if HAS_WINDOW:
            visible = visible & (pos[None, :] > q_pos[:, None] - window)
        s = tl.where(visible, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    v_off = block * stride_vb + in_block * stride_vs
    v = tl.load(v_head + v_off[:, None] + dims[None, :], mask=kv_mask, other=0.0)
    acc = acc * alpha[:, None] + tl.dot(p.to(q.dtype), v.to(q.dtype), input_precision=DOT_PRECISION)
    return acc, m_new, l_i


@triton.jit
def _paged_attention_kernel(
    out_ptr,
    partial_out_ptr,
    partial_max_ptr,
    partial_sum_ptr,
    q_ptr,
    k_cache_ptr,
    v_cache_ptr,
    cu_seqlens_q_ptr,
    context_lens_ptr,
    block_tables_ptr,
    sinks_ptr,
    scale_log2,
    window,
    k_scale_ptr,
    v_scale_ptr,
    num_seqs,
    num_heads,
    num_splits,
    stride_qt,
    stride_qh,
    stride_ot,
    stride_oh,
    stride_kb,
    stride_ks,
    stride_kh,
    stride_vb,
    stride_vs,
    stride_vh,
    stride_bt,
    BLOCK_SIZE: tl.constexpr,
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_P2: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    BLOCK_N: tl.constexpr,
    USE_SPLITS: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    HAS_SINKS: tl.constexpr,
    HAS_WINDOW: tl.constexpr,
    FP8_CACHE: tl.constexpr,
):
    q_block = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)

    seq = _find_seq(cu_seqlens_q_ptr, q_block, num_seqs, BLOCK_Q)
    q_start = tl.load(cu_seqlens_q_ptr + seq)
    q_len = tl.load(cu_seqlens_q_ptr + seq + 1) - q_start
    first_q = (q_block - (q_start // BLOCK_Q + seq)) * BLOCK_Q
    if first_q >= q_len:
        return
    context_len = tl.load(context_lens_ptr + seq)

    rows = tl.arange(0, BLOCK_M)
    q_tok = first_q + rows // GROUP  # token index within the sequence's chunk
    head = kv_head * GROUP + rows % GROUP
    row_valid = (rows < BLOCK_Q * GROUP) & (q_tok < q_len)
    q_pos = context_len - q_len + q_tok  # each query sees cache positions [0, q_pos]
    token = (q_start + q_tok).to(tl.int64)
    dims = tl.arange(0, HEAD_DIM_P2)
    dim_valid = dims < HEAD_DIM
    q_mask = row_valid[:, None] & dim_valid[None, :]
    q = tl.load(q_ptr + token[:, None] * stride_qt + head[:, None] * stride_qh + dims[None, :], mask=q_mask, other=0.0)

    kv_end = context_len - q_len + tl.minimum(first_q + BLOCK_Q, q_len)  # past the block's last query
    first_pos = context_len - q_len + first_q
    kv_start = 0
    if HAS_WINDOW:  # the first query's window starts the keys any row of the block sees
        kv_start = tl.maximum(first_pos - window + 1, 0)
    if USE_SPLITS:
        split_len = tl.cdiv(tl.cdiv(kv_end - kv_start, num_splits), BLOCK_N) * BLOCK_N
        kv_start = kv_start + split * split_len
        kv_end = tl.minimum(kv_end, kv_start + split_len)

    if FP8_CACHE:  # the cache holds keys / k_scale: the scale folds into the scores' scale
        scale_log2 = scale_log2 * tl.load(k_scale_ptr)
    m_i = tl.full([BLOCK_M], _NEG_BIG, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM_P2], dtype=tl.float32)
    table = block_tables_ptr + seq.to(tl.int64) * stride_bt
    k_head = k_cache_ptr + kv_head * stride_kh
    v_head = v_cache_ptr + kv_head * stride_vh
    # Keys up to the block's first query are visible to every row: those whole tiles skip the mask.
    # (With a window every tile takes it: the window's edge moves with each row, and covers few tiles.)
    if HAS_WINDOW:
        unmasked_end = kv_start
    else:
        unmasked_end = kv_start + tl.maximum(tl.minimum(kv_end, first_pos + 1) - kv_start, 0) // BLOCK_N * BLOCK_N
    for start in range(kv_start, unmasked_end, BLOCK_N):
        acc, m_i, l_i = _attend_tile(
            acc, m_i, l_i, q, q_pos, start, kv_end, table, k_head, v_head, stride_kb, stride_ks, stride_vb,
            stride_vs, scale_log2, dims, dim_valid, window, BLOCK_SIZE, BLOCK_N, DOT_PRECISION, False, HAS_WINDOW,
        )
    for start in range(unmasked_end, kv_end, BLOCK_N):
        acc, m_i, l_i = _attend_tile(
            acc, m_i, l_i, q, q_pos, start, kv_end, table, k_head, v_head, stride_kb, stride_ks, stride_vb,
            stride_vs, scale_log2, dims, dim_valid, window, BLOCK_SIZE, BLOCK_N, DOT_PRECISION, True, HAS_WINDOW,
        )

    if FP8_CACHE:  # and values / v_scale: the (linear) weighted sum scales back once
        acc *= tl.load(v_scale_ptr)
    if USE_SPLITS:
        partial = (token * num_heads + head) * num_splits + split
        tl.store(partial_max_ptr + partial, m_i, mask=row_valid)
        tl.store(partial_sum_ptr + partial, l_i, mask=row_valid)
        tl.store(partial_out_ptr + partial[:, None] * HEAD_DIM + dims[None, :], acc, mask=q_mask)
    else:
        if HAS_SINKS:  # the sink's share of the softmax, in the max-shifted base-2 terms of l_i
            sink = tl.load(sinks_ptr + head, mask=row_valid, other=0.0).to(tl.float32) * _LOG2E_IN_KERNEL
            l_i += tl.exp2(sink - m_i)
        # A query with no visible key (a padding slot with context 0) gets zeros, not NaN.
        out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
        out_ptrs = out_ptr + token[:, None] * stride_ot + head[:, None] * stride_oh + dims[None, :]
        tl.store(out_ptrs, out.to(out_ptr.dtype.element_ty), mask=q_mask)


@triton.jit
def _merge_splits_kernel(
    out_ptr,
    partial_out_ptr,
    partial_max_ptr,
    partial_sum_ptr,
    sinks_ptr,
    num_heads,
    num_splits,
    stride_ot,
    stride_oh,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_P2: tl.constexpr,
    SPLITS_P2: tl.constexpr,
    HAS_SINKS: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    base = (token * num_heads + head) * num_splits
    splits = tl.arange(0, SPLITS_P2)
    split_valid = splits < num_splits
    dims = tl.arange(0, HEAD_DIM_P2)
    dim_valid = dims < HEAD_DIM
    m = tl.load(partial_max_ptr + base + splits, mask=split_valid, other=float("-inf"))
    l = tl.load(partial_sum_ptr + base + splits, mask=split_valid, other=0.0)
    m_max = tl.max(m, 0)
    weight = tl.exp2(m - m_max)
    acc = tl.load(
        partial_out_ptr + (base + splits)[:, None] * HEAD_DIM + dims[None, :],
        mask=split_valid[:, None] & dim_valid[None, :],
        other=0.0,
    )
    num = tl.sum(acc * weight[:, None], 0)
    den = tl.sum(l * weight, 0)
    if HAS_SINKS:  # once per query and head, not once per split
        den += tl.exp2(tl.load(sinks_ptr + head).to(tl.float32) * _LOG2E_IN_KERNEL - m_max)
    out = num / tl.where(den > 0, den, 1.0)
    tl.store(out_ptr + token * stride_ot + head * stride_oh + dims, out.to(out_ptr.dtype.element_ty), mask=dim_valid)


def paged_attention(
    query: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    plan: TritonAttentionPlan,
    scale: float,
    num_sms: int,
    config: LaunchConfig | None = None,
    *,
    sinks: torch.Tensor | None = None,
    sliding_window: int | None = None,
    kv_scales: tuple[torch.Tensor | None, torch.Tensor | None] = (None, None),
) -> torch.Tensor:
    """``config`` overrides the tiles `launch_config` picks (for tuning; ``block_m`` must be ``block_q * group``
    or more). ``sinks`` ``[num_heads]`` and ``sliding_window`` as `KernelBackend.paged_attention` says.

    An FP8 cache holds keys and values divided by ``kv_scales`` (float32 ``[1]``
    tensors, None for 1.0; read only for an FP8 cache): the key scale folds
    into the softmax scale, the value scale multiplies the output. The tiles
    convert the FP8 keys and values to the query's dtype before each dot.
    """
    if query.stride(-1) != 1:
        query = query.contiguous()
    num_tokens, num_heads, head_dim = query.shape
    num_kv_heads = k_cache.shape[2]
    group = num_heads // num_kv_heads
    config = config or launch_config(
        num_tokens=num_tokens,
        num_seqs=plan.num_seqs,
        max_query_len=plan.max_query_len,
        max_context_len=plan.max_context_len,
        group=group,
        head_dim=head_dim,
        num_kv_heads=num_kv_heads,
        num_sms=num_sms,
        num_splits=plan.num_splits,
    )
    out = torch.empty_like(query)
    if num_tokens == 0:
        return out
    head_dim_p2 = max(16, triton.next_power_of_2(head_dim))
    use_splits = config.num_splits > 1
    if use_splits:
        partial_out = torch.empty(
            num_tokens, num_heads, config.num_splits, head_dim, dtype=torch.float32, device=query.device
        )
        partial_max = torch.empty(num_tokens, num_heads, config.num_splits, dtype=torch.float32, device=query.device)
        partial_sum = torch.empty_like(partial_max)
    else:
        partial_out = partial_max = partial_sum = out  # unused
    grid = (num_tokens // config.block_q + plan.num_seqs, num_kv_heads, config.num_splits)
    _paged_attention_kernel[grid](
        out,
        partial_out,
        partial_max,
        partial_sum,
        query,
        k_cache,
        v_cache,
        plan.cu_seqlens_q,
        plan.context_lens,
        plan.block_tables,
        sinks if sinks is not None else query,  # not read without sinks
        scale * _LOG2E,
        sliding_window or 0,
        *kv_scale_args(k_cache, *kv_scales),
        plan.num_seqs,
        num_heads,
        config.num_splits,
        query.stride(0),
        query.stride(1),
        out.stride(0),
        out.stride(1),
        *cache_strides(k_cache, v_cache),
        plan.block_tables.stride(0),
        BLOCK_SIZE=plan.block_size,
        GROUP=group,
        HEAD_DIM=head_dim,
        HEAD_DIM_P2=head_dim_p2,
        BLOCK_M=config.block_m,
        BLOCK_Q=config.block_q,
        BLOCK_N=config.block_n,
        USE_SPLITS=use_splits,
        # float32 (tests) stays exact; 16-bit inputs take the backend's default, portable to ROCm.
        DOT_PRECISION="ieee" if query.dtype == torch.float32 else None,
        HAS_SINKS=sinks is not None,
        HAS_WINDOW=sliding_window is not None,
        FP8_CACHE=k_cache.dtype == FP8_CACHE_DTYPE,
        num_warps=config.num_warps,
        num_stages=config.num_stages,
    )
    if use_splits:
        _merge_splits_kernel[(num_tokens, num_heads)](
            out,
            partial_out,
            partial_max,
            partial_sum,
            sinks if sinks is not None else query,
            num_heads,
            config.num_splits,
            out.stride(0),
            out.stride(1),
            HEAD_DIM=head_dim,
            HEAD_DIM_P2=head_dim_p2,
            SPLITS_P2=triton.next_power_of_2(config.num_splits),
            HAS_SINKS=sinks is not None,
        )
    return out
