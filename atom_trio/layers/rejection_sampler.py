"""Exact verification of draft tokens (speculative decoding): rejection sampling against the target.

A verify chunk of a sequence runs its last token and ``j`` drafts through the
target in one step, which gives the target's logits at ``j + 1`` positions:
position ``i`` predicts the token after draft ``i`` (draft 0 being the last
real token). Standard speculative sampling accepts draft ``i + 1`` with
probability ``min(1, p(d) / q(d))``, where ``p`` is the target's distribution
at position ``i`` *after every transform the request asked for* (the
`Sampler`'s own: min_tokens, logit_bias, penalties, temperature, min-p, top-k,
top-p) and ``q`` the drafter's; on the first rejection it draws from the
normalized residual ``max(0, p - q)`` and stops; when every draft is accepted
it draws a bonus token from the last position's ``p``. The output is then
distributed exactly as the target's own samples.

Two ways to run that rule, one per kind of drafter, chosen per chunk:

- **Point-mass drafts** (n-gram prompt lookup: ``q`` is one-hot on ``d``).
  The rule is "accept with probability ``p(d)``; on rejection draw from ``p``
  with ``d`` removed, renormalized", and drawing ``t ~ p`` with the ordinary
  `Sampler` and accepting iff ``t == d`` does exactly that: ``P(t = d) =
  p(d)``, and given ``t != d``, ``t`` follows the residual. Each row then
  draws what it would draw without speculation (same transforms, same seeded
  stream ``step_seed(seed, m)`` at output index ``m``), so a seeded request's
  tokens equal the plain engine's.
- **Drafts with a distribution** (EAGLE, MTP: the chunk comes with ``q``,
  one row per draft). The rule is applied literally, batched over every such
  row: ``u * q(d) < p(d)`` with a uniform ``u``, else the exponential race
  ``argmax(residual / Exp(1))`` over the residual (with ``d`` removed: a
  rejection means ``p(d) < q(d)``, so it has no residual mass anyway, and
  the host reads a rejection as "the token differs from the draft"). A one-hot
  ``q`` would give the same distribution as the path above; it is kept apart
  only so that n-gram rows keep the plain engine's exact tokens.

Greedy rows take the argmax of the processed logits in both cases: a draft is
accepted while it equals it.

The noise of the literal rule comes from a counter-based generator
(`counter_uniform`: SplitMix64 of a row key and the column), computed by
tensor ops on the device for all rows at once. A seeded row's key is
``step_seed(seed ^ salt, m)``: its draws depend on its seed and output index
only, never on its batch mates or its place among them; an unseeded row's
key comes from the device's default generator.

The rows of one step are laid out chunk by chunk: a sampling chunk with
``j`` drafts has ``j + 1`` rows (a chunk without drafts has one), each with
its own `SampleRequest` whose output tokens include the drafts before it, so
penalties, ``min_tokens`` and seeds see the context that row predicts from.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from atom_trio._device import host_to_device
from atom_trio.core.plan import TokenBitmask

from .sampler import Sampler, SampleRequest, step_seed

_MASK64 = (1 << 64) - 1

#: Salts that keep the verifier's and a drafter's streams of one output index apart.
VERIFY_SALT = 0x5EC0_DEC0_DE00_0001
DRAFT_SALT = 0x5EC0_DEC0_DE00_0002


def _signed(value: int) -> int:
    """A 64-bit pattern as the int64 a tensor holds."""
    value &= _MASK64
    return value - (1 << 64) if value >= 1 << 63 else value


def _shift_right(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Logical right shift of int64 bit patterns (torch's ``>>`` is arithmetic)."""
    return (x >> bits) & ((1 << (64 - bits)) - 1)


def counter_uniform(keys: torch.Tensor, width: int) -> torch.Tensor:
    """Uniforms in (0, 1), ``[len(keys), width]`` float32: column ``c`` of row ``r`` is SplitMix64(keys[r], c).

    Pure tensor arithmetic (int64 products wrap on every device), so a row's
    numbers are a function of its key alone, identical on the CPU and the GPU.
    """
    columns = torch.arange(1, width + 1, dtype=torch.int64, device=keys.device)
    z = keys.unsqueeze(1) + columns * _signed(0x9E3779B97F4A7C15)
    z = (z ^ _shift_right(z, 30)) * _signed(0xBF58476D1CE4E5B9)
    z = (z ^ _shift_right(z, 27)) * _signed(0x94D049BB133111EB)
    z = z ^ _shift_right(z, 31)
    return (_shift_right(z, 40).float() + 0.5) * 2.0**-24


def row_keys(
    requests: Sequence[SampleRequest], salt: int, device: torch.device, offsets: Sequence[int] | None = None
) -> torch.Tensor:
    """One int64 generator key per row: from (seed, output index + offset) for seeded rows, random otherwise."""
    offsets = offsets if offsets is not None else [0] * len(requests)
    seeded = [r.params.seed is not None for r in requests]
    keys = host_to_device(
        torch.tensor(
            [
                _signed(step_seed(r.params.seed ^ salt, len(r.output_token_ids) + offset)) if s else 0
                for r, s, offset in zip(requests, seeded, offsets)
            ],
            dtype=torch.int64,
        ),
        device,
    )
    if all(seeded):
        return keys
    drawn = torch.empty_like(keys).random_()
    if not any(seeded):
        return drawn
    return torch.where(host_to_device(torch.tensor(seeded), device), keys, drawn)


