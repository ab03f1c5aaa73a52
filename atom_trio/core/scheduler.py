"""Continuous batching: which tokens of which sequences run in the next step.

Every step mixes, within ``max_num_batched_tokens`` tokens and
``max_num_seqs`` running sequences:

1. one decode token for each running sequence whose known tokens are all
   computed but the last (oldest first);
2. the next chunk of each running sequence still prefilling (a long prompt
   is prefilled over several steps);
3. the first chunk of waiting sequences, first come first served, starting
   after the longest prefix found in the prefix cache.

When blocks run out, the newest running sequence not yet scheduled in this
step is preempted by recompute: its blocks are freed (its full blocks stay in
the prefix cache, so it often finds them again) and it goes back to the front
of the waiting queue; once re-admitted it prefills its known tokens (prompt
and what it generated so far) again and goes on where it stopped. No new
sequence is admitted in a step that preempted.

A request with ``n > 1`` becomes ``n`` siblings. Sibling 0 prefills the
prompt; the others wait for it and then share its full prompt blocks (through
the prefix cache, or directly when caching is off). The partial last block of
the prompt is never shared: each sibling recomputes those few tokens into a
block of its own, which is copy-on-write done by recompute (the plan has no
block-copy operation, and each sibling needs its own logits for the prompt's
last token anyway). With a ``seed``, sibling ``i`` samples with ``seed + i``,
so siblings differ and the request stays reproducible.

`update` appends the sampled tokens, publishes newly computed full blocks to
the prefix cache, and ends sequences on EOS (unless ``ignore_eos``), a stop
token id, ``max_tokens`` or the context length; EOS and stop token ids do not
end a sequence before ``min_tokens``.

Asynchronous scheduling: `schedule` may plan the next step while
``max_in_flight`` - 1 earlier plans still run (the engine uses two, so that the
host plans step N+1 while the device computes step N). A chunk counts as
computed as soon as it is planned, since the runner runs plans in order. A
sequence whose token is still being sampled gets a decode chunk carrying
`PREVIOUS_TOKEN`, which the runner replaces with that token on the device;
one that will reach ``max_tokens`` with it gets none. When the token turns
out to end the sequence (EOS, a stop string), the next plan has already run
one wasted decode for it: `update` drops that chunk's result, and the blocks
freed meanwhile are only reused by plans that run after it.

A sequence with a grammar (``structured_outputs``) carries its matcher:
`update` advances it with each sampled token and ends the sequence with
"stop" once it has terminated (it accepted the stop token of a complete
output; the scheduler's own stop checks come after, so ``max_tokens`` still
ends an incomplete one with "length"). A plan whose sampling chunks include
such sequences carries a `TokenBitmask` naming those rows and their
matchers, for the engine to fill. Under asynchronous scheduling such a
sequence is never planned while its previous token is still being sampled:
its mask depends on that token. It then decodes every other step while
unconstrained batch mates keep the pipeline full; the alternative, pausing
the pipeline while any constrained row runs, would slow every request in
the batch by the host's share of a step, and the engine's rule is that
requests which do not use a grammar must not pay for it. Alone (or with
only constrained mates) a constrained sequence decodes every step, as
without asynchronous scheduling. A token the matcher rejects (only possible
when ``min_tokens`` forbids the stop token that the grammar requires) ends
the sequence with "abort": its output is not a complete match.

Speculative decoding (``num_speculative_tokens`` > 0): a sampling chunk may
ask the runner for drafts (`SeqChunk.propose_drafts`); they come back with
the step's result, and the sequence's next step is a verify chunk: its last
token and the drafts (as many as the token budget, ``max_tokens`` and the KV
blocks allow), k + 1 positions whose KV slots are reserved like any others.
The result brings the accepted drafts and one token more; the rejected
positions are rolled back by length (``num_computed_tokens``, the block table
shrunk to what the kept tokens use), and only then are full blocks published,
so the prefix cache holds accepted tokens only. EOS, stop tokens,
``max_tokens`` and grammars end a sequence inside an accepted run, dropping
what follows. A sequence whose chunk in flight verifies or asks for drafts
is not planned again before that result comes (its length or its drafts come
with it), so under asynchronous scheduling a speculating sequence steps every
other plan while its batch mates keep the pipeline full. A sequence whose
drafts keep being rejected backs off: after ``m`` verify steps in a row that
accepted nothing it decodes ``2**m`` steps (at most 64) without asking for
drafts. Sequences with a grammar do not speculate.

A request asking for prompt logprobs gets them from sibling 0 alone (they are
the same for every sibling). That sequence never takes prompt tokens from the
prefix cache, as in vLLM: a cached position is not run through the model, so
it would have no logprobs. Its chunks carry the sampling parameters even when
not sampling, so that the runner knows to compute them; `update` collects them
and hands the whole list over with the first generated token.
"""

