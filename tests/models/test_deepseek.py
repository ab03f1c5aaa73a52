"""DeepSeek-V2/V3 (multi-head latent attention, routed experts) against transformers, in float32 on the CPU.

The tiny models (``TINY_MLA_CONFIGS``) are written by transformers' ``save_pretrained``, their routers
sharpened as the other MoE models' are. Logits come from the runner's mixed steps (prefill chunks over
cached latent context, absorbed decodes), greedy tokens from the whole engine; the absorbed decode is
checked against the expanded computation for random shapes, and the latent cache's size against
per-head keys and values.
"""

from __future__ import annotations

import json
import math
import random
import shutil

import pytest
import torch
import transformers
from hypothesis import given, settings
from hypothesis import strategies as st
from test_models import check_mixed_step_logits

from atom_trio import LLM, SamplingParams
from atom_trio.config import EngineConfig
from atom_trio.errors import ModelLoadError
from atom_trio.layers import MLAAttention
from atom_trio.models import get_model_class
from atom_trio.models.qwen3_moe import SparseMoeBlock
from atom_trio.ops import AttentionMetadata, TorchRefBackend
from atom_trio.runner import ModelRunner
from atom_trio.testing import TINY_MLA_CONFIGS, transformers_config, transformers_greedy, write_tiny_model_dir

ARCHS = sorted(TINY_MLA_CONFIGS)
MAX_TOKENS = 8
DEFAULT_ROPE = dict(rope_type="default", rope_theta=10000.0)
GREEDY = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, repetition_penalty=2.0, ignore_eos=True)


@pytest.fixture(scope="module")
def mla_dirs(tmp_path_factory, default_model_dir):
    root = tmp_path_factory.mktemp("tiny-mla")
    return {arch: write_tiny_model_dir(arch, root, default_model_dir) for arch in ARCHS}


@pytest.fixture(scope="module")
def prompts():
    """Six prompts; the last two share the first's first 12 tokens (three blocks of 4) for prefix-cache hits."""
    rng = random.Random(5)
    first, *others = [[rng.randrange(1, 49152) for _ in range(n)] for n in (17, 23, 9, 30)]
    return [first, *others, first[:12] + [7, 8, 9], first[:12] + [rng.randrange(1, 49152) for _ in range(11)]]


@pytest.mark.parametrize("arch", ARCHS)
def test_logits_match_transformers(mla_dirs, arch):
    check_mixed_step_logits(mla_dirs[arch], block_size=4)


def test_logits_match_transformers_through_torch_compile(mla_dirs):
    """Level 1: Dynamo traces the whole forward as one graph, latent attention an opaque op reading the step."""
    check_mixed_step_logits(mla_dirs["deepseek_v3"], block_size=4, level=1)


def engine_outputs(model_dir, *rounds, **fields):
    """The engine's outputs for each round of prompts, submitted at once, one round after the other.

    16 tokens a step: steps batch the prompts, split the long ones, mix decodes with prefill chunks.
    """
    with LLM(
        model=str(model_dir), dtype="float32", num_kv_blocks=96, block_size=4, max_num_batched_tokens=16, **fields
    ) as llm:
        return [out for prompts in rounds for out in llm.generate(prompts, GREEDY, use_tqdm=False)]


@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_through_the_engine_matches_transformers_generate(mla_dirs, prompts, arch):
    """Batched, chunked, mixed prefill and decode steps; the second round hits the prefix cache."""
    hf = transformers.AutoModelForCausalLM.from_pretrained(mla_dirs[arch], dtype=torch.float32).eval()
    outputs = engine_outputs(mla_dirs[arch], prompts[:4], prompts[4:])
    assert all(out.num_cached_tokens >= 12 for out in outputs[4:])
    distinct = set()
    for prompt, out in zip(prompts, outputs, strict=True):
        expected = transformers_greedy(hf, prompt, MAX_TOKENS, GREEDY.repetition_penalty)
        assert out.outputs[0].token_ids[: len(expected)] == expected
        distinct.update(expected)
    assert len(distinct) > 3 * len(prompts), "a degenerate reference would hardly test the model"


def test_tensor_parallel_splits_the_heads_and_gives_the_tokens_of_one_rank(mla_dirs, prompts):
    """Over gloo in worker processes: each rank holds 2 of the 4 heads (their slices of the query projection,
    ``kv_b_proj`` and ``o_proj``) and the whole latent cache, which every head reads."""
    single = [out.outputs[0].token_ids for out in engine_outputs(mla_dirs["deepseek_v3"], prompts[:4], prompts[4:])]
    split = engine_outputs(mla_dirs["deepseek_v3"], prompts[:4], prompts[4:], tensor_parallel_size=2)
    assert [out.outputs[0].token_ids for out in split] == single


