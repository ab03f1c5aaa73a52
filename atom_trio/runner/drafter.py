"""Drafters for speculative decoding: what proposes the tokens the target then verifies.

A drafter sees, for each sequence that asks (`SeqChunk.propose_drafts`),
its tokens so far, including the ones just sampled, and proposes up to
``num_speculative_tokens`` tokens to follow them. The runner calls it once
per step, after reading the sampled tokens, and sends the drafts back with
the step's result; the scheduler plans them as the sequence's next verify
chunk. Drafters that need the target's hidden states (EAGLE, MTP) take the
same place with more inputs.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import numpy as np

from atom_trio.config import SpeculativeConfig


class Drafter(Protocol):
    """Proposes draft tokens for sequences from their tokens so far."""

    def propose(self, contexts: Sequence[Sequence[int]]) -> list[list[int]]:
        """For each context (a sequence's tokens, prompt first), up to ``num_speculative_tokens`` drafts (maybe none)."""
        ...


class NgramDrafter:
    """Prompt lookup: the tokens that followed the latest earlier occurrence of the context's last ``n`` tokens.

    The longest match wins, ``n`` from ``max_n`` down to ``min_n`` (the most
    recent occurrence among equally long ones). Candidates are the earlier
    positions of the last token, extended backwards one token at a time, so
    a search costs one pass over the context plus a few per candidate.
    """

    def __init__(self, num_tokens: int, min_n: int, max_n: int) -> None:
        self.num_tokens = num_tokens
        self.min_n = min_n
        self.max_n = max_n

    def propose(self, contexts: Sequence[Sequence[int]]) -> list[list[int]]:
        return [self.propose_one(context) for context in contexts]

    def propose_one(self, context: Sequence[int]) -> list[int]:
        tokens = np.asarray(context, dtype=np.int64)
        max_n = min(self.max_n, len(tokens) - 1)
        if max_n < self.min_n:
            return []
        ends = np.flatnonzero(tokens[:-1] == tokens[-1])  # where an earlier match would end
        if not len(ends):
            return []
        lengths = np.ones(len(ends), dtype=np.int64)
        for back in range(1, max_n):
            earlier = ends - back
            extends = (lengths == back) & (earlier >= 0) & (tokens[np.maximum(earlier, 0)] == tokens[-1 - back])
            if not extends.any():
                break
            lengths += extends
        best = int(lengths.max())
        if best < self.min_n:
            return []
        end = int(ends[np.flatnonzero(lengths == best)[-1]])
        return tokens[end + 1 : end + 1 + self.num_tokens].tolist()


def make_drafter(config: SpeculativeConfig) -> Drafter:
    """The drafter of ``config.method`` (only ``ngram`` in this build; the config refuses the others)."""
    if config.method != "ngram":
        raise ValueError(f"no drafter for speculative method {config.method!r}")
    return NgramDrafter(config.num_speculative_tokens, config.prompt_lookup_min, config.prompt_lookup_max)
