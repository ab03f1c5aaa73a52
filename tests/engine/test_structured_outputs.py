"""Grammar-constrained decoding end to end: the real default model (float32, CPU), real xgrammar matchers.

Every output that finishes with "stop" must satisfy its grammar (JSON schemas
are checked by the jsonschema library); "length" is the only other way out,
and then nothing claims the output complete. Requests without a grammar
must not notice their constrained neighbours.
"""

from __future__ import annotations

import json
import re

import attrs
import jsonschema
import pytest
import trio

from atom_trio import EngineConfig, InvalidRequest, SamplingParams, StructuredOutputsParams, open_engine

SCHEMAS = {
    "nested objects": {
        "type": "object",
        "properties": {
            "person": {
                "type": "object",
                "properties": {
                    "name": {"type": "string", "maxLength": 12},
                    "address": {
                        "type": "object",
                        "properties": {
                            "city": {"type": "string", "maxLength": 12},
                            "zip": {"type": "string", "pattern": "^[0-9]{5}$"},
                        },
                        "required": ["city", "zip"],
                    },
                },
                "required": ["name", "address"],
            }
        },
        "required": ["person"],
    },
    "array with bounds": {
        "type": "object",
        "properties": {
            "scores": {
                "type": "array",
                "items": {"type": "integer", "minimum": 0, "maximum": 100},
                "minItems": 2,
                "maxItems": 4,
            }
        },
        "required": ["scores"],
    },
    "enums": {
        "type": "object",
        "properties": {"color": {"enum": ["red", "green", "blue"]}, "size": {"type": "string", "enum": ["S", "M"]}},
        "required": ["color", "size"],
    },
    "integer ranges": {
        "type": "object",
        "properties": {
            "age": {"type": "integer", "minimum": 18, "maximum": 99},
            "count": {"type": "integer", "exclusiveMinimum": 0, "maximum": 9},
        },
        "required": ["age", "count"],
    },
    "anyOf": {
        "type": "object",
        "properties": {"value": {"anyOf": [{"type": "boolean"}, {"type": "null"}, {"enum": ["none", "some"]}]}},
        "required": ["value"],
    },
    "$ref": {
        "type": "object",
        "$defs": {
            "point": {
                "type": "object",
                "properties": {
                    "x": {"type": "integer", "minimum": -9, "maximum": 9},
                    "y": {"type": "integer", "minimum": -9, "maximum": 9},
                },
                "required": ["x", "y"],
            }
        },
        "properties": {"start": {"$ref": "#/$defs/point"}, "end": {"$ref": "#/$defs/point"}},
        "required": ["start", "end"],
    },
}

LONG_SCHEMA = {
    "type": "object",
    "properties": {"items": {"type": "array", "items": {"type": "string"}, "minItems": 30}},
    "required": ["items"],
}


ENGINE = dict(dtype="float32", num_kv_blocks=256, max_model_len=1024, max_num_seqs=32, max_num_batched_tokens=512)


def config(model_dir, **overrides) -> EngineConfig:
    return EngineConfig(**{**ENGINE, "model": str(model_dir), **overrides})


