"""The bytes behind every floor and roofline: small configs counted by hand, and the models' own parameters."""

from __future__ import annotations

import random

import attrs
import pytest
from hypothesis import given
from hypothesis import strategies as st

from atom_trio.testing import (
    LLAMA_3_1_8B,
    QWEN3_30B_A3B,
    TINY_CONFIGS,
    TINY_MLA_CONFIGS,
    TINY_MOE_CONFIGS,
    transformers_config,
)
from benchmarks.roofline import (
    StepBytes,
    active_params_per_token,
    expected_distinct_experts,
    expert_bytes,
    kv_cache_bytes,
    moe_shape,
    prefill_flops,
    step_bytes,
    weight_bytes,
)

# hidden 8, MLP 16, 2 layers, 2 query heads and 1 KV head of 4, a vocabulary of 10.
SMALL = dict(
    architectures=["LlamaForCausalLM"],
    hidden_size=8,
    intermediate_size=16,
    num_hidden_layers=2,
    num_attention_heads=2,
    num_key_value_heads=1,
    head_dim=4,
    vocab_size=10,
    tie_word_embeddings=False,
)


def test_a_small_step_counted_by_hand() -> None:
    # Two sequences: one decodes (5 positions, 1 new), one runs a 2-token chunk (7 positions).
    parts = step_bytes(SMALL, [5, 7], query_lens=[1, 2])
    # A layer: qkv 8*(8+4+4)=128, o 8*8=64, gate_up 8*32=256, down 16*8=128, two norms 2*8=16 -> 592 weights.
    # Two layers 1184, final norm 8, LM head 10*8=80, embedding rows of the 3 tokens 3*8=24: 1296, 2 bytes each.
    assert parts.weights == 1296 * 2 == 2592
    # K and V, 2 layers, 1 head of 4, 5+7=12 positions, 2 bytes: 2*2*4*12*2.
    assert parts.kv_cache == 384
    # Two sampled rows of 10 float32 logits.
    assert parts.logits == 2 * 10 * 4 == 80
    assert parts.total == 3056
    assert parts.floor_ms(3056e3) == pytest.approx(1.0)  # 3056 bytes at 3056 kB/s: one millisecond


def test_tied_embeddings_and_qk_norms_by_hand() -> None:
    qwen3 = dict(SMALL, architectures=["Qwen3ForCausalLM"], tie_word_embeddings=True)
    # Each layer gains the q and k norms (2*4); the tied LM head reads the whole table, the lookup no more.
    assert weight_bytes(qwen3, tokens=3) == (2 * (592 + 8) + 8 + 80) * 2
    assert weight_bytes(dict(SMALL, attention_bias=True, mlp_bias=True), tokens=1) == (
        2 * (592 + (8 + 4 + 4 + 8) + (32 + 8)) + 8 + 80 + 8
    ) * 2


def test_llama_3_1_8b_decode_reads_15_gb_of_its_16() -> None:
    """The floor the docs quote: every weight but the embedding table, of which a decode step reads one row."""
    one_row = step_bytes(LLAMA_3_1_8B, [1024])
    assert one_row.weights == 15_009_857_536
    assert one_row.kv_cache == 1024 * 32 * 2 * 8 * 128 * 2
    whole_table = one_row.weights + (LLAMA_3_1_8B["vocab_size"] - 1) * LLAMA_3_1_8B["hidden_size"] * 2
    assert whole_table == 16_060_522_496  # every parameter: the 16.06 GB the floor once counted
    assert one_row.weights / 3011e9 * 1e3 == pytest.approx(4.985, abs=5e-4)


@pytest.mark.parametrize("arch", sorted(TINY_CONFIGS))
def test_weights_agree_with_the_models_parameters(arch: str) -> None:
    """The count follows the model as built: its parameters, less the embedding rows a step does not look up."""
    import torch

    from atom_trio.models import get_model_class

    config = dict(TINY_CONFIGS[arch], vocab_size=300)
    hf_config = transformers_config(config)
    model = get_model_class(hf_config)(hf_config)
    parameters = sum(p.numel() for p in model.parameters())  # a tied LM head is counted once
    tokens = 7
    unread = 0 if config["tie_word_embeddings"] else (300 - tokens) * config["hidden_size"]
    element = torch.tensor([], dtype=torch.bfloat16).element_size()
    assert weight_bytes(config, tokens=tokens, dtype_bytes=element) == (parameters - unread) * element


