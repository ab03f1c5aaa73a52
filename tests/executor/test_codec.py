"""The engine <-> worker codec: exact round trips of every message, the stateful plan codec, corrupt bodies."""

from __future__ import annotations

import random
import weakref

import attrs
import msgpack
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from atom_trio.config import EngineConfig
from atom_trio.core.facts import ModelFacts
from atom_trio.core.plan import SeqChunk, StepPlan, StepResult, TokenBitmask
from atom_trio.sampling_params import SamplingParams, StructuredOutputsParams
from atom_trio.core.scheduler import Scheduler
from atom_trio.executor import messages
from atom_trio.executor.codec import Decoder, Encoder
from atom_trio.executor.framing import HEADER

INT64 = st.integers(-(2**63), 2**63 - 1)
FLOATS = st.floats(allow_nan=False)
# Any str a JSON request can carry, lone surrogates included.
TEXT = st.text(st.characters(codec=None, categories=None), max_size=8)
TOKEN = st.integers(0, 200_000)

sampling_params = st.builds(
    SamplingParams,
    n=st.integers(1, 8),
    temperature=FLOATS,
    top_p=FLOATS,
    top_k=INT64,
    min_p=FLOATS,
    seed=st.none() | st.integers(-(2**63), 2**64 - 1),
    max_tokens=st.none() | INT64,
    min_tokens=INT64,
    stop=st.lists(TEXT, max_size=3),
    stop_token_ids=st.lists(TOKEN, max_size=3),
    ignore_eos=st.booleans(),
    presence_penalty=FLOATS,
    frequency_penalty=FLOATS,
    repetition_penalty=FLOATS,
    logit_bias=st.none() | st.dictionaries(TOKEN, FLOATS, max_size=4),
    logprobs=st.none() | st.integers(0, 20),
    skip_special_tokens=st.booleans(),
    include_stop_str_in_output=st.booleans(),
    prompt_logprobs=st.none() | st.integers(0, 20),
)

# One prompt token: itself, then its alternatives (or None for the prompt's first token).
PROMPT_TOKEN_LOGPROBS = st.none() | st.lists(st.tuples(TOKEN, FLOATS), min_size=1, max_size=4)

step_results = st.integers(0, 2**40).flatmap(
    lambda step_id: st.integers(0, 6).flatmap(
        lambda n: st.builds(
            StepResult,
            step_id=st.just(step_id),
            token_ids=st.lists(TOKEN, min_size=n, max_size=n),
            logprobs=st.lists(st.none() | FLOATS, min_size=n, max_size=n),
            top_logprobs=st.lists(st.none() | st.lists(st.tuples(TOKEN, FLOATS), max_size=4), min_size=n, max_size=n),
            # one entry per chunk, sampled or not: its length need not be n
            prompt_logprobs=st.none() | st.lists(st.none() | st.lists(PROMPT_TOKEN_LOGPROBS, max_size=5), max_size=8),
            num_tokens=st.none() | st.lists(st.integers(1, 4), max_size=n),
            draft_token_ids=st.none() | st.lists(st.lists(TOKEN, max_size=4), max_size=n),
        )
    )
)


# In a plan, -1 too: async output's stand-in for the token a sequence sampled in the step before, still on the GPU.
PLAN_TOKEN = st.integers(-1, 200_000)
PLAN_TOKENS = st.lists(PLAN_TOKEN, max_size=12)
BLOCKS = st.lists(st.integers(0, 10_000), max_size=6)