def chat(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def constrained(max_tokens: int = 96, temperature: float = 0.0, **spec) -> SamplingParams:
    return SamplingParams(
        temperature=temperature, max_tokens=max_tokens, seed=7, structured_outputs=StructuredOutputsParams(**spec)
    )


async def collect(stream):
    """The whole output: the stream's deltas folded into its first."""
    deltas = [delta async for delta in stream]
    for delta in deltas[1:]:
        deltas[0].add(delta)
    assert deltas[0].finished
    return deltas[0]


async def run_all(engine, requests: list[tuple[object, SamplingParams]]) -> list:
    results: list = [None] * len(requests)

    async def one(i: int, prompt: object, params: SamplingParams) -> None:
        results[i] = await collect(engine.generate(prompt, params))

    async with trio.open_nursery() as nursery:
        for i, (prompt, params) in enumerate(requests):
            nursery.start_soon(one, i, prompt, params)
    return results


def assert_valid_json(completion, schema: dict) -> None:
    assert completion.finish_reason == "stop", completion
    assert completion.stop_reason is None  # the grammar ended it with EOS, whose text is not shown
    jsonschema.validate(json.loads(completion.text), schema)


async def test_json_schemas_are_satisfied(default_model_dir):
    requests = [(chat(f"An example as JSON ({name})."), constrained(json=schema)) for name, schema in SCHEMAS.items()]
    # as JSON text too, and sampled (two siblings, each with its own matcher)
    requests.append((chat("Pick a colour and a size."), constrained(json=json.dumps(SCHEMAS["enums"]))))
    requests.append(
        (chat("Pick a colour and a size."), attrs.evolve(constrained(temperature=1.0, json=SCHEMAS["enums"]), n=2))
    )
    async with open_engine(config(default_model_dir)) as engine:
        results = await run_all(engine, requests)
    schemas = [*SCHEMAS.values(), SCHEMAS["enums"], SCHEMAS["enums"]]
    for result, schema in zip(results, schemas, strict=True):
        for completion in result.outputs:
            assert_valid_json(completion, schema)
    assert len(results[-1].outputs) == 2


async def test_regex_choice_grammar_and_json_object(default_model_dir):
    regex = r"[0-9]{3}-[a-z]{2,5}"
    choices = ["yes", "no", 'a "quoted" \\ answer']
    grammar = 'root ::= "The answer is " ("left" | "right") "."'
    requests = [
        (chat("Write a code."), constrained(regex=regex)),
        (chat("Is the sky blue?"), constrained(choice=choices)),
        (chat("Which way?"), constrained(grammar=grammar)),
        (chat("Describe a cat as a JSON object with two keys."), constrained(json_object=True, max_tokens=80)),
    ]
    async with open_engine(config(default_model_dir)) as engine:
        code, choice, sentence, anything = [r.outputs[0] for r in await run_all(engine, requests)]
    assert code.finish_reason == "stop" and re.fullmatch(regex, code.text), code
    assert choice.finish_reason == "stop" and choice.text in choices, choice
    assert sentence.finish_reason == "stop" and sentence.text in ("The answer is left.", "The answer is right."), sentence
    if anything.finish_reason == "stop":
        assert isinstance(json.loads(anything.text), dict)
    else:
        assert anything.finish_reason == "length" and len(anything.token_ids) == 80


async def test_max_tokens_ends_an_incomplete_output_with_length(default_model_dir):
    async with open_engine(config(default_model_dir)) as engine:
        result = await collect(engine.generate(chat("List thirty fruits."), constrained(max_tokens=6, json=LONG_SCHEMA)))
    completion = result.outputs[0]
    assert completion.finish_reason == "length"
    assert len(completion.token_ids) == 6
    assert completion.text.startswith('{"it')  # on its way, as far as six tokens go
    with pytest.raises(json.JSONDecodeError):
        json.loads(completion.text)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        (dict(json={"type": "object", "properties": {"a": {"type": "strange"}}}), "strange"),
        (dict(regex="(unclosed"), "parenthesis"),
        (dict(grammar='root ::= missing_rule'), "missing_rule"),
    ],
)
async def test_a_spec_the_grammar_engine_refuses_is_an_invalid_request(default_model_dir, spec, message):
    async with open_engine(config(default_model_dir)) as engine:
        with pytest.raises(InvalidRequest) as error:
            await collect(engine.generate("Hello", constrained(**spec)))
        assert error.value.param == "structured_outputs"
        assert message in str(error.value)
        assert engine.stats().num_steps == 0  # refused before anything was scheduled
        assert (await collect(engine.generate("Hello", SamplingParams(max_tokens=2)))).finished  # still serving


async def test_concurrent_requests_for_one_schema_compile_it_once(default_model_dir):
    schema = SCHEMAS["enums"]
    spellings = [schema, json.dumps(schema), json.dumps(schema, indent=2)]
    async with open_engine(config(default_model_dir)) as engine:
        results = await run_all(engine, [("Pick.", constrained(json=spellings[i % 3])) for i in range(6)])
        assert engine._structured_outputs.num_compilations == 1
    for result in results:
        assert_valid_json(result.outputs[0], schema)


