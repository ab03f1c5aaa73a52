"""The Triton sampling kernels against a float64 torch reference, on fresh random inputs.

Skipped without a GPU unless ``TRITON_INTERPRET=1``, which runs the same kernels
on CPU tensors in Triton's interpreter (slowly: sizes shrink there).
"""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
pytestmark = pytest.mark.skipif(not (torch.cuda.is_available() or INTERPRET), reason="needs a GPU")
pytest.importorskip("triton")

from atom_trio.sampling_params import SamplingParams  # noqa: E402
from atom_trio.layers.sampler import SampleRequest, Sampler  # noqa: E402
from atom_trio.ops.triton import TritonBackend, sampling  # noqa: E402
from atom_trio.ops.triton.sampling import cutoffs, sample  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# Interpreter sizes keep a run to seconds; the GPU gets real vocabularies and many draws.
VOCAB = 3000 if INTERPRET else 128256
DRAWS = 400 if INTERPRET else 60000


def knobs(rows: list[dict]) -> tuple[torch.Tensor, ...]:
    """Per-row device tensors (temperature, top_k, top_p, min_p) from dicts of overrides."""
    full = [dict(dict(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0), **r) for r in rows]
    return (
        torch.tensor([r["temperature"] for r in full], dtype=torch.float32, device=DEVICE),
        torch.tensor([r["top_k"] for r in full], dtype=torch.int32, device=DEVICE),
        torch.tensor([r["top_p"] for r in full], dtype=torch.float32, device=DEVICE),
        torch.tensor([r["min_p"] for r in full], dtype=torch.float32, device=DEVICE),
    )


def reference_keep(x: torch.Tensor, *, top_k=0, top_p=1.0, min_p=0.0, slack=0.0) -> torch.Tensor:
    """vLLM's kept set for scaled logits ``x`` (one row), in float64.

    ``slack > 0`` widens every boundary by that much (a superset), ``< 0``
    narrows it (a subset): the kernel, in float32, must land in between.
    """
    x = x.double()
    keep = torch.ones_like(x, dtype=torch.bool)
    if min_p > 0:
        keep &= x >= x.max() + math.log(min_p) - slack
    if 0 < top_k < x.numel():
        keep &= x >= x.topk(top_k).values[-1] - slack
    if top_p < 1:
        probs = torch.where(keep, (x - x.max()).exp(), 0.0)
        probs /= probs.sum()
        ordered, order = probs.sort(descending=True)
        more_likely = torch.empty_like(probs)
        more_likely[order] = ordered.cumsum(0) - ordered
        keep &= more_likely < top_p + slack
    return keep


CASES = [
    dict(top_k=50),
    dict(top_k=1),
    dict(top_p=0.9),
    dict(top_p=0.3, temperature=0.5),
    dict(min_p=0.05),
    dict(top_k=50, top_p=0.9),
    dict(top_k=200, top_p=0.95, min_p=0.01, temperature=2.0),
    dict(min_p=0.3, top_k=1000),  # min-p keeps fewer than k: top-k changes nothing
    dict(),  # temperature only: nothing cut
    dict(top_p=0.999, temperature=2.0),  # a nucleus of most of the vocabulary
]


@pytest.mark.parametrize("scale", [1.0, 4.0])
def test_kept_sets_match_the_reference(scale):
    # Temperatures are powers of two, so the kernel's x / T is the reference's exactly.
    gen = torch.Generator().manual_seed(int(scale))
    logits = (torch.randn(len(CASES), VOCAB, generator=gen) * scale).to(DEVICE)
    cut = cutoffs(logits, *knobs(CASES)).cpu()
    for row, case in enumerate(CASES):
        x = logits[row].cpu() / case.get("temperature", 1.0)
        kept = x >= cut[row]
        params = {k: v for k, v in case.items() if k != "temperature"}
        strict, generous = reference_keep(x, **params, slack=-1e-5), reference_keep(x, **params, slack=1e-5)
        assert (strict <= kept).all() and (kept <= generous).all(), (case, int(kept.sum()), int(strict.sum()))
        if not params:
            assert cut[row] == -math.inf


