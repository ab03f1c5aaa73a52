"""The sampler against independent computations of what each parameter means."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from atom_trio.layers.sampler import SampleRequest, Sampler, first_argmax
from atom_trio.ops import get_backend
from atom_trio.sampling_params import SamplingParams

EOS = 3
DEVICES = [
    "cpu",
    pytest.param(
        "cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA")]
    ),
]


def request(prompt=(0, 1), output=(), **params) -> SampleRequest:
    return SampleRequest(
        params=SamplingParams(**params), prompt_token_ids=list(prompt), output_token_ids=list(output)
    )


def random_logits(rows: int, vocab: int, seed: int, device="cpu", scale=3.0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(rows, vocab, generator=generator) * scale).to(device)


# -- greedy and temperature ------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
def test_greedy_is_argmax_alone_and_among_random_rows(device):
    logits = random_logits(6, 500, seed=0, device=device)
    sampler = Sampler(frozenset({EOS}))
    all_greedy = sampler(logits, [request(temperature=0.0) for _ in range(6)])
    assert all_greedy.token_ids == logits.argmax(-1).tolist()
    assert all_greedy.logprobs == [None] * 6 and all_greedy.top_logprobs == [None] * 6

    mixed = [request(temperature=0.0 if i % 2 else 1.5, top_k=50) for i in range(6)]
    out = sampler(logits, mixed)
    assert out.token_ids[1::2] == logits[1::2].argmax(-1).tolist()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("vocab", [49152, 16032, 1000], ids=["256-pieces", "32-pieces", "one-stage"])
def test_first_argmax_is_torch_argmax_ties_included(device, vocab):
    logits = random_logits(6, vocab, seed=3, device=device).round()  # every row's maximum is tied a few times
    logits[0] = 0.0  # all tied: token 0
    logits[1, [5, vocab // 2, vocab - 1]] = 50.0  # tied maxima in different pieces
    logits[2, vocab - 1] = 50.0  # the maximum in the last column
    assert first_argmax(logits).tolist() == logits.argmax(-1).tolist()
    assert first_argmax(logits).tolist()[:3] == [0, 5, vocab - 1]


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
def test_temperature_frequencies_match_softmax(temperature):
    logits = torch.tensor([2.0, 1.0, 0.5, -1.0, 0.0])
    rows = 20_000
    torch.manual_seed(1234)  # unseeded rows use the default RNG
    out = Sampler(frozenset())(logits.expand(rows, -1).contiguous(), [request(temperature=temperature)] * rows)
    frequencies = np.bincount(out.token_ids, minlength=5) / rows
    expected = torch.softmax(logits / temperature, -1).numpy()
    # 5 standard deviations of a frequency estimated from 20k draws is at most 0.018.
    np.testing.assert_allclose(frequencies, expected, atol=0.018)


def test_logit_bias_moves_sampled_frequencies():
    logits = torch.zeros(4)
    rows = 20_000
    torch.manual_seed(99)
    params = dict(logit_bias={0: math.log(3.0), 3: -math.log(2.0)})
    out = Sampler(frozenset())(logits.expand(rows, -1).contiguous(), [request(**params)] * rows)
    frequencies = np.bincount(out.token_ids, minlength=4) / rows
    weights = np.array([3.0, 1.0, 1.0, 0.5])
    np.testing.assert_allclose(frequencies, weights / weights.sum(), atol=0.018)


# -- seeds -----------------------------------------------------------------------------


def generate(sampler: Sampler, steps_logits, target: SampleRequest, mates: list[SampleRequest], position: int):
    """Run `target` for len(steps_logits) steps at `position` among `mates`; return its tokens."""
    tokens: list[int] = []
    for step, row_logits in enumerate(steps_logits):
        me = SampleRequest(params=target.params, prompt_token_ids=target.prompt_token_ids, output_token_ids=tokens)
        batch = mates[:position] + [me] + mates[position:]
        logits = random_logits(len(batch), row_logits.shape[0], seed=1000 + step, device=row_logits.device)
        logits[position] = row_logits
        tokens = tokens + [sampler(logits, batch).token_ids[position]]
    return tokens


@pytest.mark.parametrize("device", DEVICES)
def test_seeded_request_reproduces_whatever_its_batch(device):
    steps = [random_logits(1, 2000, seed=s, scale=1.0)[0].to(device) for s in range(12)]
    sampler = Sampler(frozenset({EOS}))
    target = request(seed=42, temperature=0.9, top_p=0.95)
    alone = generate(sampler, steps, target, [], 0)

    torch.manual_seed(0)  # the unseeded mates advance the default RNG in between
    mates = [
        request(temperature=1.0),
        request(seed=7, temperature=1.3),
        request(temperature=0.0),
        request(seed=42, temperature=0.5, top_k=3, presence_penalty=0.5),
        request(temperature=0.7, min_p=0.1, repetition_penalty=1.2),
    ]
    for position in (0, 2, 5):
        assert generate(sampler, steps, target, mates, position) == alone
    # A fresh sampler (a restarted or recomputing worker) gives the same tokens too.
    assert generate(Sampler(frozenset({EOS})), steps, target, mates[:1], 1) == alone

    other = generate(sampler, steps, request(seed=43, temperature=0.9, top_p=0.95), [], 0)
    assert other != alone


def test_seeded_rows_with_equal_state_draw_equal_tokens_and_steps_differ():
    """Same (seed, step) is the same draw, in one batch; another step is a new draw."""
    logits = torch.zeros(3, 5000)
    sampler = Sampler(frozenset())
    out = sampler(logits, [request(seed=5, output=[1, 2]), request(seed=5, output=[9, 9]), request(seed=5, output=[1])])
    assert out.token_ids[0] == out.token_ids[1]
    assert out.token_ids[0] != out.token_ids[2]


# -- top-k / top-p / min-p never leave the allowed set ----------------------------------


def allowed_tokens(logits: np.ndarray, params: SamplingParams) -> set[int]:
    """vLLM's candidate set, computed in float64, generous by a hair at each boundary."""
    eps = 1e-5
    x = logits.astype(np.float64) / params.temperature
    keep = np.ones(len(x), dtype=bool)
    probs = np.exp(x - x.max())
    probs /= probs.sum()
    if params.min_p > 0:
        keep &= probs >= params.min_p * probs.max() * (1 - eps)
    if 0 < params.top_k < len(x):
        kth = np.sort(x)[::-1][params.top_k - 1]
        keep &= x >= kth - eps
    if params.top_p < 1:
        kept = np.where(keep, probs, 0.0)
        kept /= kept.sum()
        # A token survives only if the tokens strictly more likely than it hold less than top_p.
        more_likely_mass = np.array([kept[kept > kept[i]].sum() for i in range(len(x))])
        keep &= more_likely_mass < params.top_p + eps
    return set(np.flatnonzero(keep).tolist())


