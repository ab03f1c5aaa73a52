"""Speculative decoding (n-gram) end to end on the default model: the plain engine's tokens, drafts accepted.

One engine with ``speculative_config`` and one without serve every test. Greedy
outputs must match token for token; seeded sampled requests, whose every
position draws from the same seeded stream with or without drafts (see
`atom_trio.layers.rejection_sampler`), must too, whatever their batch mates.
"""

from __future__ import annotations

import pytest

from atom_trio import LLM, SamplingParams
from atom_trio.config import EngineConfig, SpeculativeConfig
from atom_trio.errors import InvalidConfig
from atom_trio.options import parse_args
from atom_trio.server.metrics import ServerMetrics

PARAGRAPH = (
    "The lighthouse keeper climbed the spiral stairs every evening at dusk, lit the great lamp, and wrote the "
    "weather, the ships he saw and the state of the sea into a leather logbook."
)
COPY_PROMPTS = [
    f"Repeat this paragraph exactly.\n\n{PARAGRAPH}\n\nRepeated:\n{PARAGRAPH[:30]}",
    f"Rewrite the paragraph below word for word, then stop.\n{PARAGRAPH}\nRewritten:",
]
CHAT_PROMPTS = ["What is the capital of France?", "Name three colours of the rainbow."]
SPEC = {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_min": 2, "prompt_lookup_max": 4}
ENGINE = {"dtype": "float32", "num_kv_blocks": 128, "max_model_len": 512, "seed": 0}


@pytest.fixture(scope="module")
def engines(default_model_dir):
    spec = LLM(str(default_model_dir), speculative_config=SPEC, **ENGINE)
    plain = LLM(str(default_model_dir), **ENGINE)
    yield spec, plain
    spec.close()
    plain.close()


def _tokens(llm: LLM, prompts: list[str], params) -> list[list[int]]:
    return [out.outputs[0].token_ids for out in llm.generate(prompts, params, use_tqdm=False)]


def test_greedy_outputs_equal_the_plain_engine_and_drafts_are_accepted(engines) -> None:
    spec, plain = engines
    params = SamplingParams(temperature=0.0, max_tokens=40)
    before = spec.stats()
    assert _tokens(spec, COPY_PROMPTS + CHAT_PROMPTS, params) == _tokens(plain, COPY_PROMPTS + CHAT_PROMPTS, params)
    after = spec.stats()
    accepted = after.spec_num_accepted_tokens - before.spec_num_accepted_tokens
    assert accepted > 0 and after.spec_num_draft_tokens > before.spec_num_draft_tokens
    assert sum(after.spec_accepted_per_position) == after.spec_num_accepted_tokens
    assert plain.stats().spec_num_drafts == 0
    scraped = ServerMetrics(lambda: spec._engine, "m").render().decode()
    assert f'atom_trio:spec_decode_num_accepted_tokens_total{{model_name="m"}} {float(after.spec_num_accepted_tokens)}' in scraped
    assert f'atom_trio:spec_decode_num_drafts_total{{model_name="m"}} {float(after.spec_num_drafts)}' in scraped
    first = after.spec_accepted_per_position[0]
    assert f'spec_decode_num_accepted_tokens_per_pos_total{{model_name="m",position="0"}} {float(first)}' in scraped


@pytest.mark.parametrize(
    "fields", [{"async_scheduling": True}, {"executor": "process"}], ids=["async-scheduling", "worker-process"]
)
def test_asynchronous_scheduling_and_worker_processes_carry_drafts(default_model_dir, engines, fields) -> None:
    _, plain = engines
    params = SamplingParams(temperature=0.0, max_tokens=24)
    prompts = COPY_PROMPTS + CHAT_PROMPTS[:1]
    with LLM(str(default_model_dir), speculative_config=SPEC, **ENGINE, **fields) as other:
        assert _tokens(other, prompts, params) == _tokens(plain, prompts, params)
        assert other.stats().spec_num_accepted_tokens > 0


def test_stop_strings_max_tokens_and_logprobs_cut_inside_an_accepted_run(engines) -> None:
    spec, plain = engines
    for params in (
        SamplingParams(temperature=0.0, max_tokens=7, logprobs=2),
        SamplingParams(temperature=0.0, max_tokens=40, stop=["logbook"], logprobs=0),
    ):
        [a], [b] = spec.generate(COPY_PROMPTS[:1], params, use_tqdm=False), plain.generate(
            COPY_PROMPTS[:1], params, use_tqdm=False
        )
        assert (a.outputs[0].text, a.outputs[0].token_ids) == (b.outputs[0].text, b.outputs[0].token_ids)
        assert a.outputs[0].finish_reason == b.outputs[0].finish_reason
        assert len(a.outputs[0].logprobs) == len(a.outputs[0].token_ids)
        assert a.outputs[0].logprobs == pytest.approx(b.outputs[0].logprobs, abs=1e-4)  # the target's
        assert [[t for t, _ in top] for top in a.outputs[0].top_logprobs] == [
            [t for t, _ in top] for top in b.outputs[0].top_logprobs
        ]


def test_seeded_sampling_reproduces_whatever_the_batch_mates(engines) -> None:
    spec, plain = engines
    seeded = SamplingParams(temperature=0.8, top_p=0.95, seed=1234, max_tokens=24, repetition_penalty=1.1)
    alone = _tokens(spec, COPY_PROMPTS[:1], seeded)[0]
    mates = SamplingParams(temperature=1.0, max_tokens=30)
    crowded = spec.generate(COPY_PROMPTS + CHAT_PROMPTS, [seeded, mates, mates, seeded], use_tqdm=False)
    assert crowded[0].outputs[0].token_ids == alone
    assert _tokens(plain, COPY_PROMPTS[:1], seeded)[0] == alone


def test_speculative_config_is_checked_where_it_is_given() -> None:
    config = EngineConfig(speculative_config='{"method": "ngram", "num_speculative_tokens": 2}')
    assert config.speculative_config == SpeculativeConfig(
        method="ngram", num_speculative_tokens=2, prompt_lookup_min=5, prompt_lookup_max=5
    )
    flags, _ = parse_args(["--method", "ngram", "--num-speculative-tokens", "4", "--speculative-config",
                           '{"method": "ngram", "num_speculative_tokens": 1, "prompt_lookup_min": 2}'])
    assert flags.speculative_config.num_speculative_tokens == 4 and flags.speculative_config.prompt_lookup_max == 2
    for bad, says in [
        ({"method": "medusa", "num_speculative_tokens": 2}, "method must be one of"),
        ({"method": "eagle3", "num_speculative_tokens": 2}, "needs a draft model"),
        ({"method": "mtp", "num_speculative_tokens": 1, "draft_model": "x"}, "takes no draft model"),
        ({"method": "ngram", "num_speculative_tokens": 2, "draft_model": "x"}, "draft model"),
        ({"method": "ngram", "num_speculative_tokens": 0}, "num_speculative_tokens"),
        ({"method": "ngram", "num_speculative_tokens": 2, "lookahead": 1}, "unknown field(s) lookahead"),
        ({"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_min": 4, "prompt_lookup_max": 2}, "above"),
        ("{not json", "not valid JSON"),
    ]:
        with pytest.raises(InvalidConfig, match="speculative_config") as caught:
            EngineConfig(speculative_config=bad)
        assert says in str(caught.value)
    with pytest.raises(InvalidConfig, match="draft model"):
        parse_args(["--method", "ngram", "--num-speculative-tokens", "2", "--draft-model", "some/eagle"])