def test_kv_bytes_per_layer_and_bad_lengths() -> None:
    assert kv_cache_bytes(SMALL, 12, layers=1) * 2 == kv_cache_bytes(SMALL, 12)
    assert StepBytes(weights=1, kv_cache=2, logits=3).total == 6
    with pytest.raises(ValueError, match="query_len"):
        step_bytes(SMALL, [4], query_lens=[5])


# SMALL's attention and sizes, 3 layers; layer 1 dense (MLP 16), layers 0 and 2 with 4 experts of MLP 4, top-2.
SMALL_MOE = dict(
    SMALL,
    architectures=["Qwen3MoeForCausalLM"],
    num_hidden_layers=3,
    num_experts=4,
    num_experts_per_tok=2,
    moe_intermediate_size=4,
    decoder_sparse_step=1,
    mlp_only_layers=[1],
)


def test_a_small_moe_step_counted_by_hand() -> None:
    # Three tokens (decodes of 3 sequences with 5, 6, 7 positions).
    parts = step_bytes(SMALL_MOE, [5, 6, 7], distinct_experts=[2, 3])
    # Every layer: qkv 128 + o 64 + q/k norms 8 + two RMSNorms 16 = 216. Sparse layers: router 4*8 = 32 each.
    # Dense layer: 3*8*16 = 384. Final norm 8, LM head 80, 3 embedding rows 24.
    assert parts.weights == (3 * 216 + 2 * 32 + 384 + 8 + 80 + 24) * 2 == 2416
    # An expert is 3*8*4 = 96 weights; the router chose 2 in layer 0 and 3 in layer 2.
    assert parts.experts == 5 * 96 * 2 == 960
    assert parts.kv_cache == 2 * 3 * 1 * 4 * 18 * 2
    assert parts.total == 2416 + 960 + 864 + 3 * 10 * 4
    # Uniform routing of 3 tokens to 2 of 4 experts misses each expert with probability (1/2)^3: 3.5 expected.
    assert step_bytes(SMALL_MOE, [5, 6, 7]).experts == round(2 * 3.5 * 96 * 2) == 1344


def test_glm4_moe_router_shared_expert_and_dense_layers_by_hand() -> None:
    glm = dict(
        SMALL,
        architectures=["Glm4MoeForCausalLM"],
        num_hidden_layers=3,
        n_routed_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=4,
        n_shared_experts=2,
        first_k_dense_replace=1,
        attention_bias=True,
        use_qk_norm=True,
    )
    assert moe_shape(glm).sparse_layers == {1, 2}
    # A layer's attention 192, q/k/v biases 8+4+4 (o has none), q/k norms 8, two RMSNorms 16: 232.
    # Sparse layers: the shared experts are one MLP of 2*4 (3*8*8 = 192); the float32 router 4*8 + bias 4.
    bf16 = 3 * 232 + 384 + 2 * 192 + 8 + 80 + 8  # dense layer 0, one token's embedding row
    assert weight_bytes(glm, tokens=1) == bf16 * 2 + 2 * (32 + 4) * 4
    assert expert_bytes(glm, tokens=1) == 2 * 2 * 96 * 2  # one token: its top-2 in each sparse layer
    # One token multiplies attention 192, the dense MLP 384, and per sparse layer router 32 + shared 192 + 2 * 96.
    assert active_params_per_token(glm) == 3 * 192 + 384 + 2 * (32 + 192 + 2 * 96)


def test_expert_counts_are_checked() -> None:
    with pytest.raises(ValueError, match="2 sparse layers"):
        expert_bytes(SMALL_MOE, tokens=1, distinct_experts=[2])
    with pytest.raises(ValueError, match="4 experts"):
        expert_bytes(SMALL_MOE, tokens=1, distinct_experts=[2, 5])
    assert expert_bytes(SMALL, tokens=8) == 0  # a dense model has none


@given(
    num_experts=st.integers(1, 256),
    top_k=st.integers(1, 16),
    tokens=st.integers(1, 4096),
)
def test_expected_distinct_experts_bounds(num_experts: int, top_k: int, tokens: int) -> None:
    top_k = min(top_k, num_experts)
    count = expected_distinct_experts(num_experts, top_k, tokens)
    # One token touches exactly its top_k; more tokens never fewer, never more than there are, or than they chose.
    assert top_k - 1e-9 <= count <= min(num_experts, tokens * top_k) + 1e-9
    assert count <= expected_distinct_experts(num_experts, top_k, tokens + 1) + 1e-9
    assert expected_distinct_experts(num_experts, top_k, 1) == pytest.approx(top_k)


