"""`SamplingParams.validate` names the parameter that is out of range."""

from __future__ import annotations

import pytest

from atom_trio import InvalidRequest, SamplingParams, StructuredOutputsParams


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        (dict(n=0), "n"),
        (dict(n=129), "n"),
        (dict(temperature=-0.1), "temperature"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_k=-2), "top_k"),
        (dict(top_k=2**40), "top_k"),
        (dict(min_p=1.5), "min_p"),
        (dict(max_tokens=0), "max_tokens"),
        (dict(max_tokens=None, min_tokens=2**70), "min_tokens"),
        (dict(max_tokens=4, min_tokens=5), "min_tokens"),
        (dict(presence_penalty=2.5), "presence_penalty"),
        (dict(frequency_penalty=-3), "frequency_penalty"),
        (dict(repetition_penalty=0), "repetition_penalty"),
        (dict(logprobs=21), "logprobs"),
        (dict(prompt_logprobs=21), "prompt_logprobs"),
        (dict(prompt_logprobs=-1), "prompt_logprobs"),
        (dict(seed=2**64), "seed"),
        (dict(stop=["ok", ""]), "stop"),
        (dict(stop_token_ids=[5, 100]), "stop_token_ids"),
        (dict(logit_bias={100: 1.0}), "logit_bias"),
        (dict(logit_bias={3: 101.0}), "logit_bias"),
    ],
)
def test_out_of_range_parameter_is_named(fields, param):
    with pytest.raises(InvalidRequest) as error:
        SamplingParams(**fields).validate(vocab_size=100, max_logprobs=20)
    assert error.value.param == param
    assert param in str(error.value)


def test_defaults_and_edges_are_valid():
    SamplingParams().validate(vocab_size=100)
    SamplingParams(
        n=128, temperature=0, top_k=-1, top_p=1.0, min_p=1.0, max_tokens=None, logprobs=20, seed=2**64 - 1,
        prompt_logprobs=0,
        logit_bias={99: -100.0}, stop_token_ids=[0, 99],
    ).validate(vocab_size=100, max_logprobs=20)


def test_stop_accepts_a_single_string():
    assert SamplingParams(stop="###").stop == ("###",)


@pytest.mark.parametrize(
    "fields",
    [
        dict(),
        dict(json={"type": "object"}, regex="a+"),
        dict(json_object=True, choice=["a"]),
        dict(json="{not json"),
        dict(json="[1, 2]"),
        dict(choice=[]),
        dict(choice=["a", ""]),
        dict(regex=""),
        dict(grammar=""),
    ],
)
def test_structured_outputs_need_exactly_one_well_formed_spec(fields):
    with pytest.raises(InvalidRequest) as error:
        StructuredOutputsParams(**fields)
    assert error.value.param == "structured_outputs"


def test_structured_outputs_take_a_schema_as_dict_or_text_and_choices_as_a_list():
    assert StructuredOutputsParams(json='{"type": "string"}').kind == "json"
    assert StructuredOutputsParams(json={"type": "string"}).kind == "json"
    spec = StructuredOutputsParams(choice=["yes", "no"])
    assert spec.choice == ("yes", "no") and spec.kind == "choice"
    params = SamplingParams(structured_outputs=StructuredOutputsParams(json_object=True))
    params.validate(vocab_size=100)
    assert params.structured_outputs.kind == "json_object"
