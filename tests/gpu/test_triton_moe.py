"""The fused-MoE Triton kernel against the reference at real models' expert shapes, in bf16, on a GPU.

Skipped without CUDA. Expert weights are random at the scale transformers
initialises them (std 0.02); routing comes from random router logits (softmax,
top-k, renormalised), so some experts get many tokens and some none. Both sides
compute in bf16 with fp32 accumulation but round their intermediates at
different steps (the reference rounds the gate/up projection before SiLU, the
kernel applies SiLU to the fp32 accumulator), so they are compared at the
output's scale: a few bf16 units of its largest value.
"""

from __future__ import annotations

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
pytest.importorskip("triton")

from atom_trio.ops import TorchRefBackend  # noqa: E402
from atom_trio.ops.triton import TritonBackend  # noqa: E402
from atom_trio.ops.triton.moe import default_tile_config, fused_experts  # noqa: E402

# (experts, top-k, hidden, expert intermediate): the expert layers of atom_trio.testing's real configs.
SHAPES = {
    "qwen3-30b-a3b": (128, 8, 2048, 768),
    "mixtral-8x7b": (8, 2, 4096, 14336),
    "glm-4.5-air": (128, 8, 4096, 1408),
}
BATCHES = (1, 2, 8, 32, 128, 512)
REFERENCE = TorchRefBackend()


@pytest.fixture(scope="module")
def triton_backend():
    return TritonBackend("cuda")


@pytest.fixture(scope="module", params=list(SHAPES))
def experts(request):
    num_experts, top_k, hidden, inter = SHAPES[request.param]
    generator = torch.Generator(device="cuda").manual_seed(0)
    w13 = (torch.randn(num_experts, 2 * inter, hidden, device="cuda", generator=generator) * 0.02).bfloat16()
    w2 = (torch.randn(num_experts, hidden, inter, device="cuda", generator=generator) * 0.02).bfloat16()
    yield w13, w2, top_k
    del w13, w2
    torch.cuda.empty_cache()


