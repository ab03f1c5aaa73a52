"""GPT-OSS's KV cache groups on a GPU: decode CUDA graphs with a block table and slots per group.

Skipped without CUDA. A tiny random GPT-OSS (float32, a window of 24 positions, 16-token blocks) is
stepped by the scheduler through two runners fed the same plans: one with decode graphs (level 1:
Dynamo without Inductor, so the graphs are the only difference) and one eager. The sliding layers'
blocks are released as sequences grow, so the Triton kernels read tables with null entries, and the
graphs replay with the sliding group's own tables and slots; the logits must agree at every step.
"""

from __future__ import annotations

import random

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

import transformers  # noqa: E402

from atom_trio.config import EngineConfig  # noqa: E402
from atom_trio.core import Scheduler, StepResult  # noqa: E402
from atom_trio.runner import ModelRunner  # noqa: E402
from atom_trio.sampling_params import SamplingParams  # noqa: E402
from atom_trio.testing import ROUTER_GAIN  # noqa: E402

WINDOW = 24
BLOCK_SIZE = 16


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    config = transformers.GptOssConfig(
        hidden_size=128,
        intermediate_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        num_local_experts=4,
        num_experts_per_tok=2,
        sliding_window=WINDOW,
        vocab_size=512,
        max_position_embeddings=512,
        bos_token_id=1,
        eos_token_id=2,
        dtype="float32",
    )
    torch.manual_seed(0)
    model = transformers.GptOssForCausalLM(config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("sinks"):
                param.normal_(0.0, 1.0)
            if name.endswith("router.weight"):
                param.mul_(ROUTER_GAIN)
    out = tmp_path_factory.mktemp("gpu-gpt-oss") / "gpt_oss"
    model.save_pretrained(out)
    return out


def test_decode_graphs_read_each_groups_tables(model_dir):
    def runner(**fields):
        return ModelRunner(
            EngineConfig(
                model=str(model_dir), dtype="float32", num_kv_blocks=64, block_size=BLOCK_SIZE, max_num_seqs=4, **fields
            )
        )

    graphed, eager = runner(level=1), runner(enforce_eager=True)
    try:
        assert graphed.decode_graphs is not None and eager.decode_graphs is None
        facts = graphed.facts
        assert facts.kv_cache_windows == (None, WINDOW)
        scheduler = Scheduler(
            num_blocks=facts.num_kv_blocks,
            block_size=BLOCK_SIZE,
            max_num_seqs=4,
            max_num_batched_tokens=64,
            max_model_len=facts.max_model_len,
            kv_cache_windows=facts.kv_cache_windows,
        )
        rng = random.Random(0)
        greedy = SamplingParams(temperature=0.0, max_tokens=48, ignore_eos=True)
        for i, length in enumerate((70, 9, 33)):
            scheduler.add_request(str(i), [rng.randrange(3, 512) for _ in range(length)], greedy)
        released = False
        while scheduler.has_unfinished():
            plan = scheduler.schedule()
            released |= any(graphed.num_kv_blocks in chunk.block_table for chunk in plan.chunks)
            ours, want = graphed.compute_logits(plan), eager.compute_logits(plan)
            torch.testing.assert_close(ours, want, atol=1e-3, rtol=1e-3)
            tokens = want.argmax(dim=-1).tolist()
            n = len(tokens)
            scheduler.update(
                plan,
                StepResult(step_id=plan.step_id, token_ids=tokens, logprobs=[None] * n, top_logprobs=[None] * n),
            )
        assert released, "no sliding-window block was released: the test reads no null entry"
    finally:
        graphed.close()
        eager.close()
