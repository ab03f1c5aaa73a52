"""EAGLE-3 draft heads for Llama-family targets, in the layout EAGLE publishes.

An EAGLE-3 head (e.g. ``yuhuili/EAGLE3-LLaMA3.1-Instruct-8B``) reads three of
the target's hidden states per position, a low, a middle and a high layer's
input (the target's ``aux_hidden_state_layers``, from the head's
``eagle_aux_hidden_state_layer_ids`` or vLLM's default choice), fused by
``fc`` (``[hidden, 3 * hidden]``) into one. Its one decoder layer,
``midlayer``, attends over ``[input_layernorm(embed(token)),
hidden_norm(fused)]`` (``2 * hidden`` features in, ``hidden`` out) with the
fused state as its residual (the normed one with ``norm_before_residual``,
as the speculators format may set); ``norm`` then its own ``lm_head`` over a
reduced draft vocabulary give the scores, which ``d2t`` (draft id -> target
id minus draft id) places in the target's vocabulary, the rest ``-inf``.
Its next autoregressive step feeds back its own output (``hidden``
features, which skip ``fc``), as vLLM's ``llama_eagle3`` does.
"""

from __future__ import annotations

import torch
from torch import nn

from atom_trio.layers import ParallelLMHead, QKVParallelLinear, ReplicatedLinear, RMSNorm, get_rope

from .eagle import EagleLlamaForCausalLM
from .llama import LlamaAttention, LlamaDecoderLayer, LlamaMLP, _head_dim


class DraftVocabulary(nn.Module):
    """``d2t``: each draft token's id in the target's vocabulary, less its own; places draft scores there."""

    def __init__(self, draft_vocab_size: int, vocab_size: int) -> None:
        super().__init__()
        self.vocab_size = vocab_size
        self.d2t = nn.Parameter(torch.zeros(draft_vocab_size, dtype=torch.long), requires_grad=False)

    def forward(self, logits: torch.Tensor) -> torch.Tensor:
        """``[rows, vocab_size]`` scores: the draft tokens' from ``logits``, ``-inf`` for the others."""
        draft_vocab_size = len(self.d2t)
        target_ids = torch.arange(draft_vocab_size, device=logits.device) + self.d2t
        scores = logits.new_full((logits.shape[0], self.vocab_size), float("-inf"))
        return scores.index_copy_(1, target_ids, logits[:, :draft_vocab_size])


class Eagle3DecoderLayer(LlamaDecoderLayer):
    """``midlayer``: attention over the normed embedding beside the normed fused state, then the MLP."""

    def __init__(self, config) -> None:
        rotary_emb = get_rope(config, _head_dim(config), config.max_position_embeddings)
        attention = LlamaAttention(config, rotary_emb)
        attention.qkv_proj = QKVParallelLinear(
            2 * config.hidden_size,
            _head_dim(config),
            config.num_attention_heads,
            config.num_key_value_heads,
            bias=getattr(config, "attention_bias", False),
        )
        super().__init__(config, attention, LlamaMLP(config))
        self.hidden_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        # Heads in the speculators format may set it: the residual stream starts from the normed state.
        self.norm_before_residual = bool(getattr(config, "norm_before_residual", False))

    def forward(self, positions: torch.Tensor, embeds: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        """The layer's output plus its residual stream: what the next step feeds back."""
        normed = self.hidden_norm(hidden)
        features = torch.cat([self.input_layernorm(embeds), normed], dim=-1)
        attended, _ = self.self_attn(positions, features, None, None)
        out, residual = self.mlp(attended, normed if self.norm_before_residual else hidden, self.post_attention_layernorm)
        return out + residual


class Eagle3LlamaForCausalLM(EagleLlamaForCausalLM):
    """EAGLE-3 head: ``fc`` over three target taps, ``midlayer``, ``norm``, a draft-vocabulary ``lm_head`` and ``d2t``.

    ``forward(input_ids, positions, hidden_states)`` takes either the taps
    (``3 * hidden`` features) or its own previous output (``hidden``).
    """

    def __init__(self, config) -> None:
        shared = self._init_head(config)
        hidden = config.hidden_size
        self.draft_vocab_size = getattr(config, "draft_vocab_size", None) or config.vocab_size
        if "lm_head" in shared and self.draft_vocab_size != config.vocab_size:
            raise ValueError(
                f"an EAGLE-3 head without lm_head shares the target's, so its draft_vocab_size {self.draft_vocab_size} "
                f"must be the vocab_size {config.vocab_size}"
            )
        target_hidden = getattr(config, "target_hidden_size", None) or hidden
        self.fc = ReplicatedLinear(3 * target_hidden, hidden, bias=bool(getattr(config, "bias", False)))
        self.midlayer = Eagle3DecoderLayer(config)
        self.norm = RMSNorm(hidden, config.rms_norm_eps)
        self.lm_head = None if "lm_head" in shared else ParallelLMHead(self.draft_vocab_size, hidden)
        self.draft_vocab = None
        if self.draft_vocab_size != config.vocab_size:
            self.draft_vocab = DraftVocabulary(self.draft_vocab_size, config.vocab_size)

    @staticmethod
    def shared_with(hf_config, stored: set[str]) -> tuple[str, ...]:
        """What the checkpoint lacks; made-up weights (none stored) keep their own LM head over a draft vocabulary."""
        shared = EagleLlamaForCausalLM.shared_with(hf_config, stored)
        draft_vocab_size = getattr(hf_config, "draft_vocab_size", None) or hf_config.vocab_size
        if not stored and draft_vocab_size != hf_config.vocab_size:
            return tuple(m for m in shared if m != "lm_head")
        return shared

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, hidden_states: torch.Tensor) -> torch.Tensor:
        embed = self.embed_tokens if self.embed_tokens is not None else self._target[0]
        if hidden_states.shape[-1] != self.config.hidden_size:  # the target's taps, not the head's own output
            hidden_states = self.fc(hidden_states)
        return self.midlayer(positions, embed(input_ids), hidden_states)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Scores over the target's vocabulary: ``-inf`` for the tokens outside the draft vocabulary."""
        normed = self.norm(hidden)
        logits = self.lm_head(normed) if self.lm_head is not None else self._target[1](normed)
        return logits if self.draft_vocab is None else self.draft_vocab(logits)

    def checkpoint_target(self, name: str) -> tuple[str, object] | None:
        """EAGLE-3's names; ``t2d`` (the inverse map, as a mask) is not needed, and ``d2t`` only for a reduced vocabulary."""
        bare = name.removeprefix("model.")
        if bare == "t2d" or (bare == "d2t" and self.draft_vocab is None):
            return None
        return ("draft_vocab.d2t", None) if bare == "d2t" else super().checkpoint_target(bare)
