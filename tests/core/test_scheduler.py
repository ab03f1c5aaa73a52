"""Scheduler: invariants under random programs (hypothesis), and each scheduling rule on its own.

The model is not under test here, so steps are answered by `FakeRunner`: it
keeps what a real KV cache would hold (for every slot, the token prefix whose
KV was written there) and checks that every chunk attends to exactly its own
sequence's tokens, that no shared or cached block is ever written, and that
the runner-state protocol (``prefix_token_ids`` / ``finished_seq_ids``) holds.
Its sampled tokens are random; its prompt logprobs name their position
(`fake_prompt_logprobs`), so the test sees which positions reached the output.

The machine runs the scheduler as the engine does, with one plan in flight
or two (asynchronous scheduling: the next plan is made and run before the
previous one's update). The fake runner runs each plan when it is made, in
order, as the device would; it replaces `PREVIOUS_TOKEN` with the token it
sampled for that sequence in the plan before, and checks every chunk against
the tokens it knows each sequence truly has, which run ahead of the
scheduler's by the tokens in flight.
"""

from __future__ import annotations

import random
from collections import deque

import pytest
from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    rule,
    run_state_machine_as_test,
)

from atom_trio.core import block_manager as bm_module
from atom_trio.core.plan import PREVIOUS_TOKEN, StepPlan, StepResult
from atom_trio.sampling_params import SamplingParams
from atom_trio.core.scheduler import Scheduler, SeqOutput
from atom_trio.core.sequence import SequenceStatus

EOS = 0
VOCAB = 6  # small, so that prompts share prefixes and random tokens hit EOS and stop ids


def fake_prompt_logprobs(prompt: list[int], start: int, end: int) -> list:
    """What `FakeRunner` answers for prompt positions ``[start, end)``: ``None`` for 0, else ``[(token, -pos)]``."""
    return [None if pos == 0 else [(prompt[pos], -float(pos))] for pos in range(start, end)]