@st.composite
def plan_streams(draw) -> list[StepPlan]:
    """Consecutive plans as the scheduler makes them, through every path of the delta codec.

    Sequences join, leave (finish or are preempted) and come back; a batch may
    keep its previous order (the steady path); sampling parameters change or
    stay. A block table follows the scheduler's invariant: while the runner
    knows a sequence, its table only grows at the end; a sequence that sits
    out a plan or is introduced again (its chunk carries ``prefix_token_ids``)
    may come back with any table and prompt length. A known table may also
    shrink, which the encoder notices. A chunk may verify drafts (its last
    tokens) and ask for drafts; the table of a sequence that verified drafts
    may then end in other blocks at the same length (the scheduler gave back
    the blocks of rejected drafts and took new ones).
    """
    tables: dict[int, list[int]] = {}
    params: dict[int, SamplingParams | None] = {}
    prompt_lens: dict[int, int] = {}
    plans = []
    seq_ids: list[int] = []
    verified: set[int] = set()
    for step_id in range(draw(st.integers(1, 6))):
        known = set(seq_ids)
        if not seq_ids or draw(st.booleans()):
            seq_ids = draw(st.lists(st.integers(0, 6), unique=True, max_size=5))
        plain = draw(st.booleans())  # every chunk samples, none is introduced
        decode = plain and draw(st.booleans())  # and each brings one token
        chunks = []
        for seq_id in seq_ids:
            prefix = None if plain else draw(st.none() | PLAN_TOKENS)
            if seq_id in known and prefix is None:
                old = tables[seq_id]
                if seq_id in verified and old and draw(st.booleans()):
                    tables[seq_id] = old[:-1] + [draw(st.integers(0, 10_000))]
                elif draw(st.integers(0, 9)):
                    tables[seq_id] = old + draw(st.lists(st.integers(0, 10_000), max_size=2))
                else:
                    tables[seq_id] = draw(st.lists(st.integers(0, 10_000), max_size=max(len(old) - 1, 0)))
            else:
                tables[seq_id] = draw(BLOCKS)
                prompt_lens[seq_id] = draw(st.integers(0, 1 << 20))
            if seq_id not in params or draw(st.booleans()):
                params[seq_id] = draw(sampling_params if plain else st.none() | sampling_params)
            tokens = [draw(PLAN_TOKEN)] if decode else draw(PLAN_TOKENS)
            sample = plain or params[seq_id] is not None
            speculative = sample and draw(st.integers(0, 3)) == 0
            num_drafts = draw(st.integers(0, max(len(tokens) - 1, 0))) if speculative else 0
            chunks.append(
                SeqChunk(
                    seq_id=seq_id,
                    token_ids=tokens,
                    start_pos=draw(st.integers(0, 1 << 20)),
                    block_table=tables[seq_id][:],  # a fresh slice, as the scheduler's
                    prompt_len=prompt_lens[seq_id],
                    sample=sample,
                    sampling_params=params[seq_id],
                    prefix_token_ids=prefix,
                    num_draft_tokens=num_drafts,
                    propose_drafts=speculative and draw(st.booleans()),
                )
            )
        verified = {c.seq_id for c in chunks if c.num_draft_tokens}
        plans.append(StepPlan(step_id=step_id, chunks=chunks, finished_seq_ids=draw(st.lists(st.integers(0, 6)))))
    return plans


def round_trip(message, encoder=None, decoder=None):
    frame = (encoder or Encoder()).encode(message)
    (length,) = HEADER.unpack_from(frame)
    assert length == len(frame) - HEADER.size
    return (decoder or Decoder()).decode(frame[HEADER.size :])


@settings(max_examples=300)
@given(sampling_params)
def test_sampling_params_round_trip_exactly(params):
    plan = StepPlan(
        step_id=1,
        chunks=[
            SeqChunk(
                seq_id=3, token_ids=[1], start_pos=0, block_table=[0], prompt_len=1, sample=True, sampling_params=params
            )
        ],
    )
    decoded = round_trip(messages.Execute(plan=plan)).plan.chunks[0].sampling_params
    assert decoded == params
    assert type(decoded.stop) is tuple and type(decoded.stop_token_ids) is tuple


@settings(max_examples=200)
@given(plan_streams())
def test_plan_streams_round_trip_exactly_on_every_rank(plans):
    # One encoder feeds every rank (the executor sends the same frames to all), Execute and Launch alike.
    sent = [(messages.Launch if plan.step_id % 2 else messages.Execute)(plan=plan) for plan in plans]
    encoder, ranks = Encoder(), [Decoder(), Decoder(), Decoder()]
    launched, kept = None, []
    for message in sent:
        body = encoder.encode(message)[HEADER.size :]
        # Each rank keeps its plans another while, so that the decoder may reuse the chunks of some:
        # none (as the worker does), until the next plan is decoded (as a runner holds the step it
        # launched), or for good.
        assert ranks[0].decode(body) == message
        previous, launched = launched, ranks[1].decode(body)
        assert launched == message
        assert previous is None or previous == sent[len(kept) - 1]
        kept.append(ranks[2].decode(body))
    assert kept == sent  # a plan someone holds never changes


@given(step_results)
def test_step_results_round_trip_exactly(result):
    assert round_trip(messages.Result(result=result)) == messages.Result(result=result)