@pytest.mark.parametrize("tokens", [1, 8, 32, 128])
def test_expected_distinct_experts_against_sampled_routing(tokens: int) -> None:
    """Qwen3-30B-A3B's routing (8 of 128) drawn at random: the mean count of distinct experts is the formula's."""
    rng = random.Random(tokens)
    trials = 400
    counts = [len({e for _ in range(tokens) for e in rng.sample(range(128), 8)}) for _ in range(trials)]
    mean = sum(counts) / trials
    spread = (sum((c - mean) ** 2 for c in counts) / trials) ** 0.5
    # Within 4 standard errors (a sample of one token has no spread: exactly 8).
    assert abs(mean - expected_distinct_experts(128, 8, tokens)) <= 4 * spread / trials**0.5 + 1e-9


def test_qwen3_30b_a3b_decode_reads_a_tenth_of_its_weights_at_batch_1() -> None:
    """The MoE floor the docs quote: attention, routers and LM head, and batch-1 decode's 8 experts of 128."""
    one = step_bytes(QWEN3_30B_A3B, [1024])
    assert one.weights == 2_459_860_992
    assert one.experts == 48 * 8 * 3 * 2048 * 768 * 2 == 3_623_878_656
    every_expert = expert_bytes(QWEN3_30B_A3B, tokens=1, distinct_experts=[128] * 48)
    whole = one.weights + every_expert + (151936 - 1) * 2048 * 2
    assert whole == 61_064_245_248  # every parameter: 30.5B in bf16
    # A batch of 128 touches almost every expert: 127.97 of 128 expected in each layer.
    assert step_bytes(QWEN3_30B_A3B, [1024] * 128).experts == pytest.approx(every_expert, rel=3e-4)


def test_prefill_flops_count_the_active_parameters() -> None:
    hidden, layers, kv, inter, vocab, tokens = 4096, 32, 8 * 128, 14336, 128256, 2048
    # Llama-3.1-8B: every projection and the MLP, attention over the causal half, one row of LM head.
    per_layer = hidden * (hidden + 2 * kv) + hidden * hidden + 3 * hidden * inter
    attention = 2 * 2 * hidden * tokens * (tokens + 1) / 2
    assert prefill_flops(LLAMA_3_1_8B, tokens) == layers * (2 * per_layer * tokens + attention) + 2 * hidden * vocab
    # Qwen3-30B-A3B: 32 query heads of 128 (4096 wide on a 2048 residual), and per token the router and 8 experts.
    q, kv = 32 * 128, 4 * 128
    active = 48 * (2048 * (q + 2 * kv) + q * 2048 + 128 * 2048 + 8 * 3 * 2048 * 768)
    assert active_params_per_token(QWEN3_30B_A3B) == active
    assert prefill_flops(QWEN3_30B_A3B, tokens) == (
        2 * active * tokens + 48 * 2 * 2 * q * tokens * (tokens + 1) / 2 + 2 * 2048 * 151936
    )


@pytest.mark.parametrize("arch", sorted({**TINY_MOE_CONFIGS, **TINY_MLA_CONFIGS}))
def test_moe_counts_agree_with_the_models_parameters(arch: str) -> None:
    """Built in bf16 (GLM-4-MoE's and DeepSeek's routers stay float32): the count of every byte, and of the active
    weights (DeepSeek's latent attention with and without low-rank queries)."""
    import torch

    from atom_trio.layers import FusedMoE
    from atom_trio.models import get_model_class

    config = dict({**TINY_MOE_CONFIGS, **TINY_MLA_CONFIGS}[arch], vocab_size=300)
    hf_config = transformers_config(config)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        model = get_model_class(hf_config)(hf_config)
    finally:
        torch.set_default_dtype(previous)
    moe = moe_shape(config)
    layers = model.model.layers
    assert {i for i, layer in enumerate(layers) if any(isinstance(m, FusedMoE) for m in layer.modules())} == (
        moe.sparse_layers
    )
    # Every byte, when the step's tokens touch every expert of every sparse layer; less the unread embedding rows.
    tokens = 7
    parameter_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    unread = 0 if config["tie_word_embeddings"] else (300 - tokens) * config["hidden_size"] * 2
    every_expert = [moe.num_experts] * len(moe.sparse_layers)
    counted = weight_bytes(config, tokens=tokens) + expert_bytes(config, tokens=tokens, distinct_experts=every_expert)
    assert counted == parameter_bytes - unread
    # The matrices of the decoder layers, less the experts a token does not go to.
    matrices = sum(p.numel() for p in layers.parameters() if p.ndim >= 2)
    unchosen = len(moe.sparse_layers) * (moe.num_experts - moe.top_k) * moe.expert_params(config["hidden_size"])
    assert active_params_per_token(config) == matrices - unchosen


