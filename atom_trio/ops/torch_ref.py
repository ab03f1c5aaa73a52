"""The reference backend: plain torch ops, on any device.

It is the yardstick every fast backend is tested against, and the CPU path,
so it is written for both clarity and sensible CPU speed: work is batched per
step, not per token. Decode tokens (one query per sequence) of a step share one
vectorised gather of their KV blocks and one batched attention; prefill chunks
each run one `scaled_dot_product_attention` call (causal, or masked against
their cached context).

The KV cache is head-major, ``[num_kv_heads, num_blocks, block_size,
head_dim]``: gathering a batch's blocks then yields ``[kv_heads, seqs, len,
dim]`` with each head's keys contiguous, which batched matmuls read without
a copy (several times faster on CPU than the token-major layout).
"""

from __future__ import annotations

import attrs
import torch
import torch.nn.functional as F

from .interface import AttentionMetadata, KernelBackend


@attrs.frozen(kw_only=True)
class PrefillChunk:
    """A sequence with several query tokens this step."""

    start: int  # first query token in the flat batch
    end: int
    context_len: int
    block_table: torch.Tensor  # the blocks covering [0, context_len)


@attrs.frozen(kw_only=True)
class TorchAttentionPlan:
    """What `TorchRefBackend.paged_attention` reuses in every layer of a step.

    ``decode_*`` describe the sequences with exactly one query token this
    step: their token indices in the flat batch, their block tables (padded to
    the longest context among them) and an additive mask hiding the padding.
    ``only_decodes``: every token of the step is a decode, in order, so no
    gather/scatter between the flat batch and the decode batch is needed.
    """

    only_decodes: bool
    decode_token_idx: torch.Tensor | None
    decode_block_tables: torch.Tensor | None  # flat [num_decodes * blocks_per_seq]
    decode_mask: torch.Tensor | None  # [1, num_decodes, 1, padded_len] float32, 0 or -inf
    prefills: tuple[PrefillChunk, ...]


