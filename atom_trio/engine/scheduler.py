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

A request asking for prompt logprobs gets them from sibling 0 alone (they are
the same for every sibling). That sequence never takes prompt tokens from the
prefix cache, as in vLLM: a cached position is not run through the model, so
it would have no logprobs. Its chunks carry the sampling parameters even when
not sampling, so that the runner knows to compute them; `update` collects them
and hands the whole list over with the first generated token.
"""

from __future__ import annotations

import itertools
from collections import deque

import attrs

from .block_manager import BlockManager
from .errors import ContextLengthExceeded, InvalidRequest
from .plan import SeqChunk, StepPlan, StepResult
from .sampling_params import SamplingParams
from .sequence import FinishReason, Sequence, SeqOutput, SequenceStatus

__all__ = ["Scheduler", "SchedulerStats", "SeqOutput"]

_RUNNING = SequenceStatus.RUNNING
_WAITING = SequenceStatus.WAITING
_FINISHED = SequenceStatus.FINISHED
_SEED_SPACE = 2**64


@attrs.frozen(kw_only=True)
class SchedulerStats:
    """A snapshot for the server's metrics; the prefix-cache and preemption numbers are running totals."""

    num_running: int
    num_waiting: int
    kv_cache_usage: float
    prefix_cache_queries: int
    """Tokens looked up in the prefix cache at admission."""
    prefix_cache_hits: int
    """Of those, tokens found."""
    num_preemptions: int


