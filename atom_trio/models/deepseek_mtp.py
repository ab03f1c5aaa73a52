"""DeepSeek-V3's multi-token-prediction layer as a draft head: it ships inside the target's checkpoint.

The checkpoint's ``num_nextn_predict_layers`` layers sit after the model's
own, as ``model.layers.{num_hidden_layers + i}``: ``enorm`` and ``hnorm``
(RMSNorms), ``eh_proj`` (``[hidden, 2 * hidden]``), a full DeepSeek decoder
layer (latent attention; experts as the layer index makes it), and
``shared_head.norm`` / ``shared_head.head``; some also carry their own
``embed_tokens``. At position ``i`` it reads the target's last hidden state
``h_i`` and the next token ``t``:
``eh_proj(concat[enorm(embed(t)), hnorm(h_i)])`` through the decoder layer,
output plus residual (what the next step feeds back as ``h``), then
``shared_head.norm`` and the head (the target's LM head when the checkpoint
lacks ``shared_head.head``; the target's embedding likewise). As in vLLM,
the embedding at position 0 is zeroed, and the one layer drafts every one
of the ``k`` tokens; a checkpoint with more than one is refused (its later
layers would need their own windows of earlier layers' outputs).
"""

from __future__ import annotations

import re
from collections.abc import Callable

import torch
from torch import nn

from atom_trio.errors import ModelLoadError
from atom_trio.layers import (
    ParallelLMHead,
    ReplicatedLinear,
    RMSNorm,
    VocabParallelEmbedding,
    get_rope,
)

from .deepseek_v2 import DeepseekV3ForCausalLM, check_config
from .eagle import SHAREABLE, shared_modules
from .llama import _head_dim

_MTP_TENSOR = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
_MTP_OWN = ("enorm", "hnorm", "eh_proj", "shared_head", "embed_tokens")
"""The MTP layer's own modules; the checkpoint's other names under its index are its decoder layer's."""


class SharedHead(nn.Module):
    """``shared_head``: the final norm, and the LM head unless the target's is shared."""

    def __init__(self, config, own_head: bool) -> None:
        super().__init__()
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.head = ParallelLMHead(config.vocab_size, config.hidden_size) if own_head else None


class DeepseekMTPLayer(nn.Module):
    """One multi-token-prediction layer: the fusion of embedding and hidden state, a decoder layer, the head."""

    def __init__(self, config, block: nn.Module, shared: tuple[str, ...]) -> None:
        super().__init__()
        hidden = config.hidden_size
        self.enorm = RMSNorm(hidden, config.rms_norm_eps)
        self.hnorm = RMSNorm(hidden, config.rms_norm_eps)
        self.eh_proj = ReplicatedLinear(2 * hidden, hidden, bias=False)
        self.block = block
        self.shared_head = SharedHead(config, own_head="lm_head" not in shared)
        self.embed_tokens = None if "embed_tokens" in shared else VocabParallelEmbedding(config.vocab_size, hidden)

    def forward(self, positions: torch.Tensor, embeds: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        embeds = torch.where(positions.unsqueeze(-1) == 0, 0, embeds)
        fused = self.eh_proj(torch.cat([self.enorm(embeds), self.hnorm(hidden)], dim=-1))
        out, residual = self.block(positions, fused, None)
        return out + residual


class DeepseekMTP(DeepseekV3ForCausalLM):
    """The MTP layer of a DeepSeek-V3 checkpoint, built and loaded as a draft head of that checkpoint's model.

    ``forward(input_ids, positions, hidden_states)`` returns the states the
    next step feeds back; `compute_logits` the vocabulary scores.
    """

    def __init__(self, config) -> None:
        nn.Module.__init__(self)
        check_config(config, self.scoring_func)
        count = getattr(config, "num_nextn_predict_layers", None) or 0
        if count != 1:
            raise ModelLoadError(
                f"method 'mtp' drafts with one multi-token-prediction layer; the model's num_nextn_predict_layers "
                f"is {count}"
            )
        self.config = config
        self.tie_word_embeddings = False
        shared = self.shared_with_target = shared_modules(config)
        rotary_emb = get_rope(config, _head_dim(config), config.max_position_embeddings)
        first = config.num_hidden_layers
        self.layers = nn.ModuleList(
            DeepseekMTPLayer(config, self.decoder_layer(rotary_emb, first + i), shared) for i in range(count)
        )
        self._target: tuple[Callable, Callable] | None = None

    @staticmethod
    def shared_with(hf_config, stored: set[str]) -> tuple[str, ...]:
        """The embedding and LM head the MTP layer takes from the target: those its checkpoint lacks."""
        first = f"model.layers.{hf_config.num_hidden_layers}."
        present = {
            "embed_tokens": f"{first}embed_tokens.weight" in stored,
            "lm_head": f"{first}shared_head.head.weight" in stored,
        }
        return tuple(m for m in SHAREABLE if not present[m])

    def share_target(self, embed_tokens: Callable, compute_logits: Callable) -> None:
        """Take the target's embedding and LM head for what the checkpoint lacks (after loading)."""
        self._target = (embed_tokens, compute_logits)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, hidden_states: torch.Tensor) -> torch.Tensor:
        layer = self.layers[0]
        embed = layer.embed_tokens if layer.embed_tokens is not None else self._target[0]
        return layer(positions, embed(input_ids), hidden_states)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        head = self.layers[0].shared_head
        normed = head.norm(hidden)
        return head.head(normed) if head.head is not None else self._target[1](normed)

    def checkpoint_target(self, name: str) -> tuple[str, object] | None:
        """``model.layers.{num_hidden_layers + i}.*`` into ``layers.i``; the target's own tensors are skipped."""
        match = _MTP_TENSOR.match(name)
        index = int(match.group(1)) - self.config.num_hidden_layers if match else -1
        if not 0 <= index < len(self.layers):
            return None
        rest = match.group(2)
        if rest.split(".")[0] not in _MTP_OWN:
            rest = f"block.{rest}"
        return super().checkpoint_target(f"layers.{index}.{rest}")  # packed and expert tensors as the target maps them