from __future__ import annotations

import itertools
import logging
from collections import deque
from collections.abc import Callable

import attrs

from .block_manager import BlockManager
from .plan import PREVIOUS_TOKEN, SeqChunk, StepPlan, StepResult, TokenBitmask
from atom_trio.sampling_params import SamplingParams
from .sequence import FinishReason, Grammar, Sequence, SeqOutput, SequenceStatus

__all__ = ["Scheduler", "SchedulerStats", "SeqOutput"]

_RUNNING = SequenceStatus.RUNNING
_WAITING = SequenceStatus.WAITING
_FINISHED = SequenceStatus.FINISHED
_SEED_SPACE = 2**64
_MAX_DRAFT_COOLDOWN = 64

log = logging.getLogger("atom_trio.scheduler")


@attrs.frozen(kw_only=True)
class SchedulerStats:
    """A snapshot for the server's metrics; the prefix-cache and preemption numbers are running totals.

    ``num_running`` and ``num_waiting`` count sequences (a request with ``n > 1`` has ``n``). A request is
    *waiting* from `Scheduler.add_request` until the first of its sequences is scheduled, and *running* from
    then until its last sequence finishes or is aborted (while preempted too).
    """

    num_running: int
    num_waiting: int
    num_running_requests: int
    num_waiting_requests: int
    kv_cache_usage: float
    prefix_cache_queries: int
    """Tokens looked up in the prefix cache at admission."""
    prefix_cache_hits: int
    """Of those, tokens found."""
    num_preemptions: int
    spec_num_drafts: int = 0
    """Speculative decoding: verify steps of a sequence (each verifies one draft run)..."""
    spec_num_draft_tokens: int = 0
    """...the draft tokens they verified..."""
    spec_num_accepted_tokens: int = 0
    """...the drafts accepted..."""
    spec_accepted_per_position: tuple[int, ...] = ()
    """...and how often the draft at each position (0 first) was accepted."""