def mates() -> list[tuple[object, SamplingParams]]:
    plain = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    sampled = SamplingParams(temperature=0.8, top_p=0.9, seed=3, max_tokens=24, ignore_eos=True, logprobs=2)
    return [("The capital of France is", plain), (chat("Tell me a story."), sampled)]


@pytest.mark.parametrize("async_scheduling", [False, True])
async def test_unconstrained_batch_mates_are_unaffected(default_model_dir, async_scheduling):
    neighbours = [(chat(f"JSON please ({name})."), constrained(json=schema)) for name, schema in SCHEMAS.items()]
    async with open_engine(config(default_model_dir, async_scheduling=async_scheduling)) as engine:
        alone = await run_all(engine, mates())
        together = await run_all(engine, mates() + neighbours)
    for a, b in zip(alone, together):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        assert a.outputs[0].logprobs == pytest.approx(b.outputs[0].logprobs, abs=1e-4)  # another batch shape
    for result, schema in zip(together[2:], SCHEMAS.values(), strict=True):
        assert_valid_json(result.outputs[0], schema)


async def test_constrained_outputs_survive_preemption_and_pipelining(default_model_dir):
    """A KV cache too small for the batch preempts and recomputes: the matchers keep the tokens they had."""
    requests = [(chat(f"JSON please ({name})."), constrained(json=schema)) for name, schema in SCHEMAS.items()]
    async with open_engine(config(default_model_dir)) as engine:
        roomy = await run_all(engine, requests)
    async with open_engine(
        config(default_model_dir, num_kv_blocks=12, max_model_len=192, async_scheduling=True)
    ) as engine:
        cramped = await run_all(engine, requests)
        assert engine.stats().num_preemptions > 0
        assert engine._scheduler._num_constrained == 0
    for a, b, schema in zip(roomy, cramped, SCHEMAS.values(), strict=True):
        assert_valid_json(b.outputs[0], schema)
        assert b.outputs[0].token_ids == a.outputs[0].token_ids


async def test_an_abort_frees_the_matcher(default_model_dir):
    async with open_engine(config(default_model_dir)) as engine:
        stream = engine.generate(chat("List fruits."), constrained(max_tokens=200, json=LONG_SCHEMA))
        async with stream:
            async for _ in stream:
                break
        assert engine._scheduler._num_constrained == 0
        assert not engine._scheduler.running


NUMBERS = r"\[[0-9]{1,3}(, [0-9]{1,3}){2}\]"
"""A pattern any model completes in a few tokens: with random weights the grammar alone shapes the output."""


async def test_process_executor_gives_the_thread_executors_output(tiny_qwen3_dir):
    """The mask crosses the process boundary with the plan; the worker applies it as the thread does."""
    requests = [("Numbers:", constrained(max_tokens=24, regex=NUMBERS)), *mates()]
    async with open_engine(config(tiny_qwen3_dir, executor="thread")) as engine:
        thread = await run_all(engine, requests)
    async with open_engine(config(tiny_qwen3_dir, executor="process", device="cpu")) as engine:
        process = await run_all(engine, requests)
    assert re.fullmatch(NUMBERS, process[0].outputs[0].text)
    assert [r.outputs[0].token_ids for r in process] == [r.outputs[0].token_ids for r in thread]


async def test_tensor_parallel_ranks_share_the_mask(tiny_qwen3_dir):
    """Random weights, so the grammar alone shapes the output; TP=2 must pick the tokens TP=1 picks."""
    requests = [("Numbers:", constrained(max_tokens=24, regex=NUMBERS)), *mates()]
    async with open_engine(config(tiny_qwen3_dir)) as engine:
        single = await run_all(engine, requests)
    async with open_engine(config(tiny_qwen3_dir, tensor_parallel_size=2, device="cpu")) as engine:
        split = await run_all(engine, requests)
    assert single[0].outputs[0].finish_reason == "stop"
    assert re.fullmatch(NUMBERS, single[0].outputs[0].text)
    assert [r.outputs[0].token_ids for r in split] == [r.outputs[0].token_ids for r in single]