class TorchRefBackend(KernelBackend):
    name = "torch"

    def __init__(self) -> None:
        # Every layer of a step rotates by the same positions: gather their
        # cos/sin rows once per step (keyed by the step's positions tensor).
        self._rope_rows: tuple[torch.Tensor, torch.Tensor, torch.dtype, torch.Tensor, torch.Tensor] | None = None

    def kv_cache_shape(self, num_blocks, block_size, num_kv_heads, head_dim):
        return (num_kv_heads, num_blocks, block_size, head_dim)

    def plan_attention(self, metadata: AttentionMetadata) -> TorchAttentionPlan:
        # A new step: forget the last step's rotary rows (memoized because every layer
        # rotates the same positions; a stale entry would also be a guard that makes
        # torch.compile recompile every step).
        self._rope_rows = None
        block_size = metadata.block_size
        starts = [0]
        for n in metadata.query_lens_host:
            starts.append(starts[-1] + n)
        decode_seqs = [i for i, n in enumerate(metadata.query_lens_host) if n == 1]
        prefills = tuple(
            PrefillChunk(
                start=starts[i],
                end=starts[i + 1],
                context_len=ctx,
                block_table=metadata.block_tables[i, : -(-ctx // block_size)],
            )
            for i, (n, ctx) in enumerate(zip(metadata.query_lens_host, metadata.context_lens_host))
            if n > 1
        )
        if not decode_seqs:
            return TorchAttentionPlan(
                only_decodes=False,
                decode_token_idx=None,
                decode_block_tables=None,
                decode_mask=None,
                prefills=prefills,
            )
        device = metadata.block_tables.device
        max_ctx = max(metadata.context_lens_host[i] for i in decode_seqs)
        blocks_per_seq = -(-max_ctx // block_size)
        seq_idx = torch.tensor(decode_seqs, device=device)
        tables = metadata.block_tables.index_select(0, seq_idx)[:, :blocks_per_seq]
        context_lens = metadata.context_lens.index_select(0, seq_idx)
        padded = torch.arange(blocks_per_seq * block_size, device=device)
        hidden = padded[None, :] >= context_lens[:, None]
        mask = torch.zeros(hidden.shape, dtype=torch.float32, device=device).masked_fill_(hidden, float("-inf"))
        return TorchAttentionPlan(
            only_decodes=not prefills,
            decode_token_idx=torch.tensor([starts[i] for i in decode_seqs], device=device),
            decode_block_tables=tables.reshape(-1),
            decode_mask=mask[None, :, None, :],
            prefills=prefills,
        )

    def store_kv(self, key, value, k_cache, v_cache, slot_mapping) -> None:
        num_kv_heads, head_dim = k_cache.shape[0], k_cache.shape[-1]
        k_cache.view(num_kv_heads, -1, head_dim).index_copy_(1, slot_mapping, key.transpose(0, 1))
        v_cache.view(num_kv_heads, -1, head_dim).index_copy_(1, slot_mapping, value.transpose(0, 1))

    def paged_attention(self, query, key, value, k_cache, v_cache, plan: TorchAttentionPlan, scale):
        if plan.only_decodes:
            return _decode_attention(query, k_cache, v_cache, plan, scale)
        out = torch.empty_like(query)
        if plan.decode_token_idx is not None:
            q = query.index_select(0, plan.decode_token_idx)
            out.index_copy_(0, plan.decode_token_idx, _decode_attention(q, k_cache, v_cache, plan, scale))
        for chunk in plan.prefills:
            if chunk.context_len == chunk.end - chunk.start:  # nothing cached: plain causal attention
                k = key[chunk.start : chunk.end].transpose(0, 1)
                v = value[chunk.start : chunk.end].transpose(0, 1)
                mask = None
            else:
                k = _gather_blocks(k_cache, chunk.block_table)[:, : chunk.context_len]
                v = _gather_blocks(v_cache, chunk.block_table)[:, : chunk.context_len]
                mask = _causal_mask(chunk.end - chunk.start, chunk.context_len, query.device)
            # [1, heads, tokens, dim]: the 4-D layout takes the CPU flash kernel
            q = query[chunk.start : chunk.end].transpose(0, 1)
            q, k, v = q[None], k[None], v[None]
            o = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, is_causal=mask is None, scale=scale, enable_gqa=True
            )
            out[chunk.start : chunk.end] = o[0].transpose(0, 1)
        return out

    def rms_norm(self, x, weight, eps, residual=None):
        if residual is not None:
            x = x + residual
            return F.rms_norm(x, weight.shape, weight, eps), x
        return F.rms_norm(x, weight.shape, weight, eps)

    def rotary_embedding(self, positions, query, key, cos_sin_cache):
        rows = self._rope_rows
        if rows is None or rows[0] is not positions or rows[1] is not cos_sin_cache or rows[2] != query.dtype:
            cos, sin = cos_sin_cache.index_select(0, positions).unsqueeze(1).to(query.dtype).chunk(2, dim=-1)
            rows = self._rope_rows = (positions, cos_sin_cache, query.dtype, cos, sin)
        cos, sin = rows[3], rows[4]
        # one pass over query and key heads together
        rotated = _rotate(torch.cat((query, key), dim=1), cos, sin)
        return rotated.split((query.shape[1], key.shape[1]), dim=1)

    def silu_and_mul(self, x):
        d = x.shape[-1] // 2
        return F.silu(x[..., :d]) * x[..., d:]


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


def _gather_blocks(cache: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
    """The tokens of ``blocks``, in order, as one ``[kv_heads, len(blocks) * block_size, dim]`` tensor.

    ``index_select`` on a 3-D view copies whole blocks; advanced indexing on the
    4-D cache is an order of magnitude slower on CPU.
    """
    num_kv_heads, num_blocks, block_size, head_dim = cache.shape
    rows = cache.view(num_kv_heads, num_blocks, -1).index_select(1, blocks)
    return rows.view(num_kv_heads, -1, head_dim)


def _causal_mask(num_queries: int, context_len: int, device: torch.device) -> torch.Tensor:
    """Query ``i`` sits at position ``context_len - num_queries + i`` and sees keys up to it."""
    q_pos = torch.arange(context_len - num_queries, context_len, device=device)
    return torch.arange(context_len, device=device)[None, :] <= q_pos[:, None]


def _decode_attention(q, k_cache, v_cache, plan: TorchAttentionPlan, scale: float) -> torch.Tensor:
    """One query per sequence over its padded context, as two batched matmuls.

    The ``group`` query heads that share a KV head become that head's query
    rows, so grouped-query attention needs no copy of K/V per query head.
    """
    num_seqs, num_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[0]
    k = _gather_blocks(k_cache, plan.decode_block_tables).view(num_kv_heads, num_seqs, -1, head_dim)
    v = _gather_blocks(v_cache, plan.decode_block_tables).view(num_kv_heads, num_seqs, -1, head_dim)
    q = q.view(num_seqs, num_kv_heads, -1, head_dim).transpose(0, 1)  # [kv_heads, seqs, group, dim]
    scores = torch.matmul(q, k.transpose(-1, -2)).float()  # [kv_heads, seqs, group, len]
    probs = torch.softmax(scores * scale + plan.decode_mask, dim=-1).to(q.dtype)
    out = torch.matmul(probs, v)  # [kv_heads, seqs, group, dim]
    return out.transpose(0, 1).reshape(num_seqs, num_heads, head_dim)