def routing(tokens: int, num_experts: int, top_k: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Renormalised softmax top-k of random router logits: float32 weights, int32 global expert ids."""
    generator = torch.Generator(device="cuda").manual_seed(seed)
    logits = torch.randn(tokens, num_experts, device="cuda", generator=generator)
    weights, ids = torch.softmax(logits, dim=-1).topk(top_k, dim=-1)
    return weights / weights.sum(dim=-1, keepdim=True), ids.to(torch.int32)


def hidden_states(tokens: int, hidden: int, seed: int) -> torch.Tensor:
    generator = torch.Generator(device="cuda").manual_seed(seed)
    return torch.randn(tokens, hidden, device="cuda", generator=generator).bfloat16()


def assert_close_at_output_scale(got: torch.Tensor, expected: torch.Tensor) -> None:
    """Within 4 bf16 units (2**-8 relative) of the largest output everywhere, and 1.5% in norm.

    The two roundings differ by about 0.7% of the largest output at most and
    0.5% in norm at these shapes (both emulated in fp32 on the CPU).
    """
    assert got.shape == expected.shape and got.dtype == expected.dtype
    got, expected = got.float(), expected.float()
    scale = expected.abs().max().item()
    if scale == 0:  # no chosen expert held here (one rank of an expert-parallel pair): exact zeros
        assert torch.equal(got, expected)
        return
    worst = (got - expected).abs().max().item()
    assert worst <= 4 * 2**-8 * scale, f"max error {worst:.3g} at output scale {scale:.3g}"
    assert (got - expected).norm() <= 1.5e-2 * expected.norm()


@pytest.mark.parametrize("batch", BATCHES)
def test_triton_matches_the_reference_in_bf16(triton_backend, experts, batch):
    w13, w2, top_k = experts
    x = hidden_states(batch, w13.shape[2], seed=batch)
    weights, ids = routing(batch, w13.shape[0], top_k, seed=batch + 1)
    got = triton_backend.fused_experts(x, w13, w2, weights, ids)
    assert_close_at_output_scale(got, REFERENCE.fused_experts(x, w13, w2, weights, ids))


@pytest.mark.parametrize("batch", (1, 32, 512))
def test_an_expert_parallel_slice_computes_its_experts_and_the_ranks_sum_to_the_whole(triton_backend, experts, batch):
    """Two ranks holding half the experts each: each matches the reference on its slice, their sum the whole layer."""
    w13, w2, top_k = experts
    held = w13.shape[0] // 2
    x = hidden_states(batch, w13.shape[2], seed=batch + 2)
    weights, ids = routing(batch, w13.shape[0], top_k, seed=batch + 3)
    parts = []
    for rank in range(2):
        sl = slice(rank * held, (rank + 1) * held)
        part = triton_backend.fused_experts(x, w13[sl], w2[sl], weights, ids, expert_offset=rank * held)
        assert_close_at_output_scale(
            part, REFERENCE.fused_experts(x, w13[sl], w2[sl], weights, ids, expert_offset=rank * held)
        )
        parts.append(part.float())
    assert_close_at_output_scale((parts[0] + parts[1]).bfloat16(), REFERENCE.fused_experts(x, w13, w2, weights, ids))


def test_tokens_whose_experts_all_sit_on_the_other_rank_get_zeros(triton_backend, experts):
    w13, w2, top_k = experts
    held = w13.shape[0] // 2
    x = hidden_states(16, w13.shape[2], seed=5)
    weights, ids = routing(16, held, top_k, seed=6)  # experts [0, held): rank 0's
    ids[8:] += held  # the last 8 tokens: rank 1's only
    out = triton_backend.fused_experts(x, w13[:held], w2[:held], weights, ids, expert_offset=0)
    assert torch.equal(out[8:], torch.zeros_like(out[8:]))
    assert_close_at_output_scale(out[:8], REFERENCE.fused_experts(x[:8], w13[:held], w2[:held], weights[:8], ids[:8]))


@pytest.mark.parametrize("rows_per_expert", (1, 32, 128, 1024))
def test_each_default_tile_config(rows_per_expert):
    """Every tile size `default_tile_config` can pick, on Qwen3-30B-A3B's experts (prefill sizes included)."""
    num_experts, top_k, hidden, inter = SHAPES["qwen3-30b-a3b"]
    generator = torch.Generator(device="cuda").manual_seed(7)
    w13 = (torch.randn(16, 2 * inter, hidden, device="cuda", generator=generator) * 0.02).bfloat16()
    w2 = (torch.randn(16, hidden, inter, device="cuda", generator=generator) * 0.02).bfloat16()
    tiles = default_tile_config(num_experts, top_k, rows_per_expert * num_experts // top_k)
    x = hidden_states(256, hidden, seed=8)
    weights, ids = routing(256, 16, top_k, seed=9)
    got = fused_experts(x, w13, w2, weights, ids, config=tiles)
    assert_close_at_output_scale(got, REFERENCE.fused_experts(x, w13, w2, weights, ids))


def test_float32_is_exact_to_float32_rounding(triton_backend):
    generator = torch.Generator(device="cuda").manual_seed(10)
    w13 = torch.randn(8, 2 * 96, 80, device="cuda", generator=generator) * 0.1
    w2 = torch.randn(8, 80, 96, device="cuda", generator=generator) * 0.1
    x = torch.randn(37, 80, device="cuda", generator=generator)
    weights, ids = routing(37, 8, 2, seed=11)
    torch.testing.assert_close(
        triton_backend.fused_experts(x, w13, w2, weights, ids),
        REFERENCE.fused_experts(x, w13, w2, weights, ids),
        rtol=1e-4,
        atol=1e-4,
    )


@pytest.mark.parametrize("batch", (1, 8))
def test_a_captured_call_replays_with_new_routing(triton_backend, batch):
    """Captured once in a CUDA graph, replayed with new tokens, ids and weights: bit for bit the eager result."""
    num_experts, top_k, hidden, inter = SHAPES["qwen3-30b-a3b"]
    generator = torch.Generator(device="cuda").manual_seed(12)
    w13 = (torch.randn(num_experts, 2 * inter, hidden, device="cuda", generator=generator) * 0.02).bfloat16()
    w2 = (torch.randn(num_experts, hidden, inter, device="cuda", generator=generator) * 0.02).bfloat16()
    x = hidden_states(batch, hidden, seed=13)
    weights, ids = routing(batch, num_experts, top_k, seed=14)

    def call():
        return triton_backend.fused_experts(x, w13, w2, weights, ids)

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        call()  # compile outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = call()
    for seed in (15, 16):
        new_weights, new_ids = routing(batch, num_experts, top_k, seed=seed)
        x.copy_(hidden_states(batch, hidden, seed=seed))
        weights.copy_(new_weights)
        ids.copy_(new_ids)
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, call())
        assert_close_at_output_scale(out, REFERENCE.fused_experts(x, w13, w2, weights, ids))
