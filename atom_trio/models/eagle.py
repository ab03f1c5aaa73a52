"""EAGLE draft heads for Llama-family targets (speculative decoding), in the layout EAGLE publishes.

An EAGLE head (e.g. ``yuhuili/EAGLE-LLaMA3.1-Instruct-8B``) predicts the
target's next token from the target's own last hidden state: at position
``i`` it reads ``fc(concat[embed(token i+1), h_i])`` through one Llama decoder
layer whose input norm is left out, and its output ``hidden + residual`` goes
through the target's LM head (no final norm). Its next autoregressive step
feeds that output back as ``h``. Checkpoint names have no ``model.`` prefix
(``fc.weight``, ``layers.0.self_attn.q_proj.weight``); a head that lacks
``embed_tokens`` or ``lm_head`` shares the target's, which the drafter attaches
with `share_target` after loading (``config.shared_with_target`` names them).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from atom_trio.errors import ModelLoadError
from atom_trio.layers import ParallelLMHead, ReplicatedLinear, VocabParallelEmbedding, get_rope

from .llama import LlamaAttention, LlamaDecoderLayer, LlamaForCausalLM, LlamaMLP, _head_dim

SHAREABLE = ("embed_tokens", "lm_head")
"""The modules a draft head may take from its target instead of its checkpoint."""


def shared_modules(config) -> tuple[str, ...]:
    """``config.shared_with_target`` (all of `SHAREABLE` when unset), checked.

    Raises:
        ModelLoadError: it names a module no head can take from its target.
    """
    shared = tuple(getattr(config, "shared_with_target", SHAREABLE))
    if unknown := set(shared) - set(SHAREABLE):
        raise ModelLoadError(f"draft head: cannot share {sorted(unknown)} with the target (only {SHAREABLE})")
    return shared


class EagleLlamaForCausalLM(LlamaForCausalLM):
    """EAGLE-1 head: ``fc`` over [embedding, target hidden state], ``num_hidden_layers`` Llama layers, shared LM head.

    ``forward(input_ids, positions, hidden_states)`` returns the head's hidden
    states (what the next step feeds back), `compute_logits` the vocabulary scores.
    """

    def __init__(self, config) -> None:
        shared = self._init_head(config)
        hidden = config.hidden_size
        self.fc = ReplicatedLinear(2 * hidden, hidden, bias=bool(getattr(config, "bias", False)))
        rotary_emb = get_rope(config, _head_dim(config), config.max_position_embeddings)
        self.layers = nn.ModuleList(
            LlamaDecoderLayer(config, LlamaAttention(config, rotary_emb), LlamaMLP(config))
            for _ in range(config.num_hidden_layers)
        )
        self.layers[0].input_layernorm = None  # EAGLE's first layer attends to the fused features as they are
        self.lm_head = None if "lm_head" in shared else ParallelLMHead(config.vocab_size, hidden)

    def _init_head(self, config) -> tuple[str, ...]:
        """What every EAGLE head sets up first: its config, its embedding unless shared; returns what is shared."""
        nn.Module.__init__(self)
        self.config = config
        self.tie_word_embeddings = False
        shared = self.shared_with_target = shared_modules(config)
        self.embed_tokens = None
        if "embed_tokens" not in shared:
            self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size)
        # The target's, where shared: a plain tuple, so that they stay out of this module's parameters.
        self._target: tuple[Callable, Callable] | None = None
        return shared

    @staticmethod
    def shared_with(hf_config, stored: set[str]) -> tuple[str, ...]:
        """What the head takes from the target, given its checkpoint's tensor names: what it lacks."""
        present = {name.removeprefix("model.").split(".")[0] for name in stored}
        return tuple(m for m in SHAREABLE if m not in present)

    def share_target(self, embed_tokens: Callable, compute_logits: Callable) -> None:
        """Take the target's embedding and logits for what the checkpoint lacks (after the head's own weights load)."""
        self._target = (embed_tokens, compute_logits)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, hidden_states: torch.Tensor) -> torch.Tensor:
        embed = self.embed_tokens if self.embed_tokens is not None else self._target[0]
        hidden = self.fc(torch.cat([embed(input_ids), hidden_states], dim=-1))
        residual = None
        for layer in self.layers:
            hidden, residual = layer(positions, hidden, residual)
        return hidden + residual

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden) if self.lm_head is not None else self._target[1](hidden)

    def checkpoint_target(self, name: str) -> tuple[str, object] | None:
        """EAGLE's names, or the same under ``model.`` (as some conversions write them)."""
        return super().checkpoint_target(name.removeprefix("model."))
