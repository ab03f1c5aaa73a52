"""Mixture-of-experts models (Qwen3-MoE, Mixtral, GLM-4-MoE) against transformers, in float32 on the CPU.

The tiny models (``TINY_MOE_CONFIGS``) are written by transformers' ``save_pretrained`` with their
routers scaled up (``ROUTER_GAIN``), so that each token's experts win by clear margins: two correct
implementations then choose the same experts, and one that routes wrongly (a missing bias, group or
renormalization) does not. Logits come from the runner's mixed steps, greedy tokens from the whole
engine with batched, chunked and mixed steps; tensor and expert parallelism over gloo must give the
tokens one rank gives.
"""

from __future__ import annotations

import json
import random
import shutil

import pytest
import safetensors.torch
import torch
import transformers
from test_models import check_mixed_step_logits

from atom_trio import LLM, SamplingParams
from atom_trio.config import EngineConfig
from atom_trio.errors import ModelLoadError
from atom_trio.layers import FusedMoE
from atom_trio.models import get_model_class
from atom_trio.models.qwen3_moe import SparseMoeBlock
from atom_trio.runner import ModelRunner
from atom_trio.testing import (
    GLM_4_5_AIR,
    MIXTRAL_8X7B,
    QWEN3_30B_A3B,
    TINY_MOE_CONFIGS,
    transformers_config,
    transformers_greedy,
    write_tiny_model_dir,
)

ARCHS = sorted(TINY_MOE_CONFIGS)
MAX_TOKENS = 10
# Random tiny models drift into repeating one token, which would match whatever the experts computed;
# a repetition penalty (the same in both engines) keeps every step's argmax dependent on the context.
GREEDY = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, repetition_penalty=2.0, ignore_eos=True)


@pytest.fixture(scope="module")
def moe_dirs(tmp_path_factory, default_model_dir):
    root = tmp_path_factory.mktemp("tiny-moe")
    return {arch: write_tiny_model_dir(arch, root, default_model_dir) for arch in ARCHS}


@pytest.fixture(scope="module")
def prompts():
    rng = random.Random(3)
    return [[rng.randrange(1, 49152) for _ in range(n)] for n in (9, 21, 30, 11, 5, 14)]


@pytest.mark.parametrize("arch", ARCHS)
def test_logits_match_transformers(moe_dirs, arch):
    check_mixed_step_logits(moe_dirs[arch], block_size=4)


def engine_greedy(model_dir, prompts, **fields) -> list[list[int]]:
    """Greedy tokens of all ``prompts`` submitted at once: steps batch them, split the long prompts, mix in decodes."""
    with LLM(
        model=str(model_dir), dtype="float32", num_kv_blocks=96, block_size=4, max_num_batched_tokens=16, **fields
    ) as llm:
        return [out.outputs[0].token_ids for out in llm.generate(prompts, GREEDY, use_tqdm=False)]


@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_through_the_engine_matches_transformers_generate(moe_dirs, prompts, arch):
    hf = transformers.AutoModelForCausalLM.from_pretrained(moe_dirs[arch], dtype=torch.float32).eval()
    ours = engine_greedy(moe_dirs[arch], prompts)
    distinct = set()
    for prompt, tokens in zip(prompts, ours, strict=True):
        expected = transformers_greedy(hf, prompt, MAX_TOKENS, GREEDY.repetition_penalty)
        assert tokens[: len(expected)] == expected  # transformers stops at EOS, the engine (ignore_eos) does not
        distinct.update(expected)
    assert len(distinct) > 3 * len(prompts), "a degenerate reference would hardly test the experts"


