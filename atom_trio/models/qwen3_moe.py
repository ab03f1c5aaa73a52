"""Qwen3-MoE: Qwen3's attention with mixture-of-experts MLPs; and the sparse block the other MoE families share.

`SparseMoeBlock` is one layer's experts behind a router; `MoeForCausalLM` is Llama's model whose
checkpoint mapping also knows expert tensors, in either of the two layouts they come in:

- one tensor per expert and projection, ``mlp.experts.{e}.gate_proj.weight`` (``up_proj``,
  ``down_proj``; Mixtral's ``w1``/``w3``/``w2``): what the hub's checkpoints hold and what
  transformers' ``save_pretrained`` writes;
- stacked, ``mlp.experts.gate_up_proj`` ``[experts, 2 * inter, hidden]`` and ``mlp.experts.down_proj``
  ``[experts, hidden, inter]``: how transformers 5 holds them in memory, so the names and shapes
  ``--load-format dummy`` draws.

Both land in `FusedMoE`'s ``w13_weight``/``w2_weight`` through its ``weight_loader``.
"""

from __future__ import annotations

import re

import torch
from torch import nn

from atom_trio.distributed import current_tp_group
from atom_trio.layers import FusedMoE, ReplicatedLinear, RMSNorm, RotaryEmbedding, select_experts

from .llama import LlamaAttention, LlamaDecoderLayer, LlamaForCausalLM, LlamaMLP

# An expert's weight, or a quantized checkpoint's tensors of it (FP8 scales; GPTQ, AWQ and compressed-tensors' 4-bit).
_EXPERT_TENSOR = re.compile(
    r"\.experts\.(\d+)\.(gate_proj|up_proj|down_proj|w1|w3|w2)\."
    r"(weight|weight_scale|weight_scale_inv|weight_packed|weight_zero_point|weight_shape|qweight|qzeros|scales|g_idx)$"
)
_STACKED_EXPERTS = re.compile(r"\.experts\.(gate_up_proj|down_proj)$")
_EXPERT_SHARD = {"gate_proj": "w1", "w1": "w1", "up_proj": "w3", "w3": "w3", "down_proj": "w2", "w2": "w2"}


