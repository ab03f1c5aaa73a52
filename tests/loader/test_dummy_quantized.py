"""``--load-format dummy`` on quantized configs: the model holds codes and scales of its format, as a real
checkpoint of that format would give it, and they decode within the dense dummy weights' range."""

from __future__ import annotations

import pytest
import torch

from atom_trio.config import EngineConfig
from atom_trio.layers import FusedMoE
from atom_trio.loader.weights import DUMMY_WEIGHT_RANGE
from atom_trio.runner import ModelRunner
from atom_trio.testing import TINY_CONFIGS, TINY_GPT_OSS_MXFP4, TINY_MOE_CONFIGS, write_model_dir

QUANTIZATION = {
    "fp8": {"quant_method": "fp8", "weight_block_size": [32, 32], "activation_scheme": "dynamic"},
    "gptq": {"quant_method": "gptq", "bits": 4, "group_size": 32, "desc_act": False, "sym": True},
    "awq": {"quant_method": "awq", "bits": 4, "group_size": 32, "zero_point": True, "version": "gemm"},
}
CODES = {"fp8": torch.float8_e4m3fn, "gptq": torch.uint8, "awq": torch.uint8, "mxfp4": torch.uint8}


def configs() -> dict[str, dict]:
    out = {
        f"{arch}-{fmt}": dict(
            {**TINY_CONFIGS, **TINY_MOE_CONFIGS}[arch], model_type=arch, vocab_size=300, quantization_config=quant
        )
        for arch in ("llama", "qwen3_moe")
        for fmt, quant in QUANTIZATION.items()
    }
    return {**out, "gpt_oss-mxfp4": TINY_GPT_OSS_MXFP4}


def runner_of(tmp_path, config: dict, backend: str) -> ModelRunner:
    model_dir = write_model_dir(tmp_path / "model", config)
    return ModelRunner(
        EngineConfig(model=str(model_dir), load_format="dummy", dtype="float32", kernel_backend=backend, level=0,
                     num_kv_blocks=16, block_size=16, max_num_batched_tokens=64)
    )


@pytest.mark.parametrize("name", sorted(configs()))
def test_dummy_quantized_weights_are_codes_and_scales_within_the_dummy_range(tmp_path, monkeypatch, name: str) -> None:
    """On the torch backend (which computes on every format as stored) the projections and experts hold their
    format's codes; on the CPU backend, which dequantizes at load, the same layers are dense, non-zero and within
    ±`DUMMY_WEIGHT_RANGE`, drawn alike from the seed."""
    config = configs()[name]
    codes = CODES[name.rpartition("-")[2]]
    kept = runner_of(tmp_path, config, "torch")
    try:
        experts = [m for m in kept.model.modules() if isinstance(m, FusedMoE)]
        assert all(m.w13_weight.dtype == codes for m in experts)
        if not name.startswith("gpt_oss"):
            assert kept.model.model.layers[0].self_attn.qkv_proj.quant_method is not None
    finally:
        kept.close()
    for module in ("atom_trio.layers.linear", "atom_trio.layers.embedding"):  # the values are under test, not the
        monkeypatch.setattr(f"{module}.pack_cpu_weight", lambda weight: None)  # layout: keep them readable
    dense, again = runner_of(tmp_path, config, "cpu"), runner_of(tmp_path, config, "cpu")
    try:
        quantized = [
            (name, weight)
            for name, weight in dense.model.named_parameters()
            if name.endswith(("proj.weight", "experts.w13_weight", "experts.w2_weight")) and "router" not in name
        ]
        assert quantized
        twin = dict(again.model.named_parameters())
        for param_name, weight in quantized:
            assert weight.dtype == torch.float32, param_name
            assert 0 < weight.abs().max() <= DUMMY_WEIGHT_RANGE, param_name
            assert weight.std() > DUMMY_WEIGHT_RANGE / 10, param_name
            assert torch.equal(weight, twin[param_name]), param_name
    finally:
        dense.close()
        again.close()
