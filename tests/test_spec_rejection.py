"""The rejection sampler's literal rule (drafts with a distribution ``q``) keeps the target's distribution.

A synthetic target over a 6-token vocabulary: fixed logits for the first
generated token, a table of logits for the second given the first. Each
sample is one verify chunk with two drafts drawn from a draft distribution
``q`` (deliberately bad, close to the target, or one-hot as n-gram drafts are), at T = 0.8 with top-p 0.9
and a logit bias (a transform the target's ``p`` must include). Where the first
draft is rejected, the second token comes from an ordinary step on the
token that replaced it. The joint frequency of the first two tokens over
24,000 samples is compared with the exact distribution by a chi-square test,
which must also catch a verifier that accepts every draft.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from atom_trio.layers.rejection_sampler import RejectionSampler, counter_uniform, exponential_race, first_rows
from atom_trio.layers.sampler import Sampler, SampleRequest
from atom_trio.ops import get_backend
from atom_trio.sampling_params import SamplingParams

scipy_stats = pytest.importorskip("scipy.stats")

VOCAB = 6
NUM_SAMPLES = 24_000
PROMPT = [0, 1]
PARAMS = SamplingParams(temperature=0.8, top_p=0.9, logit_bias={3: 0.7}, max_tokens=4)
CUDA = pytest.param(
    "cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
)

_generator = torch.Generator().manual_seed(3)
FIRST_LOGITS = torch.randn(VOCAB, generator=_generator) * 1.5
SECOND_LOGITS = torch.randn(VOCAB, VOCAB, generator=_generator) * 1.5  # [first token, vocab]


def _reference_probs(logits: torch.Tensor) -> torch.Tensor:
    """The request's distribution from raw logits, written out independently of the sampler: bias, T, vLLM's top-p."""
    biased = logits.double().clone()
    for token, bias in PARAMS.logit_bias.items():
        biased[..., token] += bias
    probs = (biased / PARAMS.temperature).softmax(-1)
    ascending, order = probs.sort(-1)
    drop = ascending.cumsum(-1) <= 1 - PARAMS.top_p
    drop[..., -1] = False
    probs = probs.masked_fill(drop.scatter(-1, order, drop), 0.0)
    return probs / probs.sum(-1, keepdim=True)


def _exact_joint() -> np.ndarray:
    return (_reference_probs(FIRST_LOGITS)[:, None] * _reference_probs(SECOND_LOGITS)).numpy()


def _draft_dists(kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    """q for draft 1 ``[vocab]`` and for draft 2 given draft 1 ``[vocab, vocab]``."""
    if kind == "good":  # the target's own distribution, a little blurred
        first = 0.8 * _reference_probs(FIRST_LOGITS) + 0.2 / VOCAB
        second = 0.8 * _reference_probs(SECOND_LOGITS) + 0.2 / VOCAB
    elif kind == "point":  # one-hot q: the literal rule's special case that n-gram drafts take
        first = torch.nn.functional.one_hot(FIRST_LOGITS.argmax(), VOCAB).double()
        second = torch.nn.functional.one_hot(SECOND_LOGITS.argmin(-1), VOCAB).double()
    else:  # most mass where the target has little
        first = (-FIRST_LOGITS * 2).softmax(-1).double()
        second = (-SECOND_LOGITS * 2).softmax(-1).double()
    return first.float(), second.float()


class AcceptAlways(RejectionSampler):
    """Broken on purpose: every draft is accepted."""

    @staticmethod
    def accepts(uniform, p_draft, q_draft):
        return torch.ones_like(uniform, dtype=torch.bool)


def _verifier(kind: type[RejectionSampler], device: str) -> RejectionSampler:
    """``kind`` over the sampler the runner would have on ``device`` (its backend's sampling kernel included)."""
    return kind(Sampler(frozenset(), backend=get_backend("auto", device)))


def _sample_pairs(verifier: RejectionSampler, kind: str, num_samples: int, device: str = "cpu") -> np.ndarray:
    """Counts of (token 1, token 2) over ``num_samples`` verify chunks of two drafts."""
    torch.manual_seed(11)
    q1, q2 = _draft_dists(kind)
    d1 = torch.multinomial(q1, num_samples, replacement=True)
    d2 = torch.multinomial(q2[d1], 1).squeeze(1)
    logits = torch.stack([FIRST_LOGITS.expand(num_samples, VOCAB), SECOND_LOGITS[d1], FIRST_LOGITS.expand(num_samples, VOCAB)], 1)
    logits = logits.to(device)
    drafts = torch.stack([d1, d2], 1).tolist()
    requests = [
        SampleRequest(PARAMS, PROMPT, drafts[s][:i]) for s in range(num_samples) for i in range(3)
    ]
    q = torch.stack([q1.expand(num_samples, VOCAB), q2[d1]], 1).to(device)
    tokens, _, _ = verifier.sample(logits.reshape(-1, VOCAB), requests, drafts, draft_probs=list(q))
    tokens = tokens.view(num_samples, 3).cpu()
    first, second = tokens[:, 0], tokens[:, 1]
    rejected = (first != d1).nonzero().squeeze(1)
    if len(rejected):  # the next step: a plain draw after the resampled first token
        again = verifier.sampler.sample_on_device(
            SECOND_LOGITS[first[rejected]].to(device), [SampleRequest(PARAMS, PROMPT, [int(first[s])]) for s in rejected]
        )[0].cpu()
        second = second.clone()
        second[rejected] = again
    counts = np.zeros((VOCAB, VOCAB))
    np.add.at(counts, (first.numpy(), second.numpy()), 1)
    return counts


def _chi_square_p(counts: np.ndarray, probs: np.ndarray) -> float:
    expected = probs.ravel() * counts.sum()
    observed = counts.ravel()
    if observed[expected == 0].sum():
        return 0.0  # a pair the target cannot produce was sampled
    big = expected >= 5
    small = (expected > 0) & ~big
    observed, expected = observed[big], expected[big]
    if small.any():  # cells expected under 5 pooled into one
        observed, expected = np.append(observed, counts.ravel()[small].sum()), np.append(expected, (probs.ravel() * counts.sum())[small].sum())
    return float(scipy_stats.chisquare(observed, expected).pvalue)


@pytest.mark.parametrize("device", ["cpu", CUDA])
@pytest.mark.parametrize("kind", ["bad", "good", "point"])
def test_verified_tokens_follow_the_target_distribution(kind, device) -> None:
    counts = _sample_pairs(_verifier(RejectionSampler, device), kind, NUM_SAMPLES, device)
    assert _chi_square_p(counts, _exact_joint()) > 1e-3


@pytest.mark.parametrize("kind", ["bad", "good"])
def test_a_verifier_that_accepts_every_draft_is_caught(kind) -> None:
    counts = _sample_pairs(_verifier(AcceptAlways, "cpu"), kind, NUM_SAMPLES)
    assert _chi_square_p(counts, _exact_joint()) < 1e-6


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_counter_uniforms_are_the_same_on_the_gpu() -> None:
    keys = torch.randint(-(2**62), 2**62, (64,), generator=torch.Generator().manual_seed(0))
    assert torch.equal(counter_uniform(keys, 1000), counter_uniform(keys.cuda(), 1000).cpu())


def test_greedy_rows_accept_while_the_draft_is_the_argmax() -> None:
    greedy = SamplingParams(temperature=0.0)
    logits = torch.stack([FIRST_LOGITS, SECOND_LOGITS[2], FIRST_LOGITS])
    best = int(FIRST_LOGITS.argmax())
    q = torch.full((2, VOCAB), 1.0 / VOCAB)
    for drafts, expected in (([best, 0], best), ([(best + 1) % VOCAB, 0], best)):
        requests = [SampleRequest(greedy, PROMPT, drafts[:i]) for i in range(3)]
        tokens, _, _ = RejectionSampler(Sampler(frozenset())).sample(logits, requests, [drafts], draft_probs=[q])
        assert tokens.tolist() == logits.argmax(-1).tolist() and int(tokens[0]) == expected


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**32), mates=st.integers(0, 4), position=st.integers(0, 4), mate_seed=st.integers(0, 99))
def test_a_seeded_chunk_draws_the_same_tokens_whatever_its_batch_mates(seed, mates, position, mate_seed) -> None:
    mine = SamplingParams(temperature=1.0, top_k=4, seed=seed)
    generator = torch.Generator().manual_seed(mate_seed)
    chunks = [([1, 4], mine)]
    for _ in range(mates):
        chunks.insert(min(position, len(chunks)), (torch.randint(0, VOCAB, (2,), generator=generator).tolist(),
                                                   SamplingParams(temperature=0.7, seed=None)))
    index = next(i for i, c in enumerate(chunks) if c[1] is mine)
    logits = torch.cat([torch.stack([FIRST_LOGITS, SECOND_LOGITS[d[0]], FIRST_LOGITS]) for d, _ in chunks])
    requests = [SampleRequest(p, PROMPT, d[:i]) for d, p in chunks for i in range(3)]
    q = torch.softmax(-FIRST_LOGITS, -1).expand(2, VOCAB)
    tokens, _, _ = RejectionSampler(Sampler(frozenset())).sample(logits, requests, [d for d, _ in chunks],
                                                                 draft_probs=[q] * len(chunks))
    row = first_rows([d for d, _ in chunks])[index]
    alone = RejectionSampler(Sampler(frozenset())).sample(
        torch.stack([FIRST_LOGITS, SECOND_LOGITS[1], FIRST_LOGITS]),
        [SampleRequest(mine, PROMPT, [1, 4][:i]) for i in range(3)], [[1, 4]], draft_probs=[q],
    )[0]
    assert tokens[row : row + 3].tolist() == alone.tolist()


def test_counter_uniforms_are_uniform_and_the_race_follows_its_weights() -> None:
    keys = torch.arange(4000, dtype=torch.int64) * 7919 - 10**12
    uniforms = counter_uniform(keys, 3)
    assert 0 < float(uniforms.min()) and float(uniforms.max()) < 1
    assert scipy_stats.kstest(uniforms.flatten().numpy(), "uniform").pvalue > 1e-3
    weights = torch.tensor([0.5, 0.0, 1.5, 2.0])
    picks = exponential_race(weights.expand(4000, 4), counter_uniform(keys + 1, 4))
    counts = np.bincount(picks.numpy(), minlength=4)
    assert counts[1] == 0
    assert scipy_stats.chisquare(counts[[0, 2, 3]], np.array([0.5, 1.5, 2.0]) / 4 * 4000).pvalue > 1e-3
