"""``quantization_config`` detection: every supported format read into its scheme, every malformed one refused.

Each refusal is a `ModelLoadError` that names the field and the value, raised
from the config alone (before any weight is read).
"""

from __future__ import annotations

import copy
import re
import types

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from atom_trio.config import EngineConfig
from atom_trio.errors import InvalidConfig, ModelLoadError
from atom_trio.loader.quant_config import (
    Fp8Scheme,
    Int4Scheme,
    Int8Scheme,
    detect_quantization,
)

FP8_BLOCK = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [128, 128]}
GPTQ = {"quant_method": "gptq", "bits": 4, "group_size": 128, "sym": True, "desc_act": False}
AWQ = {"quant_method": "awq", "bits": 4, "group_size": 128, "zero_point": True, "version": "gemm"}


def compressed(weights, inputs, fmt, ignore=("lm_head",), targets=("Linear",)):
    group = {"targets": list(targets), "weights": weights, "input_activations": inputs}
    return {
        "quant_method": "compressed-tensors",
        "format": fmt,
        "config_groups": {"group_0": group},
        "ignore": list(ignore),
        "quantization_status": "compressed",
    }


FP8_DYNAMIC = compressed(
    {"num_bits": 8, "type": "float", "strategy": "channel", "symmetric": True, "dynamic": False},
    {"num_bits": 8, "type": "float", "strategy": "token", "symmetric": True, "dynamic": True},
    "float-quantized",
)
INT8 = compressed(
    {"num_bits": 8, "type": "int", "strategy": "channel", "symmetric": True, "dynamic": False},
    {"num_bits": 8, "type": "int", "strategy": "token", "symmetric": True, "dynamic": True},
    "int-quantized",
)
W4A16 = compressed(
    {"num_bits": 4, "type": "int", "strategy": "group", "group_size": 64, "symmetric": False, "dynamic": False},
    None,
    "pack-quantized",
)


def detect(raw, forced=None):
    return detect_quantization(types.SimpleNamespace(quantization_config=raw), forced)


def test_each_format_reads_into_its_scheme():
    assert detect(FP8_BLOCK).scheme_for("model.layers.0.mlp.down_proj") == Fp8Scheme(
        strategy="block", block_size=(128, 128), scale_name="weight_scale_inv"
    )
    assert detect({"quant_method": "fp8", "activation_scheme": "static"}).scheme_for("x.q_proj") == Fp8Scheme(
        strategy="tensor", static_input=True
    )
    assert detect(FP8_DYNAMIC).scheme_for("model.layers.3.self_attn.o_proj") == Fp8Scheme(strategy="channel")
    assert detect(INT8).scheme_for("model.layers.3.self_attn.o_proj") == Int8Scheme()
    assert detect(W4A16).scheme_for("a.b") == Int4Scheme(layout="pack-quantized", group_size=64, symmetric=False)
    assert detect(GPTQ).scheme_for("a.b") == Int4Scheme(layout="gptq", group_size=128, symmetric=True, zero_offset=1)
    assert detect({**GPTQ, "group_size": -1, "desc_act": True, "checkpoint_format": "gptq_v2"}).scheme_for(
        "a.b"
    ) == Int4Scheme(layout="gptq", group_size=None, symmetric=True, desc_act=True)
    assert detect(AWQ).scheme_for("a.b") == Int4Scheme(layout="awq", group_size=128, symmetric=False)
    assert detect({"quant_method": "mxfp4"}).scheme_for("model.layers.0.self_attn.q_proj") is None
    assert detect(None) is None


def test_ignore_lists_and_targets_choose_the_layers():
    config = detect(compressed(FP8_DYNAMIC["config_groups"]["group_0"]["weights"],
                               FP8_DYNAMIC["config_groups"]["group_0"]["input_activations"], "float-quantized",
                               ignore=["re:.*mlp.down_proj", "model.layers.0.self_attn.q_proj"],
                               targets=["re:.*self_attn.*", "re:.*mlp.*"]))
    assert config.scheme_for("model.layers.0.self_attn.q_proj") is None  # ignored by name
    assert config.scheme_for("model.layers.1.self_attn.q_proj") is not None
    assert config.scheme_for("model.layers.1.mlp.down_proj") is None  # ignored by pattern
    assert config.scheme_for("model.layers.1.mlp.up_proj") is not None
    assert config.scheme_for("model.layers.1.other.proj") is None  # no target
    fp8 = detect({**FP8_BLOCK, "modules_to_not_convert": ["lm_head", "model.layers.*.mlp.gate", "down_proj"]})
    assert fp8.scheme_for("model.layers.2.mlp.gate") is None
    assert fp8.scheme_for("model.layers.2.mlp.down_proj") is None
    assert fp8.scheme_for("model.layers.2.mlp.gate_proj") is not None


