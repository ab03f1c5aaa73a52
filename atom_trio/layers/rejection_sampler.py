"""Exact verification of draft tokens (speculative decoding): rejection sampling against the target.

A verify chunk of a sequence runs its last token and ``j`` drafts through the
target in one step, which gives the target's logits at ``j + 1`` positions:
position ``i`` predicts the token after draft ``i`` (draft 0 being the last
real token). Standard speculative sampling accepts draft ``i + 1`` with
probability ``min(1, p(d) / q(d))``, where ``p`` is the target's distribution
at position ``i`` *after every transform the request asked for* and ``q`` the
drafter's; on the first rejection it draws from the normalized residual
``max(0, p - q)`` and stops; when every draft is accepted it draws a bonus
token from the last position's ``p``. The output is then distributed exactly
as the target's own samples.

Draft-model-free drafters (n-gram prompt lookup) propose one token with
certainty: ``q`` is a point mass on ``d``. Then the rule is "accept with
probability ``p(d)``; on rejection draw from ``p`` with ``d`` removed,
renormalized", and that is what drawing ``t ~ p`` and accepting ``d`` iff
``t == d`` does: ``P(t = d) = p(d)``, and given ``t != d``, ``t`` follows the
residual. So each position draws its token with the ordinary `Sampler` (its
transforms, its per-row seeds: a seeded row's draw at output index ``m`` comes
from ``step_seed(seed, m)``, so a request's tokens do not depend on its batch
mates, and are the ones it would sample without speculation), and the run
stops at the first position whose token differs from the draft. Greedy rows
are the same rule with the argmax. A drafter with a real ``q`` (EAGLE, MTP)
will need the general rule here, next to this one.

The rows of one step are laid out chunk by chunk: a sampling chunk with
``j`` drafts has ``j + 1`` rows (a chunk without drafts has one), each with
its own `SampleRequest` whose output tokens include the drafts before it, so
penalties, ``min_tokens`` and seeds see the context that row predicts from.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from atom_trio.core.plan import TokenBitmask

from .sampler import Sampler, SampleRequest


def num_accepted(target_tokens: Sequence[int], draft_token_ids: Sequence[int]) -> int:
    """How many leading drafts equal the target's token at their position (the run stops at the first that does not)."""
    for i, draft in enumerate(draft_token_ids):
        if target_tokens[i] != draft:
            return i
    return len(draft_token_ids)


class RejectionSampler:
    """Draws the target's token at every verified position; `num_accepted` then reads off each run.

    ``sampler`` is the runner's `Sampler`: the same transforms and kernels as
    steps without drafts.
    """

    def __init__(self, sampler: Sampler) -> None:
        self.sampler = sampler

    def sample(
        self,
        logits: torch.Tensor,
        requests: list[SampleRequest],
        draft_token_ids: list[list[int]],
        token_bitmask: TokenBitmask | None = None,
    ) -> tuple[torch.Tensor, list[float | None], list[list[tuple[int, float]] | None]]:
        """One token per row (``sum(len(d) + 1 for d in draft_token_ids)`` rows), and the rows' logprob columns.

        ``token_bitmask`` counts rows by sampling chunk, as in a plan; its
        chunks have no drafts (a sequence with a grammar does not speculate),
        so each is the first row of its chunk here.
        """
        if token_bitmask is not None:
            firsts = first_rows(draft_token_ids)
            token_bitmask = TokenBitmask([firsts[r] for r in token_bitmask.rows], words=token_bitmask.words)
        return self.sampler.sample_on_device(logits, requests, token_bitmask)


def first_rows(draft_token_ids: list[list[int]]) -> list[int]:
    """Each sampling chunk's first row when chunks with ``j`` drafts take ``j + 1`` rows."""
    rows = []
    row = 0
    for drafts in draft_token_ids:
        rows.append(row)
        row += len(drafts) + 1
    return rows