row_params = st.builds(
    dict,
    temperature=st.sampled_from([0.0, 0.3, 1.0, 1.7]),
    top_k=st.sampled_from([-1, 0, 1, 2, 5, 40]),
    top_p=st.sampled_from([1.0, 0.9, 0.5, 0.1, 0.01]),
    min_p=st.sampled_from([0.0, 0.05, 0.3, 0.9]),
    seed=st.one_of(st.none(), st.integers(-(2**63), 2**64 - 1)),
)


@pytest.mark.parametrize("device", DEVICES)  # on CUDA, the backend's sampling kernel (Triton's where it imports)
@settings(max_examples=60, deadline=None)
@given(
    rows=st.lists(row_params, min_size=1, max_size=5),
    vocab=st.integers(2, 40),
    logits_seed=st.integers(0, 2**16),
    scale=st.sampled_from([0.5, 2.0, 8.0]),
)
def test_filters_never_emit_a_token_outside_the_allowed_set(device, rows, vocab, logits_seed, scale):
    logits = random_logits(len(rows), vocab, seed=logits_seed, scale=scale)
    requests = [request(**row) for row in rows] * 8  # many draws per example, all the batch paths
    # the kernel even for few rows
    sampler = Sampler(frozenset(), backend=get_backend("auto", device), fused=True if device == "cuda" else None)
    out = sampler(logits.repeat(8, 1).to(device), requests)
    for i, (token, req) in enumerate(zip(out.token_ids, requests)):
        row = logits[i % len(rows)].numpy()
        if req.params.greedy:
            assert token == int(row.argmax())
        else:
            assert token in allowed_tokens(row, req.params), (token, req.params, row)


# -- penalties, logit_bias, min_tokens --------------------------------------------------


