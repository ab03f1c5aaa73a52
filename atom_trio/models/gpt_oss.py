"""GPT-OSS (gpt-oss-20b, gpt-oss-120b): attention sinks, alternating sliding-window layers, biased clamped experts.

- Attention: Llama's, with q/k/v/o biases (``attention_bias``), ``head_dim`` from the config, YaRN rope
  (transformers' frequencies and cos/sin scaling, `get_rope`), a learned sink logit per head
  (``self_attn.sinks``) in the softmax's denominator, and a window of ``sliding_window`` positions on
  the layers ``layer_types`` marks ``sliding_attention``. The two kinds are two KV cache groups: the
  sliding layers' blocks are released as they leave the window (docs/scheduling.md).
- Experts: every layer sparse; the router (``mlp.router``, with a bias) takes the top
  ``num_experts_per_tok`` logits and softmaxes over them, which is `select_experts`' softmax over all
  experts renormalized over the chosen ones. Each expert is ``down(act(gate_up(x) + b1)) + b2`` with
  `ClampedSwiGLU` (``swiglu_alpha``, ``swiglu_limit``) as ``act``.
- Checkpoints (and transformers in memory) hold the experts stacked and transposed: ``gate_up_proj``
  ``[experts, hidden, 2 * inter]`` with gate and up features interleaved (even columns gate, odd up),
  ``gate_up_proj_bias`` ``[experts, 2 * inter]`` likewise, ``down_proj`` ``[experts, inter, hidden]``,
  ``down_proj_bias`` ``[experts, hidden]``. Loading splits the interleaved features into gate rows
  then up rows and transposes, into `FusedMoE`'s layout.
- MXFP4 checkpoints (``quantization_config`` ``mxfp4``) hold the experts' weights as ``<proj>_blocks`` and
  ``<proj>_scales``; they load into `FusedMoE`'s quantized layout (`experts_as_fused`), which the GPU's MoE
  kernel reads as it is and the CPU dequantizes once.
- ``hidden_act`` is not read (transformers' GPT-OSS ignores it too: the experts' activation is their own);
  ``router_aux_loss_coef``, ``output_router_logits`` and ``attention_dropout`` concern training.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

import torch
from torch import nn

from atom_trio.layers import Attention, FusedMoE, ReplicatedLinear, RMSNorm, RotaryEmbedding, select_experts
from atom_trio.ops import ClampedSwiGLU

from .llama import LlamaAttention, LlamaDecoderLayer
from .qwen3_moe import MoeForCausalLM

_LAYER_KINDS = ("sliding_attention", "full_attention")
_STACKED = re.compile(r"\.experts\.(gate_up|down)_proj(_bias|_blocks|_scales)?$")


class GptOssAttention(LlamaAttention):
    """Llama's attention with GPT-OSS's sinks, and the window of its layer's kind."""

    def __init__(self, config, rotary_emb: RotaryEmbedding, index: int) -> None:
        super().__init__(config, rotary_emb)
        sliding = config.layer_types[index] == "sliding_attention"
        self.attn = Attention(
            self.num_heads,
            self.num_kv_heads,
            self.head_dim,
            self.head_dim**-0.5,
            rotary_emb,
            sliding_window=config.sliding_window if sliding else None,
            sinks=True,
        )


class GptOssMoe(nn.Module):
    """The router and the biased experts, called as `LlamaMLP` is: ``(x, residual, norm)``."""

    def __init__(self, config) -> None:
        super().__init__()
        self.top_k = config.num_experts_per_tok
        self.router = ReplicatedLinear(config.hidden_size, config.num_local_experts, bias=True)
        self.experts = FusedMoE(
            config.num_local_experts,
            self.top_k,
            config.hidden_size,
            config.intermediate_size,
            bias=True,
            activation=clamped_swiglu(config),
        )

    def forward(self, x: torch.Tensor, residual: torch.Tensor, norm: RMSNorm) -> tuple[torch.Tensor, torch.Tensor]:
        hidden, residual = norm(x, residual)
        weights, ids = select_experts(self.router(hidden), self.top_k, renormalize=True)
        return self.experts(hidden, weights, ids), residual