class Scheduler:
    """Turns requests into step plans and step results into per-sequence outputs.

    ``max_model_len`` is capped at the KV cache's capacity
    (``num_blocks * block_size``) so that a sequence running alone always
    fits; read the effective value from ``scheduler.max_model_len``.
    `schedule` and `update` alternate: one plan is in flight at a time.
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
    ) -> None:
        if max_num_seqs < 1 or max_num_batched_tokens < 1 or max_model_len < 1:
            raise ValueError("max_num_seqs, max_num_batched_tokens and max_model_len must be positive")
        self.block_manager = BlockManager(
            num_blocks=num_blocks, block_size=block_size, enable_prefix_caching=enable_prefix_caching
        )
        self.block_size = block_size
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_model_len = min(max_model_len, num_blocks * block_size)
        self.enable_prefix_caching = enable_prefix_caching
        self.eos_token_ids = frozenset(eos_token_ids)

        self._waiting: deque[Sequence] = deque()
        self._running: dict[int, Sequence] = {}
        """Running sequences by id, oldest admission first (the last one is the first to preempt)."""
        self._live: dict[int, Sequence] = {}
        self._requests: dict[str, list[Sequence]] = {}
        self._seq_ids = itertools.count()
        self._step_ids = itertools.count()
        self._dropped: list[int] = []
        """Sequences whose runner state can go, sent with the next plan."""
        self._in_flight: StepPlan | None = None
        self._in_flight_samples = 0

        self.prefix_cache_queries = 0
        self.prefix_cache_hits = 0
        self.num_preemptions = 0

    # -- requests ---------------------------------------------------------------------------

    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams) -> None:
        """Queue ``params.n`` sibling sequences for one prompt.

        Raises `InvalidRequest` for a reused request id or an empty prompt and
        `ContextLengthExceeded` for a prompt that leaves no room to generate.
        """
        if request_id in self._requests:
            raise InvalidRequest(f"request id {request_id!r} is already in use", param="request_id")
        if not prompt_token_ids:
            raise InvalidRequest("the prompt must contain at least one token", param="prompt")
        if len(prompt_token_ids) >= self.max_model_len:
            raise ContextLengthExceeded(prompt_tokens=len(prompt_token_ids), max_model_len=self.max_model_len)
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
            )
            siblings.append(seq)
            self._live[seq.seq_id] = seq
        self._requests[request_id] = siblings
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
            kv_cache_usage=self.block_manager.usage,
            prefix_cache_queries=self.prefix_cache_queries,
            prefix_cache_hits=self.prefix_cache_hits,
            num_preemptions=self.num_preemptions,
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
        if self._in_flight is not None:
            raise RuntimeError("schedule() called again before update() of the previous plan")
        budget = self.max_num_batched_tokens
        size = self.block_size
        chunks: list[SeqChunk] = []
        scheduled: set[int] = set()
        preemptions_before = self.num_preemptions

        prefilling: list[Sequence] = []
        for seq in list(self._running.values()):
            if not budget:
                break
            if seq.status is not _RUNNING:  # preempted for an older sequence in this loop
                continue
            tokens = seq.token_ids
            num_tokens = len(tokens)
            if seq.num_computed_tokens + 1 < num_tokens:
                prefilling.append(seq)
                continue
            if len(seq.block_table) * size < num_tokens and not self._fit(seq, 1, scheduled):
                continue
            # the hot path (every running sequence, every step), so the decode chunk is built right here
            scheduled.add(seq.seq_id)
            chunks.append(
                SeqChunk(
                    seq_id=seq.seq_id,
                    token_ids=tokens[-1:],
                    start_pos=num_tokens - 1,
                    block_table=seq.block_table[:],
                    prompt_len=seq.prompt_len,
                    sample=True,
                    sampling_params=seq.params,
                    prefix_token_ids=None if seq.runner_knows else self._introduce(seq),
                )
            )
            budget -= 1

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
        plan = StepPlan(step_id=next(self._step_ids), chunks=chunks, finished_seq_ids=self._dropped)
        self._dropped = []
        self._in_flight = plan
        self._in_flight_samples = sum(1 for c in chunks if c.sample)
        return plan

    def _fit(self, seq: Sequence, num_tokens: int, scheduled: set[int]) -> int:
        """Give running ``seq`` blocks for up to ``num_tokens`` more tokens, preempting if none are left.

        Returns how many tokens it got; 0 when ``seq`` itself was the newest
        unscheduled sequence and got preempted.
        """
        manager = self.block_manager
        size = self.block_size
        while True:
            room = (len(seq.block_table) + manager.num_free_blocks) * size - seq.num_computed_tokens
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
            if leader is not None and leader.status is _RUNNING and leader.num_computed_tokens < leader.prompt_len:
                break  # share the prompt's blocks once sibling 0 has computed them
            lookup = self.enable_prefix_caching and seq.params.prompt_logprobs is None
            shared = manager.match_prefix(seq) if lookup else self._leader_blocks(seq)
            num_shared_tokens = len(shared) * size
            free_blocks = manager.num_free_blocks - manager.num_evictable_among(shared)
            room = (len(shared) + free_blocks) * size - num_shared_tokens
            num_tokens = min(budget, len(seq.token_ids) - num_shared_tokens, room)
            if num_tokens <= 0:
                break
            self._waiting.popleft()
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

    def _leader_blocks(self, seq: Sequence) -> list[int]:
        """Without a prefix cache, a sibling shares the full prompt blocks sibling 0 has computed."""
        leader = seq.leader
        if leader is None or leader.status is not _RUNNING:
            return []
        size = self.block_size
        num_blocks = min((len(seq.token_ids) - 1) // size, seq.prompt_len // size, leader.num_computed_tokens // size)
        return leader.block_table[:num_blocks]

    def _chunk(self, seq: Sequence, num_tokens: int) -> SeqChunk:
        start = seq.num_computed_tokens
        end = start + num_tokens
        tokens = seq.token_ids
        sample = end == len(tokens)
        return SeqChunk(
            seq_id=seq.seq_id,
            token_ids=tokens[start:end],
            start_pos=start,
            block_table=seq.block_table[: -(-end // self.block_size)],
            prompt_len=seq.prompt_len,
            sample=sample,
            sampling_params=seq.params if sample or seq.prompt_logprobs is not None else None,
            prefix_token_ids=None if seq.runner_knows else self._introduce(seq),
        )

    @staticmethod
    def _introduce(seq: Sequence) -> list[int]:
        """The ``prefix_token_ids`` of the first chunk the runner sees of ``seq`` (since admission or preemption)."""
        seq.runner_knows = True
        return seq.token_ids[: seq.num_computed_tokens]

    def _preempt(self, seq: Sequence) -> None:
        del self._running[seq.seq_id]
        self.block_manager.free(seq)
        seq.status = _WAITING
        if seq.runner_knows:
            self._dropped.append(seq.seq_id)
            seq.runner_knows = False
        self._waiting.appendleft(seq)
        self.num_preemptions += 1

    def update(self, plan: StepPlan, result: StepResult) -> list[SeqOutput]:
        """Take the step's sampled tokens: extend sequences, publish computed blocks, end finished ones."""
        if plan is not self._in_flight:
            raise RuntimeError("update() must get the plan that the last schedule() returned")
        self._in_flight = None
        num_samples = self._in_flight_samples
        prompt_logprobs = result.prompt_logprobs
        if (
            result.step_id != plan.step_id
            or len(result.token_ids) != num_samples
            or (prompt_logprobs is not None and len(prompt_logprobs) != len(plan.chunks))
        ):
            raise ValueError(
                f"result of step {result.step_id} with {len(result.token_ids)} tokens does not match "
                f"plan {plan.step_id} with {num_samples} sampled chunks of {len(plan.chunks)}"
            )
        manager = self.block_manager
        size = self.block_size
        caching = self.enable_prefix_caching
        live = self._live
        sampled, logprobs, top_logprobs = result.token_ids, result.logprobs, result.top_logprobs
        outputs: list[SeqOutput] = []
        k = -1
        for j, chunk in enumerate(plan.chunks):
            if chunk.sample:
                k += 1
            seq = live.get(chunk.seq_id)
            if seq is None:  # aborted while its step was in flight
                continue
            if prompt_logprobs is not None and prompt_logprobs[j] is not None and seq.prompt_logprobs is not None:
                # a recompute after preemption brings again the positions collected before it
                collected = seq.prompt_logprobs
                collected.extend(prompt_logprobs[j][max(0, len(collected) - chunk.start_pos) :])
            num_computed = seq.num_computed_tokens + len(chunk.token_ids)
            seq.num_computed_tokens = num_computed
            if caching and num_computed // size > seq.num_published_blocks:
                manager.publish(seq)
            if not chunk.sample:
                continue
            token = sampled[k]
            tokens = seq.token_ids
            tokens.append(token)
            if token in seq.finish_token_ids or len(tokens) >= seq.max_len:
                finish_reason, stop_reason = self._stop(seq, token)
            else:
                finish_reason = stop_reason = None
            logprob = logprobs[k]
            top = top_logprobs[k]
            output = SeqOutput(
                request_id=seq.request_id,
                index=seq.index,
                new_token_ids=[token],
                logprobs=None if logprob is None else [logprob],
                top_logprobs=None if top is None else [top],
                finish_reason=finish_reason,
                stop_reason=stop_reason,
                num_cached_tokens=seq.num_cached_tokens,
            )
            if seq.prompt_logprobs is not None and len(tokens) == seq.prompt_len + 1:
                output.prompt_logprobs = seq.prompt_logprobs
            outputs.append(output)
            if finish_reason is not None:
                self._finish(seq, finish_reason)
        return outputs

    def _stop(self, seq: Sequence, token: int) -> tuple[FinishReason | None, int | None]:
        """Why ``seq`` ends after sampling ``token``, if it does: the full check behind `update`'s quick one."""
        if token in seq.finish_token_ids and len(seq.token_ids) - seq.prompt_len >= seq.params.min_tokens:
            if token in self.eos_token_ids and not seq.params.ignore_eos:
                return "stop", None
            return "stop", token
        if len(seq.token_ids) >= seq.max_len:
            return "length", None
        return None, None

    def _finish(self, seq: Sequence, reason: FinishReason) -> None:
        if seq.status is _RUNNING:
            del self._running[seq.seq_id]
            self.block_manager.free(seq)
        elif seq.status is _WAITING:
            self._waiting.remove(seq)
        seq.status = _FINISHED
        seq.finish_reason = reason
        del self._live[seq.seq_id]
        if seq.runner_knows:
            self._dropped.append(seq.seq_id)
        siblings = self._requests[seq.request_id]
        siblings.remove(seq)
        if not siblings:
            del self._requests[seq.request_id]
