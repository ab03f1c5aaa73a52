"""Each format on a tiny model, loaded with no flag: the engine's logits against transformers' on the dequantized
weights, in float32. The CPU backend dequantizes at load; the torch reference computes on the quantized weights
as the GPU kernels do (weight-only formats exactly, activation-quantized ones with their activations rounded).
"""

from __future__ import annotations

import random

import pytest
import torch

from atom_trio.config import EngineConfig
from atom_trio.core.plan import SeqChunk, StepPlan
from atom_trio.runner import ModelRunner
from atom_trio.sampling_params import SamplingParams
from atom_trio.testing.quantize import (
    TINY_FORMATS,
    WEIGHT_ONLY_FORMATS,
    reference_model,
)

GREEDY = SamplingParams(temperature=0.0)


def _chunk(seq_id, tokens, start, prompt_len):
    return SeqChunk(
        seq_id=seq_id,
        token_ids=list(tokens),
        start_pos=start,
        block_table=list(range(seq_id * 8, seq_id * 8 + 8)),
        prompt_len=prompt_len,
        sample=True,
        sampling_params=GREEDY,
    )


def logits_against_reference(model_dir, reference, **fields):
    """Our logits and transformers' for two prompts (one split over two steps) and a decode token."""
    config = EngineConfig(
        model=str(model_dir), dtype="float32", num_kv_blocks=32, block_size=4, max_num_batched_tokens=64, **fields
    )
    runner = ModelRunner(config)
    try:
        rng = random.Random(1)
        p1, p2 = ([rng.randrange(runner.vocab_size) for _ in range(n)] for n in (11, 9))
        x = rng.randrange(runner.vocab_size)
        got = torch.cat([
            runner.compute_logits(StepPlan(step_id=0, chunks=[_chunk(0, p1, 0, 11), _chunk(1, p2[:5], 0, 9)])),
            runner.compute_logits(StepPlan(step_id=1, chunks=[_chunk(0, [x], 11, 11), _chunk(1, p2[5:], 5, 9)])),
        ])
        with torch.no_grad():
            want = torch.stack([reference(torch.tensor([s])).logits[0, -1] for s in (p1, p2[:5], p1 + [x], p2)])
        return got, want
    finally:
        runner.close()


def assert_fp32_equal(got, want):
    torch.testing.assert_close(got, want, atol=1e-4 * max(1.0, want.abs().max().item()), rtol=1e-4)


@pytest.mark.parametrize("fmt", sorted(TINY_FORMATS))
def test_dequantized_on_load_equals_transformers_on_the_dequantized_weights(quantized_dirs, fmt):
    model_dir, src, dequantized = quantized_dirs(fmt)
    got, want = logits_against_reference(model_dir, reference_model(src, dequantized), kernel_backend="cpu")
    assert_fp32_equal(got, want)


@pytest.mark.parametrize("fmt", sorted(TINY_FORMATS))
def test_quantized_compute_on_the_reference_backend(quantized_dirs, fmt):
    """Weight-only formats equal the dequantized model; W8A8 formats stay near it (their activations are rounded)."""
    model_dir, src, dequantized = quantized_dirs(fmt)
    got, want = logits_against_reference(model_dir, reference_model(src, dequantized), kernel_backend="torch")
    if fmt in WEIGHT_ONLY_FORMATS:
        assert_fp32_equal(got, want)
    else:
        error = (got - want).abs().max().item()
        assert 0 < error < 0.05 * want.abs().max().item()  # rounded activations: different, but not by much


def test_online_fp8_quantizes_an_unquantized_checkpoint(tiny_model_dirs):
    """``quantization="fp8"``: per-channel FP8 weights (amax / 448), computed from the bf16/fp32 checkpoint."""
    src = tiny_model_dirs["llama"]
    reference = reference_model(src, {})
    fp8_max = torch.finfo(torch.float8_e4m3fn).max
    with torch.no_grad():
        for name, module in reference.named_modules():
            if isinstance(module, torch.nn.Linear) and name.endswith("_proj"):
                scale = module.weight.abs().amax(dim=1, keepdim=True) / fp8_max
                module.weight.copy_((module.weight / scale).to(torch.float8_e4m3fn).float() * scale)
    got, want = logits_against_reference(src, reference, kernel_backend="cpu", quantization="fp8")
    assert_fp32_equal(got, want)
    got_torch, _ = logits_against_reference(src, reference, kernel_backend="torch", quantization="fp8")
    assert 0 < (got_torch - want).abs().max().item() < 0.05 * want.abs().max().item()


def test_online_fp8_on_latent_attention(tmp_path, default_model_dir):
    """DeepSeek-V2: its rotary-row reordering loaders survive quantization, and ``kv_b_proj``, which the model
    reads as a weight, is dequantized; logits equal transformers' with every linear layer's weights FP8-rounded."""
    from atom_trio.testing import write_tiny_model_dir

    src = write_tiny_model_dir("deepseek_v2", tmp_path, default_model_dir)
    reference = reference_model(src, {})
    fp8_max = torch.finfo(torch.float8_e4m3fn).max
    with torch.no_grad():
        for name, module in reference.named_modules():
            if isinstance(module, torch.nn.Linear) and name != "lm_head" and not name.endswith("mlp.gate"):
                scale = module.weight.abs().amax(dim=1, keepdim=True) / fp8_max
                module.weight.copy_((module.weight / scale).to(torch.float8_e4m3fn).float() * scale)
    got, want = logits_against_reference(src, reference, kernel_backend="cpu", quantization="fp8")
    assert_fp32_equal(got, want)
    got_torch, _ = logits_against_reference(src, reference, kernel_backend="torch", quantization="fp8")
    assert 0 < (got_torch - want).abs().max().item() < 0.05 * want.abs().max().item()