@pytest.mark.parametrize("name", ["qwen3-30b-a3b", "mixtral-8x7b", "glm-4.5-air", "deepseek-v2-lite"])
def test_real_moe_shapes_agree_with_the_models_parameters(name: str) -> None:
    """At real sizes, built on the meta device (no memory): every expert read makes every parameter's byte."""
    import torch

    from atom_trio.models import get_model_class
    from atom_trio.testing import REAL_CONFIGS

    config = REAL_CONFIGS[name]
    # YaRN's tables can't be computed on the meta device; the rotary embedding has no parameters.
    rope = dict(rope_parameters=dict(rope_type="default", rope_theta=1e4)) if name.startswith("deepseek") else {}
    hf_config = transformers_config(config, **rope)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device("meta"):
            model = get_model_class(hf_config)(hf_config)
    finally:
        torch.set_default_dtype(previous)
    moe = moe_shape(config)
    every_expert = [moe.num_experts] * len(moe.sparse_layers)
    whole_table = config["vocab_size"]  # a step of as many tokens as the vocabulary reads every embedding row
    counted = weight_bytes(config, tokens=whole_table) + expert_bytes(config, tokens=1, distinct_experts=every_expert)
    assert counted == sum(p.numel() * p.element_size() for p in model.parameters())



def test_latent_attention_caches_one_vector_a_position_and_layer() -> None:
    config = dict(TINY_MLA_CONFIGS["deepseek_v2"], vocab_size=100)  # 3 layers, kv_lora_rank 32, qk_rope_head_dim 8
    assert kv_cache_bytes(config, 10) == 3 * (32 + 8) * 10 * 2
    assert step_bytes(config, [4, 6]).kv_cache == kv_cache_bytes(config, 10)


# GPT-OSS at SMALL's sizes: 4 experts of 16 (top-2) in every layer, 2 layers (sliding, then full) with a window of 3.
SMALL_GPT_OSS = dict(
    SMALL,
    architectures=["GptOssForCausalLM"],
    num_local_experts=4,
    num_experts_per_tok=2,
    attention_bias=True,
    layer_types=["sliding_attention", "full_attention"],
    sliding_window=3,
)
MXFP4_CONFIG = {"quant_method": "mxfp4", "modules_to_not_convert": ["model.layers.*.self_attn", "lm_head"]}


def test_gpt_oss_counted_by_hand() -> None:
    """Sinks, q/k/v/o and router biases, biased experts; the sliding layer reads at most its window."""
    config = dict(SMALL_GPT_OSS, hidden_size=32, intermediate_size=32)  # MXFP4 groups of 32 inputs
    parts = step_bytes(config, [5, 2], query_lens=[1, 2], distinct_experts=[3, 4])
    # A layer: qkv 32*(8+4+4)=512 and biases 16, o 8*32=256 and bias 32, 2 sinks, two norms 64, router 4*32+4.
    # Two layers, final norm 32, LM head 10*32=320, embedding rows of 3 tokens 96.
    per_layer = 512 + 16 + 256 + 32 + 2 + 64 + 132
    assert parts.weights == (2 * per_layer + 32 + 320 + 96) * 2
    # An expert: gate, up, down 3*32*32 and biases 2*32+32; 3 + 4 distinct experts.
    assert parts.experts == 7 * (3 * 32 * 32 + 96) * 2
    # The full layer reads 5 + 2 positions; the sliding one min(5, 3) and, for 2 queries, min(2, 3 + 1).
    assert parts.kv_cache == 2 * 4 * ((5 + 2) + (3 + 2)) * 2
    # In MXFP4 an expert's matrices take 17 bytes a row of 32 inputs: 3 * 32 rows; its biases stay bf16.
    mxfp4 = step_bytes(dict(config, quantization_config=MXFP4_CONFIG), [5, 2], query_lens=[1, 2], distinct_experts=[3, 4])
    assert mxfp4.experts == 7 * (3 * 32 * 17 + 96 * 2)
    assert attrs.evolve(mxfp4, experts=parts.experts) == parts  # nothing else changes


def test_sliding_layers_read_their_window_at_every_context() -> None:
    full = dict(SMALL_GPT_OSS, layer_types=["full_attention"] * 2)
    for context in (1, 3, 4, 100):
        windowed = step_bytes(SMALL_GPT_OSS, [context]).kv_cache
        assert windowed == kv_cache_bytes(SMALL, context, layers=1) + kv_cache_bytes(SMALL, min(context, 3), layers=1)
        assert windowed <= step_bytes(full, [context]).kv_cache == kv_cache_bytes(SMALL, context)