class SparseMoeBlock(nn.Module):
    """A mixture-of-experts MLP: the router (``gate``) picks ``top_k`` experts for each token, ``experts`` runs them.

    Called like `LlamaMLP`: ``(x, residual, norm)`` -> ``(moe(norm(x + residual)), x + residual)``.
    ``routing`` is passed to `select_experts` (scoring function, renormalization, groups...).
    ``shared_intermediate_size`` adds an expert every token goes through (GLM-4-MoE); its partial sum
    joins the routed experts' before the layer's one all-reduce.

    The router's weight is whole on every rank: every rank must choose the same experts for a token.
    """

    def __init__(
        self,
        config,
        *,
        num_experts: int,
        top_k: int,
        intermediate_size: int,
        shared_intermediate_size: int = 0,
        **routing,
    ) -> None:
        super().__init__()
        if config.hidden_act != "silu":
            raise ValueError(f"hidden_act {config.hidden_act!r} is not supported (only 'silu')")
        if not 0 < top_k <= num_experts:
            raise ValueError(f"num_experts_per_tok {top_k} does not fit {num_experts} experts")
        self.top_k = top_k
        self.routing = routing
        self.tp = current_tp_group()
        self.gate = ReplicatedLinear(config.hidden_size, num_experts)
        shared = shared_intermediate_size > 0
        self.experts = FusedMoE(num_experts, top_k, config.hidden_size, intermediate_size, reduce_results=not shared)
        self.shared_experts = LlamaMLP(config, shared_intermediate_size, reduce_results=False) if shared else None

    def route(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Each token's experts: ``(weights [tokens, top_k] float32, ids [tokens, top_k] int32)``."""
        return select_experts(self.gate(hidden), self.top_k, **self.routing)

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None, norm: RMSNorm
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if residual is None:
            hidden, residual = norm(x), x
        else:
            hidden, residual = norm(x, residual)
        out = self.experts(hidden, *self.route(hidden))
        if self.shared_experts is not None:
            out = self.tp.all_reduce(out + self.shared_experts.forward_normed_input(hidden))
        return out, residual


class MoeForCausalLM(LlamaForCausalLM):
    """Llama's model whose checkpoint mapping also fills `FusedMoE` layers, per expert or stacked."""

    def checkpoint_target(self, name: str) -> tuple[str, object] | None:
        if match := _EXPERT_TENSOR.search(name):
            expert, projection, tensor = match.groups()
            shard = _EXPERT_SHARD[projection]
            stacked = "w2" if shard == "w2" else "w13"
            return f"{name[: match.start()]}.experts.{stacked}_{tensor}", (int(expert), shard)
        if match := _STACKED_EXPERTS.search(name):
            stacked = "w13" if match.group(1) == "gate_up_proj" else "w2"
            return f"{name[: match.start()]}.experts.{stacked}_weight", ("stacked", stacked)
        return super().checkpoint_target(name)

    def filled_keys(self, target: str, shard_id: object) -> set[tuple[str, object]]:
        if isinstance(shard_id, tuple) and shard_id[0] == "stacked":
            return self._expert_keys(target)
        return super().filled_keys(target, shard_id)

    def _expected_keys(self, params: dict[str, nn.Parameter]) -> set[tuple[str, object]]:
        keys = super()._expected_keys(params)
        for name in params:
            if isinstance(self.get_submodule(name.rpartition(".")[0]), FusedMoE):
                keys.discard((name, None))
                keys |= self._expert_keys(name)
        return keys

    def _expert_keys(self, param_name: str) -> set[tuple[str, object]]:
        """Every expert's shards of a `FusedMoE` weight (an expert-parallel rank skips others' but counts them)."""
        experts = self.get_submodule(param_name.rpartition(".")[0])
        shards = ("w2",) if param_name.rpartition(".")[2].startswith("w2_") else ("w1", "w3")
        return {(param_name, (expert, shard)) for expert in range(experts.num_experts) for shard in shards}


def refuse_sliding_window(config) -> None:
    """Attention here sees the whole context: a sliding window narrower than the model's context would change it."""
    window = getattr(config, "sliding_window", None)
    if window is not None and window < config.max_position_embeddings:
        raise ValueError(
            f"sliding_window {window} is not supported (attention covers the whole context, "
            f"max_position_embeddings {config.max_position_embeddings})"
        )


class Qwen3MoeForCausalLM(MoeForCausalLM):
    """Qwen3-MoE (Qwen3-30B-A3B, Qwen3-235B-A22B): softmax top-k routing, q/k norms, dense layers among sparse ones.

    Layer ``i`` is sparse unless it is in ``mlp_only_layers``, when ``(i + 1) % decoder_sparse_step == 0``
    and ``num_experts > 0`` (transformers' rule); a dense layer is Qwen3's MLP of ``intermediate_size``.
    """

    qk_norm = True

    def __init__(self, config) -> None:
        refuse_sliding_window(config)  # transformers keeps it None unless use_sliding_window
        super().__init__(config)

    def decoder_layer(self, rotary_emb: RotaryEmbedding, index: int) -> nn.Module:
        config = self.config
        sparse = (
            index not in (config.mlp_only_layers or [])
            and config.num_experts > 0
            and (index + 1) % config.decoder_sparse_step == 0
        )
        mlp = (
            SparseMoeBlock(
                config,
                num_experts=config.num_experts,
                top_k=config.num_experts_per_tok,
                intermediate_size=config.moe_intermediate_size,
                renormalize=config.norm_topk_prob,
            )
            if sparse
            else LlamaMLP(config)
        )
        return LlamaDecoderLayer(config, LlamaAttention(config, rotary_emb, qk_norm=True), mlp)