class FakeRunner:
    """Checks each plan against a simulated KV cache and answers it with random tokens."""

    def __init__(self, scheduler: Scheduler, seed: int = 0) -> None:
        self.scheduler = scheduler
        self.rng = random.Random(seed)
        self.kv: dict[tuple[int, int], tuple[int, ...]] = {}
        """(block, slot) -> the token prefix whose last token's KV is stored there."""
        self.history: dict[int, list[int]] = {}
        """Runner state per sequence: the tokens it has seen (what penalties would need)."""
        self.truth: dict[int, list[int]] = {}
        """Each sequence's tokens: its prompt and every token sampled for it, known to the scheduler or not yet."""
        self.last_samples: dict[int, int] = {}
        """What the previous plan sampled, by sequence: the values of its `PREVIOUS_TOKEN`s."""

    def execute(self, plan: StepPlan) -> StepResult:
        sched = self.scheduler
        size = sched.block_size
        assert plan.num_tokens <= sched.max_num_batched_tokens
        assert 0 < len(plan.chunks) <= sched.max_num_seqs
        seq_ids = [c.seq_id for c in plan.chunks]
        assert len(set(seq_ids)) == len(seq_ids)
        for chunk in plan.chunks:  # the runner drops state first: only a restarted sequence may be in both
            assert chunk.seq_id not in plan.finished_seq_ids or chunk.prefix_token_ids is not None
        for seq_id in plan.finished_seq_ids:
            del self.history[seq_id]
        live = {s.seq_id: s for s in sched.running}
        blocks = sched.block_manager.blocks
        samples = []
        counts = []
        proposals = []
        prompt_logprobs = []
        samples_by_seq = {}
        for chunk in plan.chunks:
            seq = live[chunk.seq_id]
            tokens = self.truth.setdefault(seq.seq_id, list(seq.token_ids))
            assert tokens[: len(seq.token_ids)] == seq.token_ids
            assert len(tokens) - len(seq.token_ids) == seq.num_pending_tokens - chunk.sample
            end = chunk.start_pos + len(chunk.token_ids)
            num_drafts = chunk.num_draft_tokens
            drafts = chunk.token_ids[len(chunk.token_ids) - num_drafts :]
            if chunk.token_ids == [PREVIOUS_TOKEN]:
                assert chunk.start_pos == len(seq.token_ids) and chunk.prefix_token_ids is None
                assert self.last_samples[seq.seq_id] == tokens[chunk.start_pos]
                event("previous token fed back")
            else:
                assert chunk.token_ids and chunk.token_ids[: len(chunk.token_ids) - num_drafts] == tokens[
                    chunk.start_pos : end - num_drafts
                ]
            if num_drafts:
                assert sched.num_speculative_tokens >= num_drafts and seq.grammar is None
                assert len(tokens) + num_drafts < seq.max_len, "every draft accepted must stay within max_tokens"
                event("verified drafts")
            assert chunk.propose_drafts <= (sched.num_speculative_tokens > 0 and chunk.sample)
            assert chunk.prompt_len == seq.prompt_len
            manager = sched.block_manager
            num_groups = manager.num_groups
            assert len(chunk.block_table) == -(-end // size) * num_groups
            assert chunk.sample == (end - num_drafts == len(tokens))
            asks = seq.params.prompt_logprobs is not None
            assert (chunk.sampling_params is not None) == (chunk.sample or asks)
            if asks and chunk.start_pos < chunk.prompt_len:
                # the position before the chunk ran here (not served from the prefix cache)
                assert chunk.start_pos == 0 or chunk.prefix_token_ids is None
                prompt_logprobs.append(fake_prompt_logprobs(tokens, chunk.start_pos, min(end, chunk.prompt_len)))
            else:
                prompt_logprobs.append(None)
            if chunk.prefix_token_ids is not None:
                assert chunk.seq_id not in self.history
                assert chunk.prefix_token_ids == tokens[: chunk.start_pos]
                self.history[chunk.seq_id] = list(chunk.prefix_token_ids)
            history = self.history[chunk.seq_id]
            assert chunk.start_pos <= len(history)
            assert history[: chunk.start_pos] == tokens[: chunk.start_pos], "rolled back to tokens it had"
            del history[chunk.start_pos :]  # rejected drafts
            written = tokens[: end - num_drafts] + drafts
            for group, window in enumerate(manager.windows):
                table = chunk.block_table[group::num_groups]
                # attention reads exactly this sequence's prefix, within the window of the chunk's first token
                for pos in range(0 if window is None else max(0, chunk.start_pos - window + 1), chunk.start_pos):
                    assert self.kv[table[pos // size], pos % size] == tuple(tokens[: pos + 1])
                if manager.null_block in table:
                    event("sliding-window blocks released")
                for pos in range(chunk.start_pos, end):
                    assert table[pos // size] != manager.null_block, "a token's KV goes to the null block"
                    block = blocks[table[pos // size]]
                    assert block.ref_count == 1 and block.block_hash is None, "wrote a shared or cached block"
                    self.kv[block.block_id, pos % size] = tuple(written[: pos + 1])
            history.extend(written[chunk.start_pos : end])
            if chunk.sample:
                new = self.verify(drafts)
                samples.extend(new)
                counts.append(len(new))
                samples_by_seq[seq.seq_id] = new[0]
                tokens.extend(new)
                if chunk.propose_drafts:
                    proposals.append(self.propose(sched.num_speculative_tokens))
                elif sched.num_speculative_tokens:
                    proposals.append([])
        self.last_samples = samples_by_seq
        return StepResult(
            step_id=plan.step_id,
            token_ids=samples,
            logprobs=[-1.0] * len(samples),
            top_logprobs=[None] * len(samples),
            prompt_logprobs=prompt_logprobs if any(e is not None for e in prompt_logprobs) else None,
            num_tokens=counts if len(samples) != len(counts) else None,
            draft_token_ids=proposals if any(c.propose_drafts for c in plan.chunks) else None,
        )

    def sample(self) -> int:
        """A random token; EOS rarely, so that sequences grow long enough to need preemption."""
        return EOS if self.rng.random() < 0.05 else self.rng.randrange(1, VOCAB)

    def verify(self, drafts: list[int]) -> list[int]:
        """The drafts accepted (each with probability 1/2), then the token that replaces the first rejected one
        or, when none is, one token more."""
        for i, draft in enumerate(drafts):
            if self.rng.random() < 0.5:
                return drafts[:i] + [self.rng.choice([t for t in range(VOCAB) if t != draft])]
        return drafts + [self.sample()]

    def propose(self, k: int) -> list[int]:
        return [self.sample() for _ in range(self.rng.randint(0, k))]


def check_invariants(sched: Scheduler) -> None:
    manager = sched.block_manager
    size = sched.block_size
    null = manager.null_block
    refs = [0] * manager.num_blocks
    for seq in sched.running:
        assert seq.status is SequenceStatus.RUNNING
        assert len(seq.block_tables) == manager.num_groups
        assert seq.num_computed_tokens < len(seq.token_ids) + seq.num_pending_tokens + sched.num_speculative_tokens
        assert 0 <= seq.num_pending_tokens <= sched.max_in_flight
        for group, table in enumerate(seq.block_tables):
            assert len(table) == -(-seq.num_computed_tokens // size)
            # released only what no token still to compute attends to
            assert null not in table[manager.window_start(group, seq.num_computed_tokens) :]
            for block_id in table:
                if block_id != null:
                    refs[block_id] += 1
            for i in range(seq.num_published_blocks):
                if table[i] != null and manager.blocks[table[i]].block_hash is not None:
                    assert manager.blocks[table[i]].token_ids == tuple(seq.token_ids[i * size : (i + 1) * size])
    for seq in sched.waiting:
        assert seq.status is SequenceStatus.WAITING and not any(seq.block_tables) and seq.num_computed_tokens == 0
    num_free = 0
    for block in manager.blocks:
        assert block.ref_count == refs[block.block_id], "reference count differs from the block tables"
        assert (block.ref_count == 0) == manager.is_free(block.block_id), "leaked or doubly freed block"
        num_free += block.ref_count == 0
        if block.ref_count > 1:
            assert block.block_hash is not None or not sched.enable_prefix_caching
    assert num_free == manager.num_free_blocks
    for group, cached in enumerate(manager.cached_by_group):
        for block_hash, block_id in cached.items():
            block = manager.blocks[block_id]
            assert block.block_hash == block_hash and len(block.token_ids) == size and block.group == group
            assert bm_module.hash_block(block.parent_hash, block.token_ids) == block_hash
    assert sum(b.block_hash is not None for b in manager.blocks) == sum(map(len, manager.cached_by_group))
    assert len(sched.running) <= sched.max_num_seqs
    stats = sched.stats()
    assert (stats.num_running, stats.num_waiting) == (len(sched.running), len(sched.waiting))
    assert 0.0 <= stats.kv_cache_usage <= 1.0
    assert 0 <= stats.prefix_cache_hits <= stats.prefix_cache_queries


def check_output(sched: Scheduler, params: SamplingParams, tokens: list[int], prompt_len: int, out: SeqOutput) -> None:
    """Whether ``out`` (the latest output; ``tokens`` includes its tokens) ends the sequence exactly when it should.

    An output of several tokens (accepted drafts) must not hold one that would have ended the sequence before its last.
    """
    num_new = len(out.new_token_ids)
    for i, token in enumerate(out.new_token_ids):
        num_output = len(tokens) - num_new + i + 1 - prompt_len
        may_stop = num_output >= params.min_tokens
        eos = may_stop and token == EOS and not params.ignore_eos
        stop_id = may_stop and token in params.stop_token_ids
        length = num_output == params.max_tokens or len(tokens) - num_new + i + 1 == sched.max_model_len
        if i < num_new - 1:
            assert not (eos or stop_id or length), "a stop inside an accepted run must cut it"
        elif eos:
            assert (out.finish_reason, out.stop_reason) == ("stop", None)
        elif stop_id:
            assert (out.finish_reason, out.stop_reason) == ("stop", token)
        elif length:
            assert (out.finish_reason, out.stop_reason) == ("length", None)
        else:
            assert out.finish_reason is None
    assert out.logprobs == [-1.0] * num_new and out.top_logprobs is None


class SchedulerMachine(RuleBasedStateMachine):
    """Random interleavings of add / step / abort (also mid-step), with few blocks so that preemption happens."""

    def __init__(self) -> None:
        super().__init__()
        self.requests: dict[str, dict] = {}
        self.num_added = 0
        self.failed = False

    @initialize(
        num_blocks=st.integers(3, 10),
        block_size=st.sampled_from([1, 2, 4]),
        max_num_seqs=st.integers(1, 6),
        max_num_batched_tokens=st.integers(1, 24),
        caching=st.sampled_from([True, True, False]),
        max_in_flight=st.sampled_from([1, 2]),
        seed=st.integers(0, 2**16),
        num_speculative_tokens=st.sampled_from([0, 0, 1, 3]),
        windows=st.sampled_from([(None,), (None,), (None, 1), (None, 3), (None, 6), (None, 2, 5)]),
    )
    def setup(
        self, num_blocks, block_size, max_num_seqs, max_num_batched_tokens, caching, max_in_flight, seed,
        num_speculative_tokens, windows,
    ) -> None:
        """``windows``: KV cache groups, some sliding (as GPT-OSS's), whose blocks come on top of ``num_blocks``."""
        self.in_flight: deque[tuple[StepPlan, StepResult]] = deque()
        num_blocks += sum(-(-w // block_size) + 1 for w in windows[1:])
        self.sched = Scheduler(
            num_blocks=num_blocks,
            block_size=block_size,
            max_num_seqs=max_num_seqs,
            max_num_batched_tokens=max_num_batched_tokens,
            max_model_len=24,
            enable_prefix_caching=caching,
            eos_token_ids=frozenset({EOS}),
            max_in_flight=max_in_flight,
            num_speculative_tokens=num_speculative_tokens,
            kv_cache_windows=windows,
        )
        self.runner = FakeRunner(self.sched, seed)

    @rule(
        data=st.data(),
        n=st.integers(1, 3),
        max_tokens=st.integers(1, 16),
        min_tokens=st.integers(0, 3),
        stop_token_ids=st.lists(st.integers(1, VOCAB - 1), max_size=1),
        ignore_eos=st.booleans(),
        prompt_logprobs=st.sampled_from([None, None, 1]),
    )
    def add(self, data, n, max_tokens, min_tokens, stop_token_ids, ignore_eos, prompt_logprobs) -> None:
        limit = self.sched.max_model_len - 1
        # prompts over a tiny alphabet with a common stem, so prefixes repeat
        prompt = [1, 2, 3, 4, 5, 1, 2, 3][: data.draw(st.integers(0, 8))]
        prompt += data.draw(st.lists(st.integers(1, 2), min_size=1, max_size=limit))
        prompt = prompt[:limit]
        params = SamplingParams(
            n=n,
            max_tokens=max_tokens,
            min_tokens=min(min_tokens, max_tokens),
            stop_token_ids=stop_token_ids,
            ignore_eos=ignore_eos,
            prompt_logprobs=prompt_logprobs,
        )
        request_id = f"r{self.num_added}"
        self.num_added += 1
        self.sched.add_request(request_id, prompt, params)
        self.requests[request_id] = dict(
            params=params, prompt=prompt, outputs={i: list(prompt) for i in range(n)}, done=set()
        )

    @rule(abort_midway=st.sampled_from([None, None, None, 0, 1, "all"]), data=st.data())
    def step(self, abort_midway, data) -> None:
        """One turn of the engine's loop: plan and run a step while fewer than ``max_in_flight`` are
        in flight, else (or with nothing to plan) hand the oldest step's result back."""
        self.failed = True  # until the turn completes: teardown must not go on from a broken step
        sched = self.sched
        if len(self.in_flight) < sched.max_in_flight:
            plan = sched.schedule()
            if plan is not None:
                self.in_flight.append((plan, self.runner.execute(plan)))
                event(f"{len(self.in_flight)} plans in flight")
                self.failed = False
                return
            if not self.in_flight:
                assert not sched.has_unfinished()
                self.failed = False
                return
        plan, result = self.in_flight.popleft()
        if abort_midway is not None and self.live_requests():
            request_id = data.draw(st.sampled_from(self.live_requests()))
            self.abort(request_id, None if abort_midway == "all" else abort_midway)
            event("aborted while in flight")
        self.take(sched.update(plan, result))
        self.failed = False

    def take(self, outputs: list[SeqOutput]) -> None:
        for out in outputs:
            req = self.requests[out.request_id]
            assert out.index not in req["done"]
            tokens = req["outputs"][out.index]
            tokens.extend(out.new_token_ids)
            check_output(self.sched, req["params"], tokens, len(req["prompt"]), out)
            assert 0 <= out.num_cached_tokens < len(req["prompt"])
            prompt = req["prompt"]
            if req["params"].prompt_logprobs is not None and out.index == 0:
                assert out.num_cached_tokens == 0
                if len(tokens) == len(prompt) + 1:  # the first token brings every prompt position, once
                    assert out.prompt_logprobs == fake_prompt_logprobs(prompt, 0, len(prompt))
                    event("prompt logprobs")
                else:
                    assert out.prompt_logprobs is None
            else:
                assert out.prompt_logprobs is None
            if out.finish_reason is not None:
                req["done"].add(out.index)

    def live_requests(self) -> list[str]:
        return sorted(r for r, req in self.requests.items() if len(req["done"]) < req["params"].n)

    def abort(self, request_id: str, index: int | None) -> None:
        req = self.requests[request_id]
        if index is not None and index >= req["params"].n:
            index = None
        self.sched.abort_request(request_id, index)
        req["done"].update(range(req["params"].n) if index is None else [index])

    @rule(data=st.data(), whole=st.booleans())
    def abort_between_steps(self, data, whole) -> None:
        if not self.live_requests():
            return
        request_id = data.draw(st.sampled_from(self.live_requests()))
        self.abort(request_id, None if whole else data.draw(st.integers(0, 2)))

    @invariant()
    def consistent(self) -> None:
        if hasattr(self, "sched"):
            check_invariants(self.sched)

    def teardown(self) -> None:
        if not hasattr(self, "sched") or self.failed:
            return
        # capacity always allows every sequence to finish: run until all have
        for _ in range(4000):
            if not self.in_flight and not self.sched.has_unfinished():
                break
            self.step(None, None)
            check_invariants(self.sched)
        assert not self.sched.has_unfinished(), "some sequence never finished"
        stats = self.sched.stats()
        event("preempted", stats.num_preemptions > 0)
        event("prefix cache hit", stats.prefix_cache_hits > 0)
        if self.sched.block_manager.num_groups > 1:
            event("prefix cache hit with sliding-window groups", stats.prefix_cache_hits > 0)
        assert not self.live_requests()
        manager = self.sched.block_manager
        assert manager.num_free_blocks == manager.num_blocks, "blocks leaked"


TestSchedulerMachine = SchedulerMachine.TestCase
TestSchedulerMachine.settings = settings(
    max_examples=150, stateful_step_count=40, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)


def test_scheduler_with_colliding_hashes(monkeypatch: pytest.MonkeyPatch) -> None:
    """The same programs with a hash that collides all the time: comparing tokens must keep every chunk right."""
    monkeypatch.setattr(bm_module, "hash_block", lambda parent, tokens: (parent + tokens[0]) % 3)
    run_state_machine_as_test(
        SchedulerMachine, settings=settings(max_examples=60, stateful_step_count=30, deadline=None)
    )


# -- one rule at a time -------------------------------------------------------------------------


def make_scheduler(**overrides) -> Scheduler:
    kwargs = dict(
        num_blocks=64,
        block_size=4,
        max_num_seqs=8,
        max_num_batched_tokens=64,
        max_model_len=128,
        eos_token_ids=frozenset({EOS}),
    )
    kwargs.update(overrides)
    return Scheduler(**kwargs)


def answer(sched: Scheduler, plan: StepPlan, tokens: list[int] | int = 7) -> list[SeqOutput]:
    num = sum(c.sample for c in plan.chunks)
    token_ids = tokens if isinstance(tokens, list) else [tokens] * num
    result = StepResult(step_id=plan.step_id, token_ids=token_ids, logprobs=[None] * num, top_logprobs=[None] * num)
    return sched.update(plan, result)


def run_to_end(sched: Scheduler, token: int = 7) -> dict[tuple[str, int], SeqOutput]:
    last = {}
    while (plan := sched.schedule()) is not None:
        for out in answer(sched, plan, token):
            last[out.request_id, out.index] = out
    return last


def test_long_prompt_is_prefilled_in_chunks_and_decodes_go_first() -> None:
    sched = make_scheduler(max_num_batched_tokens=8)
    sched.add_request("short", [1, 2, 3], SamplingParams(max_tokens=5))
    plan = sched.schedule()
    assert [(c.start_pos, len(c.token_ids), c.sample) for c in plan.chunks] == [(0, 3, True)]
    answer(sched, plan)
    sched.add_request("long", list(range(1, 21)), SamplingParams(max_tokens=5))
    shapes = []
    while True:
        plan = sched.schedule()
        shapes.append([(c.seq_id, c.start_pos, len(c.token_ids), c.sample, c.prefix_token_ids) for c in plan.chunks])
        answer(sched, plan)
        if plan.chunks[-1].seq_id == 1 and plan.chunks[-1].sample:
            break
    # the decode of "short" leads every step; the prompt fills the rest of the 8-token budget, and only
    # its first chunk carries prefix_token_ids (empty: nothing came before)
    assert shapes == [
        [(0, 3, 1, True, None), (1, 0, 7, False, [])],
        [(0, 4, 1, True, None), (1, 7, 7, False, None)],
        [(0, 5, 1, True, None), (1, 14, 6, True, None)],
    ]


def test_stop_conditions() -> None:
    sched = make_scheduler(eos_token_ids=frozenset({EOS, 99}))
    sched.add_request("eos", [1, 2], SamplingParams(max_tokens=10))
    sched.add_request("ignore", [1, 2], SamplingParams(max_tokens=3, ignore_eos=True))
    sched.add_request("stop_id", [1, 2], SamplingParams(max_tokens=10, stop_token_ids=[EOS, 5], ignore_eos=True))
    sched.add_request("min", [1, 2], SamplingParams(max_tokens=10, min_tokens=2))
    ends: dict[str, SeqOutput] = {}
    for token in [EOS, EOS, 99]:
        for out in answer(sched, sched.schedule(), token):
            if out.finished:
                ends[out.request_id] = out
    assert (ends["eos"].finish_reason, ends["eos"].stop_reason, ends["eos"].new_token_ids) == ("stop", None, [EOS])
    assert (ends["stop_id"].finish_reason, ends["stop_id"].stop_reason) == ("stop", EOS)
    assert (ends["min"].finish_reason, ends["min"].stop_reason) == ("stop", None)  # EOS as 2nd token, not 1st
    assert (ends["ignore"].finish_reason, ends["ignore"].new_token_ids) == ("length", [99])
    assert not sched.has_unfinished()


def test_context_length_ends_a_sequence_and_caps_at_kv_capacity() -> None:
    sched = make_scheduler(max_model_len=10)
    sched.add_request("a", [1] * 8, SamplingParams(max_tokens=None))
    ends = run_to_end(sched)
    assert ends["a", 0].finish_reason == "length"
    small = make_scheduler(num_blocks=2, block_size=4, max_model_len=100)
    assert small.max_model_len == 8  # what admission checks prompts against (tests/engine/test_input_processor.py)


def test_misused_steps_raise() -> None:
    sched = make_scheduler()
    sched.add_request("a", [1], SamplingParams())
    plan = sched.schedule()
    with pytest.raises(RuntimeError):
        sched.schedule()
    with pytest.raises(ValueError, match="does not match"):
        sched.update(plan, StepResult(step_id=plan.step_id, token_ids=[], logprobs=[], top_logprobs=[]))


def test_siblings_share_full_prompt_blocks_and_get_consecutive_seeds() -> None:
    for caching in (True, False):
        sched = make_scheduler(enable_prefix_caching=caching)
        prompt = list(range(1, 11))  # 2 full blocks of 4 and a partial one
        sched.add_request("r", prompt, SamplingParams(n=3, seed=41, max_tokens=4))
        first = sched.schedule()
        assert [c.seq_id for c in first.chunks] == [0]  # the siblings wait for sibling 0's prefill
        answer(sched, first)
        second = sched.schedule()
        forks = {c.seq_id: c for c in second.chunks if c.seq_id != 0}
        assert sorted(forks) == [1, 2]
        for chunk in forks.values():
            # full prompt blocks shared, the partial last block recomputed into a private block
            assert chunk.start_pos == 8 and chunk.token_ids == prompt[8:] and chunk.sample
            assert chunk.block_table[:2] == first.chunks[0].block_table[:2]
            assert chunk.block_table[2] != first.chunks[0].block_table[2]
            assert chunk.prefix_token_ids == prompt[:8]
        assert [forks[i].sampling_params.seed for i in (1, 2)] == [42, 43]
        shared = first.chunks[0].block_table[0]
        assert sched.block_manager.blocks[shared].ref_count == 3
        answer(sched, second)
        ends = run_to_end(sched)
        assert {k[1] for k in ends} == {0, 1, 2}
        assert sched.block_manager.num_free_blocks == sched.block_manager.num_blocks


def test_abort_while_in_flight_ignores_the_result_and_frees_blocks() -> None:
    sched = make_scheduler()
    sched.add_request("a", [1, 2, 3, 4, 5], SamplingParams(max_tokens=10))
    sched.add_request("b", [1, 2, 3], SamplingParams(max_tokens=10, n=2))
    plan = sched.schedule()
    sched.abort_request("a")
    assert sched.stats().num_running == 1 and sched.block_manager.usage < 1
    outputs = answer(sched, plan)
    assert [(o.request_id, o.index) for o in outputs] == [("b", 0)]
    nxt = sched.schedule()
    assert nxt.finished_seq_ids == [0]
    assert all(c.seq_id != 0 for c in nxt.chunks)
    answer(sched, nxt)
    sched.abort_request("b", index=1, reason="stop")
    sched.abort_request("nope")  # unknown or already finished: ignored
    ends = run_to_end(sched)
    assert list(ends) == [("b", 0)]
    assert sched.block_manager.num_free_blocks == sched.block_manager.num_blocks


def test_preemption_requeues_the_newest_and_recomputes_its_tokens() -> None:
    sched = make_scheduler(num_blocks=4, block_size=4, max_model_len=16)
    sched.add_request("old", [1, 2, 3], SamplingParams(max_tokens=12, ignore_eos=True))
    sched.add_request("new", [4, 5, 6], SamplingParams(max_tokens=12, ignore_eos=True))
    tokens = {0: [1, 2, 3], 1: [4, 5, 6]}
    rng = random.Random(1)
    preempted_plan = None
    while (plan := sched.schedule()) is not None:
        if sched.stats().num_preemptions and preempted_plan is None:
            preempted_plan = plan
            assert plan.finished_seq_ids == [1] and [c.seq_id for c in plan.chunks] == [0]
            assert [s.seq_id for s in sched.waiting] == [1]
        for chunk in plan.chunks:
            if chunk.seq_id == 1 and chunk.prefix_token_ids is not None and preempted_plan is not None:
                # re-admitted: prompt and generated tokens prefilled again, prompt_len unchanged
                assert chunk.prefix_token_ids + chunk.token_ids == tokens[1] and chunk.prompt_len == 3
        samples = [rng.randrange(1, 9) for c in plan.chunks if c.sample]
        sampled = iter(samples)
        for chunk in plan.chunks:
            if chunk.sample:
                tokens[chunk.seq_id].append(next(sampled))
        answer(sched, plan, samples)
    assert preempted_plan is not None
    assert len(tokens[0]) == 15 and len(tokens[1]) == 15


def test_prefix_cache_hits_only_after_the_blocks_are_computed() -> None:
    sched = make_scheduler()
    prompt = list(range(1, 14))
    sched.add_request("a", prompt, SamplingParams(max_tokens=2))
    sched.add_request("b", prompt, SamplingParams(max_tokens=2))  # same step: nothing computed yet
    plan = sched.schedule()
    assert [c.start_pos for c in plan.chunks] == [0, 0]
    answer(sched, plan)
    sched.add_request("c", prompt + [9], SamplingParams(max_tokens=2))
    plan = sched.schedule()
    assert plan.chunks[-1].start_pos == 12 and plan.chunks[-1].token_ids == [13, 9]
    outputs = {o.request_id: o for o in answer(sched, plan)}
    assert outputs["c"].num_cached_tokens == 12 and outputs["a"].num_cached_tokens == 0
    stats = sched.stats()
    assert (stats.prefix_cache_queries, stats.prefix_cache_hits) == (13 + 13 + 14, 12)


def test_prompt_logprobs_skip_the_prefix_cache_and_come_with_the_first_token() -> None:
    sched = make_scheduler(max_num_batched_tokens=5)
    prompt = list(range(1, 14))
    runner = FakeRunner(sched)
    sched.add_request("warm", prompt, SamplingParams(max_tokens=1))
    while (plan := sched.schedule()) is not None:
        sched.update(plan, runner.execute(plan))
    queries = sched.stats().prefix_cache_queries
    sched.add_request("scored", prompt, SamplingParams(max_tokens=2, n=2, prompt_logprobs=3))
    chunks, firsts = [], {}
    while (plan := sched.schedule()) is not None:
        chunks.extend((c.seq_id, c.start_pos, c.sample, c.sampling_params) for c in plan.chunks)
        for out in sched.update(plan, runner.execute(plan)):
            firsts.setdefault(out.index, out)
    # sibling 0 prefills from position 0 in chunks of 5, each telling the runner how many alternatives
    # to compute; it does not even query the cache. Sibling 1 shares its blocks and asks for nothing.
    leader = [(start, sample) for seq_id, start, sample, params in chunks if seq_id == 1 and start < len(prompt)]
    assert leader == [(0, False), (5, False), (10, True)]
    assert all(params.prompt_logprobs == 3 for seq_id, _, _, params in chunks if seq_id == 1)
    assert all(params.prompt_logprobs is None for seq_id, _, _, params in chunks if seq_id == 2)
    assert [start for seq_id, start, _, _ in chunks if seq_id == 2][0] == 12
    assert sched.stats().prefix_cache_queries == queries + len(prompt)  # sibling 1's lookup only
    assert firsts[0].prompt_logprobs == fake_prompt_logprobs(prompt, 0, len(prompt))
    assert firsts[0].num_cached_tokens == 0 and firsts[1].prompt_logprobs is None


def test_at_most_two_plans_in_flight() -> None:
    with pytest.raises(ValueError, match="max_in_flight"):
        make_scheduler(max_in_flight=3)
    sched = make_scheduler(max_in_flight=2)
    sched.add_request("a", [1, 2, 3], SamplingParams(max_tokens=8))
    first, second = sched.schedule(), sched.schedule()
    assert second.chunks[0].token_ids == [PREVIOUS_TOKEN]  # the token the first plan samples
    with pytest.raises(RuntimeError, match="2 plans"):
        sched.schedule()
    with pytest.raises(RuntimeError, match="oldest"):
        answer(sched, second)
    assert [o.new_token_ids for o in answer(sched, first, 5) + answer(sched, second, 6)] == [[5], [6]]
