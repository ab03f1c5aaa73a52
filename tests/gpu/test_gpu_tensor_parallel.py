"""Tensor parallelism over NCCL on two GPUs, through the engine and its worker processes.

Skipped without two CUDA GPUs, and without a tokenizer to pad to the model's
vocabulary (``.gpu_models/smollm2-tokenizer``, or ``$ATOM_TRIO_TEST_TOKENIZER``:
any directory with a byte-level BPE ``tokenizer.json``).

The model has Llama-3.1-8B's shapes with 4 of its 32 layers and transformers'
own initialisation (normal, std 0.02), saved as a checkpoint, so logits have
real margins between candidates. TP=1 and TP=2 (CUDA graphs, NCCL all-reduces
captured inside them) must pick the same greedy tokens, up to near-ties that
bf16 rounding of a different reduction order may flip, and give the same
logprobs within bf16 noise.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")

from atom_trio import SamplingParams, open_engine  # noqa: E402
from atom_trio.config import EngineConfig  # noqa: E402
from atom_trio.testing import LLAMA_3_1_8B, write_model_dir  # noqa: E402

TOKENIZER = Path(os.environ.get("ATOM_TRIO_TEST_TOKENIZER", ".gpu_models/smollm2-tokenizer"))
STEPS = 32
PARAMS = SamplingParams(temperature=0.0, max_tokens=STEPS, ignore_eos=True, logprobs=5)
BF16_ROUNDING = 0.13
"""Two bf16 units in the last place at the logits' magnitude here (8 to 16: one unit is 0.0625).

The LM head's logits are bf16; a different reduction order may round a logit
one unit either way, so two candidates within two units can swap places, and a
logprob can move by that much."""


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    import transformers

    if not (TOKENIZER / "tokenizer.json").is_file():
        pytest.skip(f"no tokenizer at {TOKENIZER}")
    spec = dict(LLAMA_3_1_8B, num_hidden_layers=4)
    path = write_model_dir(tmp_path_factory.mktemp("llama-8b-4-layers"), spec, TOKENIZER)
    config = transformers.AutoConfig.from_pretrained(path)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(path)
    del model
    torch.cuda.empty_cache()
    return path


async def greedy(model_dir: Path, prompts: list[list[int]], tensor_parallel_size: int):
    config = EngineConfig(
        model=str(model_dir),
        dtype="bfloat16",
        tensor_parallel_size=tensor_parallel_size,
        executor="process",
        max_model_len=1024,
        max_num_seqs=8,
        gpu_memory_utilization=0.5,
    )
    async with open_engine(config) as engine:
        assert len(engine.executor.worker_pids) == tensor_parallel_size
        outputs = []
        for prompt in prompts:
            tokens, tops = [], []
            async for out in engine.generate(prompt, PARAMS):
                tokens += out.outputs[0].token_ids
                tops += [dict(top) for top in out.outputs[0].top_logprobs]
            outputs.append((tokens, tops))
        return outputs


async def test_tp2_over_nccl_matches_tp1(model_dir):
    rng = random.Random(0)
    prompts = [[rng.randrange(1000, 120000) for _ in range(n)] for n in (5, 37, 300)]
    single = await greedy(model_dir, prompts, 1)
    split = await greedy(model_dir, prompts, 2)
    worst_logprob_diff, compared = 0.0, 0
    for (tokens1, logprobs1), (tokens2, logprobs2) in zip(single, split):
        assert len(tokens1) == len(tokens2) == STEPS
        for step, (a, b) in enumerate(zip(tokens1, tokens2)):
            if a != b:  # a flipped near-tie: the rest of the two sequences differ, so stop comparing there
                gap = logprobs1[step][a] - logprobs1[step].get(b, float("-inf"))
                assert gap < BF16_ROUNDING, f"step {step}: TP=2 picked {b}, {gap:.3f} nats below TP=1's {a}"
                break
            worst_logprob_diff = max(worst_logprob_diff, abs(logprobs1[step][a] - logprobs2[step][b]))
            compared += 1
    print(f"{compared} steps agree; largest difference of a picked token's logprob: {worst_logprob_diff:.4f}")
    assert compared >= STEPS  # ties are rare: most steps of the three sequences must be compared
    assert worst_logprob_diff < BF16_ROUNDING
