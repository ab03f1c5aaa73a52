"""Scheduler + real model runner on the default model, greedy: prefix caching and preemption change nothing.

One runner (float32, a small KV cache of ``NUM_KV_BLOCKS`` blocks) serves
every test; each test drives fresh schedulers over it, with the runner's
block count or fewer, so that prefix caching and preemption happen for real.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from atom_trio.config import EngineConfig
from atom_trio.sampling_params import SamplingParams
from atom_trio.core.scheduler import Scheduler

NUM_KV_BLOCKS = 24
BLOCK_SIZE = 16
MAX_MODEL_LEN = NUM_KV_BLOCKS * BLOCK_SIZE

SHARED_PREFIX = (
    "You are a helpful assistant who answers questions about geography, history and science in short, "
    "precise sentences. Always name the country, the century or the unit that the answer depends on, "
    "and never invent a fact you are not sure of. Question: "
)
QUESTIONS = [
    "What is the capital of France?",
    "Which river flows through Cairo?",
    "How far is the Moon from the Earth?",
    "Who painted the Mona Lisa?",
]


@pytest.fixture(scope="module")
def runner(default_model_dir: Path):
    from atom_trio.runner import ModelRunner

    model_runner = ModelRunner(
        EngineConfig(
            model=str(default_model_dir),
            dtype="float32",
            num_kv_blocks=NUM_KV_BLOCKS,
            block_size=BLOCK_SIZE,
            max_model_len=MAX_MODEL_LEN,
            seed=0,
        )
    )
    yield model_runner
    model_runner.close()


@pytest.fixture(scope="module")
def prompts(default_model_dir: Path) -> list[list[int]]:
    from atom_trio.loader import load_tokenizer

    tokenizer = load_tokenizer(EngineConfig(model=str(default_model_dir)))
    return [tokenizer.encode(SHARED_PREFIX + q) for q in QUESTIONS]


def make_scheduler(runner, *, caching: bool, num_blocks: int = NUM_KV_BLOCKS, max_num_seqs: int = 8) -> Scheduler:
    return Scheduler(
        num_blocks=num_blocks,
        block_size=runner.block_size,
        max_num_seqs=max_num_seqs,
        max_num_batched_tokens=256,
        max_model_len=MAX_MODEL_LEN,
        enable_prefix_caching=caching,
        eos_token_ids=runner.eos_token_ids,
    )


def generate(
    runner, scheduler: Scheduler, prompts: list[list[int]], params: SamplingParams, *, one_per_step: bool = False
) -> tuple[list[list[int]], dict[str, int], list]:
    """Run ``prompts`` to the end; with ``one_per_step`` a request is added each step, not all at once.

    Returns each request's output tokens, its ``num_cached_tokens``, and the plans.
    """
    pending = [(f"r{i}", p) for i, p in enumerate(prompts)]
    outputs: dict[str, list[int]] = {rid: [] for rid, _ in pending}
    cached: dict[str, int] = {}
    plans = []
    while pending or scheduler.has_unfinished():
        for rid, prompt in pending[: 1 if one_per_step else None]:
            scheduler.add_request(rid, prompt, params)
        pending = pending[1:] if one_per_step else []
        plan = scheduler.schedule()
        plans.append(plan)
        for out in scheduler.update(plan, runner.execute(plan)):
            outputs[out.request_id].extend(out.new_token_ids)
            cached[out.request_id] = out.num_cached_tokens
    return [outputs[f"r{i}"] for i in range(len(prompts))], cached, plans


GREEDY = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)


def test_prefix_caching_does_not_change_greedy_outputs(runner, prompts) -> None:
    on = make_scheduler(runner, caching=True)
    with_cache, cached, _ = generate(runner, on, prompts, GREEDY, one_per_step=True)
    off = make_scheduler(runner, caching=False)
    without_cache, _, _ = generate(runner, off, prompts, GREEDY, one_per_step=True)
    assert with_cache == without_cache
    assert all(len(tokens) == 12 for tokens in with_cache)
    # every request after the first found the shared system prompt's full blocks
    assert on.stats().prefix_cache_hits > 0 and off.stats().prefix_cache_hits == 0
    assert cached["r0"] == 0 and all(cached[f"r{i}"] >= BLOCK_SIZE for i in range(1, len(prompts)))


def test_a_request_sharing_a_long_prefix_reuses_its_blocks(runner, prompts) -> None:
    scheduler = make_scheduler(runner, caching=True)
    first, _, first_plans = generate(runner, scheduler, prompts[:1], GREEDY)
    prefix_blocks = first_plans[0].chunks[0].block_table
    common = next(i for i, (a, b) in enumerate(zip(prompts[0], prompts[1])) if a != b)
    expected_hit = common // BLOCK_SIZE * BLOCK_SIZE
    assert expected_hit >= 2 * BLOCK_SIZE

    before = scheduler.stats()
    second, cached, second_plans = generate(runner, scheduler, prompts[1:2], GREEDY)
    after = scheduler.stats()
    chunk = second_plans[0].chunks[0]
    assert chunk.start_pos == expected_hit and chunk.prefix_token_ids == prompts[1][:expected_hit]
    assert chunk.block_table[: expected_hit // BLOCK_SIZE] == prefix_blocks[: expected_hit // BLOCK_SIZE]
    assert after.prefix_cache_hits - before.prefix_cache_hits == expected_hit
    assert after.prefix_cache_queries - before.prefix_cache_queries == len(prompts[1])
    assert cached["r0"] == expected_hit

    # and the reused KV is right: the same tokens as computing the prompt from scratch
    alone, _, _ = generate(runner, make_scheduler(runner, caching=False), prompts[1:2], GREEDY)
    assert second == alone


@pytest.mark.parametrize("caching", [False, True], ids=["recompute", "recompute-from-cache"])
def test_preempted_sequences_resume_with_the_same_tokens(runner, prompts, caching: bool) -> None:
    # with enough blocks for all at once, nothing is preempted: the reference
    roomy = make_scheduler(runner, caching=caching)
    reference, _, _ = generate(runner, roomy, prompts, GREEDY)
    assert roomy.stats().num_preemptions == 0

    # two running sequences in 9 blocks: each needs 5 blocks (56 + 12 tokens) by its end, so the newer one
    # is preempted mid-decode, requeued and re-admitted with its generated tokens to prefill again
    crowded = make_scheduler(runner, caching=caching, num_blocks=9, max_num_seqs=2)
    tokens, _, plans = generate(runner, crowded, prompts, GREEDY)
    assert crowded.stats().num_preemptions > 0
    resumed = [
        c
        for plan in plans
        for c in plan.chunks
        if c.prefix_token_ids is not None and c.start_pos + len(c.token_ids) > c.prompt_len
    ]
    assert resumed, "no sequence was re-admitted with generated tokens to prefill again"
    if caching:  # its full blocks stayed cached while it waited, so it skipped recomputing them
        assert any(c.start_pos > 0 for c in resumed)
    assert tokens == reference
