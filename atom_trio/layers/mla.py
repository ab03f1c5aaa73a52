"""Multi-head latent attention (DeepSeek-V2/V3): one cached latent vector a token instead of per-head keys and values.

Each token's keys and values are the up-projection (``kv_b``: ``W_UK``, ``W_UV``) of one compressed
vector of ``kv_lora_rank`` features, and every head shares one rotary key of ``qk_rope_head_dim``.
The cache keeps those two side by side, ``kv_lora_rank + qk_rope_head_dim`` features a token and
layer (576 for DeepSeek-V3, against ``2 * 128 * 192`` per-head features), and the backend computes
attention from them (`KernelBackend.mla_attention`): prefill chunks expand their context to per-head
keys and values, decode tokens attend in the latent space with the up-projection absorbed.
"""

from __future__ import annotations

import torch

from atom_trio.ops import current_backend

from .attention import CachedAttention, _layers, get_forward_context
from .rotary import RotaryEmbedding


class MLAAttention(CachedAttention):
    """Rotates the rotary parts of this step's queries and keys, stores the latent vectors, then attends.

    ``num_heads`` are this rank's; the latent cache is whole on every rank (the heads split, the
    compressed vector they share does not). ``num_kv_heads`` is 1: every query head reads the same
    cached vector, multi-query attention in the latent space.

    An FP8 latent cache keeps one per-tensor scale, ``k_scale`` (the keys and values are both
    projections of the one cached vector); a checkpoint's ``v_scale`` has nothing to scale, as in vLLM.
    """

    num_kv_heads = 1

    def __init__(
        self,
        num_heads: int,
        *,
        qk_nope_head_dim: int,
        qk_rope_head_dim: int,
        kv_lora_rank: int,
        scale: float,
        rotary_emb: RotaryEmbedding,
    ) -> None:
        super().__init__()
        if rotary_emb.rotary_dim != qk_rope_head_dim:
            raise ValueError(
                f"rotary embedding of {rotary_emb.rotary_dim} features for qk_rope_head_dim {qk_rope_head_dim}"
            )
        self.num_heads = num_heads
        self.qk_nope_head_dim = qk_nope_head_dim
        self.qk_rope_head_dim = qk_rope_head_dim
        self.kv_lora_rank = kv_lora_rank
        self.scale = scale
        self.rotary_emb = rotary_emb
        self.latent_cache = torch.empty(0)
        self.ops = current_backend()

    def kv_cache_shapes(self, num_blocks: int, block_size: int) -> tuple[tuple[int, ...], ...]:
        return (self.ops.latent_cache_shape(num_blocks, block_size, self.kv_lora_rank + self.qk_rope_head_dim),)

    def bind_kv_cache(self, *caches: torch.Tensor) -> None:
        (self.latent_cache,) = caches

    def load_kv_scale(self, which: str, scale: torch.Tensor) -> None:
        if which == "k_scale":
            super().load_kv_scale(which, scale)

    def forward(
        self,
        positions: torch.Tensor,
        query: torch.Tensor,
        compressed_kv: torch.Tensor,
        key_rope: torch.Tensor,
        kv_b: torch.Tensor,
    ) -> torch.Tensor:
        """``query`` ``[tokens, heads, nope + rope]``, ``compressed_kv`` ``[tokens, kv_lora_rank]`` (normed),
        ``key_rope`` ``[tokens, rope]`` (not yet rotated), ``kv_b`` ``[heads * (nope + v), kv_lora_rank]``
        (this rank's heads). Returns ``[tokens, heads * v]``."""
        if torch.compiler.is_compiling():  # one opaque op, as `Attention`'s: the metadata stays out of the graph
            return torch.ops.atom_trio.mla_attention(positions, query, compressed_kv, key_rope, kv_b, self.layer_id)
        return self._attend(positions, query, compressed_kv, key_rope, kv_b)

    def _attend(
        self,
        positions: torch.Tensor,
        query: torch.Tensor,
        compressed_kv: torch.Tensor,
        key_rope: torch.Tensor,
        kv_b: torch.Tensor,
    ) -> torch.Tensor:
        context = get_forward_context()
        nope = self.qk_nope_head_dim
        q_rope, k_rope = self.ops.rotary_embedding(
            positions, query[..., nope:], key_rope.unsqueeze(1), self.rotary_emb.cos_sin_cache
        )
        query = torch.cat((query[..., :nope], q_rope), dim=-1)
        latent = torch.cat((compressed_kv, k_rope.squeeze(1)), dim=-1)
        self.ops.store_latent(latent, self.latent_cache, context.metadata.slot_mapping, cache_scale=self.k_scale)
        kv_b = kv_b.view(self.num_heads, -1, self.kv_lora_rank)
        out = self.ops.mla_attention(
            query, latent, self.latent_cache, kv_b, context.attn_plan, self.scale, cache_scale=self.k_scale
        )
        return out.flatten(1)


@torch.library.custom_op("atom_trio::mla_attention", mutates_args=())
def _mla_attention_op(
    positions: torch.Tensor,
    query: torch.Tensor,
    compressed_kv: torch.Tensor,
    key_rope: torch.Tensor,
    kv_b: torch.Tensor,
    layer_id: int,
) -> torch.Tensor:
    """`MLAAttention`'s rotate-store-attend step as torch.compile sees it (see ``atom_trio::paged_attention``)."""
    return _layers[layer_id]._attend(positions, query, compressed_kv, key_rope, kv_b)


@_mla_attention_op.register_fake
def _(positions, query, compressed_kv, key_rope, kv_b, layer_id):
    heads, nope = query.shape[1], query.shape[2] - key_rope.shape[-1]
    return query.new_empty(query.shape[0], kv_b.shape[0] - heads * nope)