def test_fp8_blocks_by_hand() -> None:
    """Every decoder matrix in one byte an element and a float32 scale a block (rounded up); the LM head,
    embedding and norms stay in the model's dtype."""
    fp8 = dict(SMALL, quantization_config={"quant_method": "fp8", "weight_block_size": [4, 4]})
    dense, quantized = step_bytes(SMALL, [5]), step_bytes(fp8, [5])
    # A layer's matrices: q 8x8, k 4x8, v 4x8, o 8x8, gate 16x8, up 16x8, down 8x16: 592 - 16 = 576 elements,
    # in 4x4 blocks 4+2+2+4+8+8+8 = 36 scales.
    assert dense.weights - quantized.weights == 2 * (576 * 2 - (576 + 36 * 4))
    with pytest.raises(ValueError, match="does not count"):
        step_bytes(dict(SMALL, quantization_config={"quant_method": "gptq"}), [5])


@pytest.mark.parametrize(
    "name, unquantized",
    [("tiny", True), ("tiny", False), ("gpt-oss-20b", False), ("gpt-oss-120b", False)],
    ids=["tiny-bf16", "tiny-mxfp4", "gpt-oss-20b", "gpt-oss-120b"],
)
def test_gpt_oss_counts_agree_with_the_models_parameters(tmp_path, name: str, unquantized: bool) -> None:
    """GPT-OSS built as the runner builds it (MXFP4 experts in their checkpoint layout: codes and scales as
    loaded; real sizes on the meta device, with default rope, whose tables have no bytes): every byte, when
    every expert is read, less the unread embedding rows."""
    import torch

    from atom_trio.config import EngineConfig
    from atom_trio.distributed import SINGLE
    from atom_trio.loader.resolve import resolve_model
    from atom_trio.ops import TorchRefBackend
    from atom_trio.runner.startup import build_model
    from atom_trio.testing import REAL_CONFIGS, TINY_GPT_OSS_MXFP4, write_model_dir

    config = dict(TINY_GPT_OSS_MXFP4 if name == "tiny" else REAL_CONFIGS[name])
    if unquantized:
        del config["quantization_config"]
    device = torch.device("cpu" if name == "tiny" else "meta")
    if device.type == "meta":
        config.pop("rope_scaling")
    model_dir = write_model_dir(tmp_path / "m", config)
    resolved = resolve_model(EngineConfig(model=str(model_dir), load_format="dummy", dtype="bfloat16"))
    model = build_model(resolved, device, TorchRefBackend(), level=0, tp_group=SINGLE, expert_parallel=False)
    parameter_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    moe = moe_shape(config)
    tokens = 7
    every_expert = [moe.num_experts] * len(moe.sparse_layers)
    counted = weight_bytes(config, tokens=tokens) + expert_bytes(config, tokens=tokens, distinct_experts=every_expert)
    assert counted == parameter_bytes - (config["vocab_size"] - tokens) * config["hidden_size"] * 2


def test_gpt_oss_20b_decode_floor() -> None:
    """gpt-oss-20b's published shapes: 10.2 GB of MXFP4 experts in all, 4 of 32 read a layer by one token."""
    from atom_trio.testing import GPT_OSS_20B

    every_expert = expert_bytes(GPT_OSS_20B, tokens=1, distinct_experts=[32] * 24)
    assert every_expert == 24 * 32 * (3 * 2880 * 2880 * 17 // 32 + 3 * 2880 * 2)
    assert expert_bytes(GPT_OSS_20B, tokens=1, distinct_experts=[4] * 24) * 8 == every_expert
    # At 4096 positions the 12 sliding layers read 128 of them.
    assert step_bytes(GPT_OSS_20B, [4096]).kv_cache == 2 * 8 * 64 * (12 * 4096 + 12 * 128) * 2


def test_sliding_layers_prefill_attention_within_the_window() -> None:
    """Query ``t`` of a sliding layer pairs with ``min(t, 3)`` keys: 1 + 2 + 3 + 3 + 3 = 12 of 5 tokens, against
    15 in the full layer; each pair is a QK^T and a PV product over 2 heads of 4 features."""
    matmuls = prefill_flops(dict(SMALL_GPT_OSS, layer_types=["full_attention"] * 2), 5) - prefill_flops(SMALL_GPT_OSS, 5)
    assert matmuls == 2 * 2 * (4 + 4) * (15 - 12)
