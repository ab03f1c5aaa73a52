"""torch.compile levels on the CPU: the compiled forward decodes the same greedy tokens as eager.

One model load per level; the compiled runner sees a prefill, then decode
steps at batch 1 and batch 3, so both the token-count-1 graph and the
dynamic one run.
"""

from __future__ import annotations

import pytest

from atom_trio.config import EngineConfig
from atom_trio.engine.plan import SeqChunk, StepPlan
from atom_trio.engine.sampling_params import SamplingParams
from atom_trio.loader import load_tokenizer
from atom_trio.runner import ModelRunner

GREEDY = SamplingParams(temperature=0.0, ignore_eos=True)
PROMPTS = ["The capital of France is", "def fibonacci(n):", "Water boils at a temperature of"]
STEPS = 4


def greedy_tokens(runner: ModelRunner, prompts: list[list[int]], first_seq_id: int) -> list[list[int]]:
    """``STEPS`` greedy tokens for each prompt, decoded together as one batch (sequence ids not used before)."""
    blocks_per_seq = -(-(max(map(len, prompts)) + STEPS) // runner.block_size)
    seq_ids = range(first_seq_id, first_seq_id + len(prompts))
    tables = {s: list(range(i * blocks_per_seq, (i + 1) * blocks_per_seq)) for i, s in enumerate(seq_ids)}
    outputs: list[list[int]] = [[] for _ in prompts]
    tokens, starts = prompts, [0] * len(prompts)
    for step in range(STEPS):
        chunks = [
            SeqChunk(
                seq_id=s,
                token_ids=t,
                start_pos=start,
                block_table=tables[s],
                prompt_len=len(p),
                sample=True,
                sampling_params=GREEDY,
            )
            for s, t, start, p in zip(seq_ids, tokens, starts, prompts)
        ]
        result = runner.execute(StepPlan(step_id=step, chunks=chunks, finished_seq_ids=[]))
        starts = [start + len(t) for start, t in zip(starts, tokens)]
        tokens = [[t] for t in result.token_ids]
        for out, t in zip(outputs, result.token_ids):
            out.append(t)
    return outputs


def decode(level: int) -> list[list[list[int]]]:
    config = EngineConfig(dtype="bfloat16", num_kv_blocks=32, block_size=16, level=level)
    tokenizer = load_tokenizer(config)
    prompts = [tokenizer.encode(p) for p in PROMPTS]
    runner = ModelRunner(config)
    try:
        return [greedy_tokens(runner, prompts[:1], 0), greedy_tokens(runner, prompts, 1)]
    finally:
        runner.close()


@pytest.fixture(scope="module")
def eager_tokens() -> list[list[list[int]]]:
    return decode(0)


def test_default_level_on_cpu_is_eager() -> None:
    runner = ModelRunner(EngineConfig(load_format="dummy", num_kv_blocks=8, block_size=16))
    try:
        assert runner.level == 0
    finally:
        runner.close()


@pytest.mark.parametrize("level", [1, 3])
def test_compiled_greedy_tokens_match_eager(level: int, eager_tokens: list[list[list[int]]]) -> None:
    assert decode(level) == eager_tokens
