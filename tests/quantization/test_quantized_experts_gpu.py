"""The fused-MoE Triton kernel on quantized experts at real expert shapes, in bf16 on a GPU, against the reference.

Skipped without CUDA. Qwen3-30B-A3B's experts (128 of 2048 x 768, top-8) in
FP8 with 128 x 128 blocks, FP8 per channel, 4-bit in groups of 128 (with zero
points and symmetric) and MXFP4; gpt-oss-20b's (32 of 2880 x 2880, top-4,
the clamped SwiGLU) in MXFP4, FP8 per channel and 4-bit in groups of 32
(2880 is no multiple of 128). Every scale is drawn on its own, so a scale
read from the wrong block shows. The reference (`TorchRefBackend`)
dequantizes to bf16 and runs the dense experts; the kernel dequantizes each
tile to the same bf16 values, so the two differ as the bf16 kernels do (the
rounding of intermediates), compared at the output's scale.
"""

from __future__ import annotations

import attrs
import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
pytest.importorskip("triton")

from atom_trio.ops import ClampedSwiGLU, TorchRefBackend  # noqa: E402
from atom_trio.ops.triton import TritonBackend  # noqa: E402
from tests.gpu.test_triton_moe import assert_close_at_output_scale, hidden_states, routing  # noqa: E402
from tests.quantization.test_quantized_experts_interpret import quantized_experts  # noqa: E402

# name: (experts, top-k, hidden, intermediate, FP8 block or 4-bit group, the variants)
CASES = {
    "qwen3-30b-a3b": (128, 8, 2048, 768, 128, ("fp8-block", "fp8-channel", "w4a16-zeros", "w4a16-symmetric", "mxfp4")),
    "gpt-oss-20b": (32, 4, 2880, 2880, 32, ("mxfp4", "fp8-channel", "w4a16-zeros")),
}
PARAMS = [(shape, variant) for shape, case in CASES.items() for variant in case[5]]
BATCHES = (1, 2, 4, 8, 16, 32, 64, 128, 256)
REFERENCE = TorchRefBackend()


@pytest.fixture(scope="module")
def triton_backend():
    return TritonBackend("cuda")


@pytest.fixture(scope="module", params=PARAMS, ids=[f"{shape}-{variant}" for shape, variant in PARAMS])
def experts(request):
    shape, variant = request.param
    num_experts, top_k, hidden, inter, block, _ = CASES[shape]
    w13, w2, quant = quantized_experts(variant, num_experts, hidden, inter, seed=0, block=block, device="cuda")
    activation = ClampedSwiGLU(alpha=1.702, limit=7.0) if shape == "gpt-oss-20b" else None
    yield w13, w2, quant, top_k, activation
    del w13, w2, quant
    torch.cuda.empty_cache()


@pytest.mark.parametrize("batch", BATCHES)
def test_quantized_experts_match_the_dequantized_reference(triton_backend, experts, batch):
    w13, w2, quant, top_k, activation = experts
    x = hidden_states(batch, w13.shape[2] * (1 if quant.kind == "fp8" else 2), seed=batch)
    weights, ids = routing(batch, w13.shape[0], top_k, seed=batch + 1)
    options = dict(quant=quant, activation=activation)
    got = triton_backend.fused_experts(x, w13, w2, weights, ids, **options)
    assert_close_at_output_scale(got, REFERENCE.fused_experts(x, w13, w2, weights, ids, **options))


def test_an_expert_parallel_slice_of_quantized_experts(triton_backend, experts):
    """The second half of the experts, with their scales: the kernel indexes scales by the local expert."""
    w13, w2, quant, top_k, activation = experts
    held = w13.shape[0] // 2
    x = hidden_states(64, w13.shape[2] * (1 if quant.kind == "fp8" else 2), seed=7)
    weights, ids = routing(64, w13.shape[0], top_k, seed=8)
    half = attrs.evolve(
        quant,
        w13_scale=quant.w13_scale[held:],
        w2_scale=quant.w2_scale[held:],
        w13_zeros=None if quant.w13_zeros is None else quant.w13_zeros[held:],
        w2_zeros=None if quant.w2_zeros is None else quant.w2_zeros[held:],
    )
    options = dict(expert_offset=held, quant=half, activation=activation)
    got = triton_backend.fused_experts(x, w13[held:], w2[held:], weights, ids, **options)
    assert_close_at_output_scale(got, REFERENCE.fused_experts(x, w13[held:], w2[held:], weights, ids, **options))
