"""Asynchronous scheduling: step N+1 planned and launched before step N's tokens are read.

On the CPU the runner computes a step before `launch` returns, so nothing
overlaps here; what these tests check is that the pipeline gives the very
outputs of the one-step-at-a-time engine, on the real default model, through
everything that can end or move a sequence while its next step is already
in flight: EOS, stop strings, ``max_tokens``, aborts, preemption (a small
KV cache), ``n > 1`` siblings and the prefix cache, and the sampling that
reads tokens (seeds, penalties, logprobs). The overlap itself is measured on
the GPU (docs/performance.md).
"""

from __future__ import annotations

import random

import pytest
import torch
import trio

from atom_trio import EngineConfig, SamplingParams, open_engine
from atom_trio.core.plan import PREVIOUS_TOKEN, SeqChunk, StepPlan
from atom_trio.runner import ModelRunner
from atom_trio.testing import write_tiny_model_dir

QUESTIONS = [
    "What is the capital of France?",
    "Name three colours.",
    "Write a haiku about the sea.",
    "What is 12 times 12?",
    "Who wrote Hamlet?",
    "Explain gravity in one sentence.",
]


def mixed_requests() -> list[tuple[str, SamplingParams]]:
    rng = random.Random(0)
    requests = []
    for i in range(18):
        kind = i % 6
        common = dict(max_tokens=rng.randint(3, 24), seed=i)
        if kind == 0:
            params = SamplingParams(temperature=0.0, **common)
        elif kind == 1:
            params = SamplingParams(temperature=0.9, top_p=0.9, logprobs=2, **common)
        elif kind == 2:  # penalties read the tokens fed back on the device
            params = SamplingParams(temperature=0.0, repetition_penalty=1.3, presence_penalty=0.5, **common)
        elif kind == 3:
            params = SamplingParams(temperature=0.8, n=2, **common)
        elif kind == 4:  # a stop string ends it while its next step is in flight
            params = SamplingParams(temperature=0.0, stop=[" the", "."], **common)
        else:
            params = SamplingParams(temperature=0.0, min_tokens=2, ignore_eos=True, **common)
        question = QUESTIONS[i % len(QUESTIONS)]
        requests.append(([{"role": "user", "content": question}] if i % 2 else question, params))
    return requests


async def run_all(model_dir, requests, **overrides):
    fields = dict(
        model=str(model_dir),
        dtype="float32",
        num_kv_blocks=10,  # 160 tokens for 8 running sequences of up to ~60: some get preempted
        max_model_len=128,
        max_num_seqs=8,
        max_num_batched_tokens=64,
    )
    fields.update(overrides)
    async with open_engine(EngineConfig(**fields)) as engine:
        results = [None] * len(requests)

        async def one(i: int) -> None:
            prompt, params = requests[i]
            final = None
            async for delta in engine.generate(prompt, params):
                if final is None:
                    final = delta
                else:
                    final.add(delta)
            results[i] = final

        with trio.fail_after(300):
            async with trio.open_nursery() as nursery:
                for i in range(len(requests)):
                    nursery.start_soon(one, i)
        stats = engine.stats()
        assert stats.num_running == stats.num_waiting == 0 and stats.kv_cache_usage == 0.0
        return results, stats


async def pipelined_and_one_at_a_time_alike(model_dir, requests, **overrides):
    """Run ``requests`` one step at a time, then pipelined; check the outputs are the same and return them."""
    one_at_a_time, _ = await run_all(model_dir, requests, async_scheduling=False, **overrides)
    pipelined, stats = await run_all(model_dir, requests, async_scheduling=True, **overrides)
    assert stats.num_preemptions > 0
    for (_, params), sync, overlapped in zip(requests, one_at_a_time, pipelined, strict=True):
        assert len(overlapped.outputs) == params.n
        for a, b in zip(sync.outputs, overlapped.outputs, strict=True):
            assert b.token_ids == a.token_ids
            assert b.text == a.text
            assert (b.finish_reason, b.stop_reason) == (a.finish_reason, a.stop_reason)
            if params.logprobs is not None:
                assert b.logprobs == pytest.approx(a.logprobs, abs=1e-4)
    return pipelined


@pytest.mark.parametrize("executor", ["thread", "process"])
async def test_async_scheduling_gives_the_outputs_of_one_step_at_a_time(default_model_dir, executor):
    pipelined = await pipelined_and_one_at_a_time_alike(default_model_dir, mixed_requests(), executor=executor)
    assert {o.finish_reason for r in pipelined for o in r.outputs} == {"stop", "length"}


