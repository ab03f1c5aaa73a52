"""The quantized Triton GEMMs against the torch reference at Llama-3.1-8B's weight shapes, on a GPU.

Skipped without CUDA. Both sides quantize the activations the same way (the
reference emulates the kernels), so they differ only in the order of float32
sums and the output's rounding: compared at a couple of bf16 units of the
output's largest value. Every batch size a step uses runs: one row (the
GEMVs), decode batches (``torch._scaled_mm`` for per-channel FP8, the Triton
GEMMs otherwise) and a 2048-token prefill. A decode call is also captured in
a CUDA graph and replayed on new activations, as the runner's decode graphs do.
Last, decode attention over an FP8 KV cache against the same keys and values
in a bf16 cache, at Llama-3.1-8B's heads and a few thousand tokens of context.
"""

from __future__ import annotations

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
pytest.importorskip("triton")

from atom_trio.ops import TorchRefBackend  # noqa: E402
from atom_trio.ops.quant_ref import FP8_DTYPE, FP8_MAX, pack_int4, quantize_fp8_per_token, quantize_int8  # noqa: E402
from atom_trio.ops.triton import TritonBackend  # noqa: E402
from atom_trio.ops.triton.quant import quantize_activations  # noqa: E402

# (out, in): Llama-3.1-8B's merged qkv, o, merged gate/up and down projections.
SHAPES = {"qkv_proj": (6144, 4096), "o_proj": (4096, 4096), "gate_up_proj": (28672, 4096), "down_proj": (4096, 14336)}
BATCHES = (1, 3, 32, 128, 2048)
REFERENCE = TorchRefBackend()
BF16_EPS = 2.0**-7


@pytest.fixture(scope="module")
def triton_ops():
    return TritonBackend("cuda")


def _close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    scale = expected.float().abs().max().item()
    torch.testing.assert_close(actual.float(), expected.float(), atol=2 * BF16_EPS * scale, rtol=2 * BF16_EPS)


def _activations(m: int, k: int) -> torch.Tensor:
    x = torch.randn(m, k, device="cuda")
    x[:, ::97] *= 20  # outlier channels, as real activations have
    return x.to(torch.bfloat16)


