"""The scheduler with grammar-constrained sequences, driven by real xgrammar matchers over a tiny vocabulary.

What it owns: advancing each sequence's matcher with the tokens it appends,
ending a sequence whose grammar has terminated ("stop") or rejected its token
("abort"), leaving "length" to ``max_tokens``, naming the constrained rows of
each plan, never planning a constrained sequence whose previous token is
still in flight, and keeping a matcher across preemption.
"""

from __future__ import annotations

import functools

import pytest

from atom_trio.core.plan import StepPlan, StepResult
from atom_trio.core.scheduler import Scheduler
from atom_trio.sampling_params import SamplingParams

xgrammar = pytest.importorskip("xgrammar")

EOS = 0
VOCAB = ["<eos>", "a", "b", "c", "{", "}", "x"]


@pytest.fixture(scope="module")
def compiler():
    info = xgrammar.TokenizerInfo(VOCAB, stop_token_ids=[EOS])
    return xgrammar.GrammarCompiler(info, cache_enabled=False)


def matcher_factory(compiler, ebnf: str):
    return functools.partial(xgrammar.GrammarMatcher, compiler.compile_grammar(ebnf))


def scheduler(**overrides) -> Scheduler:
    fields = dict(
        num_blocks=64, block_size=4, max_num_seqs=8, max_num_batched_tokens=64, max_model_len=64,
        eos_token_ids=frozenset({EOS}),
    )
    fields.update(overrides)
    return Scheduler(**fields)


def answer(plan: StepPlan, tokens: list[int]) -> StepResult:
    n = sum(c.sample for c in plan.chunks)
    assert len(tokens) == n
    return StepResult(step_id=plan.step_id, token_ids=tokens, logprobs=[None] * n, top_logprobs=[None] * n)


GREEDY = SamplingParams(temperature=0.0, max_tokens=10)


def test_a_terminated_grammar_ends_its_sequence_with_stop(compiler):
    s = scheduler()
    s.add_request("r", [6, 6, 6], GREEDY, matcher_factory(compiler, 'root ::= "ab"'))
    outputs = []
    for token in (1, 2, EOS):  # "a", "b", then the stop token the grammar now requires
        plan = s.schedule()
        assert plan.token_bitmask.rows == [0] and len(plan.token_bitmask.grammars) == 1
        outputs += s.update(plan, answer(plan, [token]))
    assert [o.finish_reason for o in outputs] == [None, None, "stop"]
    assert outputs[-1].stop_reason is None  # EOS: the output processor hides its text
    assert s._num_constrained == 0 and not s.has_unfinished()


def test_max_tokens_ends_an_incomplete_output_with_length(compiler):
    s = scheduler()
    s.add_request("r", [6], SamplingParams(max_tokens=2), matcher_factory(compiler, 'root ::= "abc"'))
    outputs = []
    for token in (1, 2):
        plan = s.schedule()
        outputs += s.update(plan, answer(plan, [token]))
    assert [o.finish_reason for o in outputs] == [None, "length"]


def test_a_token_the_grammar_rejects_aborts_the_sequence(compiler):
    s = scheduler()
    s.add_request("r", [6], GREEDY, matcher_factory(compiler, 'root ::= "abc"'))
    plan = s.schedule()
    (output,) = s.update(plan, answer(plan, [3]))  # "c" where "a" must come
    assert output.finish_reason == "abort"
    assert s._num_constrained == 0


def test_rows_count_sampling_chunks_only_and_unconstrained_plans_carry_no_mask(compiler):
    s = scheduler(max_num_batched_tokens=6)
    s.add_request("plain", [6, 6], GREEDY)
    s.add_request("long", [6] * 12, GREEDY)  # prefilled in pieces that do not sample
    s.add_request("json", [6, 6], GREEDY, matcher_factory(compiler, 'root ::= "{" "x"* "}"'))
    plan = s.schedule()  # plain (2, samples), long (4 of 12, does not)
    assert [c.sample for c in plan.chunks] == [True, False]
    assert plan.token_bitmask is None
    s.update(plan, answer(plan, [1]))
    plan = s.schedule()  # plain decodes, long goes on (5 tokens, no sample): no room for json yet
    s.update(plan, answer(plan, [1]))
    while True:
        plan = s.schedule()
        by_id = {c.seq_id: c for c in plan.chunks}
        if len(by_id) == 3 and all(c.sample for c in plan.chunks):
            break
        s.update(plan, answer(plan, [1] * sum(c.sample for c in plan.chunks)))
    json_seq = next(seq for seq in s.running if seq.request_id == "json")
    sampled = [c for c in plan.chunks if c.sample]
    assert plan.token_bitmask.rows == [[c.seq_id for c in sampled].index(json_seq.seq_id)]
    assert plan.token_bitmask.grammars == [json_seq.grammar]


def test_under_async_scheduling_a_constrained_sequence_waits_for_its_token(compiler):
    s = scheduler(max_in_flight=2)
    s.add_request("plain", [6, 6], SamplingParams(max_tokens=8))
    s.add_request("json", [6, 6], SamplingParams(max_tokens=8), matcher_factory(compiler, 'root ::= "{" "x"* "}"'))
    first = s.schedule()
    assert first.token_bitmask.rows == [1]
    second = s.schedule()  # planned while the first runs: the constrained sequence's mask needs its token
    assert [c.seq_id for c in second.chunks] == [first.chunks[0].seq_id]
    assert second.token_bitmask is None
    s.update(first, answer(first, [1, 4]))  # json sampled "{"
    third = s.schedule()
    assert len(third.chunks) == 2 and third.token_bitmask.rows == [1]
    assert third.chunks[1].token_ids == [4]  # its token is known, not fed back from the device


def test_a_preempted_sequence_keeps_its_matcher_and_resumes_the_grammar(compiler):
    s = scheduler(num_blocks=3, block_size=2, max_model_len=6, max_num_batched_tokens=16)
    s.add_request("old", [6, 6], SamplingParams(max_tokens=4, ignore_eos=True))
    s.add_request("json", [6], SamplingParams(max_tokens=5), matcher_factory(compiler, 'root ::= "{xx}"'))
    plan = s.schedule()
    s.update(plan, answer(plan, [1, 4]))  # json: "{"
    json_seq = next(seq for seq in s.running if seq.request_id == "json")
    matcher = json_seq.grammar
    outputs = []
    recomputed = False
    tokens = iter([6, 6, 5])  # json goes on with "x", "x", "}" whenever it runs
    while s.has_unfinished():
        plan = s.schedule()
        recomputed |= any(c.seq_id == json_seq.seq_id and c.prefix_token_ids is not None for c in plan.chunks)
        sampled = [c for c in plan.chunks if c.sample]
        answers = [next(tokens) if c.seq_id == json_seq.seq_id else 1 for c in sampled]
        if plan.token_bitmask is not None:
            assert plan.token_bitmask.grammars == [matcher]
        outputs += s.update(plan, answer(plan, answers))
        if json_seq.grammar is not None and json_seq.grammar.is_completed():
            plan = s.schedule()
            outputs += s.update(plan, answer(plan, [EOS if c.seq_id == json_seq.seq_id else 1 for c in plan.chunks]))
    assert recomputed  # preempted, then introduced to the runner again
    json_out = [o for o in outputs if o.request_id == "json"]
    assert [t for o in json_out for t in o.new_token_ids] == [6, 6, 5, EOS]
    assert json_out[-1].finish_reason == "stop"
