"""benchmark_gpu's runner-side measurements that need no GPU: counting the experts a real router chooses, and what
a latent KV cache holds against per-head keys and values."""

from __future__ import annotations

import random

import pytest

from atom_trio.config import EngineConfig
from atom_trio.layers import FusedMoE
from atom_trio.runner import ModelRunner
from atom_trio.testing import TINY_MLA_CONFIGS, TINY_MOE_CONFIGS, write_model_dir
from benchmarks.benchmark_gpu import Driver, decode_ms, latent_cache_capacity, routed_experts
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


def test_latent_cache_capacity_against_keys_and_values_per_head(tmp_path) -> None:
    """The runner's own sizing both ways: DeepSeek-V3's tiny shapes cache 40 features a token and layer, per-head
    keys and values 4 * (24 + 24)."""
    config = dict(TINY_MLA_CONFIGS["deepseek_v3"], model_type="deepseek_v3", vocab_size=2000)
    model_dir = write_model_dir(tmp_path / "deepseek_v3", config)
    runner = ModelRunner(
        EngineConfig(model=str(model_dir), load_format="dummy", dtype="float32", block_size=16,
                     cpu_kv_cache_space_gb=0.01, max_num_batched_tokens=256)
    )
    try:
        capacity = latent_cache_capacity(runner, 100)
    finally:
        runner.close()
    layers = config["num_hidden_layers"]
    assert capacity["kv_block_bytes_latent"] == layers * 16 * (32 + 8) * 4
    assert capacity["kv_block_bytes_per_head"] == layers * 16 * 4 * (24 + 24) * 4
    blocks = int(0.01 * 2**30 // capacity["kv_block_bytes_latent"])
    assert capacity["max_seqs_100_latent"] == blocks // 7  # 100 tokens take 7 blocks of 16
    per_head_blocks = blocks * capacity["kv_block_bytes_latent"] // capacity["kv_block_bytes_per_head"]
    assert capacity["max_seqs_100_per_head"] == per_head_blocks // 7
