"""The quantized GEMMs of every backend against the dequantized weights, and the Triton kernels against the torch reference.

Two yardsticks. Against ``x @ dequantize(W).T`` in float32, every backend
(the interface's dequantize-and-`linear` default, torch, cpu, Triton) lies
within a bound derived from what its activations lose: nothing for W4A16,
half an INT8 step per element, an e4m3 step per element for FP8 (twice its
rounding; the subnormal step covers the smallest values). Against the torch
reference, which emulates the kernels' activation quantization, the Triton
kernels agree to the output's rounding.

The Triton cases run on a GPU, or on the CPU under Triton's interpreter in a
subprocess that `test_the_kernels_under_the_interpreter` starts
(``TRITON_INTERPRET=1`` must be set before the kernels are defined). The
interpreter runs float16 only (its bfloat16 ``tl.dot`` reads raw bits). FP8
runs there too: the kernels round to the e4m3 grid themselves (the
interpreter's own conversion loses a carry), so its quantization is exactly
the GPU's; the ``torch._scaled_mm`` path runs on a GPU only.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from atom_trio.ops import CpuBackend, TorchRefBackend, TracedOps
from atom_trio.ops.quant_ref import (
    FP8_DTYPE,
    FP8_MAX,
    dequantize_fp8,
    dequantize_int8,
    dequantize_w4a16,
    expand_block_scale,
    pack_int4,
    quantize_fp8_per_token,
    quantize_int8,
    unpack_int4,
)

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
TRITON_IMPORTABLE = importlib.util.find_spec("triton") is not None
HAS_TRITON_DEVICE = TRITON_IMPORTABLE and (torch.cuda.is_available() or INTERPRET)
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.bfloat16, torch.float16] if torch.cuda.is_available() else [torch.float16]
REFERENCE = TorchRefBackend()
EPS = {torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}
FP8_SUBNORMAL_STEP = 2.0**-9
triton_only = pytest.mark.skipif(not HAS_TRITON_DEVICE, reason="needs a GPU or the interpreter's subprocess")
BACKENDS = ["default", "torch", "cpu", pytest.param("triton", marks=triton_only)]
FP8_SCHEMES = ["tensor", "channel", "block"]
BLOCKS = st.sampled_from([(16, 16), (16, 32), (32, 16), (128, 128)])
COMMON = dict(with_bias=st.booleans(), dtype=st.sampled_from(DTYPES), seed=st.integers(0, 2**16))
"""What every GEMM case draws besides its shape: a bias or not, the activations' dtype, the seed of its data."""
FEW = 3 if INTERPRET else 8
"""Examples each hypothesis test of the quantized ops draws: the interpreter takes about a second an example."""