@pytest.mark.parametrize(
    "result",
    [
        StepResult(step_id=4, token_ids=[9, 8], logprobs=[None, None], top_logprobs=[None, None]),
        StepResult(step_id=5, token_ids=[9, 8], logprobs=[-0.5, None], top_logprobs=[[(9, -0.5), (3, -1.5)], None]),
        StepResult(step_id=6, token_ids=[9], logprobs=[-0.25], top_logprobs=[[]]),
        StepResult(
            step_id=7,
            token_ids=[9],
            logprobs=[None],
            top_logprobs=[None],
            prompt_logprobs=[None, [None, [(5, -0.5), (7, -0.25)]], []],
        ),
        StepResult(step_id=8, token_ids=[], logprobs=[], top_logprobs=[], prompt_logprobs=[None]),
    ],
    ids=["no-logprobs", "logprobs", "zero-alternatives", "prompt-logprobs", "unsampled-prefill"],
)
def test_results_with_and_without_logprobs_round_trip_with_their_types(result):
    decoded = round_trip(messages.Result(result=result)).result
    assert decoded == result
    pairs = [pair for top in decoded.top_logprobs if top for pair in top]
    pairs += [pair for chunk in decoded.prompt_logprobs or [] if chunk for entry in chunk if entry for pair in entry]
    assert all(type(pair) is tuple for pair in pairs)


def test_a_step_without_logprobs_sends_little_more_than_its_tokens():
    n = 256
    plain = StepResult(step_id=4, token_ids=[40_000] * n, logprobs=[None] * n, top_logprobs=[None] * n)
    assert len(Encoder().encode(messages.Result(result=plain))) < 3 * n + 32


@pytest.mark.parametrize(
    "message",
    [
        messages.Init(config=EngineConfig(model="/m", dtype="float32", num_kv_blocks=7), rank=1, world_size=2),
        messages.InitDone(
            facts=ModelFacts(
                num_kv_blocks=9, block_size=16, max_model_len=2048, vocab_size=100, eos_token_ids=frozenset({2, 5})
            )
        ),
        messages.Ack(step_id=12),
        messages.Shutdown(),
        messages.Flush(),
        messages.ProfileStart(trace_prefix="/traces/atom_trio-1 \ud800"),
        messages.ProfileStop(),
        messages.Profiled(trace="/traces/atom_trio-1-rank0.trace.json"),
        messages.Profiled(error="rank 1 could not write its trace"),
        messages.Error(type_name="ValueError", message="bad \ud800", traceback="Traceback ...\n"),
    ],
    ids=lambda m: type(m).__name__,
)
def test_control_messages_round_trip(message):
    decoded = round_trip(message)
    assert decoded == message
    if isinstance(message, messages.Init):
        assert isinstance(decoded.config, EngineConfig)
    if isinstance(message, messages.InitDone):
        assert type(decoded.facts.eos_token_ids) is frozenset


def decode_step(tables: list[list[int]], params: list[SamplingParams], step_id: int) -> StepPlan:
    return StepPlan(
        step_id=step_id,
        chunks=[
            SeqChunk(
                seq_id=i,
                token_ids=[7],
                start_pos=16 * len(t) - 1,
                block_table=t[:],  # the scheduler hands out a fresh slice each step
                prompt_len=3,
                sample=True,
                sampling_params=p,
            )
            for i, (t, p) in enumerate(zip(tables, params))
        ],
    )


def test_steady_decode_sends_only_what_changed():
    tables = [list(range(100 * i, 100 * i + 64)) for i in range(32)]
    params = [SamplingParams(temperature=0.5, stop=["x"]) for _ in tables]
    encoder, decoder = Encoder(), Decoder()
    first = encoder.encode(messages.Execute(plan=decode_step(tables, params, 0)))
    tables[5].append(9999)  # one sequence crossed into a new block
    plan = decode_step(tables, params, 1)
    steady = encoder.encode(messages.Execute(plan=plan))
    assert len(steady) * 8 < len(first)
    decoder.decode(first[HEADER.size :])
    decoded = decoder.decode(steady[HEADER.size :]).plan
    assert decoded == plan
    assert decoded.chunks[5].block_table[-1] == 9999


def test_a_table_grown_in_place_after_the_step_is_still_sent():
    """The encoder keeps no reference to the plan's lists, so a scheduler that grows its own list in place is safe."""
    table = [1, 2, 3]
    params = SamplingParams()
    encoder, decoder = Encoder(), Decoder()
    for step in range(3):
        chunk = SeqChunk(
            seq_id=0, token_ids=[1], start_pos=0, block_table=table, prompt_len=1, sample=True, sampling_params=params
        )
        plan = StepPlan(step_id=step, chunks=[chunk])
        assert decoder.decode(encoder.encode(messages.Execute(plan=plan))[4:]).plan.chunks[0].block_table == table
        table.append(10 + step)


