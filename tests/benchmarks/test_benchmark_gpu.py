"""benchmark_gpu's runner-side measurements that need no GPU: counting the experts a real router chooses, what
a latent KV cache holds against per-head keys and values, and a GPT-OSS with dummy MXFP4 experts against its floor."""

from __future__ import annotations

import random

import pytest
import torch

from atom_trio.config import EngineConfig
from atom_trio.layers import FusedMoE
from atom_trio.runner import ModelRunner
from atom_trio.testing import TINY_GPT_OSS_MXFP4, TINY_MLA_CONFIGS, TINY_MOE_CONFIGS, write_model_dir
from benchmarks.benchmark_gpu import Driver, blocks_held, decode_ms, latent_cache_capacity, routed_experts
from benchmarks.roofline import expert_bytes, moe_shape, step_bytes


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
    assert blocks_held(runner, 100) == 7  # one group: every position's block
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


def test_gpt_oss_with_dummy_mxfp4_experts_decodes_and_holds_what_the_floor_counts(tmp_path) -> None:
    """gpt-oss-20b's config at tiny sizes, dummy weights: the experts stay MXFP4 codes and e8m0 scales (the torch
    backend computes on them as the GPU's kernel does), their bytes are what the floor counts for reading every
    expert, one token routes to its top-4 in every layer, and it decodes."""
    config = TINY_GPT_OSS_MXFP4
    runner = ModelRunner(
        EngineConfig(model=str(write_model_dir(tmp_path / "gpt_oss", config)), load_format="dummy", dtype="float32",
                     kernel_backend="torch", level=0, num_kv_blocks=64, block_size=16, max_num_batched_tokens=256)
    )
    try:
        layers = [m for m in runner.model.modules() if isinstance(m, FusedMoE)]
        assert {layer.w13_weight.dtype for layer in layers} == {torch.uint8}
        held = sum(
            t.numel() * t.element_size()
            for layer in layers
            for t in (layer.w13_weight, layer.w2_weight, layer.w13_scale, layer.w2_scale, layer.w13_bias, layer.w2_bias)
        )
        moe = moe_shape(config)
        assert held == expert_bytes(config, tokens=1, distinct_experts=[moe.num_experts] * 4, dtype_bytes=4)
        scales = torch.cat([layer.w13_scale.flatten() for layer in layers]).unique()
        assert scales.tolist() == [114]  # 2 ** -13: codes of at most 6 decode within the dense dummy range
        driver = Driver(runner)
        rng = random.Random(0)
        distinct = routed_experts(driver, 1, 20, 3, rng)
        assert distinct == [moe.top_k] * 4
        assert step_bytes(config, [24], distinct_experts=distinct).experts * 8 == expert_bytes(
            config, tokens=1, distinct_experts=[8] * 4
        ) * moe.top_k
        # 100 tokens: 7 blocks of 16 in the full group, and the window of 8 spans at most 2 in the sliding one.
        assert blocks_held(runner, 100) == 7 + 2
        chunks = driver.start([[1000 + i for i in range(20)]], 32, 256)
        driver.advance(chunks)
        assert decode_ms(driver, 2, 20, 5, rng) > 0
    finally:
        runner.close()


def test_model_shapes_by_name_or_config_path(tmp_path) -> None:
    from atom_trio.testing import GPT_OSS_20B, model_shapes

    assert model_shapes("gpt-oss-20b") == GPT_OSS_20B
    assert model_shapes("gpt-oss-20b", unquantized=True) == {
        k: v for k, v in GPT_OSS_20B.items() if k != "quantization_config"
    }
    path = write_model_dir(tmp_path / "tiny", TINY_GPT_OSS_MXFP4) / "config.json"
    assert model_shapes(str(path)) == TINY_GPT_OSS_MXFP4
    with pytest.raises(ValueError, match="neither one of"):
        model_shapes("gpt-oss-21b")
