"""The reference backend: plain torch ops, on any device.

It is the yardstick every fast backend is tested against, and the base of the
CPU backend (`atom_trio.ops.cpu`, which swaps some ops for fused C++ kernels),
so it is written for both clarity and sensible CPU speed: work is batched per
step, not per token. Decode tokens (one query per sequence) of a step share one
vectorised gather of their KV blocks and one batched attention; prefill chunks
each run one `scaled_dot_product_attention` call (causal, or masked against
their cached context). What is the same for every layer of a step (rotary
rows, gather indices) is computed once, at the first layer.

The KV cache is head-major, ``[num_kv_heads, num_blocks, block_size,
head_dim]``: gathering a batch's blocks then yields ``[kv_heads, seqs, len,
dim]`` with each head's keys contiguous, which batched matmuls read without
a copy (several times faster on CPU than the token-major layout).

An FP8 cache (`KernelBackend.supports_fp8_kv_cache`) holds ``fp8(x / scale)``;
attention reads it back as ``x``'s dtype times the scale (`_from_cache`), and
a chunk with nothing cached attends to its keys and values as the cache holds
them, so the result never depends on whether a prefix was cached.
"""

from __future__ import annotations

import functools

import attrs
import torch
import torch.nn.functional as F

from .interface import AttentionMetadata, KernelBackend
from .quant_ref import (
    FP8_DTYPE,
    dequantize_fp8,
    dequantize_int8,
    dequantize_w4a16,
    fp8_activations,
    int8_activations,
    quantize_fp8_static,
)


@attrs.frozen(kw_only=True)
class PrefillChunk:
    """A sequence with several query tokens this step, or a run of uncached ones that attend as one batch.

    Sequences next to each other in the flat batch, with the same number of
    tokens and nothing cached before them (a batch of new prompts of one
    length, as benchmarks send), make one ``num_seqs`` chunk: a single
    attention call over views of the batch instead of one call and one
    strided copy per sequence per layer.
    """

    start: int  # first query token in the flat batch
    end: int
    context_len: int  # of each sequence
    block_table: torch.Tensor | None  # the blocks covering [0, context_len); None when nothing is cached
    num_seqs: int = 1


@attrs.frozen(kw_only=True)
class TorchAttentionPlan:
    """What `TorchRefBackend.paged_attention` reuses in every layer of a step.

    ``decode_*`` describe the sequences with exactly one query token this
    step: their token indices in the flat batch, their context lengths and
    their block tables (padded to the longest context among them).
    ``only_decodes``: every token of the step is a decode, in order, so no
    gather/scatter between the flat batch and the decode batch is needed.
    """

    only_decodes: bool
    decode_token_idx: torch.Tensor | None
    decode_context_lens: torch.Tensor | None  # [num_decodes] int32
    decode_block_tables: torch.Tensor | None  # [num_decodes, blocks_per_seq] int32
    decode_max_context: int
    prefills: tuple[PrefillChunk, ...]


_FUSED_DECODE_MAX_CONTEXT = 512
"""Longest context a lone decode sequence runs through ``scaled_dot_product_attention``.

Measured on CPU (bf16, head_dim 64): the fused kernel beats matmul, softmax,
matmul at contexts up to a few hundred tokens, and loses well before 1000
(figures in docs/kernels.md).
"""


