"""The aiter kernel backend on a GPU: each AITER Triton kernel it calls against the torch reference, and whole models.

Skipped without CUDA or without amd-aiter. The kernels are checked at Llama-3.1-8B
shapes with our Triton kernels' tolerances (tests/ops/test_triton_ops.py,
tests/gpu/test_gpu_quant.py); the models (Qwen3-0.6B shapes, Llama-3.1-8B shapes
with 4 layers, transformers' random weights copied into the runner, as
tests/gpu/test_gpu_runner.py builds them) run with ``kernel_backend="aiter"``
at level 3 with decode CUDA graphs and eagerly, against transformers.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    pytest.mark.skipif(importlib.util.find_spec("aiter") is None, reason="amd-aiter is not installed"),
]
pytest.importorskip("triton")

from test_gpu_quant import SHAPES as LINEAR_SHAPES  # noqa: E402
from test_gpu_quant import _activations, _close, _fp8_weight  # noqa: E402
from test_gpu_runner import (  # noqa: E402
    check_picks,
    check_within_bf16_rounding,
    hf_logits,
    hf_model,
    prompts,
    run_script,
    start_runner,
)

from atom_trio.ops import TorchRefBackend  # noqa: E402
from tests.ops.test_triton_ops import TOLERANCE, check_attention, make_step, ref_layout  # noqa: E402

REF = TorchRefBackend()
DTYPE = torch.bfloat16
LLAMA_HEADS, LLAMA_KV_HEADS, HEAD_DIM, HIDDEN = 32, 8, 128, 4096
ROWS = (1, 32, 300)


@pytest.fixture(scope="module")
def aiter():
    from atom_trio.ops.aiter import AiterBackend

    return AiterBackend("cuda")


@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("shape", [(HIDDEN,), (16, HEAD_DIM)], ids=["hidden", "qk-norm"])
def test_rms_norm(aiter, rows, shape):
    x, residual = (torch.randn(rows, *shape, device="cuda", dtype=DTYPE) for _ in range(2))
    weight = torch.randn(shape[-1], device="cuda", dtype=DTYPE)
    torch.testing.assert_close(aiter.rms_norm(x, weight, 1e-5), REF.rms_norm(x, weight, 1e-5), **TOLERANCE[DTYPE])
    for got, expected in zip(aiter.rms_norm(x, weight, 1e-5, residual), REF.rms_norm(x, weight, 1e-5, residual)):
        torch.testing.assert_close(got, expected, **TOLERANCE[DTYPE])


@pytest.mark.parametrize("tokens", ROWS)
def test_rotary_embedding(aiter, tokens):
    inv_freq = 1.0 / (500000 ** (torch.arange(0, HEAD_DIM, 2, device="cuda").float() / HEAD_DIM))
    freqs = torch.outer(torch.arange(4096, device="cuda").float(), inv_freq)
    cos_sin = torch.cat([freqs.cos(), freqs.sin()], dim=-1)
    width = (LLAMA_HEADS + 2 * LLAMA_KV_HEADS) * HEAD_DIM
    qkv = torch.randn(tokens, width, device="cuda", dtype=DTYPE)
    query = qkv[:, : LLAMA_HEADS * HEAD_DIM].view(tokens, LLAMA_HEADS, HEAD_DIM)
    key_columns = qkv[:, LLAMA_HEADS * HEAD_DIM : (LLAMA_HEADS + LLAMA_KV_HEADS) * HEAD_DIM]
    key = key_columns.view(tokens, LLAMA_KV_HEADS, HEAD_DIM)
    positions = torch.randint(0, 4096, (tokens,), device="cuda")
    for got, expected in zip(
        aiter.rotary_embedding(positions, query, key, cos_sin), REF.rotary_embedding(positions, query, key, cos_sin)
    ):
        torch.testing.assert_close(got, expected, **TOLERANCE[DTYPE])


@pytest.mark.parametrize("batch", [1, 32, 128])
def test_decode_attention_at_llama_shapes(aiter, batch):
    seqs = [(1, 1000 + 37 * i % 200) for i in range(batch)]
    check_attention(aiter, seqs, num_heads=LLAMA_HEADS, num_kv_heads=LLAMA_KV_HEADS, head_dim=HEAD_DIM, dtype=DTYPE)


@pytest.mark.parametrize(
    "seqs", [[(1, 16), (9, 0), (7, 23), (1, 0), (16, 16), (150, 70)], [(512, 1536), (1, 4000), (300, 0)]],
    ids=["mixed", "long-prefill"],
)
def test_prefill_and_mixed_attention(aiter, seqs):
    check_attention(aiter, seqs, num_heads=LLAMA_HEADS, num_kv_heads=LLAMA_KV_HEADS, head_dim=HEAD_DIM, dtype=DTYPE)


@pytest.mark.parametrize("window", [None, 128])
def test_attention_with_sinks_and_a_window(aiter, window):
    q, k, v, k_cache, v_cache, metadata = make_step(
        [(1, 700), (33, 0), (7, 300), (1, 5)], num_heads=64, num_kv_heads=8, head_dim=64, block_size=16,
        dtype=DTYPE, seed=5,
    )
    sinks = torch.randn(64, device="cuda") * 2
    ref_k, ref_v = ref_layout(k_cache), ref_layout(v_cache)
    REF.store_kv(k, v, ref_k, ref_v, metadata.slot_mapping)
    expected = REF.paged_attention(
        q, k, v, ref_k, ref_v, REF.plan_attention(metadata), 0.125, sinks=sinks, sliding_window=window
    )
    aiter.store_kv(k, v, k_cache, v_cache, metadata.slot_mapping)
    out = aiter.paged_attention(
        q, k, v, k_cache, v_cache, aiter.plan_attention(metadata), 0.125, sinks=sinks, sliding_window=window
    )
    torch.testing.assert_close(out, expected, **TOLERANCE[DTYPE])


@pytest.mark.parametrize("shape", list(LINEAR_SHAPES))
@pytest.mark.parametrize("rows", ROWS)
def test_linear_at_llama_shapes(aiter, shape, rows):
    n, k = LINEAR_SHAPES[shape]
    x = torch.randn(rows, k, device="cuda", dtype=DTYPE)
    weight = (torch.randn(n, k, device="cuda") / k**0.5).to(DTYPE)
    _close(aiter.linear(x, weight), REF.linear(x, weight))
    assert f"linear {(rows, n, k)}" not in aiter.fallbacks, "AITER's tile did not fit: our kernel ran"


@pytest.mark.parametrize("shape", list(LINEAR_SHAPES))
@pytest.mark.parametrize("rows", ROWS)
def test_fp8_block_linear_at_llama_shapes(aiter, shape, rows):
    n, k = LINEAR_SHAPES[shape]
    weight, scale, block_size = _fp8_weight(n, k, "block")
    x = _activations(rows, k)
    _close(
        aiter.fp8_linear(x, weight, scale, None, block_size=block_size),
        REF.fp8_linear(x, weight, scale, None, block_size=block_size),
    )
    assert f"fp8_linear {(rows, n, k)}" not in aiter.fallbacks, "AITER's tile did not fit: our kernel ran"


@pytest.mark.parametrize("shape", ["qwen3-0.6b", "llama-3.1-8b-4-layers"])
def test_models_on_the_aiter_backend_match_transformers(shape, tmp_path):
    """Level 3 with decode CUDA graphs and eager: logits within bf16 rounding of fp32 transformers, its greedy picks."""
    reference = hf_model(shape, torch.bfloat16)
    reference.config.save_pretrained(tmp_path)
    exact = hf_model(shape, torch.float32)
    exact.load_state_dict(reference.state_dict())
    for options in ({}, {"enforce_eager": True}):
        runner = start_runner(tmp_path, reference, kernel_backend="aiter", **options)
        try:
            assert runner.backend.name == "aiter"
            prompt_ids = prompts(runner.vocab_size)
            tokens, ours = run_script(runner, prompt_ids, None, seq_base=100)
        finally:
            runner.close()
        truth = hf_logits(exact, prompt_ids, tokens)
        check_within_bf16_rounding(ours, hf_logits(reference, prompt_ids, tokens), truth)
        assert check_picks(truth, ours, what=f"aiter {options or 'level 3'} vs transformers fp32") >= 0.9