def exponential_race(weights: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """``argmax(weights / Exp(1))`` per row: index ``i`` with probability ``weights[i] / weights.sum()``."""
    return (weights / -torch.log(uniforms)).argmax(dim=-1)


def num_accepted(target_tokens: Sequence[int], draft_token_ids: Sequence[int]) -> int:
    """How many leading drafts equal the target's token at their position (the run stops at the first that does not)."""
    for i, draft in enumerate(draft_token_ids):
        if target_tokens[i] != draft:
            return i
    return len(draft_token_ids)


class RejectionSampler:
    """The target's token at every verified position; `num_accepted` then reads off each run.

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
        draft_probs: Sequence[torch.Tensor | None] | None = None,
    ) -> tuple[torch.Tensor, list[float | None], list[list[tuple[int, float]] | None]]:
        """One token per row (``sum(len(d) + 1 for d in draft_token_ids)`` rows), and the rows' logprob columns.

        ``draft_probs``: per chunk, the drafter's ``q`` of its drafts (``[j', vocab]``
        with ``j' >= j``, on the logits' device), or None for point-mass drafts.
        ``token_bitmask`` counts rows by sampling chunk, as in a plan; its
        chunks have no drafts (a sequence with a grammar does not speculate),
        so each is the first row of its chunk here. Logprobs are the target's,
        of the tokens returned.
        """
        if token_bitmask is not None:
            firsts = first_rows(draft_token_ids)
            token_bitmask = TokenBitmask([firsts[r] for r in token_bitmask.rows], words=token_bitmask.words)
        logits, processed, tokens = self.sampler.draw(logits, requests, token_bitmask)
        if draft_probs is not None and any(q is not None for q in draft_probs):
            self._verify(processed, tokens, requests, draft_token_ids, draft_probs)
        logprobs, top_logprobs = self.sampler.token_logprobs(logits, tokens, requests)
        return tokens, logprobs, top_logprobs

    def _verify(
        self,
        processed: torch.Tensor,
        tokens: torch.Tensor,
        requests: list[SampleRequest],
        draft_token_ids: list[list[int]],
        draft_probs: Sequence[torch.Tensor | None],
    ) -> None:
        """The literal rule for the sampled rows of chunks with a ``q``: their tokens in ``tokens`` are replaced."""
        rows: list[int] = []
        drafts: list[int] = []
        q_rows: list[torch.Tensor] = []
        for first, chunk_drafts, q in zip(first_rows(draft_token_ids), draft_token_ids, draft_probs):
            # A chunk's rows share one request's parameters: greedy rows keep the argmax the sampler took.
            if q is None or not chunk_drafts or requests[first].params.greedy:
                continue
            q_rows.append(q[: len(chunk_drafts)])
            rows.extend(range(first, first + len(chunk_drafts)))
            drafts.extend(chunk_drafts)
        if not rows:
            return
        device = processed.device
        index = host_to_device(torch.tensor(rows, dtype=torch.long), device)
        draft = host_to_device(torch.tensor(drafts, dtype=torch.long), device).unsqueeze(1)
        selected = [requests[r] for r in rows]
        p = self.sampler.probs(processed.index_select(0, index), [r.params for r in selected])
        q = torch.cat(q_rows).to(p.dtype)
        uniforms = counter_uniform(row_keys(selected, VERIFY_SALT, device), p.shape[1] + 1)
        accept = self.accepts(uniforms[:, 0], p.gather(1, draft).squeeze(1), q.gather(1, draft).squeeze(1))
        residual = (p - q).clamp_min_(0.0).scatter_(1, draft, 0.0)
        # p == q up to rounding leaves no residual: then p without the draft (a rejection is all but impossible there).
        empty = residual.sum(dim=-1, keepdim=True) <= 0
        residual = torch.where(empty, p.scatter(1, draft, 0.0), residual)
        resampled = exponential_race(residual, uniforms[:, 1:])
        tokens[index] = torch.where(accept, draft.squeeze(1), resampled)

    @staticmethod
    def accepts(uniform: torch.Tensor, p_draft: torch.Tensor, q_draft: torch.Tensor) -> torch.Tensor:
        """Accept with probability ``min(1, p(d) / q(d))``: ``u < p / q`` without the division."""
        return uniform * q_draft < p_draft


def first_rows(draft_token_ids: list[list[int]]) -> list[int]:
    """Each sampling chunk's first row when chunks with ``j`` drafts take ``j + 1`` rows."""
    rows = []
    row = 0
    for drafts in draft_token_ids:
        rows.append(row)
        row += len(drafts) + 1
    return rows
