"""A sequence: one completion being generated, and what the scheduler reports about it.

A request with ``n`` completions becomes ``n`` sibling sequences that share
the prompt. A sequence's *known tokens* are its prompt followed by what it has
generated so far. With asynchronous scheduling a step may be planned while
the previous one still runs, so a sequence may also have a *pending* token:
sampled by a plan in flight, not known yet, but already fed to the next plan
(the runner takes it from the device). The KV of all its tokens, known and
pending, but the last is planned (or, mid-prefill, of the first
``num_computed_tokens``).
"""

from __future__ import annotations

import enum
from typing import Literal, Protocol

import attrs

from .plan import TokenLogprobs
from atom_trio.sampling_params import SamplingParams

FinishReason = Literal["stop", "length", "abort"]


class Grammar(Protocol):
    """What the scheduler needs of a sequence's grammar matcher (an xgrammar ``GrammarMatcher`` is one).

    The engine makes one per sequence; the scheduler advances it with each
    token it appends and ends the sequence when it has terminated (accepted
    the stop token after a complete output).
    """

    def accept_token(self, token_id: int) -> bool: ...

    def is_terminated(self) -> bool: ...


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class Sequence:
    """Mutable scheduling state of one sequence (a plain slotted class: the scheduler's hot loop reads it).

    Attributes:
        token_ids: the known tokens, prompt first.
        num_computed_tokens: leading tokens whose KV is in ``block_table``'s
            blocks, or will be once the plans in flight have run: a chunk
            counts from the moment it is planned, because the runner runs
            plans in order, so any later plan finds its KV written.
        num_pending_tokens: tokens sampled by plans in flight whose values
            are not known yet (0, or 1 under asynchronous scheduling).
        block_tables: per KV cache group (one unless the model mixes attention
            kinds, see `BlockManager`), the physical blocks covering at least
            ``num_computed_tokens`` positions; ``block_table`` is the first
            group's. A sliding group's table holds the null block where its
            blocks fell out of the window, the first ``num_released_blocks`` at least.
        block_hashes: chained hashes of the first full blocks of ``token_ids``,
            computed lazily and kept across preemption (they depend on the
            tokens only), so a prompt is hashed once however often it is looked up.
        num_published_blocks: leading blocks of ``block_table`` already offered
            to the prefix cache (or taken from it).
        leader: sibling 0 of an ``n > 1`` request (``None`` for sibling 0 itself);
            the other siblings wait for it to prefill the prompt, then share its blocks.
        num_cached_tokens: prompt tokens served from the prefix cache at the
            first admission (``None`` until admitted).
        finish_token_ids: sampled tokens that may end the sequence (EOS unless
            ``ignore_eos``, and the stop token ids), and ``max_len`` the length
            at which it ends: both precomputed so that `Scheduler.update` checks
            a token with one set lookup and one comparison.
        runner_knows: whether the runner holds this sequence's state (it was sent
            ``prefix_token_ids`` since its admission or last preemption).
        prompt_logprobs: when its parameters ask for them, the prompt tokens'
            logprobs collected so far from the steps' results (one entry per
            prompt position, from 0); ``None`` otherwise.
        grammar: the matcher its output must satisfy (``structured_outputs``),
            advanced with every generated token it has; ``None`` when unconstrained
            and once finished. Kept across preemption: it has matched the
            known tokens, which a recompute keeps.
        draft_token_ids: speculative decoding: the drafts the runner proposed
            for the token after the known ones (empty when none); valid while
            no token is pending, since the last result for the sequence brought them.
        awaits_drafts: its chunk in flight verifies drafts or asks for new ones,
            so it is not planned again before that chunk's result (its length,
            or its next drafts, come with it).
        draft_misses, draft_cooldown: back-off for sequences whose drafts are
            rejected: after ``m`` verify steps in a row that accepted nothing it
            decodes ``2**m`` steps (at most 64) without asking for drafts.
    """

    __slots__ = (
        "seq_id",
        "request_id",
        "index",
        "token_ids",
        "prompt_len",
        "params",
        "stop_token_ids",
        "finish_token_ids",
        "max_len",
        "leader",
        "status",
        "num_computed_tokens",
        "num_pending_tokens",
        "block_tables",
        "num_released_blocks",
        "block_hashes",
        "num_published_blocks",
        "num_cached_tokens",
        "runner_knows",
        "finish_reason",
        "prompt_logprobs",
        "grammar",
        "draft_token_ids",
        "awaits_drafts",
        "draft_misses",
        "draft_cooldown",
    )

    def __init__(
        self,
        *,
        seq_id: int,
        request_id: str,
        index: int,
        prompt_token_ids: list[int],
        params: SamplingParams,
        eos_token_ids: frozenset[int],
        max_model_len: int,
        leader: Sequence | None = None,
        grammar: Grammar | None = None,
    ) -> None:
        self.seq_id = seq_id
        self.request_id = request_id
        self.index = index
        self.token_ids = list(prompt_token_ids)
        self.prompt_len = len(prompt_token_ids)
        self.params = params
        self.stop_token_ids = frozenset(params.stop_token_ids)
        self.finish_token_ids = self.stop_token_ids if params.ignore_eos else self.stop_token_ids | eos_token_ids
        max_len = max_model_len if params.max_tokens is None else self.prompt_len + params.max_tokens
        self.max_len = min(max_len, max_model_len)
        self.leader = leader
        self.status = SequenceStatus.WAITING
        self.num_computed_tokens = 0
        self.num_pending_tokens = 0
        self.block_tables: list[list[int]] = [[]]
        self.num_released_blocks = 0
        self.block_hashes: list[int] = []
        self.num_published_blocks = 0
        self.num_cached_tokens: int | None = None
        self.runner_knows = False
        self.finish_reason: FinishReason | None = None
        self.prompt_logprobs: list[TokenLogprobs | None] | None = None if params.prompt_logprobs is None else []
        self.grammar = grammar
        self.draft_token_ids: list[int] = []
        self.awaits_drafts = False
        self.draft_misses = 0
        self.draft_cooldown = 0

    @property
    def block_table(self) -> list[int]:
        """The first (full attention) group's block table."""
        return self.block_tables[0]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.prompt_len

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.prompt_len :]

    def __repr__(self) -> str:
        return (
            f"Sequence(seq_id={self.seq_id}, request_id={self.request_id!r}, index={self.index}, "
            f"status={self.status.name}, tokens={len(self.token_ids)}, computed={self.num_computed_tokens})"
        )


@attrs.define(kw_only=True)
class SeqOutput:
    """What one step produced for one sequence: its new token and, when it ended, why.

    ``stop_reason`` is the stop token id that ended it (``None`` for EOS,
    ``length`` or abort). ``num_cached_tokens`` counts the prompt tokens that
    were served from the prefix cache when the sequence was first admitted.
    ``prompt_logprobs`` comes once, with the first generated token, when the
    request asked for them: one entry per prompt token (`TokenLogprobs`, the
    first ``None``).
    Not frozen: one is built per running sequence per step, and a frozen attrs
    class takes twice as long to build.
    """

    request_id: str
    index: int
    new_token_ids: list[int]
    logprobs: list[float] | None
    top_logprobs: list[list[tuple[int, float]]] | None
    finish_reason: FinishReason | None
    stop_reason: int | str | None
    num_cached_tokens: int
    prompt_logprobs: list[TokenLogprobs | None] | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None
