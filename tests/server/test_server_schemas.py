"""The request layer without a model: strict schemas, refusals, sampling mapping."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from atom_trio.server import sampling
from atom_trio.server.errors import ApiError
from atom_trio.server.schemas import ChatCompletionRequest, CompletionRequest, parse_json, structure


def refused(cls: type, body: object) -> ApiError:
    with pytest.raises(ApiError) as info:
        structure(cls, body)
    assert info.value.status == 400
    return info.value


def test_every_problem_is_listed_and_the_first_is_the_param() -> None:
    error = refused(
        ChatCompletionRequest,
        {"messages": [{"role": "robot", "content": "x"}, {"content": 3}], "max_tokens": "5", "stream": "no"},
    )
    assert error.param == "max_tokens"
    for fragment in ("max_tokens: expected integer, got string", "stream: expected boolean, got string",
                     "messages[0].role: must be one of", "messages[1].role: required field missing",
                     "messages[1].content"):
        assert fragment in error.message
    assert error.body()["error"]["type"] == "invalid_request_error"


@pytest.mark.parametrize(
    ("field", "value"),
    [("n", True), ("n", 1.5), ("temperature", "0.5"), ("max_tokens", "16"), ("seed", 1.0),
     ("stop", 3), ("stop", ["a", 1]), ("logit_bias", {"1": "x"}), ("echo", 1), ("user", 5)],
)
def test_json_types_are_strict(field: str, value: object) -> None:
    error = refused(CompletionRequest, {"prompt": "hi", field: value})
    assert error.param == field or error.param.startswith(field)


def test_ints_are_fine_floats_and_nulls_mean_default() -> None:
    req = structure(CompletionRequest, {"prompt": "hi", "temperature": 1, "top_p": None, "stop": None, "n": None})
    assert req.temperature == 1 and req.top_p is None and req.stop is None


@pytest.mark.parametrize(
    ("cls", "field", "value"),
    [
        (CompletionRequest, "best_of", 2),
        (CompletionRequest, "suffix", "tail"),
        (CompletionRequest, "guided_decoding_backend", "xgrammar"),
        (ChatCompletionRequest, "prompt_logprobs", 1),
        (ChatCompletionRequest, "functions", [{"name": "f"}]),
        (ChatCompletionRequest, "function_call", "auto"),
    ],
)
def test_unsupported_openai_fields_are_refused_by_name(cls: type, field: str, value: object) -> None:
    base = {"prompt": "hi"} if cls is CompletionRequest else {"messages": [{"role": "user", "content": "hi"}]}
    error = refused(cls, {**base, field: value})
    assert error.param == field
    assert field in error.message and "not supported" in error.message


@pytest.mark.parametrize(
    ("field", "value"),
    [("best_of", 1), ("function_call", "none"), ("functions", [])],
)
def test_neutral_values_of_unsupported_fields_pass(field: str, value: object) -> None:
    structure(ChatCompletionRequest, {"messages": [{"role": "user", "content": "hi"}], field: value})


def test_unknown_fields_and_non_text_content_are_refused() -> None:
    assert refused(CompletionRequest, {"prompt": "x", "bogus": 1}).param == "bogus"
    error = refused(ChatCompletionRequest, {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]})
    assert error.param == "messages[0].content" and "image_url" in error.message
    error = refused(ChatCompletionRequest, {"messages": [{"role": "assistant", "function_call": {"name": "f"}}]})
    assert error.param == "messages[0].function_call"


def test_body_must_be_a_json_object() -> None:
    with pytest.raises(ApiError) as info:
        parse_json(b"{not json")
    assert info.value.status == 400 and info.value.code == "invalid_json"
    assert refused(CompletionRequest, [1, 2]).param is None


prompt_text = st.text(min_size=1, max_size=8)
token_ids = st.lists(st.integers(0, 49151), min_size=1, max_size=6)


@given(st.one_of(prompt_text, st.lists(prompt_text, min_size=1, max_size=4), token_ids,
                 st.lists(token_ids, min_size=1, max_size=4)))
def test_every_prompt_shape_becomes_a_list_of_prompts(prompt: object) -> None:
    prompts = structure(CompletionRequest, {"prompt": prompt}).prompt
    if isinstance(prompt, str) or (isinstance(prompt, list) and isinstance(prompt[0], int)):
        assert prompts == [prompt]
    else:
        assert prompts == prompt


def test_text_parts_are_joined_and_developer_is_system() -> None:
    req = structure(ChatCompletionRequest, {"messages": [
        {"role": "developer", "content": "be brief"},
        {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
    ]})
    assert sampling.chat_messages(req) == [{"role": "system", "content": "be brief"}, {"role": "user", "content": "a\nb"}]


def test_sampling_params_from_completion_request() -> None:
    req = structure(CompletionRequest, {
        "prompt": "x", "temperature": 0.5, "top_k": 5, "min_p": 0.1, "seed": 7, "n": 2, "stop": "END",
        "stop_token_ids": [3], "ignore_eos": True, "min_tokens": 2, "logit_bias": {"42": -100},
        "presence_penalty": 0.5, "frequency_penalty": 0.25, "repetition_penalty": 1.1, "logprobs": 3,
        "include_stop_str_in_output": True, "skip_special_tokens": False,
    })
    params = sampling.completion_params(req)
    assert params.max_tokens == sampling.COMPLETION_DEFAULT_MAX_TOKENS
    assert (params.temperature, params.top_k, params.min_p, params.seed, params.n) == (0.5, 5, 0.1, 7, 2)
    assert params.stop == ("END",) and params.stop_token_ids == (3,) and params.logit_bias == {42: -100.0}
    assert params.ignore_eos and params.min_tokens == 2 and params.logprobs == 3
    assert params.include_stop_str_in_output and not params.skip_special_tokens
    assert (params.presence_penalty, params.frequency_penalty, params.repetition_penalty) == (0.5, 0.25, 1.1)


def test_echo_with_logprobs_asks_for_prompt_logprobs() -> None:
    def params(**fields):
        return sampling.completion_params(structure(CompletionRequest, {"prompt": "x", **fields}))

    assert params(echo=True, logprobs=3).prompt_logprobs == 3
    assert params(echo=True, logprobs=3, prompt_logprobs=1).prompt_logprobs == 1
    assert params(logprobs=3).prompt_logprobs is None and params(echo=True).prompt_logprobs is None
    assert params(prompt_logprobs=0).prompt_logprobs == 0
    # echo with max_tokens 0: one token is generated and left out of the response
    assert params(echo=True, max_tokens=0).max_tokens == 1
    assert params(max_tokens=0).max_tokens == 0  # refused by validation, as in vLLM


def test_sampling_params_from_chat_request() -> None:
    base = {"messages": [{"role": "user", "content": "hi"}]}
    assert sampling.chat_params(structure(ChatCompletionRequest, base)).max_tokens is None  # to the context end
    params = sampling.chat_params(structure(ChatCompletionRequest, {
        **base, "max_tokens": 9, "max_completion_tokens": 5, "logprobs": True, "top_logprobs": 2}))
    assert params.max_tokens == 5 and params.logprobs == 2
    assert sampling.chat_params(structure(ChatCompletionRequest, {**base, "logprobs": True})).logprobs == 0
    assert sampling.chat_params(structure(ChatCompletionRequest, base)).logprobs is None


@pytest.mark.parametrize(
    ("cls", "body", "param"),
    [
        (ChatCompletionRequest, {"messages": [{"role": "user", "content": "hi"}], "top_logprobs": 2}, "top_logprobs"),
        (CompletionRequest, {"prompt": "x", "stream_options": {"include_usage": True}}, "stream_options"),
        (CompletionRequest, {"prompt": "x", "prompt_logprobs": 1, "stream": True}, "prompt_logprobs"),
        (CompletionRequest, {"prompt": "x", "logit_bias": {"abc": 1}}, "logit_bias"),
    ],
)
def test_inconsistent_requests_are_refused(cls: type, body: dict, param: str) -> None:
    req = structure(cls, body)
    to_params = sampling.chat_params if cls is ChatCompletionRequest else sampling.completion_params
    with pytest.raises(ApiError) as info:
        to_params(req)
    assert info.value.status == 400 and info.value.param == param


def test_error_envelope_is_openai_shaped() -> None:
    body = json.loads(json.dumps(ApiError(429, "slow down", type="rate_limit_error", code="x").body()))
    assert body == {"error": {"message": "slow down", "type": "rate_limit_error", "param": None, "code": "x"}}
