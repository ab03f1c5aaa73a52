"""What a drafter sees and answers: the interface between the runner and every drafting method."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Protocol

import attrs
import torch

from atom_trio.layers.sampler import SampleRequest
from atom_trio.sampling_params import SamplingParams


@attrs.frozen
class DraftRequest:
    """One sequence asking for drafts, after the step that produced its newest tokens.

    ``hidden_states``: the target's last hidden states (what its LM head reads) at
    the positions just before the context's last ``len(hidden_states)`` tokens,
    i.e. the rows that predicted them; None for drafters that read none
    (``hidden_window`` 0). Position ``i``'s row predicted token ``i + 1``.
    """

    seq_id: int
    context: list[int]
    """The sequence's tokens so far, prompt first, the ones just produced last."""
    prompt_len: int
    params: SamplingParams
    hidden_states: torch.Tensor | None = None

    @property
    def sample_request(self) -> SampleRequest:
        """As the sampler sees the row that would draw the first draft (its output index is the draft's)."""
        return SampleRequest(self.params, self.context[: self.prompt_len], self.context[self.prompt_len :])


@attrs.frozen
class Proposal:
    """Per request: up to ``num_speculative_tokens`` drafts, and the distribution ``q`` each was drawn from.

    ``draft_probs[i]`` is ``[len(token_ids[i]), vocab]`` on the device, or
    None where the drafts are point masses (n-gram lookup, greedy rows).
    """

    token_ids: list[list[int]]
    draft_probs: list[torch.Tensor | None]


class Drafter(Protocol):
    """Proposes draft tokens for sequences; the target verifies them (`atom_trio.layers.rejection_sampler`)."""

    hidden_window: int
    """How many of the target's last hidden states per sequence it reads (0: none, the runner keeps none)."""

    def propose(self, requests: Sequence[DraftRequest]) -> Proposal:
        """Drafts for each request (maybe none)."""
        ...

    def forget(self, seq_ids: Iterable[int]) -> None:
        """Drop what is kept for finished sequences."""
        ...


def hidden_rows(chunks: Sequence, cu_query_lens: Sequence[int], window: int) -> tuple[list[int], list[int]]:
    """The rows of a step's flat batch whose hidden states a drafter reads, and how many each sampling chunk has.

    The last ``window`` rows of each sampling chunk that asks for drafts (none
    of the others): a verify chunk's are the positions it verified, of which
    the runner passes on those of the accepted tokens.
    """
    rows: list[int] = []
    counts: list[int] = []
    for chunk, start, end in zip(chunks, cu_query_lens, cu_query_lens[1:]):
        if chunk.sample:
            count = min(window, end - start) if chunk.propose_drafts else 0
            rows.extend(range(end - count, end))
            counts.append(count)
    return rows, counts
