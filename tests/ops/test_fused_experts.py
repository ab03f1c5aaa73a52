"""`KernelBackend.fused_experts`: the reference against its definition, and the CPU path against the reference."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from atom_trio.ops import CpuBackend, TorchRefBackend

REFERENCE = TorchRefBackend()
CPU = CpuBackend()


def _experts(num_experts: int, hidden: int, inter: int, dtype: torch.dtype, seed: int):
    generator = torch.Generator().manual_seed(seed)
    w13 = torch.randn(num_experts, 2 * inter, hidden, generator=generator) / hidden**0.5
    w2 = torch.randn(num_experts, hidden, inter, generator=generator) / inter**0.5
    return w13.to(dtype), w2.to(dtype)


def _routing(tokens: int, num_experts: int, top_k: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Distinct experts per token (as a top-k gives) and positive weights."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.rand(tokens, num_experts, generator=generator).argsort(dim=1)[:, :top_k].to(torch.int32)
    weights = torch.rand(tokens, top_k, generator=generator) + 0.05
    return weights, ids


def _by_definition(hidden, w13, w2, weights, ids, offset):
    """``sum_j w[t,j] * down(silu(gate(x)) * up(x))`` token by token, in float64."""
    x, w13, w2 = hidden.double(), w13.double(), w2.double()
    inter = w2.shape[2]
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for weight, expert in zip(weights[t].tolist(), ids[t].tolist()):
            local = expert - offset
            if 0 <= local < w13.shape[0]:
                gate, up = (w13[local] @ x[t]).split(inter)
                out[t] += weight * (w2[local] @ (F.silu(gate) * up))
    return out


def test_the_reference_is_the_definition_with_experts_held_elsewhere_adding_nothing():
    w13, w2 = _experts(6, 24, 16, torch.float32, seed=1)
    hidden = torch.randn(9, 24, generator=torch.Generator().manual_seed(2))
    weights, ids = _routing(9, 10, 3, seed=3)  # experts 0..9, of which this rank holds 2..7
    got = REFERENCE.fused_experts(hidden, w13, w2, weights, ids, expert_offset=2)
    torch.testing.assert_close(got.double(), _by_definition(hidden, w13, w2, weights, ids, 2), rtol=1e-5, atol=1e-5)


@settings(max_examples=60, deadline=None)
@given(
    tokens=st.integers(1, 64),
    num_experts=st.integers(1, 16),
    data=st.data(),
    hidden=st.sampled_from([8, 16, 40, 64]),
    inter=st.sampled_from([4, 16, 24, 48]),
    dtype=st.sampled_from([torch.float32, torch.bfloat16]),
    seed=st.integers(0, 2**16),
)
def test_cpu_path_matches_the_reference(tokens, num_experts, data, hidden, inter, dtype, seed):
    top_k = data.draw(st.integers(1, min(num_experts, 4)), label="top_k")
    held = data.draw(st.integers(1, num_experts), label="experts held here")
    offset = data.draw(st.integers(0, num_experts - held), label="expert_offset")
    w13, w2 = _experts(held, hidden, inter, dtype, seed)
    x = torch.randn(tokens, hidden, generator=torch.Generator().manual_seed(seed + 1)).to(dtype)
    weights, ids = _routing(tokens, num_experts, top_k, seed + 2)
    expected = REFERENCE.fused_experts(x, w13, w2, weights, ids, expert_offset=offset)
    got = CPU.fused_experts(x, w13, w2, weights, ids, expert_offset=offset)
    assert got.dtype == dtype and got.shape == (tokens, hidden)
    if dtype == torch.float32:
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    else:  # the intermediate activations round to bf16 in either path, maybe at different steps
        torch.testing.assert_close(got.float(), expected.float(), rtol=1e-2, atol=1e-2)
    off_rank = ((ids < offset) | (ids >= offset + held)).all(dim=1)
    assert not got[off_rank].any()  # tokens whose experts all sit on other ranks get exact zeros


def test_tokens_whose_experts_all_sit_on_another_rank_get_zeros():
    w13, w2 = _experts(4, 16, 8, torch.float32, seed=4)
    hidden = torch.randn(5, 16)
    weights, ids = _routing(5, 4, 2, seed=5)
    for backend in (REFERENCE, CPU):
        out = backend.fused_experts(hidden, w13, w2, weights, ids + 4, expert_offset=0)  # experts 4..7: elsewhere
        assert torch.equal(out, torch.zeros_like(hidden))


def test_the_cpu_path_never_runs_an_expert_no_token_chose():
    w13, w2 = _experts(8, 16, 8, torch.float32, seed=6)
    hidden = torch.randn(6, 16)
    weights, ids = _routing(6, 4, 2, seed=7)  # experts 0..3 only
    expected = REFERENCE.fused_experts(hidden, w13[:4], w2[:4], weights, ids)
    w13[4:], w2[4:] = float("nan"), float("nan")  # running one would poison every token it touched
    torch.testing.assert_close(CPU.fused_experts(hidden, w13, w2, weights, ids), expected, rtol=1e-5, atol=1e-5)


def test_a_token_in_a_batch_gets_what_it_gets_alone():
    w13, w2 = _experts(8, 32, 16, torch.float32, seed=8)
    hidden = torch.randn(12, 32)
    weights, ids = _routing(12, 8, 2, seed=9)
    batched = CPU.fused_experts(hidden, w13, w2, weights, ids)
    rows = [slice(t, t + 1) for t in range(12)]
    alone = torch.cat([CPU.fused_experts(hidden[t], w13, w2, weights[t], ids[t]) for t in rows])
    torch.testing.assert_close(batched, alone, rtol=1e-6, atol=1e-6)