def _fp8_weight(n: int, k: int, scheme: str):
    weight = (torch.randn(n, k, device="cuda") * 100).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    shape = {"tensor": (1,), "channel": (n, 1), "block": (-(-n // 128), -(-k // 128))}[scheme]
    return weight, (torch.rand(shape, device="cuda") + 0.5) / (100 * k**0.5), (128, 128) if scheme == "block" else None


@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("scheme", ["tensor", "channel", "block"])
@pytest.mark.parametrize("m", BATCHES)
def test_fp8_linear_at_llama_shapes(triton_ops, shape, scheme, m):
    n, k = SHAPES[shape]
    weight, scale, block_size = _fp8_weight(n, k, scheme)
    x = _activations(m, k)
    _close(
        triton_ops.fp8_linear(x, weight, scale, None, block_size=block_size),
        REFERENCE.fp8_linear(x, weight, scale, None, block_size=block_size),
    )


def test_fp8_linear_with_a_static_input_scale_and_a_bias(triton_ops):
    n, k = SHAPES["o_proj"]
    weight, scale, _ = _fp8_weight(n, k, "channel")
    bias = torch.randn(n, device="cuda", dtype=torch.bfloat16)
    for m in (1, 32, 2048):
        x = _activations(m, k)
        input_scale = (x.float().abs().amax() / FP8_MAX).reshape(1)
        _close(
            triton_ops.fp8_linear(x, weight, scale, bias, input_scale=input_scale),
            REFERENCE.fp8_linear(x, weight, scale, bias, input_scale=input_scale),
        )


@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("m", BATCHES)
def test_int8_linear_at_llama_shapes(triton_ops, shape, m):
    n, k = SHAPES[shape]
    weight = torch.randint(-127, 128, (n, k), device="cuda", dtype=torch.int8)
    scale = (torch.rand(n, 1, device="cuda") + 0.5) / (127 * k**0.5)
    x = _activations(m, k)
    _close(triton_ops.int8_linear(x, weight, scale, None), REFERENCE.int8_linear(x, weight, scale, None))


@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize(("group_size", "asymmetric"), [(128, False), (128, True), (32, True)])
@pytest.mark.parametrize("m", BATCHES)
def test_w4a16_linear_at_llama_shapes(triton_ops, shape, group_size, asymmetric, m):
    n, k = SHAPES[shape]
    qweight = pack_int4(torch.randint(0, 16, (n, k), device="cuda"))
    scales = ((torch.rand(n, k // group_size, device="cuda") + 0.5) / (4 * k**0.5)).to(torch.bfloat16)
    zeros = torch.randint(0, 16, scales.shape, device="cuda", dtype=torch.uint8) if asymmetric else None
    x = _activations(m, k)
    _close(
        triton_ops.w4a16_linear(x, qweight, scales, zeros, None, group_size=group_size),
        REFERENCE.w4a16_linear(x, qweight, scales, zeros, None, group_size=group_size),
    )


@pytest.mark.parametrize("group_size", [None, 128])
def test_activation_quantization_is_bit_exact(group_size):
    x = _activations(2048, 14336)
    q, scale = quantize_activations(x, FP8_DTYPE, group_size=group_size)
    expected_q, expected_scale = quantize_fp8_per_token(x, group_size)
    assert torch.equal(scale, expected_scale) and torch.equal(q.view(torch.uint8), expected_q.view(torch.uint8))
    q8, scale8 = quantize_activations(x, torch.int8)
    expected_q8, expected_scale8 = quantize_int8(x)
    assert torch.equal(scale8, expected_scale8) and torch.equal(q8, expected_q8)


def test_decode_calls_replay_from_a_cuda_graph(triton_ops):
    n, k = SHAPES["o_proj"]
    fp8_weight, fp8_scale, block = _fp8_weight(n, k, "block")
    qweight = pack_int4(torch.randint(0, 16, (n, k), device="cuda"))
    scales = ((torch.rand(n, k // 128, device="cuda") + 0.5) / (4 * k**0.5)).to(torch.bfloat16)
    for m in (1, 32):
        x = _activations(m, k)

        def step():
            return (
                triton_ops.fp8_linear(x, fp8_weight, fp8_scale, None, block_size=block),
                triton_ops.w4a16_linear(x, qweight, scales, None, None, group_size=128),
            )

        step()  # compile outside the capture
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            outputs = step()
        x.copy_(_activations(m, k))
        graph.replay()
        torch.cuda.synchronize()
        for replayed, eager in zip(outputs, step()):
            assert torch.equal(replayed, eager)


@pytest.mark.parametrize("num_splits", [None, 1])
def test_fp8_kv_decode_is_bf16_kv_decode_within_fp8_rounding(triton_ops, num_splits):
    from atom_trio.ops import AttentionMetadata

    heads, kv_heads, head_dim, block_size, contexts = 32, 8, 128, 16, [1, 700, 4096, 2500]
    blocks = [-(-n // block_size) for n in contexts]
    order = torch.randperm(sum(blocks)).tolist()
    tables = [[order.pop() for _ in range(b)] for b in blocks]
    width = max(blocks)
    step = AttentionMetadata(
        cu_seqlens_q=torch.arange(len(contexts) + 1, dtype=torch.int32, device="cuda"),
        context_lens=torch.tensor(contexts, dtype=torch.int32, device="cuda"),
        block_tables=torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32, device="cuda"),
        slot_mapping=torch.zeros(len(contexts), dtype=torch.int64, device="cuda"),
        query_lens_host=[1] * len(contexts),
        context_lens_host=contexts,
        block_size=block_size,
    )
    slots = torch.tensor(
        [t[p // block_size] * block_size + p % block_size for n, t in zip(contexts, tables) for p in range(n)],
        device="cuda",
    )
    keys = (torch.randn(len(slots), kv_heads, head_dim, device="cuda") * 2).to(torch.bfloat16)
    values = torch.randn(len(slots), kv_heads, head_dim, device="cuda").to(torch.bfloat16)
    k_scale = (keys.float().abs().max() / FP8_MAX).reshape(1)  # float32 [1] tensors, as a layer holds them
    v_scale = (values.float().abs().max() / FP8_MAX).reshape(1)
    shape = triton_ops.kv_cache_shape(sum(blocks), block_size, kv_heads, head_dim)
    caches = {dtype: (torch.zeros(shape, dtype=dtype, device="cuda"), torch.zeros(shape, dtype=dtype, device="cuda"))
              for dtype in (torch.bfloat16, FP8_DTYPE)}  # fmt: skip
    triton_ops.store_kv(keys, values, *caches[torch.bfloat16], slots)
    triton_ops.store_kv(keys, values, *caches[FP8_DTYPE], slots, k_scale=k_scale, v_scale=v_scale)
    query = torch.randn(len(contexts), heads, head_dim, device="cuda").to(torch.bfloat16)
    plan = triton_ops.plan_attention(step, num_splits=num_splits)
    scale = head_dim**-0.5
    exact = triton_ops.paged_attention(query, None, None, *caches[torch.bfloat16], plan, scale)
    fp8 = triton_ops.paged_attention(
        query, None, None, *caches[FP8_DTYPE], plan, scale, k_scale=k_scale, v_scale=v_scale
    )
    # e4m3 keeps 3 mantissa bits: each key and value within 2**-4 of itself. The output is a
    # weighted mean of values, so its error stays near the values' rounding.
    torch.testing.assert_close(fp8.float(), exact.float(), atol=2.0**-4 * values.float().abs().max().item(), rtol=2.0**-3)
    assert (fp8.float() - exact.float()).abs().mean() < 2.0**-6 * values.float().abs().mean()