def clamped_swiglu(config) -> ClampedSwiGLU:
    """The experts' activation from the config; ``swiglu_alpha`` defaults to 1.702 as transformers' reference does.

    Older transformers releases have no ``swiglu_alpha`` field and hard-code that value.
    """
    return ClampedSwiGLU(alpha=getattr(config, "swiglu_alpha", 1.702), limit=config.swiglu_limit)


class GptOssForCausalLM(MoeForCausalLM):
    def __init__(self, config) -> None:
        check_config(config)
        super().__init__(config)

    def decoder_layer(self, rotary_emb: RotaryEmbedding, index: int) -> nn.Module:
        return LlamaDecoderLayer(self.config, GptOssAttention(self.config, rotary_emb, index), GptOssMoe(self.config))

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        super().load_weights((name, experts_as_fused(name, tensor)) for name, tensor in weights)

    def checkpoint_target(self, name: str) -> tuple[str, object] | None:
        if name.endswith(".self_attn.sinks"):
            return f"{name.removesuffix('.sinks')}.attn.sinks", None
        if (match := _STACKED.search(name)) and match.group(2):
            stacked = "w13" if match.group(1) == "gate_up" else "w2"
            return f"{name[: match.start()]}.experts.{stacked}{match.group(2)}", ("stacked", stacked)
        return super().checkpoint_target(name)


def experts_as_fused(name: str, tensor: torch.Tensor) -> torch.Tensor:
    """A checkpoint's stacked expert tensor in `FusedMoE`'s layout (any other tensor as it is).

    ``gate_up_proj`` ``[E, hidden, 2I]`` interleaved -> ``[E, 2I, hidden]``, gate rows then up rows;
    its bias ``[E, 2I]`` interleaved -> gate then up; ``down_proj`` ``[E, I, hidden]`` -> ``[E, hidden, I]``.

    MXFP4 (transformers' ``integrations/mxfp4.py``): ``<proj>_blocks`` ``[E, out, in / 32, 16]`` and
    ``<proj>_scales`` ``[E, out, in / 32]`` are already ``[out, in]``-major, ``gate_up_proj``'s out features
    interleaved as above: its rows are split into gate then up, and the blocks of a row flattened to
    ``[E, out, in / 2]`` (`atom_trio.ops.quant_experts`'s layout).
    """
    if not (match := _STACKED.search(name)):
        return tensor
    gate_up, kind = match.group(1) == "gate_up", match.group(2)
    if kind in ("_blocks", "_scales"):
        if gate_up:
            tensor = torch.cat((tensor[:, 0::2], tensor[:, 1::2]), dim=1)
        return tensor.flatten(-2) if kind == "_blocks" else tensor
    if gate_up:
        tensor = torch.cat((tensor[..., ::2], tensor[..., 1::2]), dim=-1)
    return tensor if kind == "_bias" else tensor.transpose(1, 2)


def check_config(config) -> None:
    """Refuse, by name, the config values this implementation would compute differently from transformers."""
    layer_types = list(config.layer_types or [])
    if len(layer_types) != config.num_hidden_layers or not set(layer_types) <= set(_LAYER_KINDS):
        raise ValueError(
            f"layer_types {layer_types} is not supported: one of {_LAYER_KINDS} for each of the "
            f"num_hidden_layers {config.num_hidden_layers}"
        )
    if "sliding_attention" in layer_types and config.sliding_window is not None and config.sliding_window < 1:
        raise ValueError(f"sliding_window {config.sliding_window} is not supported (1 or more positions)")
    if not 0 < config.num_experts_per_tok <= config.num_local_experts:
        raise ValueError(
            f"num_experts_per_tok {config.num_experts_per_tok} does not fit {config.num_local_experts} experts"
        )
    if config.swiglu_limit is None or config.swiglu_limit <= 0:
        raise ValueError(f"swiglu_limit {config.swiglu_limit} is not supported (a positive clamp)")