class TorchRefBackend(KernelBackend):
    """Plain torch kernels."""

    name = "torch"
    supports_fp8_kv_cache = True

    def __init__(self) -> None:
        # Every layer of a step rotates by the same positions: gather their
        # cos/sin rows once per step (keyed by the step's positions tensor).
        self._rope_rows: tuple[torch.Tensor, torch.Tensor, torch.dtype, torch.Tensor, torch.Tensor] | None = None
        # Every layer of a step gathers the same decode blocks (torch path):
        # their rows in the cache seen as ``[kv_heads * num_blocks, block_size
        # * head_dim]`` and the additive mask hiding the padding after each
        # context, keyed by the plan and that view's shape.
        self._decode_rows: tuple[TorchAttentionPlan, int, int, torch.Tensor, torch.Tensor] | None = None

    def kv_cache_shape(self, num_blocks, block_size, num_kv_heads, head_dim):
        return (num_kv_heads, num_blocks, block_size, head_dim)

    def apply_token_bitmask(self, logits, bitmask, rows):
        vocab = logits.shape[1]
        if bitmask.shape[1] * 32 < vocab:
            raise ValueError(f"a bitmask of {bitmask.shape[1]} words does not cover a vocabulary of {vocab}")
        shifts = torch.arange(32, dtype=torch.int32, device=bitmask.device)
        allowed = ((bitmask.unsqueeze(-1) >> shifts) & 1).bool().flatten(1)[:, :vocab]
        logits.index_put_((rows,), logits.index_select(0, rows).masked_fill_(~allowed, float("-inf")))

    def plan_attention(self, metadata: AttentionMetadata) -> TorchAttentionPlan:
        # A new step: forget the last step's rotary rows (memoized because every layer
        # rotates the same positions; a stale entry would also be a guard that makes
        # torch.compile recompile every step).
        self._rope_rows = None
        self._decode_rows = None
        block_size = metadata.block_size
        starts = [0]
        for n in metadata.query_lens_host:
            starts.append(starts[-1] + n)
        decode_seqs = [i for i, n in enumerate(metadata.query_lens_host) if n == 1]
        prefills: list[PrefillChunk] = []
        for i, (n, ctx) in enumerate(zip(metadata.query_lens_host, metadata.context_lens_host)):
            if n == 1:
                continue
            last = prefills[-1] if prefills else None
            if ctx > n:
                table = metadata.block_tables[i, : -(-ctx // block_size)]
                prefills.append(PrefillChunk(start=starts[i], end=starts[i + 1], context_len=ctx, block_table=table))
            elif last is not None and last.block_table is None and last.end == starts[i] and last.context_len == n:
                prefills[-1] = attrs.evolve(last, end=starts[i + 1], num_seqs=last.num_seqs + 1)
            else:
                prefills.append(PrefillChunk(start=starts[i], end=starts[i + 1], context_len=n, block_table=None))
        if not decode_seqs:
            return TorchAttentionPlan(
                only_decodes=False,
                decode_token_idx=None,
                decode_context_lens=None,
                decode_block_tables=None,
                decode_max_context=0,
                prefills=tuple(prefills),
            )
        device = metadata.block_tables.device
        max_ctx = max(metadata.context_lens_host[i] for i in decode_seqs)
        blocks_per_seq = -(-max_ctx // block_size)
        seq_idx = torch.tensor(decode_seqs, device=device)
        tables = metadata.block_tables.index_select(0, seq_idx)[:, :blocks_per_seq].to(torch.int32).contiguous()
        context_lens = metadata.context_lens.index_select(0, seq_idx).to(torch.int32)
        return TorchAttentionPlan(
            only_decodes=not prefills,
            decode_token_idx=torch.tensor([starts[i] for i in decode_seqs], device=device),
            decode_context_lens=context_lens,
            decode_block_tables=tables,
            decode_max_context=max_ctx,
            prefills=tuple(prefills),
        )

    def store_kv(self, key, value, k_cache, v_cache, slot_mapping, *, k_scale=None, v_scale=None) -> None:
        for x, cache, x_scale in ((key, k_cache, k_scale), (value, v_cache, v_scale)):
            num_kv_heads, head_dim = cache.shape[0], cache.shape[-1]
            _bytes(cache).view(num_kv_heads, -1, head_dim).index_copy_(
                1, slot_mapping, _bytes(_to_cache(x, cache, x_scale)).transpose(0, 1)
            )

    def paged_attention(
        self,
        query,
        key,
        value,
        k_cache,
        v_cache,
        plan: TorchAttentionPlan,
        scale,
        *,
        sinks=None,
        sliding_window=None,
        k_scale=None,
        v_scale=None,
    ):
        # Sinks and windows need the mask spelled out: the fused kernel's is_causal knows neither.
        explicit_mask = sinks is not None or sliding_window is not None

        def keys_values(chunk: PrefillChunk, tokens: int):
            if chunk.block_table is None:  # nothing cached: plain causal attention over the chunk's own tokens
                k, v = (
                    _as_cached(x[chunk.start : chunk.end], cache, x_scale)
                    .unflatten(0, (chunk.num_seqs, tokens))
                    .transpose(1, 2)
                    for x, cache, x_scale in ((key, k_cache, k_scale), (value, v_cache, v_scale))
                )
                return k, v, _causal_mask(tokens, tokens, query.device, sliding_window) if explicit_mask else None
            rows = _head_rows(chunk.block_table, *k_cache.shape[:2])
            k = _from_cache(_gather_rows(k_cache, rows)[None, :, : chunk.context_len], k_scale, query.dtype)
            v = _from_cache(_gather_rows(v_cache, rows)[None, :, : chunk.context_len], v_scale, query.dtype)
            return k, v, _causal_mask(tokens, chunk.context_len, query.device, sliding_window)

        decode = functools.partial(
            self._decode_attention,
            k_cache=k_cache,
            v_cache=v_cache,
            plan=plan,
            scale=scale,
            sinks=sinks,
            sliding_window=sliding_window,
            k_scale=k_scale,
            v_scale=v_scale,
        )
        return _attend_by_kind(query, query.shape[-1], plan, scale, decode, keys_values, sinks)

    def _decode_attention(
        self,
        q,
        k_cache,
        v_cache,
        plan: TorchAttentionPlan,
        scale: float,
        sinks=None,
        sliding_window=None,
        k_scale=None,
        v_scale=None,
    ) -> torch.Tensor:
        """One query per sequence over its padded context.

        The ``group`` query heads that share a KV head become that head's query
        rows, so grouped-query attention needs no copy of K/V per query head.
        """
        num_seqs, num_heads, head_dim = q.shape
        num_kv_heads, num_blocks = k_cache.shape[:2]
        memo = self._decode_rows
        if memo is None or memo[0] is not plan or memo[1:3] != (num_kv_heads, num_blocks):
            rows = _head_rows(plan.decode_block_tables.reshape(-1), num_kv_heads, num_blocks)
            padded = torch.arange(plan.decode_block_tables.shape[1] * k_cache.shape[2], device=q.device)
            hidden = padded[None, :] >= plan.decode_context_lens[:, None]
            mask = torch.zeros(hidden.shape, dtype=torch.float32, device=q.device).masked_fill_(hidden, float("-inf"))
            memo = self._decode_rows = (plan, num_kv_heads, num_blocks, rows, mask[None, :, None, :])
        k = _from_cache(_gather_rows(k_cache, memo[3]), k_scale, q.dtype).view(num_kv_heads, num_seqs, -1, head_dim)
        v = _from_cache(_gather_rows(v_cache, memo[3]), v_scale, q.dtype).view(num_kv_heads, num_seqs, -1, head_dim)
        mask = memo[4]
        if sinks is None and sliding_window is None:
            if num_seqs == 1 and plan.decode_max_context <= _FUSED_DECODE_MAX_CONTEXT:
                # One sequence has no padding to mask, and torch's fused kernel beats
                # the three ops below (a third of the time at short contexts on CPU).
                ctx = plan.decode_max_context
                q = q.view(1, num_kv_heads, -1, head_dim)  # [1, kv_heads, group, dim]: the group as queries
                k, v = k.transpose(0, 1)[:, :, :ctx], v.transpose(0, 1)[:, :, :ctx]
                return F.scaled_dot_product_attention(q, k, v, scale=scale).view(1, num_heads, head_dim)
        elif sliding_window is not None:  # the query sits at context_len - 1: keys before context_len - window go
            positions = torch.arange(mask.shape[-1], device=q.device)
            early = positions[None, :] < (plan.decode_context_lens[:, None] - sliding_window)
            mask = mask.masked_fill(early[None, :, None, :], float("-inf"))
        q = q.view(num_seqs, num_kv_heads, -1, head_dim).transpose(0, 1)  # [kv_heads, seqs, group, dim]
        scores = torch.matmul(q, k.transpose(-1, -2))  # [kv_heads, seqs, group, len]
        # scale and mask in one float32 op: mask + scale * scores
        logits = torch.add(mask, scores, alpha=scale)
        if sinks is None:
            probs = torch.softmax(logits, dim=-1).to(q.dtype)
        else:
            sink = sinks.float().view(num_kv_heads, 1, -1, 1).expand(-1, num_seqs, -1, 1)
            probs = torch.softmax(torch.cat((logits, sink), dim=-1), dim=-1)[..., :-1].to(q.dtype)
        out = torch.matmul(probs, v)  # [kv_heads, seqs, group, dim]
        return out.transpose(0, 1).reshape(num_seqs, num_heads, head_dim)

    def store_latent(self, latent, cache, slot_mapping, *, cache_scale=None) -> None:
        stored = _bytes(_to_cache(latent, cache, cache_scale))
        _bytes(cache).view(-1, cache.shape[-1]).index_copy_(0, slot_mapping, stored)

    def mla_attention(self, query, latent, cache, kv_b, plan: TorchAttentionPlan, scale, *, cache_scale=None):
        def keys_values(chunk: PrefillChunk, tokens: int):
            if chunk.block_table is None:  # nothing cached: the chunk's own latents (as cached), causal
                context, mask = _as_cached(latent[chunk.start : chunk.end], cache, cache_scale), None
            else:
                blocks = cache.index_select(0, chunk.block_table.long())
                context = _from_cache(blocks.view(-1, cache.shape[-1])[: chunk.context_len], cache_scale, query.dtype)
                mask = _causal_mask(tokens, chunk.context_len, query.device)
            k, v = _expand_latent(context, kv_b, query.shape[-1])
            return *(x.unflatten(0, (chunk.num_seqs, -1)).transpose(1, 2) for x in (k, v)), mask

        nope = query.shape[-1] - (cache.shape[-1] - kv_b.shape[-1])
        decode = functools.partial(
            self._absorbed_decode, cache=cache, kv_b=kv_b, plan=plan, scale=scale, cache_scale=cache_scale
        )
        return _attend_by_kind(query, kv_b.shape[1] - nope, plan, scale, decode, keys_values)

    def _absorbed_decode(self, query, cache, kv_b, plan: TorchAttentionPlan, scale, cache_scale=None):
        """Decode tokens with the up-projection absorbed: ``W_UK`` into the query, ``W_UV`` after the latent output.

        Each head's score ``q_nope . (W_UK c)`` equals ``(W_UK^T q_nope) . c``, so the query moves into the
        latent space and attends over the cached vectors as they are; the output is weighted latents, which
        ``W_UV`` turns into the head's value. No per-head key or value is ever built for the context.
        """
        latent_dim = kv_b.shape[-1]
        nope = query.shape[-1] - (cache.shape[-1] - latent_dim)
        w_uk, w_uv = kv_b[:, :nope], kv_b[:, nope:]  # [heads, nope, latent], [heads, v, latent]
        q_latent = torch.bmm(query[..., :nope].transpose(0, 1), w_uk).transpose(0, 1)  # [seqs, heads, latent]
        q = torch.cat((q_latent, query[..., nope:]), dim=-1)
        out_latent = self.mla_decode(q, cache, plan, scale, latent_dim, cache_scale=cache_scale)
        return torch.bmm(out_latent.transpose(0, 1), w_uv.transpose(1, 2)).transpose(0, 1)  # [seqs, heads, v]

    def mla_decode(self, query, cache, plan: TorchAttentionPlan, scale, value_dim, *, cache_scale=None):
        tables = plan.decode_block_tables.long()
        context = cache.index_select(0, tables.reshape(-1)).view(tables.shape[0], -1, cache.shape[-1])
        context = _from_cache(context, cache_scale, query.dtype)
        hidden = torch.arange(context.shape[1], device=query.device)[None, :] >= plan.decode_context_lens[:, None]
        scores = torch.matmul(query, context.transpose(1, 2)).float() * scale  # [seqs, heads, len]
        probs = torch.softmax(scores.masked_fill_(hidden[:, None, :], float("-inf")), dim=-1).to(query.dtype)
        return torch.matmul(probs, context[..., :value_dim])

    def rms_norm(self, x, weight, eps, residual=None):
        if residual is not None:
            x = x + residual
            return F.rms_norm(x, weight.shape, weight, eps), x
        return F.rms_norm(x, weight.shape, weight, eps)

    def rotary_embedding(self, positions, query, key, cos_sin_cache):
        rows = self._rope_rows
        if rows is None or rows[0] is not positions or rows[1] is not cos_sin_cache or rows[2] != query.dtype:
            cos, sin = cos_sin_cache.index_select(0, positions).unsqueeze(1).to(query.dtype).chunk(2, dim=-1)
            # rotate-half as one elementwise pass: x * [cos, cos] + roll(x) * [-sin, sin]
            rows = (positions, cos_sin_cache, query.dtype, torch.cat((cos, cos), -1), torch.cat((-sin, sin), -1))
            self._rope_rows = rows
        cos, signed_sin = rows[3], rows[4]
        # one pass over query and key heads together
        x = torch.cat((query, key), dim=1)
        rotated = x * cos + x.roll(x.shape[-1] // 2, -1) * signed_sin
        return rotated.split((query.shape[1], key.shape[1]), dim=1)

    def silu_and_mul(self, x):
        d = x.shape[-1] // 2
        return F.silu(x[..., :d]) * x[..., d:]

    quantized_weights = frozenset({"fp8", "int8", "w4a16"})
    """All of them: the quantized ops below are the ground truth the GPU kernels are tested against."""

    quantized_experts = frozenset({"fp8", "w4a16", "mxfp4"})
    """All of them, for the same reason: `fused_experts` dequantizes them on every call."""

    def fp8_linear(self, x, weight, weight_scale, bias, *, block_size=None, input_scale=None):
        # The activations as the kernel quantizes them; the products then exact in float32.
        group_size = None if block_size is None else block_size[1]
        activations = fp8_activations(x, input_scale, group_size)
        return _float32_linear(activations, dequantize_fp8(weight, weight_scale, block_size), bias, x.dtype)

    def int8_linear(self, x, weight, weight_scale, bias, *, input_scale=None):
        activations = int8_activations(x, input_scale)
        return _float32_linear(activations, dequantize_int8(weight, weight_scale), bias, x.dtype)

    def w4a16_linear(self, x, qweight, scales, zeros, bias, *, group_size):
        # The weight rounded once to x's dtype, as the kernels feed their dot; float32 accumulation.
        weight = dequantize_w4a16(qweight, scales, zeros, group_size).to(x.dtype)
        return _float32_linear(x.float(), weight.float(), bias, x.dtype)


def _float32_linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype
) -> torch.Tensor:
    """``x @ weight.T + bias`` in float32, rounded once to ``dtype`` (a quantized GEMM's epilogue)."""
    y = x @ weight.T
    if bias is not None:
        y = y + bias.float()
    return y.to(dtype)


def _bytes(x: torch.Tensor) -> torch.Tensor:
    """An FP8 tensor seen as its bytes (torch's CPU ``index_copy_`` takes no FP8), any other as it is."""
    return x.view(torch.uint8) if x.dtype == FP8_DTYPE else x


def _to_cache(x: torch.Tensor, cache: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
    """``x`` as ``cache`` holds it: ``fp8(x / scale)`` (scale None: 1.0) in an FP8 cache, else ``x``."""
    if cache.dtype != FP8_DTYPE:
        return x
    return quantize_fp8_static(x, torch.ones(1, device=x.device) if scale is None else scale)


def _from_cache(cached: torch.Tensor, scale: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """Values read from a cache, in the compute ``dtype``: FP8 ones times their scale (None: 1.0), others as read."""
    if cached.dtype != FP8_DTYPE:
        return cached
    values = cached.float()
    return (values if scale is None else values * scale).to(dtype)


def _as_cached(x: torch.Tensor, cache: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
    """``x`` as attention reads it back from ``cache``: rounded through FP8 in an FP8 cache, else ``x`` itself."""
    return _from_cache(_to_cache(x, cache, scale), scale, x.dtype)


def _head_rows(blocks: torch.Tensor, num_kv_heads: int, num_blocks: int) -> torch.Tensor:
    """The rows of ``blocks``, head by head, in a cache seen as ``[kv_heads * num_blocks, block_size * dim]``."""
    offsets = torch.arange(num_kv_heads, device=blocks.device) * num_blocks
    return (offsets[:, None] + blocks[None, :]).reshape(-1)


def _gather_rows(cache: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """The blocks at ``rows`` (from `_head_rows`), in order, as one ``[kv_heads, tokens, dim]`` tensor.

    ``index_select`` along the first dimension of a 2-D view copies each
    block with one ``memcpy``, about twice as fast on CPU as selecting along
    the blocks dimension of ``[kv_heads, num_blocks, ...]``; advanced indexing
    on the 4-D cache is an order of magnitude slower still.
    """
    num_kv_heads, num_blocks, _, head_dim = cache.shape
    return cache.view(num_kv_heads * num_blocks, -1).index_select(0, rows).view(num_kv_heads, -1, head_dim)


def _attend_by_kind(
    query, out_dim: int, plan: TorchAttentionPlan, scale: float, decode, keys_values, sinks=None
) -> torch.Tensor:
    """A step's attention ``[tokens, heads, out_dim]``: its decode tokens through ``decode`` as one batch, each
    prefill chunk by one `scaled_dot_product_attention` over what ``keys_values(chunk, tokens_per_seq)`` gives
    (keys and values ``[sequences, heads, len, dim]`` and a mask, None for causal over the chunk alone), or
    with ``sinks`` by `_sink_attention`."""
    if plan.only_decodes:
        return decode(query)
    out = query.new_empty(*query.shape[:2], out_dim)
    if plan.decode_token_idx is not None:
        out.index_copy_(0, plan.decode_token_idx, decode(query.index_select(0, plan.decode_token_idx)))
    for chunk in plan.prefills:
        # [sequences, heads, tokens, dim] views of the flat batch: the 4-D layout takes the CPU flash kernel
        tokens = (chunk.end - chunk.start) // chunk.num_seqs
        q = query[chunk.start : chunk.end].unflatten(0, (chunk.num_seqs, tokens)).transpose(1, 2)
        k, v, mask = keys_values(chunk, tokens)
        if sinks is None:
            o = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, is_causal=mask is None, scale=scale, enable_gqa=True
            )
        else:
            o = _sink_attention(q, k, v, mask, scale, sinks)
        out[chunk.start : chunk.end].unflatten(0, (chunk.num_seqs, tokens)).copy_(o.transpose(1, 2))
    return out


def _sink_attention(q, k, v, mask: torch.Tensor, scale: float, sinks: torch.Tensor) -> torch.Tensor:
    """Masked attention ``[sequences, heads, tokens, dim]`` with one sink logit per head in the softmax, as
    transformers' GPT-OSS computes it: the sink joins each row's logits, the softmax runs, the sink's share drops."""
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    scores = (torch.matmul(q, k.transpose(-1, -2)) * scale).float().masked_fill(~mask, float("-inf"))
    sink = sinks.float().view(1, -1, 1, 1).expand(*scores.shape[:-1], 1)
    probs = torch.softmax(torch.cat((scores, sink), dim=-1), dim=-1)[..., :-1]
    return torch.matmul(probs.to(v.dtype), v)


def _expand_latent(context: torch.Tensor, kv_b: torch.Tensor, qk_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-head keys ``[tokens, heads, qk_dim]`` and values ``[tokens, heads, v]`` of latents ``[tokens, latent+rope]``.

    A key is the head's up-projection of the latent (its first ``nope`` features) then the shared rotary key.
    """
    heads, nope_v, latent_dim = kv_b.shape
    kv = F.linear(context[:, :latent_dim], kv_b.reshape(-1, latent_dim)).view(-1, heads, nope_v)
    nope = qk_dim - (context.shape[-1] - latent_dim)
    rope = context[:, None, latent_dim:].expand(-1, heads, -1)
    return torch.cat((kv[..., :nope], rope), dim=-1), kv[..., nope:]


def _causal_mask(
    num_queries: int, context_len: int, device: torch.device, sliding_window: int | None = None
) -> torch.Tensor:
    """Query ``i`` sits at position ``p = context_len - num_queries + i`` and sees keys up to it (of those, with
    ``sliding_window`` ``w``, the last ``w``: positions ``(p - w, p]``)."""
    q_pos = torch.arange(context_len - num_queries, context_len, device=device)[:, None]
    k_pos = torch.arange(context_len, device=device)[None, :]
    visible = k_pos <= q_pos
    return visible if sliding_window is None else visible & (k_pos > q_pos - sliding_window)
