"""benchmark_gpu's runner-side measurements that need no GPU: counting the experts a real router chooses."""

from __future__ import annotations

import random

import pytest

from atom_trio.config import EngineConfig
from atom_trio.layers import FusedMoE
from atom_trio.runner import ModelRunner
from atom_trio.testing import TINY_MOE_CONFIGS, write_model_dir
from benchmarks.benchmark_gpu import Driver, decode_ms, routed_experts
from benchmarks.roofline import moe_shape


@pytest.fixture(scope="module")
def moe_runner(tmp_path_factory):
    """A tiny Qwen3-MoE (8 experts, top-2, sparse layers 0 and 2) with dummy weights, its forward traced by Dynamo."""
    config = dict(TINY_MOE_CONFIGS["qwen3_moe"], model_type="qwen3_moe", vocab_size=2000)
    model_dir = write_model_dir(tmp_path_factory.mktemp("moe") / "qwen3_moe", config)
    runner = ModelRunner(
        EngineConfig(model=str(model_dir), load_format="dummy", dtype="float32", level=1, num_kv_blocks=64,
                     block_size=16, max_num_batched_tokens=256)
    )
    yield runner, moe_shape(config)
    runner.close()


def test_routed_experts_counts_each_sparse_layers_choice(moe_runner) -> None:
    runner, moe = moe_runner
    driver = Driver(runner)
    rng = random.Random(0)
    # One sequence: each sparse layer runs exactly its top-2.
    assert routed_experts(driver, 1, 20, 4, rng) == [moe.top_k] * len(moe.sparse_layers)
    # Twelve: at least top-2, at most all 8, and (random prompts) more than one token's worth somewhere.
    counts = routed_experts(driver, 12, 20, 4, rng)
    assert len(counts) == len(moe.sparse_layers)
    assert all(moe.top_k <= n <= moe.num_experts for n in counts)
    assert max(counts) > moe.top_k
    # The hooks are gone, and the compiled forward runs on.
    assert all(not m._forward_pre_hooks for m in runner.model.modules() if isinstance(m, FusedMoE))
    assert decode_ms(driver, 2, 20, 5, rng) > 0


def test_driver_refuses_more_sequences_than_the_cache_holds(moe_runner) -> None:
    runner, _ = moe_runner
    driver = Driver(runner)
    with pytest.raises(SystemExit, match="need 65 KV blocks; the cache has 64"):
        driver.start([[1000] * 20] * 65, 16, 256)