class Scheduler:
    """Turns requests into step plans and step results into per-sequence outputs.

    ``max_model_len`` is capped at the KV cache's capacity
    (``num_blocks * block_size`` for one KV cache group) so that a sequence
    running alone always fits; read the effective value from
    ``scheduler.max_model_len``. ``kv_cache_windows``: the model's KV cache
    groups (`BlockManager`): a sliding group's blocks are released as they
    leave the window.
    Up to ``max_in_flight`` plans from `schedule` await their `update`, which
    takes them oldest first. ``num_speculative_tokens`` > 0 turns speculative
    decoding on: at most that many drafts per verify chunk.
    """

    def __init__(
        self,
        *,
        num_blocks: int,
        block_size: int,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        max_model_len: int,
        enable_prefix_caching: bool = True,
        eos_token_ids: frozenset[int] = frozenset(),
        max_in_flight: int = 1,
        num_speculative_tokens: int = 0,
        kv_cache_windows: tuple[int | None, ...] = (None,),
    ) -> None:
        if max_num_seqs < 1 or max_num_batched_tokens < 1 or max_model_len < 1:
            raise ValueError("max_num_seqs, max_num_batched_tokens and max_model_len must be positive")
        if max_in_flight not in (1, 2):
            # With a third plan in flight, a sequence preempted while its token is still being sampled
            # could be readmitted before that token is known.
            raise ValueError("max_in_flight is 1 (one step at a time) or 2 (asynchronous scheduling)")
        self.block_manager = BlockManager(
            num_blocks=num_blocks,
            block_size=block_size,
            enable_prefix_caching=enable_prefix_caching,
            windows=kv_cache_windows,
        )
        self._windowed = self.block_manager.num_groups > 1
        self.block_size = block_size
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_model_len = min(max_model_len, self.block_manager.max_tokens_alone())
        self.enable_prefix_caching = enable_prefix_caching
        self.eos_token_ids = frozenset(eos_token_ids)
        self.max_in_flight = max_in_flight
        self.num_speculative_tokens = num_speculative_tokens

        self._waiting: deque[Sequence] = deque()
        self._running: dict[int, Sequence] = {}
        """Running sequences by id, oldest admission first (the last one is the first to preempt)."""
        self._live: dict[int, Sequence] = {}
        self._requests: dict[str, list[Sequence]] = {}
        self._unscheduled: set[str] = set()
        """Requests none of whose sequences has been scheduled yet."""
        self._seq_ids = itertools.count()
        self._step_ids = itertools.count()
        self._dropped: list[int] = []
        """Sequences whose runner state can go, sent with the next plan."""
        self._in_flight: deque[StepPlan] = deque()
        self._num_constrained = 0
        """Live sequences with a grammar: while none, planning spends nothing on masks."""

        self.prefix_cache_queries = 0
        self.prefix_cache_hits = 0
        self.num_preemptions = 0
        self.spec_num_drafts = 0
        self.spec_num_draft_tokens = 0
        self.spec_num_accepted_tokens = 0
        self.spec_accepted_per_position = [0] * num_speculative_tokens

    # -- requests ---------------------------------------------------------------------------

    def add_request(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        grammar: Callable[[], Grammar] | None = None,
    ) -> None:
        """Queue ``params.n`` sibling sequences for one prompt; ``grammar`` makes each sibling's matcher.

        The request has passed the engine's admission checks (its input
        processor): the asserts state what those guarantee, a fresh id and a
        prompt that leaves room to generate; they are invariants, not checks
        a caller may rely on.
        """
        assert request_id not in self._requests, f"request id {request_id!r} is already in use"
        assert 0 < len(prompt_token_ids) < self.max_model_len, "the prompt must leave room to generate"
        siblings: list[Sequence] = []
        for index in range(params.n):
            sibling_params = params
            if params.n > 1 and params.seed is not None and index:
                seed = params.seed + index
                sibling_params = attrs.evolve(params, seed=seed - _SEED_SPACE if seed >= _SEED_SPACE else seed)
            if index and params.prompt_logprobs is not None:
                sibling_params = attrs.evolve(sibling_params, prompt_logprobs=None)  # sibling 0 computes them
            seq = Sequence(
                seq_id=next(self._seq_ids),
                request_id=request_id,
                index=index,
                prompt_token_ids=prompt_token_ids,
                params=sibling_params,
                eos_token_ids=self.eos_token_ids,
                max_model_len=self.max_model_len,
                leader=siblings[0] if siblings else None,
                grammar=None if grammar is None else grammar(),
            )
            siblings.append(seq)
            self._live[seq.seq_id] = seq
        self._requests[request_id] = siblings
        if grammar is not None:
            self._num_constrained += len(siblings)
        self._unscheduled.add(request_id)
        self._waiting.extend(siblings)

    def abort_request(self, request_id: str, index: int | None = None, reason: FinishReason = "abort") -> None:
        """End one sibling (``index``) or all of a request now, freeing their blocks.

        Safe while the sequence's step is in flight (`update` ignores its
        result) and for requests that already finished (nothing happens).
        """
        siblings = self._requests.get(request_id)
        if siblings is None:
            return
        for seq in [s for s in siblings if index is None or s.index == index]:
            self._finish(seq, reason)

    def has_unfinished(self) -> bool:
        return bool(self._waiting or self._running)

    def stats(self) -> SchedulerStats:
        return SchedulerStats(
            num_running=len(self._running),
            num_waiting=len(self._waiting),
            num_running_requests=len(self._requests) - len(self._unscheduled),
            num_waiting_requests=len(self._unscheduled),
            kv_cache_usage=self.block_manager.usage,
            prefix_cache_queries=self.prefix_cache_queries,
            prefix_cache_hits=self.prefix_cache_hits,
            num_preemptions=self.num_preemptions,
            spec_num_drafts=self.spec_num_drafts,
            spec_num_draft_tokens=self.spec_num_draft_tokens,
            spec_num_accepted_tokens=self.spec_num_accepted_tokens,
            spec_accepted_per_position=tuple(self.spec_accepted_per_position),
        )

    @property
    def running(self) -> list[Sequence]:
        """Running sequences, oldest admission first (a copy, for inspection)."""
        return list(self._running.values())

    @property
    def waiting(self) -> list[Sequence]:
        """Waiting sequences in admission order (a copy, for inspection)."""
        return list(self._waiting)

    # -- one step ---------------------------------------------------------------------------

    def schedule(self) -> StepPlan | None:
        """The next step's plan, or ``None`` when nothing can run."""
        if len(self._in_flight) >= self.max_in_flight:
            raise RuntimeError(f"schedule() called with {len(self._in_flight)} plans awaiting update()")
        budget = self.max_num_batched_tokens
        size = self.block_size
        chunks: list[SeqChunk] = []
        scheduled: set[int] = set()
        preemptions_before = self.num_preemptions

        speculating = self.num_speculative_tokens > 0
        prefilling: list[Sequence] = []
        for seq in list(self._running.values()):
            if not budget:
                break
            if seq.status is not _RUNNING:  # preempted for an older sequence in this loop
                continue
            tokens = seq.token_ids
            pending = seq.num_pending_tokens
            if pending and (seq.grammar is not None or seq.awaits_drafts):
                continue  # its mask, its length or its drafts come with the token still being sampled
            num_tokens = len(tokens) + pending
            if seq.num_computed_tokens + 1 < num_tokens:
                prefilling.append(seq)
                continue
            if num_tokens >= seq.max_len:  # its pending token is its last
                continue
            if self._windowed:
                self.block_manager.release(seq)
            drafts = seq.draft_token_ids
            if drafts:
                drafts = self._fit_drafts(seq, budget, scheduled)
                if drafts is None:
                    continue
            elif len(seq.block_table) * size < num_tokens and not self._fit(seq, 1, scheduled):
                continue
            # the hot path (every running sequence, every step), so the decode chunk is built right here
            scheduled.add(seq.seq_id)
            chunks.append(
                SeqChunk(
                    seq_id=seq.seq_id,
                    token_ids=[PREVIOUS_TOKEN] if pending else tokens[-1:] + drafts if drafts else tokens[-1:],
                    start_pos=num_tokens - 1,
                    block_table=(
                        self.block_manager.chunk_table(seq, len(seq.block_table))
                        if self._windowed
                        else seq.block_tables[0][:]
                    ),
                    prompt_len=seq.prompt_len,
                    sample=True,
                    sampling_params=seq.params,
                    prefix_token_ids=None if seq.runner_knows else self._introduce(seq, num_tokens - 1),
                    num_draft_tokens=len(drafts),
                    propose_drafts=bool(drafts) or (speculating and self._asks_for_drafts(seq)),
                )
            )
            seq.num_computed_tokens = num_tokens + len(drafts)
            seq.num_pending_tokens = pending + 1
            budget -= 1 + len(drafts)

        for seq in prefilling:
            if not budget:
                break
            if seq.status is not _RUNNING:
                continue
            num_tokens = self._fit(seq, min(budget, len(seq.token_ids) - seq.num_computed_tokens), scheduled)
            if num_tokens:
                scheduled.add(seq.seq_id)
                chunks.append(self._chunk(seq, num_tokens))
                budget -= num_tokens

        if self.num_preemptions == preemptions_before:
            budget = self._admit(budget, chunks)

        if not chunks:
            return None
        plan = StepPlan(
            step_id=next(self._step_ids),
            chunks=chunks,
            finished_seq_ids=self._dropped,
            token_bitmask=self._token_bitmask(chunks) if self._num_constrained else None,
        )
        self._dropped = []
        self._in_flight.append(plan)
        return plan

    def _fit_drafts(self, seq: Sequence, budget: int, scheduled: set[int]) -> list[int] | None:
        """The drafts of ``seq``'s verify chunk, KV slots given for them; None if ``seq`` got preempted instead.

        Its tokens are all known (drafts are kept only then). As many drafts
        go as the token budget, ``max_tokens`` (every draft may be accepted,
        with one token more) and the free blocks allow; the sequence then
        awaits the result for its length and next drafts.
        """
        num_tokens = len(seq.token_ids)
        drafts = seq.draft_token_ids[: min(self.num_speculative_tokens, budget - 1, seq.max_len - num_tokens - 1)]
        seq.draft_token_ids = []
        room = self._fit(seq, 1 + len(drafts), scheduled)
        if not room:
            return None
        seq.awaits_drafts = True
        return drafts[: room - 1]

    @staticmethod
    def _asks_for_drafts(seq: Sequence) -> bool:
        """Whether ``seq``'s chunk being planned asks for drafts (no grammar, not backing off); then it awaits them."""
        if seq.grammar is not None:
            return False
        if seq.draft_cooldown:
            seq.draft_cooldown -= 1
            if seq.draft_cooldown:
                return False
        seq.awaits_drafts = True
        return True

    def _token_bitmask(self, chunks: list[SeqChunk]) -> TokenBitmask | None:
        """The rows (among sampling chunks) of sequences with a grammar, with their matchers; None if none."""
        live = self._live
        rows: list[int] = []
        grammars: list[Grammar] = []
        row = 0
        for chunk in chunks:
            if chunk.sample:
                grammar = live[chunk.seq_id].grammar
                if grammar is not None:
                    rows.append(row)
                    grammars.append(grammar)
                row += 1
        return TokenBitmask(rows, grammars) if rows else None

    def _fit(self, seq: Sequence, num_tokens: int, scheduled: set[int]) -> int:
        """Give running ``seq`` blocks for up to ``num_tokens`` more tokens, preempting if none are left.

        Returns how many tokens it got; 0 when ``seq`` itself was the newest
        unscheduled sequence and got preempted.
        """
        manager = self.block_manager
        size = self.block_size
        if self._windowed:
            manager.release(seq)
        while True:
            # every KV cache group takes a block for each new block of positions
            num_blocks = len(seq.block_table) + manager.num_free_blocks // manager.num_groups
            room = num_blocks * size - seq.num_computed_tokens
            if room > 0:
                num_tokens = min(num_tokens, room)
                manager.grow(seq, seq.num_computed_tokens + num_tokens)
                return num_tokens
            victim = next(s for s in reversed(self._running.values()) if s.seq_id not in scheduled)
            self._preempt(victim)
            if victim is seq:
                return 0

    def _admit(self, budget: int, chunks: list[SeqChunk]) -> int:
        """Admit waiting sequences in order while tokens, sequence slots and blocks last."""
        manager = self.block_manager
        size = self.block_size
        while budget and self._waiting and len(self._running) < self.max_num_seqs:
            seq = self._waiting[0]
            leader = seq.leader
            if leader is not None and leader.status is _RUNNING and not self._prompt_ready(leader, chunks):
                break  # share the prompt's blocks once sibling 0 has computed them
            lookup = self.enable_prefix_caching and seq.params.prompt_logprobs is None
            shared = manager.match_prefix(seq) if lookup else self._leader_blocks(seq)
            num_shared_tokens = len(shared[0]) * size
            free_blocks = manager.num_free_blocks - manager.num_evictable_among(shared)
            room = free_blocks // manager.num_groups * size
            num_tokens = min(budget, len(seq.token_ids) - num_shared_tokens, room)
            if num_tokens <= 0:
                break
            self._waiting.popleft()
            self._unscheduled.discard(seq.request_id)
            if lookup:
                self.prefix_cache_queries += len(seq.token_ids)
                self.prefix_cache_hits += num_shared_tokens
            if seq.num_cached_tokens is None:
                seq.num_cached_tokens = num_shared_tokens if self.enable_prefix_caching else 0
            manager.share(seq, shared)
            seq.num_computed_tokens = num_shared_tokens
            manager.grow(seq, num_shared_tokens + num_tokens)
            seq.status = _RUNNING
            self._running[seq.seq_id] = seq
            chunks.append(self._chunk(seq, num_tokens))
            budget -= num_tokens
        return budget

    @staticmethod
    def _prompt_ready(leader: Sequence, chunks: list[SeqChunk]) -> bool:
        """Whether running sibling 0's prompt blocks are computed (and published) for plans from this one on.

        Not while its first token is still to come back (its last prompt
        chunk may be in flight, unpublished) or it recomputes the prompt after
        a preemption, in an earlier plan or in this one.
        """
        prompt_len = leader.prompt_len
        if len(leader.token_ids) == prompt_len or leader.num_computed_tokens < prompt_len:
            return False
        return not any(c.seq_id == leader.seq_id and c.start_pos < prompt_len for c in chunks)

    def _leader_blocks(self, seq: Sequence) -> list[list[int]]:
        """Without a prefix cache, a sibling shares the full prompt blocks sibling 0 has computed (in every group)."""
        leader = seq.leader
        manager = self.block_manager
        if leader is None or leader.status is not _RUNNING:
            return [[] for _ in manager.windows]
        size = self.block_size
        num_blocks = min((len(seq.token_ids) - 1) // size, seq.prompt_len // size, leader.num_computed_tokens // size)
        return manager.prefix_of(leader.block_tables, num_blocks)

    def _chunk(self, seq: Sequence, num_tokens: int) -> SeqChunk:
        """The next chunk of a sequence whose tokens are all known, counted as computed from now on."""
        start = seq.num_computed_tokens
        end = start + num_tokens
        tokens = seq.token_ids
        sample = end == len(tokens)
        seq.num_computed_tokens = end
        seq.num_pending_tokens = int(sample)
        seq.draft_token_ids = []
        return SeqChunk(
            seq_id=seq.seq_id,
            token_ids=tokens[start:end],
            start_pos=start,
            block_table=self.block_manager.chunk_table(seq, -(-end // self.block_size)),
            prompt_len=seq.prompt_len,
            sample=sample,
            sampling_params=seq.params if sample or seq.prompt_logprobs is not None else None,
            prefix_token_ids=None if seq.runner_knows else self._introduce(seq, start),
            propose_drafts=sample and self.num_speculative_tokens > 0 and self._asks_for_drafts(seq),
        )

    @staticmethod
    def _introduce(seq: Sequence, start: int) -> list[int]:
        """The ``prefix_token_ids`` of the first chunk the runner sees of ``seq`` (since admission or preemption)."""
        seq.runner_knows = True
        return seq.token_ids[:start]

    def _preempt(self, seq: Sequence) -> None:
        del self._running[seq.seq_id]
        self.block_manager.free(seq)
        seq.draft_token_ids = []
        seq.status = _WAITING
        if seq.runner_knows:
            self._dropped.append(seq.seq_id)
            seq.runner_knows = False
        self._waiting.appendleft(seq)
        self.num_preemptions += 1

    def update(self, plan: StepPlan, result: StepResult) -> list[SeqOutput]:
        """Take the oldest plan's sampled tokens: extend sequences, publish computed blocks, end finished ones."""
        if not self._in_flight or plan is not self._in_flight[0]:
            raise RuntimeError("update() must get the oldest plan that schedule() returned and update() has not taken")
        chunks = plan.chunks
        num_samples = sum(1 for c in chunks if c.sample)
        prompt_logprobs = result.prompt_logprobs
        counts = result.num_tokens
        drafts = result.draft_token_ids
        if (
            result.step_id != plan.step_id
            or len(result.token_ids) != (num_samples if counts is None else sum(counts))
            or (counts is not None and len(counts) != num_samples)
            or (drafts is not None and len(drafts) != num_samples)
            or (prompt_logprobs is not None and len(prompt_logprobs) != len(chunks))
        ):
            raise ValueError(
                f"result of step {result.step_id} with {len(result.token_ids)} tokens does not match "
                f"plan {plan.step_id} with {num_samples} sampled chunks of {len(chunks)}"
            )
        self._in_flight.popleft()
        manager = self.block_manager
        size = self.block_size
        caching = self.enable_prefix_caching
        live = self._live
        sampled, logprobs, top_logprobs = result.token_ids, result.logprobs, result.top_logprobs
        outputs: list[SeqOutput] = []
        k = -1  # the sampling chunk's row
        start = end = 0  # its tokens in the result's columns
        for j, chunk in enumerate(chunks):
            if chunk.sample:
                k += 1
                start, end = end, end + (1 if counts is None else counts[k])
            seq = live.get(chunk.seq_id)
            if seq is None:  # aborted or ended while its step was in flight
                continue
            if prompt_logprobs is not None and prompt_logprobs[j] is not None and seq.prompt_logprobs is not None:
                # a recompute after preemption brings again the positions collected before it
                collected = seq.prompt_logprobs
                collected.extend(prompt_logprobs[j][max(0, len(collected) - chunk.start_pos) :])
            tokens = seq.token_ids
            if chunk.sample:
                seq.num_pending_tokens -= 1
                if chunk.propose_drafts:
                    seq.awaits_drafts = False
                    seq.draft_token_ids = drafts[k] if drafts is not None else []
                if chunk.num_draft_tokens:
                    self._count_drafts(seq, chunk.num_draft_tokens, end - start - 1)
                finish_reason = stop_reason = None
                cut = end
                for i in range(start, end):  # the accepted drafts and one token more; a stop cuts the run
                    token = sampled[i]
                    tokens.append(token)
                    if seq.grammar is not None:
                        finish_reason, stop_reason = self._grammar_stop(seq, token)
                    elif token in seq.finish_token_ids or len(tokens) >= seq.max_len:
                        finish_reason, stop_reason = self._stop(seq, token)
                    if finish_reason is not None:
                        cut = i + 1
                        break
                if chunk.num_draft_tokens and seq.status is _RUNNING:
                    # Roll the rejected drafts back: their KV slots are free again, their blocks too.
                    seq.num_computed_tokens = len(tokens) - 1
                    manager.shrink(seq, seq.num_computed_tokens)
            # Blocks planned by now hold valid KV for every later plan; only known tokens can be hashed.
            # (A sequence preempted since this plan keeps its token but has no blocks left to publish.)
            if (
                caching
                and min(seq.num_computed_tokens, len(tokens)) // size > seq.num_published_blocks
                and seq.status is _RUNNING
            ):
                manager.publish(seq)
            if not chunk.sample:
                continue
            output = SeqOutput(
                request_id=seq.request_id,
                index=seq.index,
                new_token_ids=sampled[start:cut],
                logprobs=None if logprobs[start] is None else logprobs[start:cut],
                top_logprobs=None if top_logprobs[start] is None else top_logprobs[start:cut],
                finish_reason=finish_reason,
                stop_reason=stop_reason,
                num_cached_tokens=seq.num_cached_tokens,
            )
            if seq.prompt_logprobs is not None and len(tokens) - (cut - start) == seq.prompt_len:
                output.prompt_logprobs = seq.prompt_logprobs
            outputs.append(output)
            if finish_reason is not None:
                self._finish(seq, finish_reason)
        return outputs

    def _count_drafts(self, seq: Sequence, num_drafts: int, num_accepted: int) -> None:
        """Count a verify step's drafts for the metrics, and back off a sequence whose drafts keep failing."""
        self.spec_num_drafts += 1
        self.spec_num_draft_tokens += num_drafts
        self.spec_num_accepted_tokens += num_accepted
        per_position = self.spec_accepted_per_position
        for position in range(num_accepted):
            per_position[position] += 1
        if num_accepted:
            seq.draft_misses = 0
        else:
            seq.draft_misses += 1
            seq.draft_cooldown = min(2**seq.draft_misses, _MAX_DRAFT_COOLDOWN)

    def _stop(self, seq: Sequence, token: int) -> tuple[FinishReason | None, int | None]:
        """Why ``seq`` ends after sampling ``token``, if it does: the full check behind `update`'s quick one."""
        if token in seq.finish_token_ids and len(seq.token_ids) - seq.prompt_len >= seq.params.min_tokens:
            if token in self.eos_token_ids and not seq.params.ignore_eos:
                return "stop", None
            return "stop", token
        if len(seq.token_ids) >= seq.max_len:
            return "length", None
        return None, None

    def _grammar_stop(self, seq: Sequence, token: int) -> tuple[FinishReason | None, int | None]:
        """`_stop` for a sequence with a grammar: advance its matcher with ``token`` first."""
        grammar = seq.grammar
        if not grammar.accept_token(token):
            log.warning("request %r: its grammar rejected sampled token %d, so it is aborted", seq.request_id, token)
            return "abort", None
        if grammar.is_terminated():
            return "stop", None
        if token in seq.finish_token_ids or len(seq.token_ids) >= seq.max_len:
            return self._stop(seq, token)
        return None, None

    def _finish(self, seq: Sequence, reason: FinishReason) -> None:
        if seq.status is _RUNNING:
            del self._running[seq.seq_id]
            self.block_manager.free(seq)
        elif seq.status is _WAITING:
            self._waiting.remove(seq)
        seq.status = _FINISHED
        seq.finish_reason = reason
        if seq.grammar is not None:
            seq.grammar = None  # the matcher goes now, not with the last reference to the sequence
            self._num_constrained -= 1
        del self._live[seq.seq_id]
        if seq.runner_knows:
            self._dropped.append(seq.seq_id)
        siblings = self._requests[seq.request_id]
        siblings.remove(seq)
        if not siblings:
            del self._requests[seq.request_id]
            self._unscheduled.discard(seq.request_id)
