"""Token embedding and LM head, split by vocabulary across tensor-parallel ranks.

Rank ``r`` holds rows ``[r * n, (r + 1) * n)`` of the ``[vocab, hidden]``
matrix, ``n = ceil(vocab / size)``; the last rank's rows past the vocabulary
are zero padding. The embedding looks up the ids in its range and an
all-reduce fills in the rest; the LM head's per-rank logits are all-gathered,
so every rank (rank 0 samples) sees the whole vocabulary.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from atom_trio.distributed import current_tp_group
from atom_trio.ops import current_backend

from .linear import cpu_linear, pack_cpu_weight


class VocabParallelEmbedding(nn.Module):
    def __init__(self, vocab_size: int, hidden_size: int) -> None:
        super().__init__()
        self.tp = current_tp_group()
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_embeddings = -(-vocab_size // self.tp.size)  # this rank's rows
        self.vocab_start = self.tp.rank * self.num_embeddings
        self.weight = nn.Parameter(torch.empty(self.num_embeddings, hidden_size), requires_grad=False)
        self.weight.weight_loader = self.weight_loader

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: object = None) -> None:
        if tuple(loaded.shape) != (self.vocab_size, self.hidden_size):
            raise ValueError(
                f"checkpoint tensor of shape {tuple(loaded.shape)} does not fit parameter "
                f"{(self.vocab_size, self.hidden_size)}"
            )
        rows = loaded[self.vocab_start : self.vocab_start + self.num_embeddings]
        param.data[: len(rows)].copy_(rows)
        param.data[len(rows) :].zero_()

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.tp.size == 1:
            return F.embedding(input_ids, self.weight)
        local = input_ids - self.vocab_start
        elsewhere = (local < 0) | (local >= self.num_embeddings)
        hidden = F.embedding(local.masked_fill(elsewhere, 0), self.weight)
        hidden.masked_fill_(elsewhere.unsqueeze(-1), 0.0)
        return self.tp.all_reduce(hidden)


class ParallelLMHead(VocabParallelEmbedding):
    """Hidden states to vocabulary logits; `tie_to` shares the embedding's matrix (split the same way)."""

    packed_weight: torch.Tensor | None = None

    def __init__(self, vocab_size: int, hidden_size: int) -> None:
        super().__init__(vocab_size, hidden_size)
        self.ops = current_backend()

    def tie_to(self, embedding: VocabParallelEmbedding) -> None:
        self.weight = embedding.weight

    def process_weights_after_loading(self) -> None:
        """Pack the matrix for CPU matmuls (`pack_cpu_weight`); the dense one stays, a tied embedding reads it."""
        if self.packed_weight is None:
            self.packed_weight = pack_cpu_weight(self.weight)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.packed_weight is not None:
            logits = cpu_linear(hidden, self.packed_weight, None)
        else:
            logits = self.ops.linear(hidden, self.weight)
        if self.tp.size == 1:
            return logits
        return self.tp.all_gather(logits, dim=-1)[..., : self.vocab_size]
