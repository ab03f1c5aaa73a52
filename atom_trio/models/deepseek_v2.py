"""DeepSeek-V2 (V2, V2-Lite), DeepSeek-V3 and Kimi-K2 (V3's architecture): latent attention and routed experts.

- Attention is multi-head latent attention (`MLAAttention`): queries from ``q_proj``, or through a
  low-rank ``q_a_proj`` / ``q_a_layernorm`` / ``q_b_proj`` when ``q_lora_rank`` is set; keys and
  values from one compressed vector (``kv_a_proj_with_mqa``: ``kv_lora_rank`` features, normed by
  ``kv_a_layernorm``, plus one rotary key of ``qk_rope_head_dim`` every head shares), which
  ``kv_b_proj`` expands to each head's key (``qk_nope_head_dim``) and value (``v_head_dim``). The
  cache holds the compressed vector and the rotary key, not the expansion.
- The rotary features come interleaved in DeepSeek's checkpoints (pairs ``(x0, x1), (x2, x3)...``
  turn together; V2 always, V3 with ``rope_interleave``). Loading reorders those rows of the query
  and key projections to evens then odds, where the backends' rotate-half rotation turns the same
  pairs: the scores are the same sums over the same products (transformers' V3 rotation returns
  that order too).
- YaRN (``rope_parameters``): frequencies and cos/sin scaling from transformers, and DeepSeek's
  ``mscale_all_dim`` folded into the softmax scale (`_yarn_softmax_scale`), as transformers does.
- Experts: layer ``i`` is sparse when ``n_routed_experts`` is set, ``i >= first_k_dense_replace``
  and ``i % moe_layer_freq == 0`` (DeepSeek's rule); ``n_shared_experts`` always-on experts beside
  them. V2 routes by softmax, ``greedy`` or ``group_limited_greedy`` (a group rated by its best
  expert), with ``norm_topk_prob`` as DeepSeek's code applies it; V3 by ``noaux_tc`` (sigmoid
  scores, ``e_score_correction_bias``, groups rated by their best two), GLM-4-MoE's router. Both
  scale by ``routed_scaling_factor``. Router weights stay float32, as in transformers.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from atom_trio.distributed import current_tp_group
from atom_trio.layers import (
    ColumnParallelLinear,
    MLAAttention,
    ReplicatedLinear,
    RMSNorm,
    RotaryEmbedding,
    RowParallelLinear,
    select_experts,
)

from .glm4_moe import Glm4MoeForCausalLM, Glm4MoeSparseBlock
from .llama import LlamaDecoderLayer, LlamaMLP
from .qwen3_moe import SparseMoeBlock

_LATENT_NORM_EPS = 1e-6
"""``q_a_layernorm`` and ``kv_a_layernorm`` use RMSNorm's default epsilon, not ``rms_norm_eps`` (DeepSeek's code)."""


class LatentUpProjection(ColumnParallelLinear):
    """``kv_b_proj``: read as a weight, by head (prefill expands latents through it, decode absorbs it), never
    run as a matmul of its own, so it keeps its dense layout (no CPU packing; dequantized when quantized)."""

    weight_is_read = True

    def process_weights_after_loading(self) -> None:
        pass


def deinterleave_rope_rows(linear: nn.Module, head_dim: int, rope_dim: int) -> None:
    """Have ``linear``'s loaders reorder the last ``rope_dim`` rows of each ``head_dim`` rows to evens, then odds.

    A checkpoint's interleaved rotary pairs ``(2i, 2i+1)`` then sit at ``(i, i + rope_dim / 2)``,
    the pairs rotate-half turns; queries and keys reordered alike give the same scores.
    """
    nope = head_dim - rope_dim
    order = torch.cat((torch.arange(nope), nope + torch.arange(0, rope_dim, 2), nope + torch.arange(1, rope_dim, 2)))
    for param in (linear.weight, linear.bias):
        if param is None:
            continue
        load = param.weight_loader

        def reordered(param, loaded, shard_id=None, load=load):
            return load(param, loaded.unflatten(0, (-1, head_dim))[:, order].flatten(0, 1), shard_id)

        param.weight_loader = reordered


class DeepseekV2Attention(nn.Module):
    """Latent attention's projections around `MLAAttention`; names as in the checkpoints."""

    def __init__(self, config, rotary_emb: RotaryEmbedding, *, rope_interleaved: bool) -> None:
        super().__init__()
        tp = current_tp_group()
        self.num_heads = tp.divide(config.num_attention_heads, "attention heads")
        nope, rope, v = (config.qk_nope_head_dim, config.qk_rope_head_dim, config.v_head_dim)
        self.qk_head_dim = nope + rope
        self.latent_split = [config.kv_lora_rank, rope]
        bias = config.attention_bias
        hidden, heads = config.hidden_size, config.num_attention_heads
        if config.q_lora_rank is None:
            self.q_proj = ColumnParallelLinear(hidden, heads * self.qk_head_dim)
            query_out = self.q_proj
        else:
            self.q_a_proj = ReplicatedLinear(hidden, config.q_lora_rank, bias=bias)
            self.q_a_layernorm = RMSNorm(config.q_lora_rank, _LATENT_NORM_EPS)
            self.q_b_proj = ColumnParallelLinear(config.q_lora_rank, heads * self.qk_head_dim)
            query_out = self.q_b_proj
        self.kv_a_proj_with_mqa = ReplicatedLinear(hidden, config.kv_lora_rank + rope, bias=bias)
        self.kv_a_layernorm = RMSNorm(config.kv_lora_rank, _LATENT_NORM_EPS)
        self.kv_b_proj = LatentUpProjection(config.kv_lora_rank, heads * (nope + v))
        self.o_proj = RowParallelLinear(heads * v, hidden, bias=bias)
        if rope_interleaved:
            deinterleave_rope_rows(query_out, self.qk_head_dim, rope)
            deinterleave_rope_rows(self.kv_a_proj_with_mqa, config.kv_lora_rank + rope, rope)
        self.attn = MLAAttention(
            self.num_heads,
            qk_nope_head_dim=nope,
            qk_rope_head_dim=rope,
            kv_lora_rank=config.kv_lora_rank,
            scale=_yarn_softmax_scale(config.rope_parameters, self.qk_head_dim**-0.5),
            rotary_emb=rotary_emb,
        )

    def forward(
        self, positions: torch.Tensor, hidden: torch.Tensor, residual: torch.Tensor | None, input_norm: RMSNorm
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Attention of ``input_norm(hidden + residual)``; returns it with ``hidden + residual``."""
        if residual is None:
            normed, residual = input_norm(hidden), hidden
        else:
            normed, residual = input_norm(hidden, residual)
        if hasattr(self, "q_proj"):
            query = self.q_proj(normed)
        else:
            query = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(normed)))
        compressed_kv, key_rope = self.kv_a_proj_with_mqa(normed).split(self.latent_split, dim=-1)
        out = self.attn(
            positions,
            query.view(-1, self.num_heads, self.qk_head_dim),
            self.kv_a_layernorm(compressed_kv.contiguous()),
            key_rope,
            self.kv_b_proj.weight,
        )
        return self.o_proj(out), residual


class DeepseekV2SparseBlock(SparseMoeBlock):
    """DeepSeek-V2's experts: softmax scores of float32 router logits, greedy or group-limited greedy top-k."""

    def __init__(self, config) -> None:
        method = config.topk_method
        routing = {}
        if method == "group_limited_greedy":
            num_experts, groups, keep = (config.n_routed_experts, config.n_group, config.topk_group)
            if not groups or num_experts % groups or not keep or keep > groups:
                raise ValueError(f"n_group {groups} / topk_group {keep} do not group {num_experts} experts")
            if config.num_experts_per_tok > keep * (num_experts // groups):
                raise ValueError(
                    f"topk_group {keep} leaves fewer than num_experts_per_tok {config.num_experts_per_tok}"
                )
            routing = dict(num_expert_group=groups, topk_group=keep)
        elif method != "greedy":
            raise ValueError(
                f"topk_method {method!r} is not supported for DeepSeek-V2 ('greedy', 'group_limited_greedy')"
            )
        super().__init__(
            config,
            num_experts=config.n_routed_experts,
            top_k=config.num_experts_per_tok,
            intermediate_size=config.moe_intermediate_size,
            shared_intermediate_size=config.moe_intermediate_size * (config.n_shared_experts or 0),
            renormalize=bool(config.norm_topk_prob) and config.num_experts_per_tok > 1,
            routed_scaling_factor=config.routed_scaling_factor,
            **routing,
        )
        self.gate.weight.data = self.gate.weight.data.float()

    def route(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return select_experts(self.gate(hidden.float()), self.top_k, **self.routing)


class DeepseekV2ForCausalLM(Glm4MoeForCausalLM):
    """DeepSeek-V2 and V2-Lite. The skipping of multi-token-prediction layers and the float32 router are
    GLM-4-MoE's (`Glm4MoeForCausalLM`), whose routing is DeepSeek-V3's."""

    scoring_func = "softmax"
    packed_modules = {"gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1)}

    def __init__(self, config) -> None:
        check_config(config, self.scoring_func)
        super().__init__(config)

    def rope_interleaved(self) -> bool:
        return True

    def sparse_block(self) -> nn.Module:
        return DeepseekV2SparseBlock(self.config)

    def decoder_layer(self, rotary_emb: RotaryEmbedding, index: int) -> nn.Module:
        config = self.config
        attention = DeepseekV2Attention(config, rotary_emb, rope_interleaved=self.rope_interleaved())
        sparse = (
            config.n_routed_experts is not None
            and index >= config.first_k_dense_replace
            and index % getattr(config, "moe_layer_freq", 1) == 0
        )
        return LlamaDecoderLayer(config, attention, self.sparse_block() if sparse else LlamaMLP(config))


class DeepseekV3ForCausalLM(DeepseekV2ForCausalLM):
    """DeepSeek-V3 and Kimi-K2: ``noaux_tc`` routing (GLM-4-MoE's sparse block), ``rope_interleave``."""

    scoring_func = "sigmoid"

    def rope_interleaved(self) -> bool:
        return bool(getattr(self.config, "rope_interleave", True))

    def sparse_block(self) -> nn.Module:
        return Glm4MoeSparseBlock(self.config)


def check_config(config, scoring_func: str) -> None:
    """Refuse, by name, the config fields whose values this implementation would silently compute differently."""
    if config.num_key_value_heads not in (None, config.num_attention_heads):
        raise ValueError(
            f"num_key_value_heads {config.num_key_value_heads} is not supported: latent attention expands the "
            f"latent to every one of the num_attention_heads {config.num_attention_heads}"
        )
    if getattr(config, "scoring_func", scoring_func) != scoring_func:
        raise ValueError(f"scoring_func {config.scoring_func!r} is not supported ({scoring_func!r} only)")
    if scoring_func == "sigmoid" and getattr(config, "topk_method", None) not in (None, "noaux_tc"):
        raise ValueError(f"topk_method {config.topk_method!r} is not supported (only 'noaux_tc')")
    if getattr(config, "moe_layer_freq", 1) < 1:
        raise ValueError(f"moe_layer_freq {config.moe_layer_freq} is not supported (1 or more)")
    if config.qk_rope_head_dim % 2 or config.qk_rope_head_dim < 2:
        raise ValueError(f"qk_rope_head_dim {config.qk_rope_head_dim} is not supported (an even number of features)")


def _yarn_softmax_scale(rope_parameters: dict, scale: float) -> float:
    """``scale`` times YaRN's ``mscale(factor, mscale_all_dim)`` squared, DeepSeek's softmax scale.

    YaRN's attention factor already scales the rotary features; DeepSeek scales
    the whole ``q @ k`` product too, non-rotary features included. Written
    here rather than imported: transformers only exposes it in recent releases.
    """
    mscale_all_dim = rope_parameters.get("mscale_all_dim", 0)
    factor = rope_parameters.get("factor", 1.0)
    if rope_parameters.get("rope_type", "default") == "default" or not mscale_all_dim or factor <= 1:
        return scale
    mscale = 0.1 * mscale_all_dim * math.log(factor) + 1.0
    return scale * mscale * mscale
