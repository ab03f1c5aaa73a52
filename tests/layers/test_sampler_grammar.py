"""A constrained sampler never emits a token its matcher rejects, and leaves its unconstrained batch mates alone.

Real parts throughout: the default model's tokenizer, xgrammar grammars
compiled from random JSON schemas, matchers filling the masks, the sampler on
the CPU backend (xgrammar's kernel) and on the torch reference, over random
logits pushed towards forbidden tokens by a large logit bias.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from atom_trio.core.plan import TokenBitmask
from atom_trio.layers.sampler import SampleRequest, Sampler
from atom_trio.ops import CpuBackend, TorchRefBackend
from atom_trio.sampling_params import SamplingParams

xgrammar = pytest.importorskip("xgrammar")

EOS = 2  # SmolLM2's <|im_end|>
VOCAB_SIZE = 49152  # SmolLM2's logits
STEPS = 12

names = st.text(alphabet="abcdef", min_size=1, max_size=3)
leaves = st.one_of(
    st.integers(0, 6).map(lambda n: {"type": "string", "maxLength": n}),
    st.tuples(st.integers(-50, 50), st.integers(0, 100)).map(
        lambda t: {"type": "integer", "minimum": t[0], "maximum": t[0] + t[1]}
    ),
    st.just({"type": "boolean"}),
    st.lists(st.text(alphabet="abcxyz ", min_size=1, max_size=4), min_size=1, max_size=3, unique=True).map(
        lambda values: {"enum": values}
    ),
)
schemas = st.recursive(
    leaves,
    lambda children: st.one_of(
        st.dictionaries(names, children, min_size=1, max_size=3).map(
            lambda props: {"type": "object", "properties": props, "required": sorted(props)}
        ),
        st.tuples(children, st.integers(0, 2), st.integers(0, 2)).map(
            lambda t: {"type": "array", "items": t[0], "minItems": t[1], "maxItems": t[1] + t[2]}
        ),
        st.lists(children, min_size=2, max_size=3).map(lambda alternatives: {"anyOf": alternatives}),
    ),
    max_leaves=5,
)
knobs = st.fixed_dictionaries(
    dict(
        temperature=st.sampled_from([0.0, 0.7, 1.5]),
        top_k=st.sampled_from([0, 5]),
        top_p=st.sampled_from([1.0, 0.8]),
        min_p=st.sampled_from([0.0, 0.1]),
        seed=st.integers(0, 2**32),
        logprobs=st.sampled_from([None, 3]),
    )
)


@pytest.fixture(scope="module")
def compiler(default_model_dir):
    from transformers import AutoConfig, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(default_model_dir)
    assert AutoConfig.from_pretrained(default_model_dir).vocab_size == VOCAB_SIZE
    info = xgrammar.TokenizerInfo.from_huggingface(tokenizer, vocab_size=VOCAB_SIZE, stop_token_ids=[EOS])
    return xgrammar.GrammarCompiler(info, cache_enabled=False)


def allowed(words: np.ndarray, token: int) -> bool:
    return bool((int(words[token // 32]) >> (token % 32)) & 1)


@pytest.mark.parametrize("backend", [CpuBackend(), TorchRefBackend()], ids=["cpu", "torch"])
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    schema=schemas,
    constrained_knobs=st.lists(knobs, min_size=1, max_size=3),
    mate_knobs=knobs,
    logits_seed=st.integers(0, 2**32 - 1),
    bias_token=st.integers(0, VOCAB_SIZE - 1),
)
def test_a_constrained_sampler_emits_only_what_its_matcher_accepts(
    compiler, backend, schema, constrained_knobs, mate_knobs, logits_seed, bias_token
):
    grammar = compiler.compile_json_schema(json.dumps(schema), any_whitespace=False)
    sampler = Sampler(frozenset({EOS}), backend=backend)
    # A +100 bias on one token: the mask must hold against it.
    rows = [SamplingParams(logit_bias={bias_token: 100.0}, **k) for k in constrained_knobs]
    mate = SamplingParams(logit_bias={bias_token: 100.0}, **mate_knobs)
    matchers = [xgrammar.GrammarMatcher(grammar) for _ in rows]
    histories: list[list[int]] = [[] for _ in range(len(rows) + 1)]
    rng = torch.Generator().manual_seed(logits_seed)
    for _ in range(STEPS):
        live = [i for i, m in enumerate(matchers) if not m.is_terminated()]
        if not live:
            break
        logits = torch.randn(len(live) + 1, VOCAB_SIZE, generator=rng) * 4
        words = np.empty((len(live), VOCAB_SIZE // 32), dtype=np.int32)
        for j, i in enumerate(live):
            matchers[i].fill_next_token_bitmask(words, j)
        # the unconstrained mate sits between constrained rows
        order = [*live[:1], len(rows), *live[1:]]
        requests = [SampleRequest(rows[i] if i < len(rows) else mate, [1, 2, 3], histories[i]) for i in order]
        mask_rows = [k for k, i in enumerate(order) if i < len(rows)]
        out = sampler(logits.clone(), requests, TokenBitmask(mask_rows, words=words))
        for k, i in enumerate(order):
            token = out.token_ids[k]
            histories[i].append(token)
            if i == len(rows):
                continue
            j = live.index(i)
            assert allowed(words[j], token)
            assert matchers[i].accept_token(token), f"row {i} sampled {token}, which its grammar rejects"
            if out.top_logprobs[k] is not None:  # logprobs are the masked distribution's
                assert all(allowed(words[j], t) or lp == float("-inf") for t, lp in out.top_logprobs[k])
                assert out.logprobs[k] > float("-inf")
        # the mate, sampled alone from its own row, takes the very same token
        alone = sampler(logits[1:2].clone(), [SampleRequest(mate, [1, 2, 3], histories[len(rows)][:-1])])
        assert alone.token_ids[0] == histories[len(rows)][-1]
        if mate.logprobs is not None:
            assert alone.logprobs[0] == pytest.approx(out.logprobs[1], abs=1e-5)


def test_a_row_whose_grammar_allows_one_token_takes_it_whatever_its_logits(compiler):
    grammar = compiler.compile_grammar('root ::= "{"')
    matcher = xgrammar.GrammarMatcher(grammar)
    words = np.empty((1, VOCAB_SIZE // 32), dtype=np.int32)
    matcher.fill_next_token_bitmask(words, 0)
    allowed_tokens = [t for t in range(VOCAB_SIZE) if allowed(words[0], t)]
    logits = torch.zeros(1, VOCAB_SIZE)
    logits[0, allowed_tokens] = -50.0  # the least likely tokens are the only ones allowed
    params = SamplingParams(temperature=1.0, top_k=5, top_p=0.5, seed=1, logprobs=2)
    sampler = Sampler(frozenset({EOS}), backend=CpuBackend())
    out = sampler(logits, [SampleRequest(params, [1], [])], TokenBitmask([0], words=words))
    assert out.token_ids[0] in allowed_tokens
    assert matcher.accept_token(out.token_ids[0])
