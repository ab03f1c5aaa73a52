"""The step plan: what the scheduler asks the model runner to compute in one step.

One batch layout everywhere: a plan is a list of chunks, one per scheduled
sequence. A chunk is a run of new tokens of one sequence (a whole prompt, a
piece of a long prompt, the single last-sampled token of a decode, or that
token followed by draft tokens to verify), the position of its first token,
and the block table covering every position up to the chunk's end. Prefill
chunks, decode tokens and verify chunks mix freely in one plan.

These are plain attrs classes without torch so that the scheduler can build
them cheaply and the process executor can send them over a socket (cattrs +
msgpack).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import attrs

from atom_trio.sampling_params import SamplingParams

if TYPE_CHECKING:
    import numpy as np

PREVIOUS_TOKEN = -1
"""The token id of a decode chunk whose token is the one its sequence sampled in the previous plan.

Asynchronous scheduling plans step N+1 while step N runs, before N's tokens
are known; the runner feeds each such chunk the token it sampled for that
sequence in N, straight from the device."""


@attrs.define
class SeqChunk:
    """New tokens of one sequence to run through the model this step.

    Read-only by convention, but not ``frozen``: a plan holds one chunk per
    running sequence, and a frozen attrs class sets each field through
    ``object.__setattr__``, which makes a chunk several times as costly to build
    as this one built positionally. At 256 sequences that was most
    of the process executor's per-step budget, since the worker rebuilds
    every chunk from the wire (with ``map(SeqChunk, *columns)``, hence
    positional fields too; the scheduler passes them by name).

    Attributes:
        seq_id: the scheduler's id of the sequence (unique while it lives).
        token_ids: the tokens whose KV this step computes and stores; a
            decode chunk's may be ``[PREVIOUS_TOKEN]``.
        start_pos: position of ``token_ids[0]``; positions below it are
            already in the KV cache (computed earlier or found in the prefix cache).
        block_table: physical KV blocks covering positions ``[0, start_pos + len(token_ids))``.
        prompt_len: the prompt's length; tokens at or past it are generated
            (frequency and presence penalties count only those).
        sample: whether to sample a next token after this chunk; False for a
            prefill chunk that is not the prompt's last.
        sampling_params: how to sample (``None`` only when ``sample`` is False);
            a prefill chunk of a request that asks for prompt logprobs carries
            it even when not sampling, since it says how many alternatives to compute.
        prefix_token_ids: tokens ``[0, start_pos)``, sent the first time the
            runner sees this sequence (after admission or preemption) so that
            it can keep the token history the penalties need; ``None`` after.
        num_draft_tokens: speculative decoding: the last ``num_draft_tokens``
            of ``token_ids`` are drafts to verify. The runner samples at each of
            the chunk's last ``num_draft_tokens + 1`` positions and returns the
            accepted drafts and one token more; the KV of rejected drafts is
            garbage that the next chunk overwrites (its ``start_pos`` rolls back).
        propose_drafts: after sampling, the runner proposes drafts for the
            sequence's next step (`StepResult.draft_token_ids`).
    """

    seq_id: int
    token_ids: list[int]
    start_pos: int
    block_table: list[int]
    prompt_len: int
    sample: bool
    sampling_params: SamplingParams | None = None
    prefix_token_ids: list[int] | None = None
    num_draft_tokens: int = 0
    propose_drafts: bool = False

    @property
    def end_pos(self) -> int:
        """The position after this chunk's last token: the KV length once it has run."""
        return self.start_pos + len(self.token_ids)

    def next_decode(self, token_id: int) -> SeqChunk:
        """The decode chunk that feeds ``token_id``, sampled after this chunk, back in.

        For drivers that step a runner without the scheduler (tests, benchmarks);
        the block table must already cover the new position.
        """
        return attrs.evolve(
            self, token_ids=[token_id], start_pos=self.end_pos, sample=True, prefix_token_ids=None, num_draft_tokens=0
        )


@attrs.define(eq=False)
class TokenBitmask:
    """Which tokens the plan's grammar-constrained rows may sample, in xgrammar's layout.

    ``rows`` are positions among the plan's sampling chunks (ascending); only
    those rows are masked, the others sample as if there were no mask.
    ``words`` is an int32 array ``[len(rows), ceil(vocab / 32)]``: bit ``b``
    of word ``w`` allows token ``32 * w + b``. The scheduler makes this with
    the rows and their ``grammars`` (the engine's matchers, never sent); the
    engine fills ``words`` between `Scheduler.schedule` and the launch,
    since filling takes the grammar engine, which the core does not import.
    """

    rows: list[int]
    grammars: list[Any] = attrs.Factory(list)
    words: np.ndarray | None = None


@attrs.frozen(kw_only=True)
class StepPlan:
    """One step: chunks to compute, and sequences whose runner state can be dropped.

    The runner drops that state before it reads the chunks: a sequence
    preempted while an earlier plan was in flight may be in both, restarted
    by a chunk that carries its ``prefix_token_ids``. ``token_bitmask`` is
    present only when some sampling chunk follows a grammar, so a plan
    without one costs nothing more to build or send.
    """

    step_id: int
    chunks: list[SeqChunk]
    finished_seq_ids: list[int] = attrs.field(factory=list)
    token_bitmask: TokenBitmask | None = None

    @property
    def num_tokens(self) -> int:
        return sum(len(c.token_ids) for c in self.chunks)


TokenLogprobs = list[tuple[int, float]]
"""One prompt token's ``(token_id, logprob)`` pairs: the token itself first, then the
requested number of alternatives, most likely first (the token may appear twice)."""


@attrs.frozen(kw_only=True)
class StepResult:
    """What the runner sampled, one entry per chunk with ``sample=True``, in plan order.

    Columnar so that it stays cheap to build and to send for large batches.
    ``logprobs[i]`` is the sampled token's logprob and ``top_logprobs[i]`` the
    requested number of ``(token_id, logprob)`` alternatives, most likely
    first; both are ``None`` for a chunk whose request did not ask.

    Speculative decoding: ``num_tokens`` is ``None`` when every sampling chunk
    gave one token; otherwise it holds how many each gave (a verify chunk's
    accepted drafts and one more), and ``token_ids``, ``logprobs`` and
    ``top_logprobs`` list those tokens back to back. ``draft_token_ids``, one
    entry per sampling chunk, holds the drafts proposed for the sequence's
    next step (empty where none); ``None`` when no chunk asked
    (`SeqChunk.propose_drafts`).

    ``prompt_logprobs`` is ``None`` unless some chunk's request asks for
    prompt logprobs; then it has one entry per chunk (sampled or not) in plan
    order: ``None`` for a chunk that did not ask or holds no prompt token,
    else one `TokenLogprobs` per prompt token of the chunk, each given the
    tokens before it (``None`` for the prompt's first token, which has none).
    """

    step_id: int
    token_ids: list[int]
    logprobs: list[float | None]
    top_logprobs: list[list[tuple[int, float]] | None]
    prompt_logprobs: list[list[TokenLogprobs | None] | None] | None = None
    num_tokens: list[int] | None = None
    draft_token_ids: list[list[int]] | None = None