def test_penalties_and_bias_match_hand_computation():
    logits = torch.tensor([[2.0, -1.0, 0.5, 1.0, -0.5, 3.0], [2.0, -1.0, 0.5, 1.0, -0.5, 3.0]])
    requests = [
        # prompt {0, 1}, output [1, 2, 2]: token 1 is in both, 2 twice in the output.
        request(
            prompt=[0, 1],
            output=[1, 2, 2],
            repetition_penalty=2.0,
            presence_penalty=0.5,
            frequency_penalty=0.25,
            logit_bias={4: 1.5, 5: -2.0},
        ),
        request(prompt=[0, 1], output=[1, 2, 2]),  # untouched mate
    ]
    processed = Sampler(frozenset()).process_logits(logits, requests)
    # bias first (vLLM order): [2, -1, .5, 1, 1, 1]
    # repetition over prompt+output {0, 1, 2}: positive / 2, negative * 2 -> [1, -2, .25, 1, 1, 1]
    # frequency over output counts {1: 1, 2: 2}: -[0, .25, .5, 0, 0, 0]
    # presence over output {1, 2}: -[0, .5, .5, 0, 0, 0]
    expected = torch.tensor([1.0, -2.75, -0.75, 1.0, 1.0, 1.0])
    torch.testing.assert_close(processed[0], expected)
    torch.testing.assert_close(processed[1], logits[1])
    assert torch.equal(logits[0], torch.tensor([2.0, -1.0, 0.5, 1.0, -0.5, 3.0])), "input was written to"
    torch.testing.assert_close(processed[0].softmax(-1), expected.softmax(-1))


def test_penalties_change_the_greedy_choice_and_output_only_penalties_ignore_the_prompt():
    logits = torch.tensor([[3.0, 2.9, 0.0, 0.0]] * 3)
    sampler = Sampler(frozenset())
    out = sampler(
        logits,
        [
            request(prompt=[0], output=[], temperature=0.0, presence_penalty=2.0, frequency_penalty=2.0),
            request(prompt=[1], output=[0], temperature=0.0, presence_penalty=0.2),
            request(prompt=[0], output=[], temperature=0.0, repetition_penalty=1.1),
        ],
    )
    assert out.token_ids == [0, 1, 1]


def test_min_tokens_blocks_eos_and_stop_ids_then_releases_them():
    logits = torch.tensor([[0.0, 1.0, 0.0, 9.0, 0.0, 8.0]])  # EOS (3) then stop id 5 are the most likely
    sampler = Sampler(frozenset({EOS}))
    params = dict(temperature=0.0, min_tokens=2, stop_token_ids=[5])
    for generated in ([], [1]):
        processed = sampler.process_logits(logits, [request(output=generated, **params)])
        assert processed[0, EOS] == -math.inf and processed[0, 5] == -math.inf
        assert sampler(logits, [request(output=generated, **params)]).token_ids == [1]
        # Random sampling cannot reach them either.
        sampled = sampler(logits.expand(64, -1), [request(output=generated, min_tokens=2, stop_token_ids=[5])] * 64)
        assert not {EOS, 5} & set(sampled.token_ids)
    assert sampler(logits, [request(output=[1, 1], **params)]).token_ids == [EOS]
    # ignore_eos leaves EOS alone but still holds back the request's own stop ids.
    ignoring = sampler.process_logits(logits, [request(ignore_eos=True, **params)])
    assert ignoring[0, EOS] == 9.0 and ignoring[0, 5] == -math.inf


# -- a mixed batch: each row as it would be alone, with no host sync ---------------------

deterministic_row = st.builds(
    dict,
    temperature=st.sampled_from([0.0, 0.0, 0.5, 1.0, 1.6]),  # the random rows are seeded: their draw is fixed
    top_k=st.sampled_from([-1, 1, 3, 20]),
    top_p=st.sampled_from([1.0, 0.9, 0.3]),
    min_p=st.sampled_from([0.0, 0.1]),
    seed=st.integers(0, 2**63 - 1),
    repetition_penalty=st.sampled_from([1.0, 1.3, 0.8]),
    presence_penalty=st.sampled_from([0.0, 0.7]),
    frequency_penalty=st.sampled_from([0.0, -0.4]),
    min_tokens=st.sampled_from([0, 0, 4]),
    logit_bias=st.sampled_from([None, {2: 3.0, 7: -5.0}]),
    stop_token_ids=st.sampled_from([None, [5]]),
)


