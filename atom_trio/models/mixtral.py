"""Mixtral (8x7B, 8x22B): Llama's attention, and in every layer a mixture of experts, top-2 of 8.

The router's weights are a softmax over the chosen experts' logits: the softmax over all of them,
top-k, renormalized (`select_experts` with ``renormalize``). Checkpoints name the block
``block_sparse_moe`` and the experts' projections ``w1`` (gate), ``w3`` (up) and ``w2`` (down);
transformers 5 (and so ``--load-format dummy``) names it ``mlp`` with stacked experts. Both load.
"""

from __future__ import annotations

from torch import nn

from atom_trio.layers import RotaryEmbedding

from .llama import LlamaAttention, LlamaDecoderLayer
from .qwen3_moe import MoeForCausalLM, SparseMoeBlock, refuse_sliding_window


class MixtralForCausalLM(MoeForCausalLM):
    def __init__(self, config) -> None:
        refuse_sliding_window(config)
        super().__init__(config)

    def decoder_layer(self, rotary_emb: RotaryEmbedding, index: int) -> nn.Module:
        config = self.config
        experts = SparseMoeBlock(
            config,
            num_experts=config.num_local_experts,
            top_k=config.num_experts_per_tok,
            intermediate_size=config.intermediate_size,
            renormalize=True,
        )
        return LlamaDecoderLayer(config, LlamaAttention(config, rotary_emb), experts)

    def checkpoint_target(self, name: str) -> tuple[str, object] | None:
        return super().checkpoint_target(name.replace(".block_sparse_moe.", ".mlp."))