@pytest.mark.skipif(
    INTERPRET or torch.cuda.is_available() or not TRITON_IMPORTABLE,
    reason="on a GPU the Triton cases run directly; under the interpreter this is the run it starts",
)
def test_the_kernels_under_the_interpreter():
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__, "-k", "triton"],
        env={**os.environ, "TRITON_INTERPRET": "1"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0 and " passed" in result.stdout, result.stdout[-6000:] + result.stderr[-2000:]


@pytest.fixture(scope="module")
def backends():
    made = {"default": TracedOps(CpuBackend()), "torch": TorchRefBackend(), "cpu": CpuBackend()}
    if HAS_TRITON_DEVICE:
        from atom_trio.ops.triton import TritonBackend

        made["triton"] = TritonBackend(DEVICE)
    return made


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _activations(m: int, k: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    """Random rows with a few outlier columns, so that per-token and per-group scales differ."""
    x = torch.randn(m, k, generator=_generator(seed))
    x[:, :: max(1, k // 3)] *= 8
    return x.to(dtype)


def _fp8_weight(n: int, k: int, scheme: str, block: tuple[int, int], seed: int):
    """A random FP8 weight and its float32 scale for ``scheme``; ``block`` only for block scales."""
    gen = _generator(seed)
    weight = (torch.randn(n, k, generator=gen) * 100).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    shape = {"tensor": (1,), "channel": (n, 1), "block": (-(-n // block[0]), -(-k // block[1]))}[scheme]
    scale = (torch.rand(shape, generator=gen) + 0.5) / (100 * k**0.5)
    return weight, scale, block if scheme == "block" else None


def _w4_weight(n: int, k: int, group_size: int, dtype: torch.dtype, asymmetric: bool, seed: int):
    gen = _generator(seed)
    qweight = pack_int4(torch.randint(0, 16, (n, k), generator=gen))
    scales = ((torch.rand(n, k // group_size, generator=gen) + 0.5) / (4 * k**0.5)).to(dtype)
    zeros = torch.randint(0, 16, scales.shape, generator=gen, dtype=torch.uint8) if asymmetric else None
    return qweight, scales, zeros


def _bias(n: int, dtype: torch.dtype, seed: int, with_bias: bool) -> torch.Tensor | None:
    return torch.randn(n, generator=_generator(seed + 1)).to(dtype) if with_bias else None


def _bound(x_abs: torch.Tensor, activation_error: torch.Tensor, weight: torch.Tensor, bias, dtype) -> torch.Tensor:
    """How far a quantized GEMM may land from ``x @ W.T + b`` in float32.

    What the activations lose, carried through ``|W|``; plus a few roundings
    of the output (and of the weight, where a backend dequantizes it to the
    activations' dtype).
    """
    w_abs = weight.abs()
    magnitude = x_abs @ w_abs.T + (0 if bias is None else bias.float().abs())
    return activation_error @ w_abs.T + 4 * EPS[dtype] * magnitude + 1e-6


def _fp8_activation_error(x: torch.Tensor, group_size: int | None, input_scale: torch.Tensor | None):
    """Per element: one e4m3 step at the value's magnitude (2**-3 relative) or the subnormal step, in x's units."""
    if input_scale is not None:
        scale = input_scale.float().expand(x.shape)
    else:
        _, scale = quantize_fp8_per_token(x, group_size)
        if group_size is not None:
            scale = scale.repeat_interleave(group_size, 1)[:, : x.shape[1]]
    return x.float().abs() * 2.0**-3 + scale * FP8_SUBNORMAL_STEP


def _device(backend: str) -> str:
    return DEVICE if backend == "triton" else "cpu"


def _on(device: str, *tensors):
    return [None if t is None else t.to(device) for t in tensors]


# The layouts.


@settings(max_examples=30, deadline=None)
@given(n=st.integers(1, 9), half_k=st.integers(1, 9), seed=st.integers(0, 2**16))
def test_int4_packing_round_trips(n, half_k, seed):
    values = torch.randint(0, 16, (n, 2 * half_k), generator=_generator(seed), dtype=torch.uint8)
    packed = pack_int4(values)
    assert packed.shape == (n, half_k) and packed.dtype == torch.uint8
    assert torch.equal(unpack_int4(packed), values)
    assert torch.equal(packed[:, 0] & 0xF, values[:, 0])  # column 0 is the low nibble


@settings(max_examples=30, deadline=None)
@given(n=st.integers(1, 40), k=st.integers(1, 40), seed=st.integers(0, 2**16))
def test_block_scales_of_whole_rows_or_the_whole_tensor_are_channel_and_tensor_scales(n, k, seed):
    weight, channel_scale, _ = _fp8_weight(n, k, "channel", (1, 1), seed)
    assert torch.equal(dequantize_fp8(weight, channel_scale, (1, k)), dequantize_fp8(weight, channel_scale))
    tensor_scale = channel_scale[:1, 0]
    assert torch.equal(dequantize_fp8(weight, tensor_scale.view(1, 1), (n, k)), dequantize_fp8(weight, tensor_scale))
    bo, bi = 1 + seed % 7, 1 + seed % 5
    blocks = torch.rand(-(-n // bo), -(-k // bi), generator=_generator(seed))
    expanded = expand_block_scale(blocks, (n, k), (bo, bi))
    assert expanded.shape == (n, k)
    assert expanded[n - 1, k - 1] == blocks[-1, -1] and expanded[0, 0] == blocks[0, 0]


@settings(max_examples=30, deadline=None)
@given(
    m=st.integers(1, 6),
    k=st.integers(1, 70),
    group=st.sampled_from([None, 16, 32]),
    seed=st.integers(0, 2**16),
)
def test_per_token_quantization_reaches_the_format_maximum_and_loses_at_most_one_rounding(m, k, group, seed):
    x = _activations(m, k, torch.float32, seed)
    q, scale = quantize_fp8_per_token(x, group)
    assert q.dtype == FP8_DTYPE and scale.shape == (m, 1 if group is None else -(-k // group))
    row_max = q.float().abs().amax(dim=1)
    assert torch.equal(row_max, torch.full_like(row_max, FP8_MAX))  # each row's (or group's) largest value
    dequantized = q.float() * (scale if group is None else scale.repeat_interleave(group, 1)[:, :k])
    assert ((dequantized - x).abs() <= _fp8_activation_error(x, group, None) / 2).all()
    q8, scale8 = quantize_int8(x)
    assert q8.dtype == torch.int8 and torch.equal(q8.abs().amax(dim=1), torch.full((m,), 127, dtype=torch.int8))
    assert ((q8.float() * scale8 - x).abs() <= scale8 / 2 * (1 + 1e-6)).all()


# Every backend against the dequantized weights.


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("scheme", FP8_SCHEMES)
@settings(max_examples=FEW, deadline=None)
@given(
    m=st.integers(1, 9),
    n=st.integers(1, 48),
    k=st.integers(1, 160),
    block=BLOCKS,
    static=st.booleans(),
    **COMMON,
)
def test_fp8_linear_is_within_an_activation_rounding_of_the_dequantized_product(
    backends, backend, scheme, m, n, k, block, static, with_bias, dtype, seed
):
    ops = backends[backend]
    x = _activations(m, k, dtype, seed)
    weight, scale, block_size = _fp8_weight(n, k, scheme, block, seed)
    bias = _bias(n, dtype, seed, with_bias)
    input_scale = (x.float().abs().amax() / FP8_MAX * 1.25).reshape(1) if static else None
    xd, wd, sd, bd, isd = _on(_device(backend), x, weight, scale, bias, input_scale)
    y = ops.fp8_linear(xd, wd, sd, bd, block_size=block_size, input_scale=isd).cpu()
    assert y.shape == (m, n) and y.dtype == dtype
    dequantized = dequantize_fp8(weight, scale, block_size)
    expected = F.linear(x.float(), dequantized, None if bias is None else bias.float())
    group = block_size[1] if block_size is not None and not static else None
    error = _fp8_activation_error(x, group, input_scale)
    assert ((y.float() - expected).abs() <= _bound(x.float().abs(), error, dequantized, bias, dtype)).all()


@pytest.mark.parametrize("backend", BACKENDS)
@settings(max_examples=FEW, deadline=None)
@given(
    m=st.integers(1, 9),
    n=st.integers(1, 48),
    k=st.integers(1, 160),
    **COMMON,
)
def test_int8_linear_is_within_half_a_step_of_the_dequantized_product(backends, backend, m, n, k, with_bias, dtype, seed):
    ops = backends[backend]
    x = _activations(m, k, dtype, seed)
    gen = _generator(seed)
    weight = torch.randint(-127, 128, (n, k), generator=gen, dtype=torch.int8)
    scale = (torch.rand(n, 1, generator=gen) + 0.5) / (127 * k**0.5)
    bias = _bias(n, dtype, seed, with_bias)
    xd, wd, sd, bd = _on(_device(backend), x, weight, scale, bias)
    y = ops.int8_linear(xd, wd, sd, bd).cpu()
    assert y.shape == (m, n) and y.dtype == dtype
    dequantized = dequantize_int8(weight, scale)
    expected = F.linear(x.float(), dequantized, None if bias is None else bias.float())
    _, step = quantize_int8(x)
    error = (step / 2).expand(m, k)
    assert ((y.float() - expected).abs() <= _bound(x.float().abs(), error, dequantized, bias, dtype)).all()


@pytest.mark.parametrize("backend", BACKENDS)
@settings(max_examples=FEW, deadline=None)
@given(
    m=st.integers(1, 9),
    n=st.integers(1, 40),
    group_size=st.sampled_from([16, 32, 48, 64, 128]),
    groups=st.integers(1, 3),
    asymmetric=st.booleans(),
    **COMMON,
)
def test_w4a16_linear_is_the_dequantized_product(
    backends, backend, m, n, group_size, groups, asymmetric, with_bias, dtype, seed
):
    ops = backends[backend]
    k = group_size * groups
    x = _activations(m, k, dtype, seed)
    qweight, scales, zeros = _w4_weight(n, k, group_size, dtype, asymmetric, seed)
    bias = _bias(n, dtype, seed, with_bias)
    xd, qd, sd, zd, bd = _on(_device(backend), x, qweight, scales, zeros, bias)
    y = ops.w4a16_linear(xd, qd, sd, zd, bd, group_size=group_size).cpu()
    assert y.shape == (m, n) and y.dtype == dtype
    dequantized = dequantize_w4a16(qweight, scales, zeros, group_size).float()
    expected = F.linear(x.float(), dequantized, None if bias is None else bias.float())
    no_loss = torch.zeros(m, k)
    assert ((y.float() - expected).abs() <= _bound(x.float().abs(), no_loss, dequantized, bias, dtype)).all()


# The Triton kernels against the reference's emulation.


@triton_only
@pytest.mark.parametrize("target", ["fp8", "int8"])
@settings(max_examples=FEW, deadline=None)
@given(
    m=st.integers(1, 5),
    k=st.integers(1, 300),
    group=st.sampled_from([None, 16, 128]),
    static=st.booleans(),
    dtype=st.sampled_from(DTYPES),
    seed=st.integers(0, 2**16),
)
def test_triton_activation_quantization_is_the_reference(target, m, k, group, static, dtype, seed):
    from atom_trio.ops.quant_ref import quantize_fp8_static
    from atom_trio.ops.triton.quant import quantize_activations

    x = _activations(m, k, dtype, seed)
    qmax = FP8_MAX if target == "fp8" else 127.0
    input_scale = (x.float().abs().amax() / qmax * 1.25).reshape(1) if static else None
    q, scale = quantize_activations(
        x.to(DEVICE),
        FP8_DTYPE if target == "fp8" else torch.int8,
        group_size=group if target == "fp8" else None,
        input_scale=None if input_scale is None else input_scale.to(DEVICE),
    )
    q, scale = q.cpu(), scale.cpu()
    if target == "int8":  # per token, whatever the group
        expected_q, expected_scale = quantize_int8(x, input_scale)
    elif static:
        expected_q, expected_scale = quantize_fp8_static(x, input_scale), input_scale
    else:
        expected_q, expected_scale = quantize_fp8_per_token(x, group)
    assert torch.equal(scale, expected_scale.float().reshape(scale.shape))
    assert torch.equal(q.float(), expected_q.float())


def _e4m3_edge_values() -> torch.Tensor:
    """Every finite e4m3 value, the ties between neighbours and a float32 ulp either side, and what saturates.

    With a scale of 1 these are the rounding's hard cases: subnormal e4m3
    values and the ties below 2**-6, ties that carry into the next power of
    two, +-0 and negative values that round to -0, float32 subnormals, and
    values past 448 (infinities too) that saturate.
    """
    codes = torch.arange(256, dtype=torch.uint8).view(FP8_DTYPE).float()
    grid = codes[codes.isfinite() & (codes >= 0)].unique()  # sorted, +0 first
    ties = (grid[1:] + grid[:-1]) / 2
    near = torch.cat((ties, torch.nextafter(ties, torch.zeros(())), torch.nextafter(ties, torch.full((), 1e9))))
    beyond = torch.tensor([449.0, 463.9, 464.0, 480.0, 1e30, float("inf"), 2.0**-149, 1e-40, 2.0**-127, 2.0**-11])
    magnitudes = torch.cat((grid, near, beyond))
    return torch.cat((magnitudes, -magnitudes))


@triton_only
def test_triton_fp8_rounding_of_subnormals_ties_signed_zeros_and_saturation_is_torchs():
    from atom_trio.ops.quant_ref import quantize_fp8_static
    from atom_trio.ops.triton.quant import quantize_activations

    x, one = _e4m3_edge_values().reshape(1, -1), torch.ones(1)
    q, _ = quantize_activations(x.to(DEVICE), FP8_DTYPE, input_scale=one.to(DEVICE))
    assert torch.equal(q.cpu().view(torch.uint8), quantize_fp8_static(x, one).view(torch.uint8))  # -0 is not +0


@triton_only
@pytest.mark.parametrize("scheme", FP8_SCHEMES)
@settings(max_examples=FEW, deadline=None)
@given(
    m=st.integers(1, 24),
    n=st.integers(1, 48),
    k=st.integers(1, 300),
    block=BLOCKS,
    static=st.booleans(),
    **COMMON,
)
def test_triton_fp8_gemm_is_the_reference(backends, scheme, m, n, k, block, static, with_bias, dtype, seed):
    x = _activations(m, k, dtype, seed)
    weight, scale, block_size = _fp8_weight(n, k, scheme, block, seed)
    bias = _bias(n, dtype, seed, with_bias)
    input_scale = (x.float().abs().amax() / FP8_MAX * 1.25).reshape(1) if static else None
    xd, wd, sd, bd, isd = _on(DEVICE, x, weight, scale, bias, input_scale)
    y = backends["triton"].fp8_linear(xd, wd, sd, bd, block_size=block_size, input_scale=isd).cpu()
    expected = REFERENCE.fp8_linear(x, weight, scale, bias, block_size=block_size, input_scale=input_scale)
    torch.testing.assert_close(y, expected, **_output_tolerance(dtype))


@triton_only
@settings(max_examples=FEW, deadline=None)
@given(
    m=st.integers(1, 24),
    n=st.integers(1, 48),
    k=st.integers(1, 300),
    static=st.booleans(),
    **COMMON,
)
def test_triton_int8_gemm_is_the_reference(backends, m, n, k, static, with_bias, dtype, seed):
    x = _activations(m, k, dtype, seed)
    gen = _generator(seed)
    weight = torch.randint(-127, 128, (n, k), generator=gen, dtype=torch.int8)
    scale = (torch.rand(n, 1, generator=gen) + 0.5) / (127 * k**0.5)
    bias = _bias(n, dtype, seed, with_bias)
    input_scale = (x.float().abs().amax() / 127 * 1.25).reshape(1) if static else None
    xd, wd, sd, bd, isd = _on(DEVICE, x, weight, scale, bias, input_scale)
    y = backends["triton"].int8_linear(xd, wd, sd, bd, input_scale=isd).cpu()
    expected = REFERENCE.int8_linear(x, weight, scale, bias, input_scale=input_scale)
    torch.testing.assert_close(y, expected, **_output_tolerance(dtype))


@triton_only
@settings(max_examples=FEW, deadline=None)
@given(
    m=st.integers(1, 24),
    n=st.integers(1, 40),
    group_size=st.sampled_from([16, 32, 48, 64, 128]),
    groups=st.integers(1, 3),
    asymmetric=st.booleans(),
    **COMMON,
)
def test_triton_w4a16_is_the_reference(backends, m, n, group_size, groups, asymmetric, with_bias, dtype, seed):
    k = group_size * groups
    x = _activations(m, k, dtype, seed)
    qweight, scales, zeros = _w4_weight(n, k, group_size, dtype, asymmetric, seed)
    bias = _bias(n, dtype, seed, with_bias)
    xd, qd, sd, zd, bd = _on(DEVICE, x, qweight, scales, zeros, bias)
    y = backends["triton"].w4a16_linear(xd, qd, sd, zd, bd, group_size=group_size).cpu()
    expected = REFERENCE.w4a16_linear(x, qweight, scales, zeros, bias, group_size=group_size)
    torch.testing.assert_close(y, expected, **_output_tolerance(dtype))


@triton_only
@pytest.mark.parametrize(
    "case",
    [
        "fp8-tensor", "fp8-channel", "fp8-channel-static", "fp8-block-16x32", "fp8-block-128x128",
        "fp8-block-128x128-static", "fp8-block-24x48", "int8", "int8-static", "w4-32", "w4-48",
    ],
)  # fmt: skip
def test_triton_one_row_gemvs_are_the_reference(backends, case):
    """A decode row takes the GEMVs (the 8-bit one quantizes the row itself): every scale layout, static
    and dynamic activations, widths that are not multiples of the tiles (a 48-wide block takes the GEMM)."""
    ops, dtype, (n, k) = backends["triton"], DTYPES[0], (37, 520)
    x = _activations(1, k, dtype, seed=len(case))
    qmax = 127.0 if case.startswith("int8") else FP8_MAX
    input_scale = (x.float().abs().amax() / qmax * 1.25).reshape(1) if case.endswith("static") else None
    isd = None if input_scale is None else input_scale.to(DEVICE)
    if case.startswith("fp8"):
        scheme = case.split("-")[1]
        block = tuple(int(b) for b in case.split("-")[2].split("x")) if scheme == "block" else (1, 1)
        weight, scale, block_size = _fp8_weight(n, k, scheme, block, seed=1)
        xd, wd, sd = _on(DEVICE, x, weight, scale)
        y = ops.fp8_linear(xd, wd, sd, None, block_size=block_size, input_scale=isd)
        expected = REFERENCE.fp8_linear(x, weight, scale, None, block_size=block_size, input_scale=input_scale)
    elif case.startswith("int8"):
        weight = torch.randint(-127, 128, (n, k), generator=_generator(1), dtype=torch.int8)
        scale = torch.rand(n, 1, generator=_generator(2)) / (127 * k**0.5)
        y = ops.int8_linear(*_on(DEVICE, x, weight, scale), None, input_scale=isd)
        expected = REFERENCE.int8_linear(x, weight, scale, None, input_scale=input_scale)
    else:
        group_size = int(case.split("-")[1])
        k = group_size * (k // group_size)
        x = x[:, :k]
        qweight, scales, zeros = _w4_weight(n, k, group_size, dtype, True, seed=1)
        y = ops.w4a16_linear(*_on(DEVICE, x, qweight, scales, zeros), None, group_size=group_size)
        expected = REFERENCE.w4a16_linear(x, qweight, scales, zeros, None, group_size=group_size)
    torch.testing.assert_close(y.cpu(), expected, **_output_tolerance(dtype))


@triton_only
def test_triton_fp8_kv_cache_holds_the_scaled_values_and_attends_as_their_dequantized_copy(backends):
    """Keys and values stored to FP8 (plain and through the rotary store), then attention over that cache.

    The stored bytes are `quant_ref.quantize_fp8_static`'s; attention over the FP8
    cache with its scales matches attention over a cache holding the dequantized
    values, for decodes and prefill chunks over cached context, split or not.
    """
    from atom_trio.ops import AttentionMetadata
    from atom_trio.ops.quant_ref import quantize_fp8_static

    ops, dtype, block_size, heads, kv_heads, head_dim = backends["triton"], DTYPES[-1], 16, 2, 1, 16
    seqs = [(1, 20), (4, 9), (6, 0)]  # (new tokens, cached tokens)
    gen = _generator(0)
    tables, next_block = [], 0
    for n, cached in seqs:
        blocks = -(-(n + cached) // block_size)
        tables.append(list(range(next_block, next_block + blocks))[::-1])  # blocks out of order
        next_block += blocks
    width = max(len(t) for t in tables)
    query_lens, context_lens = [n for n, _ in seqs], [n + c for n, c in seqs]

    def slots_of(first, last):  # each sequence's positions [first(n, c), last(n, c))
        return [t[p // block_size] * block_size + p % block_size for (n, c), t in zip(seqs, tables) for p in range(first(n, c), last(n, c))]

    all_slots = torch.tensor(slots_of(lambda n, c: 0, lambda n, c: n + c), dtype=torch.int64, device=DEVICE)
    tokens = len(all_slots)
    step = AttentionMetadata(
        cu_seqlens_q=torch.tensor([sum(query_lens[:i]) for i in range(len(seqs) + 1)], dtype=torch.int32, device=DEVICE),
        context_lens=torch.tensor(context_lens, dtype=torch.int32, device=DEVICE),
        block_tables=torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32, device=DEVICE),
        slot_mapping=torch.tensor(slots_of(lambda n, c: c, lambda n, c: n + c), dtype=torch.int64, device=DEVICE),
        query_lens_host=query_lens,
        context_lens_host=context_lens,
        block_size=block_size,
    )
    k_scale, v_scale = (torch.tensor([s], device=DEVICE) for s in (0.0123, 0.0371))  # a layer's scale tensors
    keys = (torch.randn(tokens, kv_heads, head_dim, generator=gen) * 3).to(dtype).to(DEVICE)
    values = (torch.randn(tokens, kv_heads, head_dim, generator=gen) * 9).to(dtype).to(DEVICE)
    shape = ops.kv_cache_shape(next_block, block_size, kv_heads, head_dim)
    k_cache = torch.zeros(shape, dtype=FP8_DTYPE, device=DEVICE)
    v_cache = torch.zeros(shape, dtype=FP8_DTYPE, device=DEVICE)
    # The whole context in one store, then the rotary store over it (rotating by position 0 keeps the keys).
    ops.store_kv(keys, values, k_cache, v_cache, all_slots, k_scale=k_scale, v_scale=v_scale)
    flat = k_cache.view(-1, kv_heads, head_dim)[all_slots]
    assert torch.equal(flat.view(torch.uint8), quantize_fp8_static(keys.cpu(), k_scale.cpu()).to(DEVICE).view(torch.uint8))
    rotary_k, rotary_v = torch.zeros_like(k_cache), torch.zeros_like(v_cache)
    cos_sin = torch.cat((torch.ones(1, head_dim // 2), torch.zeros(1, head_dim // 2)), dim=1).to(DEVICE)
    queries_for_rotary = torch.zeros(tokens, heads, head_dim, dtype=dtype, device=DEVICE)
    positions = torch.zeros(tokens, dtype=torch.int64, device=DEVICE)
    ops.rotary_store_kv(
        positions, queries_for_rotary, keys, values, cos_sin, rotary_k, rotary_v, all_slots, k_scale=k_scale, v_scale=v_scale
    )
    assert torch.equal(rotary_k.view(torch.uint8), k_cache.view(torch.uint8))
    assert torch.equal(rotary_v.view(torch.uint8), v_cache.view(torch.uint8))

    query = torch.randn(sum(query_lens), heads, head_dim, generator=gen).to(dtype).to(DEVICE)
    plan = ops.plan_attention(step, num_splits=2)  # split KV: the value scale reaches the partial sums too
    scale = head_dim**-0.5
    out = ops.paged_attention(query, None, None, k_cache, v_cache, plan, scale, k_scale=k_scale, v_scale=v_scale)
    dequantized_k = (k_cache.float() * k_scale).to(dtype)
    dequantized_v = (v_cache.float() * v_scale).to(dtype)
    expected = ops.paged_attention(query, None, None, dequantized_k, dequantized_v, plan, scale)
    torch.testing.assert_close(out, expected, atol=4 * EPS[dtype] * values.abs().max().item(), rtol=4 * EPS[dtype])


def _output_tolerance(dtype: torch.dtype) -> dict[str, float]:
    """Two roundings of the output apart: float32 sums in another order, then one rounding to ``dtype``."""
    return dict(atol=1e-3, rtol=2 * EPS[dtype])
