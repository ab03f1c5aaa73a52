"""Prompt logprobs (``SamplingParams.prompt_logprobs``) from the hidden states of every prompt position of a chunk.

Position ``p`` predicts token ``p + 1``, so a chunk's last position predicts
the first token of the *next* chunk, which the runner does not know yet: its
hidden state is kept until that chunk arrives, which makes a prompt split
over several steps give the values of one step.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch

from atom_trio.core.plan import SeqChunk, TokenLogprobs

# Prompt positions whose logits are materialised at once: bounds the [rows, vocab] float32 temporaries.
_PROMPT_LOGPROBS_ROWS = 512


def wants_prompt_logprobs(chunk: SeqChunk) -> bool:
    params = chunk.sampling_params
    return params is not None and params.prompt_logprobs is not None and chunk.start_pos < chunk.prompt_len


class PromptLogprobs:
    """Computes a step's prompt logprobs column, keeping the hidden state each unfinished prompt's next chunk needs.

    ``compute_logits`` (the model's: hidden states to vocabulary logits) is
    passed with each step, so this keeps no reference to the model.
    """

    def __init__(self, *, vocab_size: int, device: torch.device) -> None:
        self.vocab_size = vocab_size
        self.device = device
        self._tails: dict[int, torch.Tensor] = {}
        """Hidden state of the last position of a prompt-logprobs sequence's previous chunk, by sequence."""

    def column(
        self,
        compute_logits: Callable[[torch.Tensor], torch.Tensor],
        chunks: list[SeqChunk],
        hidden: torch.Tensor,
        ends: list[int],
    ) -> list[list[TokenLogprobs | None] | None]:
        """One entry per chunk: its prompt logprobs, or ``None`` when it does not ask.

        ``hidden`` holds the step's rows; chunk ``i``'s end at ``ends[i]``.
        """
        return [
            self._chunk_logprobs(compute_logits, chunk, hidden[end - len(chunk.token_ids) : end])
            if wants_prompt_logprobs(chunk)
            else None
            for chunk, end in zip(chunks, ends)
        ]

    def forget(self, seq_ids: Iterable[int]) -> None:
        for seq_id in seq_ids:
            self._tails.pop(seq_id, None)

    def clear(self) -> None:
        self._tails.clear()

    def _chunk_logprobs(
        self, compute_logits: Callable[[torch.Tensor], torch.Tensor], chunk: SeqChunk, hidden: torch.Tensor
    ) -> list[TokenLogprobs | None]:
        """Each prompt token of ``chunk`` with its logprob given the tokens before it, and the top alternatives.

        ``hidden`` holds the chunk's rows. The first entry is ``None`` for the
        prompt's first token, and also when the position before the chunk was
        never run through this runner (served from a prefix cache: the
        scheduler does not do that for requests asking for prompt logprobs).
        """
        seq_id, num_top = chunk.seq_id, chunk.sampling_params.prompt_logprobs
        num_prompt = min(chunk.end_pos, chunk.prompt_len) - chunk.start_pos
        tail = self._tails.pop(seq_id, None)
        if chunk.end_pos < chunk.prompt_len:
            self._tails[seq_id] = hidden[-1:].clone()
        if chunk.start_pos > 0 and tail is not None and chunk.prefix_token_ids is None:
            predictors = torch.cat([tail, hidden[: num_prompt - 1]])
            return self._token_logprobs(compute_logits, predictors, chunk.token_ids[:num_prompt], num_top)
        entries: list[TokenLogprobs | None] = [None]
        entries.extend(
            self._token_logprobs(compute_logits, hidden[: num_prompt - 1], chunk.token_ids[1:num_prompt], num_top)
        )
        return entries

    def _token_logprobs(
        self,
        compute_logits: Callable[[torch.Tensor], torch.Tensor],
        hidden: torch.Tensor,
        targets: list[int],
        num_top: int,
    ) -> list[TokenLogprobs]:
        """For each row of ``hidden``: ``targets[i]``'s logprob under it, then the ``num_top`` most likely tokens."""
        entries: list[TokenLogprobs] = []
        num_top = min(num_top, self.vocab_size)
        for lo in range(0, len(targets), _PROMPT_LOGPROBS_ROWS):
            rows = targets[lo : lo + _PROMPT_LOGPROBS_ROWS]
            logprobs = compute_logits(hidden[lo : lo + len(rows)]).float().log_softmax(dim=-1)
            chosen = logprobs.gather(1, torch.tensor(rows, device=self.device).unsqueeze(1)).squeeze(1).tolist()
            if num_top:
                values, indices = logprobs.topk(num_top, dim=-1)
                tops = [list(zip(i, v)) for i, v in zip(indices.tolist(), values.tolist())]
            else:
                tops = [[] for _ in rows]
            entries.extend([(token, logprob), *top] for token, logprob, top in zip(rows, chosen, tops))
        return entries
