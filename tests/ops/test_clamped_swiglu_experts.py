"""GPT-OSS's experts (biases, `ClampedSwiGLU`) in `KernelBackend.fused_experts` on every backend.

The reference is checked against transformers' ``GptOssExperts`` itself, on weights in the
checkpoint's layout that `experts_as_fused` turns into ours; the CPU path and the Triton kernel
(on a GPU, or on the CPU under Triton's interpreter in a subprocess) against the reference. The
activations are scaled so that the clamp cuts a good share of both projections.
"""

from __future__ import annotations


import pytest
import torch
import transformers
from transformers.models.gpt_oss.modeling_gpt_oss import GptOssExperts

from atom_trio.models.gpt_oss import clamped_swiglu, experts_as_fused
from triton_interpreter import INTERPRET, assert_passes_under_the_interpreter

from atom_trio.ops import CpuBackend, TorchRefBackend

REFERENCE = TorchRefBackend()
EXPERTS, HIDDEN, INTER, TOKENS, TOP_K = 6, 32, 16, 11, 2
LIMIT = 1.5


def _layer(seed: int):
    """transformers' experts with random weights and biases, ours from them, and a routing."""
    config = transformers.GptOssConfig(
        num_local_experts=EXPERTS, hidden_size=HIDDEN, intermediate_size=INTER, swiglu_limit=LIMIT
    )
    generator = torch.Generator().manual_seed(seed)
    reference = GptOssExperts(config)
    with torch.no_grad():
        for param in reference.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * 0.5)
    fused = {
        name: experts_as_fused(f"model.layers.0.mlp.experts.{name}", tensor.detach())
        for name, tensor in reference.named_parameters()
    }
    x = torch.randn(TOKENS, HIDDEN, generator=generator)
    ids = torch.rand(TOKENS, EXPERTS, generator=generator).argsort(dim=1)[:, :TOP_K]
    weights = torch.softmax(torch.randn(TOKENS, TOP_K, generator=generator), dim=-1)
    ours = dict(
        w13=fused["gate_up_proj"],
        w2=fused["down_proj"],
        w13_bias=fused["gate_up_proj_bias"],
        w2_bias=fused["down_proj_bias"],
        activation=clamped_swiglu(config),
    )
    return reference, ours, x, weights, ids


def _fused(backend, ours, x, weights, ids, **kwargs):
    return backend.fused_experts(
        x, ours["w13"], ours["w2"], weights, ids.to(torch.int32), w13_bias=ours["w13_bias"],
        w2_bias=ours["w2_bias"], activation=ours["activation"], **kwargs,
    )


def test_the_reference_is_transformers_experts():
    reference, ours, x, weights, ids = _layer(seed=0)
    with torch.no_grad():
        expected = reference(x, ids, weights)
        gate_up = x @ reference.gate_up_proj[0] + reference.gate_up_proj_bias[0]
    clamped = (gate_up[:, ::2] >= LIMIT).float().mean(), (gate_up[:, 1::2].abs() >= LIMIT).float().mean()
    assert all(0.1 < share < 0.9 for share in clamped), "the clamp should cut some of both projections"
    torch.testing.assert_close(_fused(REFERENCE, ours, x, weights, ids), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_cpu_matches_the_reference_with_experts_held_elsewhere(dtype):
    _, ours, x, weights, ids = _layer(seed=1)
    ours = {k: v.to(dtype) if isinstance(v, torch.Tensor) else v for k, v in ours.items()}
    held = {k: v[2:5] if isinstance(v, torch.Tensor) else v for k, v in ours.items()}  # experts 2..4 here
    expected = _fused(REFERENCE, held, x.to(dtype), weights, ids, expert_offset=2)
    got = _fused(CpuBackend(), held, x.to(dtype), weights, ids, expert_offset=2)
    tolerance = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(got.float(), expected.float(), **tolerance)


@pytest.mark.skipif(INTERPRET, reason="starts the interpreter run")
def test_triton_kernel_under_the_interpreter():
    pytest.importorskip("triton")
    assert_passes_under_the_interpreter(__file__, "test_triton_matches")


@pytest.mark.skipif(not (torch.cuda.is_available() or INTERPRET), reason="needs a GPU or Triton's interpreter")
@pytest.mark.parametrize("expert_offset", [0, 2])
def test_triton_matches_the_reference(expert_offset):
    from atom_trio.ops.triton.moe import MoeTileConfig, fused_experts  # noqa: PLC0415

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.float32 if INTERPRET else torch.bfloat16
    _, ours, x, weights, ids = _layer(seed=2)
    held = {k: v[expert_offset:] if isinstance(v, torch.Tensor) else v for k, v in ours.items()}
    expected = _fused(REFERENCE, held, x, weights, ids, expert_offset=expert_offset)
    on_device = {k: v.to(device, dtype) if isinstance(v, torch.Tensor) else v for k, v in held.items()}
    tiles = MoeTileConfig(block_m=16, block_n=16, block_k=16, group_m=1, num_warps=4, num_stages=1)
    got = fused_experts(
        x.to(device, dtype), on_device["w13"], on_device["w2"], weights.to(device), ids.to(device, torch.int32),
        expert_offset=expert_offset, w13_bias=on_device["w13_bias"], w2_bias=on_device["w2_bias"],
        activation=on_device["activation"], config=tiles,
    )
    tolerance = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=3e-2, atol=3e-2)
    torch.testing.assert_close(got.float().cpu(), expected, **tolerance)