def _decode_chunk(seq_id: int, table: list[int], prefix: list[int] | None = None) -> SeqChunk:
    return SeqChunk(
        seq_id=seq_id, token_ids=[-1], start_pos=16 * len(table) - 1, block_table=table, prompt_len=5, sample=True,
        sampling_params=SamplingParams(), prefix_token_ids=prefix,
    )


def test_a_reintroduced_sequence_may_bring_a_whole_new_table():
    """After preemption (or whenever its chunk carries ``prefix_token_ids``) a sequence's table is not a delta."""
    encoder, decoder = Encoder(), Decoder()
    plans = [
        StepPlan(step_id=0, chunks=[_decode_chunk(0, [1, 2, 3, 4]), _decode_chunk(1, [5, 6])]),
        # sequence 0 preempted: it sits out a plan, then comes back with other blocks, fewer of them
        StepPlan(step_id=1, chunks=[_decode_chunk(1, [5, 6])], finished_seq_ids=[0]),
        StepPlan(step_id=2, chunks=[_decode_chunk(1, [5, 6]), _decode_chunk(0, [9, 8], prefix=[7] * 31)]),
        # reintroduced at once, with a table of the same length: only the introduction says it changed
        StepPlan(step_id=3, chunks=[_decode_chunk(1, [5, 6]), _decode_chunk(0, [3, 4], prefix=[7] * 31)]),
        StepPlan(step_id=4, chunks=[_decode_chunk(1, [5, 6, 7]), _decode_chunk(0, [3, 4])]),
    ]
    for plan in plans:
        assert decoder.decode(encoder.encode(messages.Execute(plan=plan))[4:]).plan == plan


