"""N-gram prompt lookup: drafts copied from earlier in the sequence, no draft model."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np

from .base import DraftRequest, Proposal


class NgramDrafter:
    """Prompt lookup: the tokens that followed the latest earlier occurrence of the context's last ``n`` tokens.

    The longest match wins, ``n`` from ``max_n`` down to ``min_n`` (the most
    recent occurrence among equally long ones). Candidates are the earlier
    positions of the last token, extended backwards one token at a time, so
    a search costs one pass over the context plus a few per candidate.
    """

    hidden_window = 0

    def __init__(self, num_tokens: int, min_n: int, max_n: int) -> None:
        self.num_tokens = num_tokens
        self.min_n = min_n
        self.max_n = max_n

    def propose(self, requests: Sequence[DraftRequest]) -> Proposal:
        """Point-mass drafts: the verifier accepts each with the target's probability of it."""
        return Proposal([self.propose_one(r.context) for r in requests], [None] * len(requests))

    def forget(self, seq_ids: Iterable[int]) -> None:
        """Nothing is kept between steps."""

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
