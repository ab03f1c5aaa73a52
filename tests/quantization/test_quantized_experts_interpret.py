"""The fused-MoE Triton kernel on quantized experts, under Triton's interpreter, against the dequantized reference.

Each layout of `atom_trio.ops.quant_experts` (FP8 with block and per-row
scales, 4-bit with and without zero points, MXFP4), on tiny shapes whose
tiles span several row blocks, column tiles and K steps, with K both a
multiple of the tile and not. The reference is `TorchRefBackend`, which
dequantizes (`dequantize_experts`) and runs the dense experts; in float32
the two differ only by the order of their sums. The cases run in the
interpreter's subprocess (`test_the_kernels_under_the_interpreter`).
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

pytest.importorskip("triton")

from atom_trio.ops import ClampedSwiGLU, TorchRefBackend  # noqa: E402
from atom_trio.ops.quant_experts import QuantizedExperts, dequantize_experts  # noqa: E402
from atom_trio.ops.quant_ref import FP8_DTYPE  # noqa: E402
from atom_trio.ops.triton.moe import MoeTileConfig, fused_experts  # noqa: E402
from tests.ops.triton_interpreter import INTERPRET, assert_passes_under_the_interpreter  # noqa: E402

interpreted = pytest.mark.skipif(not INTERPRET, reason="runs in test_the_kernels_under_the_interpreter's subprocess")
REFERENCE = TorchRefBackend()
TILES = [
    MoeTileConfig(block_m=16, block_n=16, block_k=64, group_m=1, num_warps=4, num_stages=1),
    MoeTileConfig(block_m=32, block_n=32, block_k=16, group_m=2, num_warps=4, num_stages=1),
]
VARIANTS = ["fp8-block", "fp8-channel", "w4a16-zeros", "w4a16-symmetric", "mxfp4"]


@pytest.mark.skipif(INTERPRET, reason="starts the interpreter run")
def test_the_kernels_under_the_interpreter():
    assert_passes_under_the_interpreter(__file__, "not under_the_interpreter")


def quantized_experts(
    variant: str, num_experts: int, hidden: int, inter: int, seed: int, *, block: int = 16, device: str = "cpu"
):
    """Random expert weights in ``variant``'s layout, ``block`` x ``block`` FP8 blocks or 4-bit groups of ``block``
    (MXFP4's are 32), every scale drawn on its own: ``(w13, w2, QuantizedExperts)``. Their products are about
    0.05 in size (MXFP4's up to 6)."""
    generator = torch.Generator(device=device).manual_seed(seed)
    shapes = {"w13": (num_experts, 2 * inter, hidden), "w2": (num_experts, hidden, inter)}

    def uniform(shape, low, high, dtype=torch.float32):
        return (torch.rand(shape, generator=generator, device=device) * (high - low) + low).to(dtype)

    def codes(shape, high):
        return torch.randint(0, high, shape, generator=generator, dtype=torch.uint8, device=device)

    weights, scales, zeros = {}, {}, {}
    for name, (e, n, k) in shapes.items():
        if variant.startswith("fp8"):
            weights[name] = torch.empty(e, n, k, dtype=FP8_DTYPE, device=device)
            for expert in range(e):  # an expert at a time: no float32 copy of them all
                values = torch.randn(n, k, generator=generator, device=device).mul(100).clamp(-448, 448)
                weights[name][expert] = values.to(FP8_DTYPE)
            rows, cols = (block, block) if variant == "fp8-block" else (1, k)
            scales[name] = uniform((e, -(-n // rows), -(-k // cols)), 1e-4, 1e-3)
        else:
            weights[name] = codes((e, n, k // 2), 256)
            if variant == "mxfp4":
                scales[name] = codes((e, n, k // 32), 8) + 120  # 2 ** -7 .. 2 ** 0
            else:
                scales[name] = uniform((e, n, k // block), 1e-3, 2e-2)
                zeros[name] = codes((e, n, k // block), 16) if variant == "w4a16-zeros" else None
    quant = QuantizedExperts(
        kind=variant.partition("-")[0],
        w13_scale=scales["w13"],
        w2_scale=scales["w2"],
        w13_zeros=zeros.get("w13"),
        w2_zeros=zeros.get("w2"),
        block_size=(block, block) if variant == "fp8-block" else None,
        group_size=block if variant.startswith("w4a16") else 0,
    )
    return weights["w13"], weights["w2"], quant


def routing(tokens: int, num_experts: int, top_k: int, seed: int):
    generator = torch.Generator().manual_seed(seed)
    ids = torch.stack([torch.randperm(num_experts, generator=generator)[:top_k] for _ in range(tokens)])
    return torch.rand(tokens, top_k, generator=generator) + 0.1, ids.to(torch.int32)


@interpreted
@pytest.mark.parametrize("variant", VARIANTS)
# 96 hidden features: the gate/up GEMM's last K tile of 64 is partial.
@pytest.mark.parametrize(("tiles", "hidden"), [(TILES[0], 96), (TILES[1], 64)], ids=["k64-partial", "k16"])
def test_kernel_equals_the_dequantized_reference(variant, tiles, hidden):
    w13, w2, quant = quantized_experts(variant, 6, hidden, 32, seed=hidden)
    hidden_states = torch.randn(11, hidden, generator=torch.Generator().manual_seed(1))
    weights, ids = routing(11, 6, 2, seed=2)
    activation = ClampedSwiGLU(alpha=1.702, limit=7.0) if variant == "mxfp4" else None
    got = fused_experts(hidden_states, w13, w2, weights, ids, quant=quant, activation=activation, config=tiles)
    want = REFERENCE.fused_experts(hidden_states, w13, w2, weights, ids, quant=quant, activation=activation)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * want.abs().max().item())


@interpreted
@settings(max_examples=8, deadline=None)
@given(
    variant=st.sampled_from(VARIANTS),
    tokens=st.integers(1, 9),
    top_k=st.integers(1, 3),
    expert_offset=st.sampled_from([0, 2]),
    seed=st.integers(0, 2**16),
)
def test_expert_parallel_slices_and_batches(variant, tokens, top_k, expert_offset, seed):
    """A rank holding experts [offset, offset + 4) of 6 adds only their choices, for any batch and top-k."""
    w13, w2, quant = quantized_experts(variant, 4, 64, 32, seed=seed)
    hidden_states = torch.randn(tokens, 64, generator=torch.Generator().manual_seed(seed))
    weights, ids = routing(tokens, 6, top_k, seed=seed + 1)
    options = dict(expert_offset=expert_offset, quant=quant)
    got = fused_experts(hidden_states, w13, w2, weights, ids, config=TILES[0], **options)
    want = REFERENCE.fused_experts(hidden_states, w13, w2, weights, ids, **options)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * max(want.abs().max().item(), 1.0))


def test_dequantization_follows_each_layout():
    """`dequantize_experts` by hand: FP8 times its block's scale, (q - zero) * scale per group, e2m1 * 2 ** (s - 127)."""
    w13, _, quant = quantized_experts("fp8-block", 2, 48, 32, seed=0)
    dense = dequantize_experts(w13, quant.w13_scale, None, quant)
    assert torch.equal(dense[1, 17, 33], w13[1, 17, 33].float() * quant.w13_scale[1, 1, 2])
    w13, _, quant = quantized_experts("w4a16-zeros", 2, 64, 32, seed=0)
    dense = dequantize_experts(w13, quant.w13_scale, quant.w13_zeros, quant)
    q = (w13[1, 5, 20] >> 4).item()  # column 41: byte 20's high nibble
    assert dense[1, 5, 41] == (q - quant.w13_zeros[1, 5, 2].item()) * quant.w13_scale[1, 5, 2]
    w13, _, quant = quantized_experts("mxfp4", 2, 64, 32, seed=0)
    dense = dequantize_experts(w13, quant.w13_scale, None, quant)
    e2m1 = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]
    code = (w13[0, 3, 18] & 0xF).item()  # column 36: byte 18's low nibble, group 1
    expected = (-1 if code & 8 else 1) * e2m1[code & 7] * 2.0 ** (quant.w13_scale[0, 3, 1].item() - 127)
    assert dense[0, 3, 36] == expected