@pytest.mark.parametrize(
    ("arch", "overrides"),
    [
        ("qwen3_moe", dict(num_hidden_layers=6, decoder_sparse_step=2, mlp_only_layers=[3])),
        ("qwen3_moe", dict(num_hidden_layers=4, decoder_sparse_step=1, mlp_only_layers=[0, 2])),
        ("qwen3_moe", dict(num_hidden_layers=2, num_experts=0)),
        ("glm4_moe", dict(num_hidden_layers=4, first_k_dense_replace=2)),
        ("mixtral", dict(num_hidden_layers=2)),
    ],
)
def test_sparse_and_dense_layers_where_transformers_puts_them(arch, overrides):
    config = transformers_config(TINY_MOE_CONFIGS[arch], vocab_size=64, **overrides)
    with torch.device("meta"):
        reference = transformers.AutoModelForCausalLM.from_config(config)
    ours = get_model_class(config)(config)
    want = [hasattr(layer.mlp, "experts") for layer in reference.model.layers]
    got = [isinstance(layer.mlp, SparseMoeBlock) for layer in ours.model.layers]
    assert got == want


def in_memory_state_dict(model_dir):
    """The checkpoint as transformers 5 holds it: stacked experts, ``mlp`` for Mixtral's ``block_sparse_moe``."""
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    return model.state_dict()


@pytest.mark.parametrize("arch", ARCHS)
def test_stacked_and_per_expert_checkpoints_load_the_same_weights(moe_dirs, arch):
    """``save_pretrained`` writes one tensor per expert; dummy weights come in transformers' stacked names."""
    files = safetensors.torch.load_file(moe_dirs[arch] / "model.safetensors")
    stacked = in_memory_state_dict(moe_dirs[arch])
    assert any(".experts.0." in name for name in files) and any(name.endswith("gate_up_proj") for name in stacked)
    config = transformers.AutoConfig.from_pretrained(moe_dirs[arch])
    per_expert_model, stacked_model = get_model_class(config)(config), get_model_class(config)(config)
    per_expert_model.load_weights(files.items())
    stacked_model.load_weights(stacked.items())
    for (name, a), (_, b) in zip(per_expert_model.state_dict().items(), stacked_model.state_dict().items()):
        assert torch.equal(a, b), name
    experts = next(m for m in per_expert_model.modules() if isinstance(m, FusedMoE))
    prefix = next(n for n in files if ".experts.3." in n).split(".experts.")[0]
    up = next(n for n in files if n.startswith(f"{prefix}.experts.3.") and n.endswith(("up_proj.weight", "w3.weight")))
    assert torch.equal(experts.w13_weight[3, experts.intermediate_size :], files[up])


def test_a_missing_expert_tensor_is_named(moe_dirs):
    config = transformers.AutoConfig.from_pretrained(moe_dirs["glm4_moe"])
    files = safetensors.torch.load_file(moe_dirs["glm4_moe"] / "model.safetensors")
    del files["model.layers.2.mlp.experts.5.up_proj.weight"]
    with pytest.raises(ModelLoadError, match=r"lacks 1 tensors.*layers\.2\.mlp\.experts\.w13_weight\[\(5, 'w3'\)\]"):
        get_model_class(config)(config).load_weights(files.items())


def test_glm_skips_multi_token_prediction_layers(moe_dirs):
    """The hub's GLM-4.5 checkpoints carry an MTP layer after the last decoder layer; it is not part of the model."""
    config = transformers.AutoConfig.from_pretrained(moe_dirs["glm4_moe"])
    files = safetensors.torch.load_file(moe_dirs["glm4_moe"] / "model.safetensors")
    mtp = {f"model.layers.{config.num_hidden_layers}.eh_proj.weight": torch.zeros(4, 4)}
    get_model_class(config)(config).load_weights([*files.items(), *mtp.items()])


