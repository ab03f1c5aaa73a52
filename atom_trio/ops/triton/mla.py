"""Multi-head latent attention on the GPU: the latent store, and decode attention over the paged latent cache.

Decode runs in the latent space (the reference's absorption folds ``W_UK`` into
the query and applies ``W_UV`` after): one query a sequence ``[seqs, heads,
latent + rope]``, scored against every feature of each cached vector, the
output the weighted sum of their first ``latent`` features. Every head reads the
same vectors, so a program owns a tile of ``BLOCK_H`` heads of one sequence and
loads each tile of cached vectors once for all of them (``BLOCK_H`` query rows a
load feeds, not one), reusing the loaded latents as the values of the second
product. The head tiles of one sequence are the fastest-varying program index,
so with more heads than a tile (DeepSeek-V3's 128) they run side by side and the
later ones find the vectors in L2.

When the grid is too small to fill the GPU (few sequences), each sequence's
context is cut into ``num_splits`` ranges run by separate programs, and the dense
decode kernel's merge (`attention._merge_splits_kernel`) combines their
unnormalised partials. Everything that decides a launch is a host integer (the
sequence count, the plan's longest context, the split count), so a decode step
captures in a CUDA graph and replays with new lengths and block tables.

An FP8 latent cache holds the vectors divided by one per-layer scale (a float32 tensor the kernels load):
the store rounds them (`cache.store_rows`), and decode folds the scale into the softmax scale and the output.

Prefill chunks (and the mixed batches they come in) take the reference's path:
their latent context expanded to per-head keys and values and one
``scaled_dot_product_attention`` a chunk (`TritonLatentAttention`), with the decode
rows of the same step through the kernel here.
"""

from __future__ import annotations

import attrs
import torch
import triton
import triton.language as tl

from ..torch_ref import TorchAttentionPlan, TorchRefBackend
from .attention import _LOG2E, _NEG_BIG, MAX_SPLITS, MIN_SPLIT_TOKENS, _merge_splits_kernel
from .cache import FP8_CACHE_DTYPE, kv_scale_args, load_rows, slot_row, store_rows


@attrs.frozen
class MLALaunchConfig:
    block_h: int  # heads a program owns
    block_n: int  # cached vectors a loop iteration loads
    num_warps: int
    num_stages: int


DEFAULT_MLA_TILES = MLALaunchConfig(block_h=16, block_n=32, num_warps=4, num_stages=2)
"""16 heads to a program (fewer leave rows masked), 32 cached vectors a step, 4 warps: vLLM's Triton MLA decode
tiles, for fewer than 64 heads (DeepSeek-V2-Lite's 16, a TP rank's share)."""

WIDE_MLA_TILES = MLALaunchConfig(block_h=64, block_n=64, num_warps=8, num_stages=1)
"""64 heads to a program, 64 cached vectors a step, 8 warps, one stage: at DeepSeek-V3's 128 heads the fastest
of the tiles ``benchmarks/mla_decode.py --tune`` times on an H100 (1.5x the default tiles at batch 64, contexts
4k and 32k: docs/performance.md, "The MLA decode kernel"), each cached vector read once per 64 heads."""


def mla_tiles(num_heads: int) -> MLALaunchConfig:
    """The tiles for ``num_heads`` query heads: wide ones when they fill a program, else `DEFAULT_MLA_TILES`."""
    return WIDE_MLA_TILES if num_heads >= WIDE_MLA_TILES.block_h else DEFAULT_MLA_TILES


