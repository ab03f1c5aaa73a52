"""GLM-4-MoE (GLM-4.5, GLM-4.5-Air): sigmoid-scored grouped routing with a shared expert, partial rotary.

- Routing (DeepSeek-V3's, `select_experts` with ``scoring_func="sigmoid"``): scores are the sigmoid of
  float32 router logits; the choice ranks ``scores + e_score_correction_bias``, within the ``topk_group``
  best of ``n_group`` expert groups; the weights are the unbiased scores, renormalized with
  ``norm_topk_prob``, times ``routed_scaling_factor``. The router's weight and bias stay float32
  whatever the model's dtype, as in transformers.
- Layers before ``first_k_dense_replace`` have a dense MLP (``intermediate_size``); the others add
  ``n_shared_experts`` always-on experts (one MLP of ``moe_intermediate_size * n_shared_experts``).
- Attention: q/k/v biases with ``attention_bias`` (never o), q/k norms with ``use_qk_norm``, rotary
  on the first ``head_dim * partial_rotary_factor`` features of each head.
- The hub's checkpoints carry ``num_nextn_predict_layers`` multi-token-prediction layers after the
  last decoder layer (``model.layers.{num_hidden_layers}...``), for speculative decoding; they do
  not take part in the model's output, and loading skips them.
"""

from __future__ import annotations

import re

import torch
from torch import nn

from atom_trio.layers import RotaryEmbedding, select_experts

from .llama import LlamaAttention, LlamaDecoderLayer, LlamaMLP
from .qwen3_moe import MoeForCausalLM, SparseMoeBlock

_LAYER_INDEX = re.compile(r"^model\.layers\.(\d+)\.")


class Glm4MoeSparseBlock(SparseMoeBlock):
    def __init__(self, config) -> None:
        num_experts, groups = config.n_routed_experts, config.n_group
        if groups < 1 or num_experts % groups or num_experts // groups < 2:
            raise ValueError(f"n_group {groups} does not split {num_experts} experts into groups of two or more")
        candidates = config.topk_group * (num_experts // groups)
        if not 1 <= config.topk_group <= groups or config.num_experts_per_tok > candidates:
            raise ValueError(
                f"topk_group {config.topk_group} of n_group {groups} does not leave num_experts_per_tok "
                f"{config.num_experts_per_tok} experts to choose from"
            )
        super().__init__(
            config,
            num_experts=num_experts,
            top_k=config.num_experts_per_tok,
            intermediate_size=config.moe_intermediate_size,
            shared_intermediate_size=config.moe_intermediate_size * config.n_shared_experts,
            scoring_func="sigmoid",
            renormalize=config.norm_topk_prob,
            num_expert_group=groups,
            topk_group=config.topk_group,
            routed_scaling_factor=config.routed_scaling_factor,
        )
        self.gate.weight.data = self.gate.weight.data.float()
        self.gate.e_score_correction_bias = nn.Parameter(
            torch.zeros(num_experts, dtype=torch.float32), requires_grad=False
        )

    def route(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.gate(hidden.float())
        return select_experts(logits, self.top_k, correction_bias=self.gate.e_score_correction_bias, **self.routing)


class Glm4MoeForCausalLM(MoeForCausalLM):
    keep_in_float32 = (".mlp.gate.weight", ".mlp.gate.e_score_correction_bias")

    def decoder_layer(self, rotary_emb: RotaryEmbedding, index: int) -> nn.Module:
        config = self.config
        attention = LlamaAttention(config, rotary_emb, qk_norm=config.use_qk_norm, o_proj_bias=False)
        mlp = Glm4MoeSparseBlock(config) if index >= config.first_k_dense_replace else LlamaMLP(config)
        return LlamaDecoderLayer(config, attention, mlp)

    def checkpoint_target(self, name: str) -> tuple[str, object] | None:
        match = _LAYER_INDEX.match(name)
        if match and int(match.group(1)) >= self.config.num_hidden_layers:
            return None  # a multi-token-prediction layer
        return super().checkpoint_target(name)