def test_the_quantization_option():
    online = detect(None, "fp8")
    assert online.scheme_for("a.q_proj") == Fp8Scheme(strategy="channel", online=True)
    assert detect(GPTQ, "gptq").scheme_for("a.b").layout == "gptq"
    with pytest.raises(ModelLoadError, match="quantization 'awq' was asked for, but the checkpoint is quantized as 'gptq'"):
        detect(GPTQ, "awq")
    with pytest.raises(ModelLoadError, match="quantization 'gptq' needs a checkpoint quantized as gptq"):
        detect(None, "gptq")
    with pytest.raises(InvalidConfig, match="quantization must be one of fp8, compressed-tensors"):
        EngineConfig(quantization="int3")


# Each case: (base config, path of the field to change, a bad value, what the error must say).
BAD_FIELDS = [
    (FP8_BLOCK, ("quant_method",), st.sampled_from(["fp4", "bitsandbytes", "hqq", None]), "quant_method"),
    (FP8_BLOCK, ("fmt",), st.sampled_from(["e5m2", "int8"]), "fmt"),
    (FP8_BLOCK, ("activation_scheme",), st.text(min_size=1).filter(lambda s: s not in ("dynamic", "static")),
     "activation_scheme"),
    (FP8_BLOCK, ("weight_block_size",),
     st.one_of(st.lists(st.integers(1, 512), min_size=0, max_size=1), st.lists(st.integers(-5, 0), min_size=2,
               max_size=2), st.lists(st.integers(1, 512), min_size=3, max_size=4), st.just("128")),
     "weight_block_size"),
    (GPTQ, ("bits",), st.sampled_from([2, 3, 8, True, "4"]), "bits"),
    (GPTQ, ("group_size",), st.one_of(st.integers(-100, 0).filter(lambda n: n != -1), st.integers(1, 999).map(
        lambda n: 2 * n + 1), st.just(True)), "group_size"),
    (GPTQ, ("sym",), st.sampled_from([1, "true", None]), "sym"),
    (GPTQ, ("desc_act",), st.sampled_from([0, "false", None]), "desc_act"),
    (GPTQ, ("checkpoint_format",), st.sampled_from(["marlin", "bitblas", "gptq_v3"]), "checkpoint_format"),
    (GPTQ, ("lm_head",), st.just(True), "lm_head"),
    (GPTQ, ("dynamic",), st.just({"-:.*down_proj": {}}), "dynamic"),
    (AWQ, ("version",), st.sampled_from(["gemv", "gemv_fast", "exllama", "marlin", 2]), "version"),
    (AWQ, ("zero_point",), st.just(False), "zero_point"),
    (AWQ, ("bits",), st.sampled_from([3, 8]), "bits"),
    (FP8_DYNAMIC, ("format",), st.sampled_from(["dense", "nvfp4-pack-quantized", "marlin-24", "naive-quantized"]),
     "config_groups.group_0.format"),
    (FP8_DYNAMIC, ("config_groups", "group_0", "weights", "num_bits"), st.sampled_from([4, 16]),
     "config_groups.group_0.weights.num_bits"),
    (FP8_DYNAMIC, ("config_groups", "group_0", "weights", "strategy"), st.sampled_from(["group", "token"]),
     "config_groups.group_0.weights.strategy"),
    (FP8_DYNAMIC, ("config_groups", "group_0", "weights", "symmetric"), st.just(False),
     "config_groups.group_0.weights.symmetric"),
    (FP8_DYNAMIC, ("config_groups", "group_0", "input_activations", "strategy"), st.sampled_from(["tensor", "group"]),
     "config_groups.group_0.input_activations.strategy"),
    (FP8_DYNAMIC, ("config_groups", "group_0", "input_activations"), st.just(None),
     "config_groups.group_0.input_activations"),
    (INT8, ("config_groups", "group_0", "weights", "strategy"), st.sampled_from(["tensor", "group"]),
     "config_groups.group_0.weights.strategy"),
    (INT8, ("config_groups", "group_0", "input_activations", "dynamic"), st.just(False),
     "config_groups.group_0.input_activations"),
    (W4A16, ("config_groups", "group_0", "weights", "group_size"), st.sampled_from([0, -3, None, "64"]),
     "config_groups.group_0.weights.group_size"),
    (W4A16, ("config_groups", "group_0", "weights", "actorder"), st.just("group"),
     "config_groups.group_0.weights.actorder"),
    (W4A16, ("config_groups", "group_0", "weights", "type"), st.just("float"), "config_groups.group_0.weights.type"),
    (W4A16, ("config_groups", "group_0", "input_activations"),
     st.just({"num_bits": 8, "type": "float", "strategy": "token", "dynamic": True}),
     "config_groups.group_0.input_activations"),
    (W4A16, ("config_groups", "group_0", "targets"), st.sampled_from([[], None, [3]]),
     "config_groups.group_0.targets"),
    (W4A16, ("ignore",), st.sampled_from(["lm_head", [None], ["re:("]]), "ignore"),
    (W4A16, ("kv_cache_scheme",), st.sampled_from([{"num_bits": 8, "type": "int"}, {"num_bits": 4, "type": "float"},
     {"num_bits": 8, "type": "float", "strategy": "channel"}, {"num_bits": 8, "type": "float", "dynamic": True}, 8]),
     "kv_cache_scheme"),
    (W4A16, ("sparsity_config",), st.just({"format": "sparse-24-bitmask"}), "sparsity_config"),
    (W4A16, ("quantization_status",), st.sampled_from(["frozen", "initialized"]), "quantization_status"),
]