async def test_deepseek_async_scheduling_gives_the_outputs_of_one_step_at_a_time(tmp_path, default_model_dir):
    """Latent attention (tiny DeepSeek-V3): a decode launched before the previous step's token is read stores
    its latent vector in the slot the plan gave it; preempted sequences recompute theirs. One request of each kind,
    in a cache as tight for them (10 blocks of 8 tokens)."""
    model_dir = write_tiny_model_dir("deepseek_v3", tmp_path, default_model_dir)
    requests = mixed_requests()[:6]  # one of each kind
    await pipelined_and_one_at_a_time_alike(model_dir, requests, block_size=8, num_kv_blocks=10, max_model_len=80)


async def test_abort_while_the_next_step_is_in_flight_frees_everything(default_model_dir):
    async with open_engine(
        EngineConfig(model=str(default_model_dir), dtype="float32", num_kv_blocks=64, async_scheduling=True)
    ) as engine:
        params = SamplingParams(temperature=0.0, max_tokens=200, ignore_eos=True)
        for _ in range(3):
            seen = 0
            async for delta in engine.generate("Count to a hundred.", params):
                seen += len(delta.outputs[0].token_ids)
                if seen >= 5:
                    break  # leaving the stream aborts the request, with one step planned past this one
        with trio.fail_after(30):
            while engine.stats().kv_cache_usage:
                await trio.sleep(0.01)
        out = None
        async for delta in engine.generate("Who wrote Hamlet?", SamplingParams(temperature=0.0, max_tokens=8)):
            out = delta if out is None else out.add(delta) or out
        assert out.finished and out.outputs[0].token_ids


def test_runner_feeds_back_the_previous_tokens_on_the_device(tiny_llama_dir):
    runner = ModelRunner(EngineConfig(model=str(tiny_llama_dir), dtype="float32", num_kv_blocks=16, block_size=4))
    greedy = SamplingParams(temperature=0.0)
    prompts = [[5, 6, 7], [8, 9, 10, 11, 12]]
    chunks = [
        SeqChunk(seq_id=i, token_ids=p, start_pos=0, block_table=[2 * i, 2 * i + 1], prompt_len=len(p), sample=True,
                 sampling_params=greedy)
        for i, p in enumerate(prompts)
    ]
    # One step at a time, the host feeding each token back.
    expected = []
    step = StepPlan(step_id=0, chunks=chunks)
    for n in range(3):
        tokens = runner.execute(step).token_ids
        expected.append(tokens)
        step = StepPlan(step_id=n + 1, chunks=[c.next_decode(t) for c, t in zip(step.chunks, tokens)])
    runner.execute(StepPlan(step_id=9, chunks=[], finished_seq_ids=[0, 1]))
    # Launched two at a time: each decode chunk carries PREVIOUS_TOKEN.
    first = runner.launch(StepPlan(step_id=10, chunks=chunks))
    placeholders = [c.next_decode(PREVIOUS_TOKEN) for c in chunks]
    second = runner.launch(StepPlan(step_id=11, chunks=placeholders))
    assert runner.collect(first).token_ids == expected[0]
    third = runner.launch(StepPlan(step_id=12, chunks=[c.next_decode(PREVIOUS_TOKEN) for c in placeholders]))
    assert runner.collect(second).token_ids == expected[1]
    assert runner.collect(third).token_ids == expected[2]
    # The runner's histories hold the true tokens (what penalties read), not the placeholders.
    assert runner.inputs.histories[1].output == [t[1] for t in expected[:2]]


def test_previous_token_without_a_previous_sample_is_refused(tiny_llama_dir):
    runner = ModelRunner(EngineConfig(model=str(tiny_llama_dir), dtype="float32", num_kv_blocks=16, block_size=4))
    greedy = SamplingParams(temperature=0.0)
    prompt = SeqChunk(seq_id=0, token_ids=[5, 6, 7], start_pos=0, block_table=[0], prompt_len=3, sample=True,
                      sampling_params=greedy)
    runner.execute(StepPlan(step_id=0, chunks=[prompt]))
    other = SeqChunk(seq_id=1, token_ids=[5, 6], start_pos=0, block_table=[1], prompt_len=2, sample=True,
                     sampling_params=greedy)
    runner.execute(StepPlan(step_id=1, chunks=[other]))  # the last step did not sample sequence 0
    with pytest.raises(ValueError, match="PREVIOUS_TOKEN"):
        runner.execute(StepPlan(step_id=2, chunks=[prompt.next_decode(PREVIOUS_TOKEN)]))
    with pytest.raises(ValueError, match="PREVIOUS_TOKEN"):
        runner.execute(StepPlan(step_id=3, chunks=[attrs_evolve(other, token_ids=[PREVIOUS_TOKEN, 3])]))
    # refused plans left the runner as it was: sequence 0 still decodes from the host's token
    assert runner.execute(StepPlan(step_id=4, chunks=[prompt.next_decode(9)])).token_ids
    assert torch.is_tensor(runner.inputs.last_tokens)


def attrs_evolve(chunk: SeqChunk, **changes) -> SeqChunk:
    import attrs

    return attrs.evolve(chunk, **changes)