@pytest.mark.parametrize("device", DEVICES)  # on CUDA, every row through the backend's sampling kernel
@settings(max_examples=40, deadline=None)
@given(
    rows=st.lists(
        st.tuples(
            deterministic_row,
            st.lists(st.integers(0, 59), min_size=1, max_size=6),
            st.lists(st.integers(0, 59), max_size=6),
        ),
        min_size=2,
        max_size=9,
    ),
    logits_seed=st.integers(0, 2**16),
)
def test_a_mixed_batch_gives_each_row_the_token_it_gets_alone(device, rows, logits_seed):
    logits = random_logits(len(rows), 60, seed=logits_seed, scale=2.0, device=device)
    requests = [request(prompt, output, **row) for row, prompt, output in rows]
    sampler = Sampler(frozenset({EOS}), backend=get_backend("auto", device), fused=True if device == "cuda" else None)
    together = sampler(logits, requests).token_ids
    alone = [sampler(logits[i : i + 1], [r]).token_ids[0] for i, r in enumerate(requests)]
    assert together == alone


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA")
@pytest.mark.parametrize("fused", [None, False], ids=["backend-kernel", "torch-path"])
def test_a_mixed_batch_of_256_samples_on_the_device_without_a_host_sync(fused):
    """Greedy, top-p, seeded, penalized, min_tokens and biased rows in one batch: the tokens stay on the device."""
    device = torch.device("cuda")
    logits = random_logits(256, 32000, seed=1, device=device)
    kinds = [
        {"temperature": 0.0},
        {"temperature": 0.8, "top_p": 0.9},
        {"temperature": 0.7, "top_k": 50, "seed": 11},
        {"temperature": 1.0, "presence_penalty": 0.5, "repetition_penalty": 1.2, "frequency_penalty": 0.1},
        {"temperature": 0.0, "min_tokens": 8, "logit_bias": {5: 2.0}},
        {"temperature": 0.9, "min_p": 0.05, "seed": 3},
    ]
    requests = [request(list(range(i, i + 40)), list(range(i % 7)), **kinds[i % len(kinds)]) for i in range(256)]
    sampler = Sampler(frozenset({EOS}), backend=get_backend("auto", device), fused=fused)
    sampler.sample_on_device(logits, requests)  # first launches (kernel compiles) outside the check
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        tokens, logprobs, _ = sampler.sample_on_device(logits, requests)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert tokens.device.type == "cuda" and tokens.shape == (256,) and logprobs == [None] * 256
    greedy = tokens[0::6].tolist()
    assert greedy == logits[0::6].argmax(-1).tolist()  # the greedy rows carry no penalty here


# -- logprobs ---------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
def test_logprobs_are_the_raw_distribution(device):
    logits = random_logits(4, 300, seed=3, device=device)
    requests = [
        request(logprobs=5, temperature=0.7, top_k=10, repetition_penalty=1.5, logit_bias={7: 5.0}),
        request(temperature=0.0),
        request(logprobs=0, temperature=0.0, presence_penalty=1.0, output=[int(logits[2].argmax())]),
        request(logprobs=20, seed=1),
    ]
    out = Sampler(frozenset({EOS}))(logits, requests)
    raw = torch.log_softmax(logits.double().cpu(), -1)
    assert out.logprobs[1] is None and out.top_logprobs[1] is None
    assert out.top_logprobs[2] == []
    for i, n in ((0, 5), (2, 0), (3, 20)):
        token = out.token_ids[i]
        assert out.logprobs[i] == pytest.approx(raw[i, token].item(), abs=1e-5)
        top = out.top_logprobs[i]
        assert len(top) == n
        assert [t for t, _ in top] == raw[i].argsort(descending=True)[:n].tolist()
        assert [v for _, v in top] == pytest.approx(raw[i].sort(descending=True).values[:n].tolist(), abs=1e-5)
        assert all(isinstance(t, int) and isinstance(v, float) for t, v in top)


def test_rejects_logits_that_do_not_match_the_requests():
    with pytest.raises(ValueError):
        Sampler(frozenset())(torch.zeros(2, 10), [request()])


def test_fused_sampling_needs_a_backend_with_a_sampling_kernel():
    with pytest.raises(ValueError, match="no sampling kernel"):
        Sampler(frozenset(), fused=True)  # the default backend, the torch reference, has none