def mla_num_splits(*, programs: int, max_context_len: int, num_sms: int) -> int:
    """Context splits for ``programs`` (head tiles x sequences) over contexts up to ``max_context_len``.

    Fewer than the dense kernel's rule would take: a split costs ``heads x latent``
    float32 partials written and read back by the merge (at 128 heads and latent
    512, 256 KB a sequence and split each way: the traffic of 455 cached tokens), so the context is cut
    only while the grid is short of one program an SM, into at most that many
    splits of at least `MIN_SPLIT_TOKENS`.
    """
    if programs >= num_sms:
        return 1
    return max(1, min(num_sms // programs, max_context_len // MIN_SPLIT_TOKENS, MAX_SPLITS))


@triton.jit
def _latent_tile(
    acc, m_i, l_i, q_latent, q_rope, start, kv_end, table, cache_ptr, stride_cb, stride_cs, scale_log2,
    latent_dims, rope_dims,
    BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, LATENT: tl.constexpr, ROPE: tl.constexpr,
    DOT_PRECISION: tl.constexpr, MASKED: tl.constexpr,
):
    """One online-softmax step over cached vectors ``[start, start + BLOCK_N)``, gathered through the block table."""
    pos = start + tl.arange(0, BLOCK_N)
    if MASKED:
        pos_valid = pos < kv_end
    else:
        pos_valid = tl.full([BLOCK_N], 1, tl.int1)  # a constant mask: the compiler drops it
    block = tl.load(table + pos // BLOCK_SIZE, mask=pos_valid, other=0).to(tl.int64)
    rows = cache_ptr + block * stride_cb + (pos % BLOCK_SIZE) * stride_cs
    latent_mask = pos_valid[:, None] & (latent_dims < LATENT)[None, :]
    rope_mask = pos_valid[:, None] & (rope_dims < ROPE)[None, :]
    latent = tl.load(rows[:, None] + latent_dims[None, :], mask=latent_mask, other=0.0).to(q_latent.dtype)
    rope = tl.load(rows[:, None] + LATENT + rope_dims[None, :], mask=rope_mask, other=0.0).to(q_rope.dtype)
    s = tl.dot(q_latent, tl.trans(latent), input_precision=DOT_PRECISION)
    s = tl.dot(q_rope, tl.trans(rope), acc=s, input_precision=DOT_PRECISION) * scale_log2
    if MASKED:
        s = tl.where(pos_valid[None, :], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    # The latents just loaded are the values: no second read of the cache.
    acc = acc * alpha[:, None] + tl.dot(p.to(latent.dtype), latent, input_precision=DOT_PRECISION)
    return acc, m_new, l_i


@triton.jit
def _mla_decode_kernel(
    out_ptr,
    partial_out_ptr,
    partial_max_ptr,
    partial_sum_ptr,
    q_latent_ptr,
    q_rope_ptr,
    cache_ptr,
    context_lens_ptr,
    block_tables_ptr,
    scale_log2,
    cache_scale_ptr,
    num_heads,
    num_splits,
    stride_qls,
    stride_qlh,
    stride_qrs,
    stride_qrh,
    stride_os,
    stride_oh,
    stride_cb,
    stride_cs,
    stride_bt,
    BLOCK_SIZE: tl.constexpr,
    LATENT: tl.constexpr,
    ROPE: tl.constexpr,
    LATENT_P2: tl.constexpr,
    ROPE_P2: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_N: tl.constexpr,
    USE_SPLITS: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    FP8_CACHE: tl.constexpr,
):
    head_tile = tl.program_id(0)
    seq = tl.program_id(1).to(tl.int64)
    split = tl.program_id(2)

    heads = head_tile * BLOCK_H + tl.arange(0, BLOCK_H)
    head_valid = heads < num_heads
    latent_dims = tl.arange(0, LATENT_P2)
    rope_dims = tl.arange(0, ROPE_P2)
    latent_mask = head_valid[:, None] & (latent_dims < LATENT)[None, :]
    rope_mask = head_valid[:, None] & (rope_dims < ROPE)[None, :]
    q_latent = tl.load(
        q_latent_ptr + seq * stride_qls + heads[:, None] * stride_qlh + latent_dims[None, :], mask=latent_mask, other=0.0
    )
    q_rope = tl.load(
        q_rope_ptr + seq * stride_qrs + heads[:, None] * stride_qrh + rope_dims[None, :], mask=rope_mask, other=0.0
    )

    kv_end = tl.load(context_lens_ptr + seq)
    kv_start = 0
    if USE_SPLITS:
        split_len = tl.cdiv(tl.cdiv(kv_end, num_splits), BLOCK_N) * BLOCK_N
        kv_start = split * split_len
        kv_end = tl.minimum(kv_end, kv_start + split_len)

    if FP8_CACHE:  # the cache holds vectors / scale: one scale for scores and values alike
        cache_scale = tl.load(cache_scale_ptr)
        scale_log2 = scale_log2 * cache_scale
    m_i = tl.full([BLOCK_H], _NEG_BIG, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_H], dtype=tl.float32)
    acc = tl.zeros([BLOCK_H, LATENT_P2], dtype=tl.float32)
    table = block_tables_ptr + seq * stride_bt
    # Whole tiles need no position mask; only the last, partial one does.
    whole_end = kv_start + tl.maximum(kv_end - kv_start, 0) // BLOCK_N * BLOCK_N
    for start in range(kv_start, whole_end, BLOCK_N):
        acc, m_i, l_i = _latent_tile(
            acc, m_i, l_i, q_latent, q_rope, start, kv_end, table, cache_ptr, stride_cb, stride_cs, scale_log2,
            latent_dims, rope_dims, BLOCK_SIZE, BLOCK_N, LATENT, ROPE, DOT_PRECISION, False,
        )
    for start in range(whole_end, kv_end, BLOCK_N):
        acc, m_i, l_i = _latent_tile(
            acc, m_i, l_i, q_latent, q_rope, start, kv_end, table, cache_ptr, stride_cb, stride_cs, scale_log2,
            latent_dims, rope_dims, BLOCK_SIZE, BLOCK_N, LATENT, ROPE, DOT_PRECISION, True,
        )

    if FP8_CACHE:
        acc *= cache_scale
    if USE_SPLITS:
        partial = (seq * num_heads + heads) * num_splits + split
        tl.store(partial_max_ptr + partial, m_i, mask=head_valid)
        tl.store(partial_sum_ptr + partial, l_i, mask=head_valid)
        tl.store(partial_out_ptr + partial[:, None] * LATENT + latent_dims[None, :], acc, mask=latent_mask)
    else:
        # A sequence with no context (a CUDA graph's padding row) gets zeros, not NaN.
        out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
        out_ptrs = out_ptr + seq * stride_os + heads[:, None] * stride_oh + latent_dims[None, :]
        tl.store(out_ptrs, out.to(out_ptr.dtype.element_ty), mask=latent_mask)


def mla_decode(
    q_latent: torch.Tensor,
    q_rope: torch.Tensor,
    cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    *,
    max_context_len: int,
    scale: float,
    num_sms: int,
    num_splits: int | None = None,
    config: MLALaunchConfig | None = None,
    cache_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """Latent-space decode attention: ``[seqs, heads, latent]`` from queries ``q_latent`` ``[seqs, heads, latent]``
    and ``q_rope`` ``[seqs, heads, rope]`` (any strides with unit last one) over ``cache`` ``[blocks, block_size,
    latent + rope]``.

    Sequence ``i`` attends to its first ``context_lens[i]`` cached vectors through ``block_tables[i]``.
    ``max_context_len`` (a host integer, at least every ``context_lens[i]``) and ``num_splits`` (forced, or
    None for `mla_num_splits`) decide the launch; ``config`` overrides `mla_tiles` (tuning).
    An FP8 cache holds the vectors divided by ``cache_scale`` (float32 ``[1]``, None for 1.0).
    """
    num_seqs, num_heads, latent_dim = q_latent.shape
    rope_dim = q_rope.shape[-1]
    num_blocks, block_size, cache_dim = cache.shape
    if cache_dim != latent_dim + rope_dim or cache.stride(-1) != 1:
        raise ValueError(f"a latent cache of {cache_dim} features for queries of {latent_dim} + {rope_dim}")
    q_latent, q_rope = (q if q.stride(-1) == 1 else q.contiguous() for q in (q_latent, q_rope))
    out = q_latent.new_empty(num_seqs, num_heads, latent_dim)
    if num_seqs == 0:
        return out
    config = config or mla_tiles(num_heads)
    head_tiles = triton.cdiv(num_heads, config.block_h)
    if num_splits is None:
        num_splits = mla_num_splits(programs=head_tiles * num_seqs, max_context_len=max_context_len, num_sms=num_sms)
    use_splits = num_splits > 1
    if use_splits:
        partial_out = torch.empty(num_seqs, num_heads, num_splits, latent_dim, dtype=torch.float32, device=out.device)
        partial_max = torch.empty(num_seqs, num_heads, num_splits, dtype=torch.float32, device=out.device)
        partial_sum = torch.empty_like(partial_max)
    else:
        partial_out = partial_max = partial_sum = out  # unused
    latent_p2 = max(16, triton.next_power_of_2(latent_dim))
    _mla_decode_kernel[(head_tiles, num_seqs, num_splits)](
        out,
        partial_out,
        partial_max,
        partial_sum,
        q_latent,
        q_rope,
        cache,
        context_lens,
        block_tables,
        scale * _LOG2E,
        *kv_scale_args(cache, cache_scale),
        num_heads,
        num_splits,
        q_latent.stride(0),
        q_latent.stride(1),
        q_rope.stride(0),
        q_rope.stride(1),
        out.stride(0),
        out.stride(1),
        cache.stride(0),
        cache.stride(1),
        block_tables.stride(0),
        BLOCK_SIZE=block_size,
        LATENT=latent_dim,
        ROPE=rope_dim,
        LATENT_P2=latent_p2,
        ROPE_P2=max(16, triton.next_power_of_2(rope_dim)),
        BLOCK_H=config.block_h,
        BLOCK_N=config.block_n,
        USE_SPLITS=use_splits,
        # float32 (tests) stays exact; 16-bit inputs take the backend's default, portable to ROCm.
        DOT_PRECISION="ieee" if q_latent.dtype == torch.float32 else None,
        FP8_CACHE=cache.dtype == FP8_CACHE_DTYPE,
        num_warps=config.num_warps,
        num_stages=config.num_stages,
    )
    if use_splits:
        _merge_splits_kernel[(num_seqs, num_heads)](
            out,
            partial_out,
            partial_max,
            partial_sum,
            out,  # no sinks: not read
            num_heads,
            num_splits,
            out.stride(0),
            out.stride(1),
            HEAD_DIM=latent_dim,
            HEAD_DIM_P2=latent_p2,
            SPLITS_P2=triton.next_power_of_2(num_splits),
            HAS_SINKS=False,
        )
    return out


@triton.jit
def _store_latent_kernel(
    latent_ptr, cache_ptr, slot_mapping_ptr, scale_ptr, block_size, stride_lt, stride_cb, stride_cs,
    DIM: tl.constexpr, DIM_P2: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_mapping_ptr + token).to(tl.int64)
    if slot < 0:  # a padding token (a CUDA graph's spare batch rows) owns no slot
        return
    row = load_rows(latent_ptr + token * stride_lt, 0, 1, DIM, 1, DIM_P2)
    store_rows(slot_row(cache_ptr, slot, block_size, stride_cb, stride_cs), row, 0, scale_ptr, 1, DIM, 1, DIM_P2)


def store_latent(
    latent: torch.Tensor, cache: torch.Tensor, slot_mapping: torch.Tensor, cache_scale: torch.Tensor | None = None
) -> None:
    """One program per token writes its vector ``latent[t]`` to slot ``slot_mapping[t]``; negative slots are skipped.

    An FP8 cache gets ``fp8(latent / cache_scale)``."""
    if latent.stride(-1) != 1:
        latent = latent.contiguous()
    num_tokens, dim = latent.shape
    if num_tokens == 0:
        return
    _store_latent_kernel[(num_tokens,)](
        latent,
        cache,
        slot_mapping,
        *kv_scale_args(cache, cache_scale),
        cache.shape[1],
        latent.stride(0),
        cache.stride(0),
        cache.stride(1),
        DIM=dim,
        DIM_P2=triton.next_power_of_2(dim),
    )


@attrs.frozen(kw_only=True)
class LatentPlan(TorchAttentionPlan):
    """A step as the reference's latent attention walks it (decode rows, prefill chunks), with the decode
    kernel's split count (None: `mla_num_splits` picks)."""

    num_splits: int | None = None


class TritonLatentAttention(TorchRefBackend):
    """The reference's latent attention with its decode rows in `mla_decode`.

    Prefill chunks expand their latent context through ``kv_b`` and run one
    ``scaled_dot_product_attention`` each (torch's fused GPU kernels); decode rows
    are absorbed as the reference absorbs them, and attend in the Triton kernel.
    """

    def __init__(self, num_sms: int) -> None:
        super().__init__()
        self.num_sms = num_sms

    def mla_decode(self, query, cache, plan: LatentPlan, scale, value_dim, *, cache_scale=None):
        return mla_decode(
            query[..., :value_dim],
            query[..., value_dim:],
            cache,
            plan.decode_block_tables,
            plan.decode_context_lens,
            max_context_len=plan.decode_max_context,
            scale=scale,
            num_sms=self.num_sms,
            num_splits=plan.num_splits,
            cache_scale=cache_scale,
        )