@pytest.mark.parametrize("rounds", [0, 1, sampling.ROUNDS])
def test_many_tiles_and_any_number_of_parallel_rounds_give_the_same_cut_offs(monkeypatch, rounds):
    """Small tiles (dozens per row) and 0 (the row program alone), 1 or all parallel search rounds.

    Count-based cut-offs (min-p, top-k) are exact whatever the path; mass-based
    ones (top-p) must land inside the reference's bracket.
    """
    gen = torch.Generator().manual_seed(13)
    logits = (torch.randn(len(CASES), VOCAB, generator=gen) * 3).to(DEVICE)
    expected = cutoffs(logits, *knobs(CASES)).cpu()
    monkeypatch.setattr(sampling, "MAX_TILE", 64)
    monkeypatch.setattr(sampling, "ROUNDS", rounds)
    cut = cutoffs(logits, *knobs(CASES)).cpu()
    for row, case in enumerate(CASES):
        x = logits[row].cpu() / case.get("temperature", 1.0)
        params = {k: v for k, v in case.items() if k != "temperature"}
        kept = x >= cut[row]
        assert (reference_keep(x, **params, slack=-1e-5) <= kept).all(), case
        assert (kept <= reference_keep(x, **params, slack=1e-5)).all(), case
        if "top_p" not in case:
            assert cut[row] == expected[row], case