@pytest.mark.parametrize(
    ("arch", "change", "message"),
    [
        ("mixtral", dict(sliding_window=64), "sliding_window 64 is not supported"),
        ("qwen3_moe", dict(use_sliding_window=True, sliding_window=64), "sliding_window 64 is not supported"),
        ("qwen3_moe", dict(hidden_act="gelu"), "hidden_act 'gelu' is not supported"),
        ("mixtral", dict(hidden_act="gelu"), "hidden_act 'gelu' is not supported"),
        ("glm4_moe", dict(n_group=3), "n_group 3 does not split 8 experts"),
        ("glm4_moe", dict(topk_group=1, num_experts_per_tok=3), "topk_group 1 of n_group 4 does not leave"),
        ("glm4_moe", dict(rope_parameters=dict(rope_type="default", rope_theta=1e4, partial_rotary_factor=0.3)),
         "does not fit 9 of the head's 32 features"),
    ],
)
def test_what_the_models_do_not_handle_is_a_model_load_error(moe_dirs, tmp_path, arch, change, message):
    model_dir = tmp_path / arch
    shutil.copytree(moe_dirs[arch], model_dir)
    config = json.loads((model_dir / "config.json").read_text())
    (model_dir / "config.json").write_text(json.dumps({**config, **change}))
    with pytest.raises(ModelLoadError, match=message):
        ModelRunner(EngineConfig(model=str(model_dir), num_kv_blocks=4))


def test_a_sliding_window_wider_than_the_context_is_accepted(moe_dirs, tmp_path):
    model_dir = tmp_path / "mixtral"
    shutil.copytree(moe_dirs["mixtral"], model_dir)
    config = json.loads((model_dir / "config.json").read_text())
    config["sliding_window"] = config["max_position_embeddings"]
    (model_dir / "config.json").write_text(json.dumps(config))
    ModelRunner(EngineConfig(model=str(model_dir), num_kv_blocks=4)).close()


@pytest.mark.parametrize("arch", ["qwen3_moe", "mixtral", "glm4_moe"])
def test_tensor_and_expert_parallel_give_the_tokens_of_one_rank(moe_dirs, prompts, arch):
    """Over gloo in worker processes: TP=2 slices every expert, EP=2 gives each rank four whole experts.

    GLM-4-MoE's shared expert joins the routed experts' partial sums before the one all-reduce.
    """
    single = engine_greedy(moe_dirs[arch], prompts[:3])
    assert engine_greedy(moe_dirs[arch], prompts[:3], tensor_parallel_size=2) == single
    assert engine_greedy(moe_dirs[arch], prompts[:3], tensor_parallel_size=2, enable_expert_parallel=True) == single


@pytest.mark.parametrize("config", [QWEN3_30B_A3B, MIXTRAL_8X7B, GLM_4_5_AIR], ids=lambda c: c["model_type"])
def test_real_shapes_build_with_transformers_parameter_count(config):
    """The benchmarks' real-size configs: our model (on the meta device) holds what transformers' does."""
    hf_config = transformers_config(config)
    with torch.device("meta"):
        reference = transformers.AutoModelForCausalLM.from_config(hf_config)
        ours = get_model_class(hf_config)(hf_config)
    assert sum(t.numel() for t in ours.state_dict().values()) == sum(t.numel() for t in reference.state_dict().values())


def test_glm_router_keeps_the_checkpoints_float32_values_in_a_bfloat16_model(moe_dirs):
    """As transformers does (``_keep_in_fp32_modules_strict``): a bfloat16 bias would move experts' rankings."""
    files = safetensors.torch.load_file(moe_dirs["glm4_moe"] / "model.safetensors")
    runner = ModelRunner(EngineConfig(model=str(moe_dirs["glm4_moe"]), dtype="bfloat16", num_kv_blocks=4))
    try:
        gate = runner.model.model.layers[1].mlp.gate
        assert runner.model.model.layers[1].mlp.experts.w13_weight.dtype == torch.bfloat16
        assert torch.equal(gate.e_score_correction_bias, files["model.layers.1.mlp.gate.e_score_correction_bias"])
        stored = files["model.layers.1.mlp.gate.weight"]  # the values the router computes with, however laid out
        with torch.inference_mode():
            assert torch.equal(gate(torch.eye(stored.shape[1], dtype=torch.float32)), stored.T)
    finally:
        runner.close()