def decode_metadata(context_lens: list[int], block_size: int, num_blocks: int, rng: random.Random) -> AttentionMetadata:
    """One decode token per sequence; each sequence's blocks drawn at random (distinct) from the cache."""
    blocks = rng.sample(range(num_blocks), sum(-(-n // block_size) for n in context_lens))
    tables, start = [], 0
    for n in context_lens:
        used = -(-n // block_size)
        tables.append(blocks[start : start + used])
        start += used
    width = max(map(len, tables))
    return AttentionMetadata(
        cu_seqlens_q=torch.arange(len(context_lens) + 1, dtype=torch.int32),
        context_lens=torch.tensor(context_lens, dtype=torch.int32),
        block_tables=torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32),
        slot_mapping=torch.tensor(
            [t[(n - 1) // block_size] * block_size + (n - 1) % block_size for t, n in zip(tables, context_lens)]
        ),
        query_lens_host=[1] * len(context_lens),
        context_lens_host=context_lens,
        block_size=block_size,
    )


@settings(max_examples=40, deadline=None)
@given(
    heads=st.integers(1, 8),
    nope=st.integers(1, 24),
    rope=st.sampled_from([2, 4, 8]),
    v=st.integers(1, 24),
    latent=st.integers(1, 40),
    block_size=st.sampled_from([1, 2, 4, 16]),
    context_lens=st.lists(st.integers(1, 40), min_size=1, max_size=5),
    seed=st.integers(0, 2**16),
)
def test_absorbed_decode_equals_attention_over_expanded_keys_and_values(
    heads, nope, rope, v, latent, block_size, context_lens, seed
):
    """``W_UK`` folded into the query and ``W_UV`` after the latent output give what per-head K and V give."""
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    num_blocks = sum(-(-n // block_size) for n in context_lens) + 3
    cache = torch.randn(num_blocks, block_size, latent + rope, generator=gen)  # unused slots hold noise too
    kv_b = torch.randn(heads, nope + v, latent, generator=gen) / math.sqrt(latent)
    query = torch.randn(len(context_lens), heads, nope + rope, generator=gen)
    metadata = decode_metadata(context_lens, block_size, num_blocks, rng)
    backend = TorchRefBackend()
    latent_now = cache.view(-1, latent + rope)[metadata.slot_mapping]
    scale = (nope + rope) ** -0.5
    got = backend.mla_attention(query, latent_now, cache, kv_b, backend.plan_attention(metadata), scale)
    for i, n in enumerate(context_lens):
        table = metadata.block_tables[i, : -(-n // block_size)].long()
        context = cache[table].reshape(-1, latent + rope)[:n]  # [n, latent + rope]
        kv = torch.einsum("tl,hdl->htd", context[:, :latent], kv_b)  # every head's keys and values, expanded
        keys = torch.cat((kv[..., :nope], context[None, :, latent:].expand(heads, -1, -1)), dim=-1)
        probs = torch.softmax(torch.einsum("hd,htd->ht", query[i], keys) * scale, dim=-1)
        want = torch.einsum("ht,htd->hd", probs, kv[..., nope:])
        torch.testing.assert_close(got[i], want, atol=1e-5, rtol=1e-5)


def test_the_latent_cache_holds_one_vector_a_token_and_layer(mla_dirs):
    """Sized from the layers' declaration: ``kv_lora_rank + qk_rope_head_dim`` features, not K and V per head."""
    config = TINY_MLA_CONFIGS["deepseek_v3"]
    budget_gb = 0.001
    runner = ModelRunner(
        EngineConfig(model=str(mla_dirs["deepseek_v3"]), dtype="float32", block_size=4, cpu_kv_cache_space_gb=budget_gb)
    )
    try:
        latent_dim = config["kv_lora_rank"] + config["qk_rope_head_dim"]
        layers = config["num_hidden_layers"]
        block_bytes = layers * 4 * latent_dim * 4
        assert runner.kv_layout.block_bytes == block_bytes
        assert runner.num_kv_blocks == int(budget_gb * 2**30 // block_bytes)
        assert runner.kv_cache.shape == (1, layers, runner.num_kv_blocks, 4, latent_dim)
        attn = next(m for m in runner.model.modules() if isinstance(m, MLAAttention))
        assert attn.latent_cache.data_ptr() == runner.kv_cache[0, 0].data_ptr()
    finally:
        runner.close()


@pytest.mark.parametrize(
    ("shapes", "ratio"),
    [
        # DeepSeek-V2-Lite: 16 heads of 128 + 64 key and 128 value features, latent 512 + 64.
        (dict(heads=16, nope=128, rope=64, v=128, latent=512), 16 * (192 + 128) / 576),
        # DeepSeek-V3 / Kimi-K2: 128 heads.
        (dict(heads=128, nope=128, rope=64, v=128, latent=512), 128 * (192 + 128) / 576),
    ],
)
def test_tokens_that_fit_in_the_same_memory_against_per_head_keys_and_values(shapes, ratio):
    """The block bytes of the latent layout against those of K (nope + rope) and V per head, at real shapes."""
    config = transformers_config(
        TINY_MLA_CONFIGS["deepseek_v3"],
        num_attention_heads=shapes["heads"],
        num_key_value_heads=shapes["heads"],
        qk_nope_head_dim=shapes["nope"],
        qk_rope_head_dim=shapes["rope"],
        v_head_dim=shapes["v"],
        kv_lora_rank=shapes["latent"],
        hidden_size=256,
        vocab_size=64,
        rope_parameters=DEFAULT_ROPE,  # YaRN's tables can't be computed on the meta device
    )
    with torch.device("meta"):
        model = get_model_class(config)(config)
    layers = [m for m in model.modules() if isinstance(m, MLAAttention)]
    per_block_latent = sum(math.prod(s) for layer in layers for s in layer.kv_cache_shapes(1, 16))
    per_block_heads = len(layers) * 16 * shapes["heads"] * (shapes["nope"] + shapes["rope"] + shapes["v"])
    assert per_block_heads / per_block_latent == pytest.approx(ratio)
    assert ratio > 8


@pytest.mark.parametrize(
    ("arch", "overrides"),
    [
        ("deepseek_v2", dict(num_hidden_layers=4, first_k_dense_replace=2)),
        ("deepseek_v3", dict(num_hidden_layers=3, first_k_dense_replace=1, rope_parameters=DEFAULT_ROPE)),
        ("deepseek_v3", dict(num_hidden_layers=2, first_k_dense_replace=0, rope_parameters=DEFAULT_ROPE)),
    ],
)
def test_sparse_and_dense_layers_where_transformers_puts_them(arch, overrides):
    config = transformers_config(TINY_MLA_CONFIGS[arch], vocab_size=64, **overrides)
    with torch.device("meta"):
        reference = transformers.AutoModelForCausalLM.from_config(config)
        ours = get_model_class(config)(config)
    want = [hasattr(layer.mlp, "experts") for layer in reference.model.layers]
    assert [isinstance(layer.mlp, SparseMoeBlock) for layer in ours.model.layers] == want


def test_moe_layer_freq_makes_every_other_layer_dense():
    """DeepSeek's rule (transformers ignores the field): sparse at ``i >= first_k_dense_replace``, ``i % freq == 0``."""
    config = transformers_config(TINY_MLA_CONFIGS["deepseek_v2"], vocab_size=64, num_hidden_layers=6, moe_layer_freq=2)
    with torch.device("meta"):
        ours = get_model_class(config)(config)
    assert [isinstance(layer.mlp, SparseMoeBlock) for layer in ours.model.layers] == [
        False,
        False,
        True,
        False,
        True,
        False,
    ]


def test_real_shapes_build_with_transformers_parameter_count():
    config = transformers_config(
        TINY_MLA_CONFIGS["deepseek_v3"],
        hidden_size=512,
        num_attention_heads=8,
        num_key_value_heads=8,
        kv_lora_rank=128,
        q_lora_rank=96,
        qk_nope_head_dim=32,
        qk_rope_head_dim=16,
        v_head_dim=32,
        vocab_size=64,
        rope_parameters=DEFAULT_ROPE,
    )
    with torch.device("meta"):
        reference = transformers.AutoModelForCausalLM.from_config(config)
        ours = get_model_class(config)(config)
    assert sum(t.numel() for t in ours.state_dict().values()) == sum(t.numel() for t in reference.state_dict().values())


@pytest.mark.parametrize(
    ("arch", "change", "message"),
    [
        ("deepseek_v2", dict(topk_method="noaux_tc"), "topk_method 'noaux_tc' is not supported for DeepSeek-V2"),
        ("deepseek_v2", dict(scoring_func="sigmoid"), "scoring_func 'sigmoid' is not supported"),
        ("deepseek_v3", dict(topk_method="greedy"), "topk_method 'greedy' is not supported"),
        ("deepseek_v2", dict(num_key_value_heads=2), "num_key_value_heads 2 is not supported"),
        ("deepseek_v2", dict(hidden_act="gelu"), "hidden_act 'gelu' is not supported"),
        ("deepseek_v2_lora", dict(topk_group=5), "n_group 4 / topk_group 5"),
        ("deepseek_v3", dict(n_group=3), "n_group 3 does not split 8 experts"),
        (
            "deepseek_v3",
            dict(rope_parameters=dict(rope_type="dynamic", factor=2.0, rope_theta=1e4)),
            "rope type 'dynamic' is not supported",
        ),
    ],
)
def test_what_the_models_do_not_handle_is_a_model_load_error(mla_dirs, tmp_path, arch, change, message):
    model_dir = tmp_path / arch
    shutil.copytree(mla_dirs[arch], model_dir)
    config = json.loads((model_dir / "config.json").read_text())
    (model_dir / "config.json").write_text(json.dumps({**config, **change}))
    with pytest.raises(ModelLoadError, match=message):
        ModelRunner(EngineConfig(model=str(model_dir), num_kv_blocks=4))