def test_steady_decode_reuses_only_chunks_that_no_one_holds():
    encoder, decoder = Encoder(), Decoder()
    plans = [StepPlan(step_id=s, chunks=[_decode_chunk(i, [i] * (1 + s // 2)) for i in range(3)]) for s in range(6)]

    def step(step_id: int) -> StepPlan:
        decoded = decoder.decode(encoder.encode(messages.Execute(plan=plans[step_id]))[4:]).plan
        assert decoded == plans[step_id]
        return decoded

    held = step(0)  # for good
    dropped = weakref.ref(step(1).chunks[0])  # at once: only the decoder holds step 1's chunks
    launched = step(2)
    assert launched.chunks[0] is dropped()
    # A runner holds the step it launched (2) until the next one (3) is decoded; step 0's are held too.
    launched, collected = step(3), weakref.ref(launched.chunks[0])
    assert launched.chunks[0] is not collected() and launched.chunks[0] is not held.chunks[0]
    assert step(4).chunks[0] is collected()  # the chunks of step 2, which nobody holds any more
    assert held == plans[0]


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), num_blocks=st.integers(4, 12), prefix_caching=st.booleans())
def test_the_real_schedulers_plans_round_trip_through_preemption(seed, num_blocks, prefix_caching):
    """The codec sends block tables as deltas on the scheduler's invariant: check it on the scheduler's own plans,
    with few enough blocks that sequences get preempted and come back, some with their blocks in the cache."""
    rng = random.Random(seed)
    scheduler = Scheduler(
        num_blocks=num_blocks, block_size=4, max_num_seqs=6, max_num_batched_tokens=24, max_model_len=40,
        enable_prefix_caching=prefix_caching,
    )
    shared_prompt = [rng.randrange(100) for _ in range(9)]
    for i in range(8):
        prompt = shared_prompt[: rng.randint(1, 9)] + [rng.randrange(100) for _ in range(rng.randint(0, 6))]
        scheduler.add_request(f"r{i}", prompt, SamplingParams(max_tokens=rng.randint(1, 20), n=rng.randint(1, 2)))
    encoder, decoder = Encoder(), Decoder()
    while (plan := scheduler.schedule()) is not None:
        assert decoder.decode(encoder.encode(messages.Execute(plan=plan))[4:]).plan == plan
        n = sum(c.sample for c in plan.chunks)
        tokens = [rng.randrange(100) for _ in range(n)]
        result = StepResult(step_id=plan.step_id, token_ids=tokens, logprobs=[None] * n, top_logprobs=[None] * n)
        scheduler.update(plan, result)
    assert not scheduler.has_unfinished()


def test_unencodable_plan_leaves_the_codec_in_step():
    encoder, decoder = Encoder(), Decoder()

    def plan(step_id, table, params):
        chunk = SeqChunk(seq_id=0, token_ids=[1], start_pos=0, block_table=table, prompt_len=1, sample=True, sampling_params=params)
        return StepPlan(step_id=step_id, chunks=[chunk])

    decoder.decode(encoder.encode(messages.Execute(plan=plan(0, [1], SamplingParams())))[4:])
    with pytest.raises(OverflowError):
        encoder.encode(messages.Execute(plan=plan(1, [1, 2], SamplingParams(min_tokens=2**70))))
    good = plan(2, [1, 2], SamplingParams())
    assert decoder.decode(encoder.encode(messages.Execute(plan=good))[4:]).plan == good


@pytest.mark.parametrize("body", [b"", b"\xc1", b"\x92\x63\x90", b"\x92\x02\x01"], ids=["empty", "invalid", "tag", "shape"])
def test_garbage_is_a_protocol_error(body):
    with pytest.raises(messages.ProtocolError):
        Decoder().decode(body)


def _plan_body(**changes) -> bytes:
    """A valid Execute body for a fresh decoder, with fields of its wire form replaced."""
    table = [1, 2, 3]
    plan = StepPlan(
        step_id=1,
        chunks=[
            SeqChunk(
                seq_id=s, token_ids=[5], start_pos=40, block_table=table, prompt_len=9, sample=True,
                sampling_params=SamplingParams(),
            )
            for s in (0, 1)
        ],
    )
    tag, payload = msgpack.unpackb(Encoder().encode(messages.Execute(plan=plan))[HEADER.size :])
    fields = [
        "step_id", "seq_ids", "token_ids", "start_pos", "unplain", "introductions", "appends", "params", "finished"
    ]
    for name, value in changes.items():
        payload[fields.index(name)] = value
    return msgpack.packb([tag, payload])


def test_a_valid_plan_body_decodes():
    assert len(Decoder().decode(_plan_body()).plan.chunks) == 2


@pytest.mark.parametrize(
    "body",
    [
        _plan_body()[:-3],  # truncated
        _plan_body() + b"\x00",  # trailing bytes
        _plan_body(start_pos=[40]),  # columns that do not line up
        _plan_body(appends=[[0, 2, [7]]]),  # appends to a table the decoder does not hold
        _plan_body(introductions=[[0, 9, [1, 2, 3]], [5, 9, [7]]]),  # introduces a chunk the plan does not have
        _plan_body(introductions=[[0, 9, [1, 2, 3]]]),  # names a sequence it does not introduce
        _plan_body(params=[[0, [1, 2]]]),  # sampling parameters with fields missing
        _plan_body(seq_ids=None),
    ],
    ids=["truncated", "trailing", "ragged", "append", "index", "stranger", "params", "type"],
)
def test_a_corrupt_plan_is_a_protocol_error(body):
    with pytest.raises(messages.ProtocolError):
        Decoder().decode(body)


def test_appending_to_another_table_than_the_decoder_holds_is_a_protocol_error():
    decoder = Decoder()
    decoder.decode(_plan_body())  # both sequences now hold 3 blocks
    with pytest.raises(messages.ProtocolError, match=r"appends to 9 blocks of sequence 0, which holds \[1, 2, 3\]"):
        decoder.decode(_plan_body(introductions=[], appends=[[0, 9, [7]]]))


def test_a_grammar_mask_crosses_with_its_plan_and_the_grammar_stays_behind():
    params = SamplingParams(temperature=0.0, structured_outputs=StructuredOutputsParams(regex="[a-z]+"))
    chunks = [_decode_chunk(i, [i], prefix=[1, 2]) for i in range(3)]
    chunks[1].sampling_params = params
    words = np.random.default_rng(0).integers(-(2**31), 2**31, size=(1, 5), dtype=np.int32)
    plan = StepPlan(step_id=4, chunks=chunks, token_bitmask=TokenBitmask([1], [object()], words))
    encoder, decoder = Encoder(), Decoder()
    decoded = round_trip(messages.Execute(plan=plan), encoder, decoder).plan
    assert decoded.token_bitmask.rows == [1] and decoded.token_bitmask.grammars == []
    assert decoded.token_bitmask.words.dtype == np.int32 and decoded.token_bitmask.words.flags.writeable
    np.testing.assert_array_equal(decoded.token_bitmask.words, words)
    # the runner needs the mask, not the grammar: everything else of the parameters crosses as it was
    assert decoded.chunks[1].sampling_params == attrs.evolve(params, structured_outputs=None)
    # and the next plan, without a mask, is sent as every unconstrained plan is: one field less
    plain = StepPlan(step_id=5, chunks=[c.next_decode(9) for c in chunks])
    body = encoder.encode(messages.Execute(plan=plain))[HEADER.size :]
    assert len(msgpack.unpackb(body, strict_map_key=False)[1]) == 9
    assert decoder.decode(body).plan.token_bitmask is None