@pytest.mark.parametrize(("base", "path", "values", "field"), BAD_FIELDS, ids=lambda v: v if isinstance(v, str) else None)
@settings(max_examples=15, deadline=None)
@given(data=st.data())
def test_a_malformed_field_is_refused_by_name(base, path, values, field, data):
    raw = copy.deepcopy(base)
    value = data.draw(values)
    target = raw
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    with pytest.raises(ModelLoadError) as caught:
        detect(raw)
    message = str(caught.value)
    assert field in message
    if not isinstance(value, (dict, list)) or not value:
        assert repr(value) in message or str(value) in message


def test_fp8_blocks_with_static_activations_are_refused():
    with pytest.raises(ModelLoadError, match="activation_scheme 'static' with weight_block_size"):
        detect({**FP8_BLOCK, "activation_scheme": "static"})


def test_the_config_is_checked_before_any_weight_is_read(tiny_llama_dir, tmp_path):
    """A model directory whose weights cannot be read at all still fails on its quantization_config first."""
    import json
    import shutil

    from atom_trio.runner import ModelRunner

    model_dir = tmp_path / "bad"
    shutil.copytree(tiny_llama_dir, model_dir)
    config = json.loads((model_dir / "config.json").read_text())
    (model_dir / "config.json").write_text(json.dumps({**config, "quantization_config": {**GPTQ, "bits": 3}}))
    (model_dir / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ModelLoadError, match=re.escape("quantization_config.bits 3 is not supported")):
        ModelRunner(EngineConfig(model=str(model_dir), num_kv_blocks=4))


@pytest.mark.parametrize(
    ("quantization_config", "message"),
    [
        (INT8, "int8 experts are not supported"),
        (FP8_BLOCK, "32 expert intermediate features do not divide into the FP8 blocks of 128 x 128"),
        ({"quant_method": "fp8", "activation_scheme": "static"}, "static FP8 activation scales .* on experts"),
    ],
)
def test_experts_a_scheme_cannot_hold_are_refused_before_loading(tmp_path, quantization_config, message):
    from atom_trio.runner import ModelRunner
    from atom_trio.testing.models import TINY_MOE_CONFIGS, write_model_dir

    config = {
        **TINY_MOE_CONFIGS["qwen3_moe"],
        "model_type": "qwen3_moe",
        "vocab_size": 256,
        "quantization_config": quantization_config,
    }
    model_dir = write_model_dir(tmp_path / "moe", config)
    with pytest.raises(ModelLoadError, match=rf"model.layers.0.mlp.experts: {message}"):
        ModelRunner(EngineConfig(model=str(model_dir), load_format="dummy", num_kv_blocks=4))


def test_online_fp8_leaves_experts_and_routers_unquantized(tmp_path):
    from atom_trio.layers.linear import LinearBase
    from atom_trio.runner import ModelRunner
    from atom_trio.testing.models import TINY_MOE_CONFIGS, write_model_dir

    config = {**TINY_MOE_CONFIGS["qwen3_moe"], "model_type": "qwen3_moe", "vocab_size": 256}
    model_dir = write_model_dir(tmp_path / "moe", config)
    fields = dict(load_format="dummy", num_kv_blocks=4, quantization="fp8", kernel_backend="torch")
    runner = ModelRunner(EngineConfig(model=str(model_dir), **fields))
    try:
        dtypes = {name: m.weight.dtype for name, m in runner.model.named_modules() if isinstance(m, LinearBase)}
        routers = {name for name in dtypes if name.endswith(".mlp.gate")}
        assert routers and all(dtypes[name] == torch.float32 for name in routers)
        assert all(dtype == torch.float8_e4m3fn for name, dtype in dtypes.items() if name not in routers)
        assert runner.model.model.layers[0].mlp.experts.w13_weight.dtype == torch.float32
    finally:
        runner.close()