def test_ties_are_kept_together_and_masked_tokens_never_count():
    # bf16-like logits with many exact ties, and -inf tokens (min_tokens / logit_bias masks).
    gen = torch.Generator().manual_seed(7)
    logits = (torch.randn(3, VOCAB, generator=gen) * 2).to(torch.bfloat16).float()
    logits[:, ::3] = -math.inf
    logits = logits.to(DEVICE)
    cases = [dict(top_k=37), dict(top_p=0.6), dict(top_k=VOCAB // 2)]  # the last keeps tokens beside -inf ones
    cut = cutoffs(logits, *knobs(cases)).cpu()
    for row, case in enumerate(cases):
        x = logits[row].cpu()
        kept = x >= cut[row]
        assert torch.isfinite(cut[row])
        assert (reference_keep(x, **case, slack=-1e-5) <= kept).all()
        assert (kept <= reference_keep(x, **case, slack=1e-5) | (x == cut[row])).all()
        assert not torch.isinf(x[kept]).any()


def test_draws_stay_in_the_kept_set_and_greedy_rows_are_argmax():
    gen = torch.Generator().manual_seed(11)
    logits = (torch.randn(len(CASES) + 2, VOCAB, generator=gen) * 3).to(DEVICE)
    cases = CASES + [dict(temperature=0.0), dict(temperature=0.0, top_k=5)]
    seeds = torch.arange(len(cases), dtype=torch.int64, device=DEVICE) * 7919
    tokens = sample(logits, *knobs(cases), seeds).cpu()
    cut = cutoffs(logits, *knobs(cases)).cpu()
    for row, case in enumerate(cases):
        if case.get("temperature") == 0.0:
            assert tokens[row] == logits[row].argmax().item()
        else:
            assert logits[row, tokens[row]].item() / case.get("temperature", 1.0) >= cut[row]


DISTRIBUTION_CASES = [
    dict(temperature=0.8, top_k=20, top_p=0.9, min_p=0.02),
    dict(temperature=1.3),  # no cut-off: the draw pass alone
    dict(top_p=0.5),
]


@pytest.mark.parametrize("case", DISTRIBUTION_CASES, ids=str)
def test_draws_follow_the_renormalised_distribution(case):
    """Chi-square of many seeded draws of one row against the reference's kept softmax."""
    vocab = 40
    gen = torch.Generator().manual_seed(3)
    row = torch.randn(vocab, generator=gen) * 1.5
    logits = row.expand(DRAWS, -1).contiguous().to(DEVICE)
    seeds = torch.arange(DRAWS, dtype=torch.int64, device=DEVICE) * 2654435761 + 17
    tokens = sample(logits, *knobs([case] * DRAWS), seeds).cpu().numpy()

    x = row.double() / case.get("temperature", 1.0)
    keep = reference_keep(x, **{k: v for k, v in case.items() if k != "temperature"}).numpy()
    probs = torch.where(torch.from_numpy(keep), (x - x.max()).exp(), 0.0).numpy()
    probs /= probs.sum()
    counts = np.bincount(tokens, minlength=vocab)
    assert counts[~keep].sum() == 0
    expected = probs * DRAWS
    # Bins expected below 5 draws are pooled, as the chi-square approximation asks.
    small = keep & (expected < 5)
    observed = np.append(counts[keep & ~small], counts[small].sum())
    expecting = np.append(expected[keep & ~small], expected[small].sum())
    if expecting[-1] == 0:
        observed, expecting = observed[:-1], expecting[:-1]
    chi2 = ((observed - expecting) ** 2 / expecting).sum()
    dof = len(observed) - 1
    # Six standard deviations above the mean of a chi-square with `dof` degrees of freedom.
    assert chi2 < dof + 6 * math.sqrt(2 * dof), (chi2, dof)


def test_seeded_rows_reproduce_whatever_their_batch():
    gen = torch.Generator().manual_seed(5)
    vocab = 500
    target = (torch.randn(vocab, generator=gen) * 2).to(DEVICE)
    target_case = dict(temperature=0.9, top_p=0.95, top_k=100)
    target_seed = -(2**62) - 12345  # any int64

    def draw(position: int, mates: int, mate_seed: int) -> int:
        mate_logits = torch.randn(mates, vocab, generator=gen).to(DEVICE) * 3
        logits = torch.cat([mate_logits[:position], target[None], mate_logits[position:]])
        cases = [dict(temperature=1.0, min_p=0.1)] * position + [target_case] + [dict(top_k=3)] * (mates - position)
        seeds = torch.full((mates + 1,), mate_seed, dtype=torch.int64, device=DEVICE)
        seeds[position] = target_seed
        return int(sample(logits, *knobs(cases), seeds)[position])

    alone = draw(0, 0, 0)
    assert all(draw(position, 6, mate_seed) == alone for position, mate_seed in [(0, 1), (3, 2), (6, 3)])
    # Other seeds draw other tokens (the target's nucleus holds many tokens, so 20 seeds cannot all agree).
    others = {
        int(sample(target[None], *knobs([target_case]), torch.tensor([s], device=DEVICE))) for s in range(20)
    }
    assert len(others) > 1


def test_sampler_uses_the_kernels_with_penalties_bias_and_logprobs():
    """The Sampler's kernel path end to end: processing, seeds by step, greedy rows, raw logprobs."""
    vocab = 300
    gen = torch.Generator().manual_seed(9)
    logits = (torch.randn(4, vocab, generator=gen) * 3).to(DEVICE)
    sampler = Sampler(frozenset({3}), backend=TritonBackend(DEVICE), fused=True)

    def request(output=(), **params) -> SampleRequest:
        return SampleRequest(params=SamplingParams(**params), prompt_token_ids=[0, 1], output_token_ids=list(output))

    requests = [
        request(temperature=0.0, presence_penalty=5.0, output=[int(logits[0].argmax())]),
        request(seed=1, top_k=10, logit_bias={7: 100.0}, logprobs=2),
        request(seed=2, min_tokens=4, top_p=0.5, output=[1]),
        request(seed=3, temperature=0.7, top_k=5),
    ]
    out = sampler(logits, requests)
    processed = sampler.process_logits(logits, requests)
    assert out.token_ids[0] == int(processed[0].argmax()) != int(logits[0].argmax())
    assert out.token_ids[1] == 7  # +100 bias leaves no other token a chance
    assert out.logprobs[1] == pytest.approx(torch.log_softmax(logits[1].double(), -1)[7].item(), abs=1e-5)
    assert out.token_ids[2] != 3  # EOS is blocked until min_tokens
    assert logits[3, out.token_ids[3]] >= logits[3].topk(5).values[-1]
    # The same requests in another order and company give the seeded rows the same tokens.
    again = sampler(logits[[3, 2]], [requests[3], requests[2]])
    assert again.token_ids == [out.token_ids[3], out.token_ids[2]]
