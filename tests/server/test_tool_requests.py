"""Tools, structured outputs and reasoning at the request layer, without a model: schemas, their mapping to
`SamplingParams`, the grammar of a forced tool choice, and the calls read back from its output."""

from __future__ import annotations

import json

import jsonschema
import pytest
from hypothesis import given
from hypothesis import strategies as st

from atom_trio.config import REASONING_PARSERS, TOOL_CALL_PARSERS, ServerSettings
from atom_trio.errors import InvalidConfig
from atom_trio.sampling_params import StructuredOutputsParams
from atom_trio.server import reasoning, sampling, tool_parsers
from atom_trio.server.chat_output import ChatOutputRules, delta_calls
from atom_trio.server.errors import ApiError
from atom_trio.server.reasoning import get_reasoning_parser
from atom_trio.server.schemas import ChatCompletionRequest, CompletionRequest, structure
from atom_trio.server.tool_choice import ForcedCallStream
from atom_trio.server.tool_parsers import get_tool_parser

HI = [{"role": "user", "content": "hi"}]
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "The weather in a city.",
                                            "parameters": {"type": "object", "properties": {
                                                "city": {"type": "string"}, "days": {"type": "integer"}},
                                                "required": ["city"]}}}
TIME = {"type": "function", "function": {"name": "get_time"}}


def chat(**fields: object) -> ChatCompletionRequest:
    return structure(ChatCompletionRequest, {"messages": HI, **fields})


def refused(to_params, req_fields: dict, param: str, cls: type = ChatCompletionRequest) -> ApiError:
    base = {"messages": HI} if cls is ChatCompletionRequest else {"prompt": "x"}
    with pytest.raises(ApiError) as info:
        to_params(structure(cls, {**base, **req_fields}))
    assert info.value.status == 400 and info.value.param == param, info.value.message
    return info.value


# ---- structured outputs ---------------------------------------------------------------------------------

SCHEMA = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}


@pytest.mark.parametrize(("fields", "expected"), [
    ({"response_format": {"type": "text"}}, None),
    ({"response_format": {"type": "json_object"}}, StructuredOutputsParams(json_object=True)),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "a", "schema": SCHEMA, "strict": True}}},
     StructuredOutputsParams(json=SCHEMA)),
    ({"structured_outputs": {"regex": "[a-z]+"}}, StructuredOutputsParams(regex="[a-z]+")),
    ({"structured_outputs": {"choice": ["yes", "no"]}}, StructuredOutputsParams(choice=("yes", "no"))),
    ({"structured_outputs": {"json": json.dumps(SCHEMA)}}, StructuredOutputsParams(json=json.dumps(SCHEMA))),
    ({"guided_json": SCHEMA}, StructuredOutputsParams(json=SCHEMA)),
    ({"guided_regex": "\\d+"}, StructuredOutputsParams(regex="\\d+")),
    ({"guided_choice": ["a", "b"]}, StructuredOutputsParams(choice=("a", "b"))),
    ({"guided_grammar": 'root ::= "x"'}, StructuredOutputsParams(grammar='root ::= "x"')),
])
def test_every_structured_output_field_maps_to_the_same_params(fields: dict, expected: object) -> None:
    assert sampling.chat_params(chat(**fields)).structured_outputs == expected
    completion = structure(CompletionRequest, {"prompt": "x", **fields})
    assert sampling.completion_params(completion).structured_outputs == expected
    assert sampling.grammar_param(completion) == (None if expected is None else next(iter(fields)))


@pytest.mark.parametrize(("fields", "param"), [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "a"}}}, "response_format"),
    ({"response_format": {"type": "json_object"}, "guided_regex": "a"}, "guided_regex"),
    ({"structured_outputs": {}}, "structured_outputs"),
    ({"structured_outputs": {"regex": "a", "choice": ["a"]}}, "structured_outputs"),
    ({"guided_choice": []}, "guided_choice"),
    ({"guided_json": "{not json"}, "guided_json"),
    ({"guided_json": "[1]"}, "guided_json"),
])
def test_bad_structured_outputs_name_the_field(fields: dict, param: str) -> None:
    refused(sampling.chat_params, fields, param)
    refused(sampling.completion_params, fields, param, cls=CompletionRequest)


@pytest.mark.parametrize(("fields", "param"), [
    ({"response_format": {"type": "xml"}}, "response_format.type"),
    ({"response_format": {"type": "json_schema", "json_schema": {"schema": {}}}}, "response_format.json_schema.name"),
    ({"structured_outputs": {"json": 5}}, "structured_outputs.json"),
    ({"structured_outputs": {"whitespace_pattern": " "}}, "structured_outputs.whitespace_pattern"),
    ({"guided_choice": "a"}, "guided_choice"),
])
def test_malformed_structured_output_values_are_refused_when_parsed(fields: dict, param: str) -> None:
    with pytest.raises(ApiError) as info:
        chat(**fields)
    assert info.value.param == param


# ---- tools ------------------------------------------------------------------------------------------------

def test_tool_choice_defaults_follow_openai() -> None:
    assert sampling.tool_choice(chat()) == "none"
    assert sampling.tool_choice(chat(tools=[WEATHER])) == "auto"
    assert sampling.tool_choice(chat(tools=[WEATHER], tool_choice="none")) == "none"
    assert sampling.tool_choice(chat(tool_choice="none")) == "none"
    assert sampling.tool_choice(chat(tools=[WEATHER], tool_choice={"type": "function",
                                                                   "function": {"name": "get_weather"}})) == "named"
    for fields in ({}, {"tool_choice": "none"}, {"tool_choice": "auto"}):
        assert sampling.chat_params(chat(tools=[WEATHER], **fields)).structured_outputs is None


@pytest.mark.parametrize(("fields", "param"), [
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tool_choice": "auto"}, "tool_choice"),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
    ({"tools": [WEATHER], "tool_choice": "required", "response_format": {"type": "json_object"}}, "response_format"),
    ({"tools": [WEATHER], "tool_choice": "required", "guided_regex": "a"}, "guided_regex"),
])
def test_inconsistent_tool_requests_are_refused(fields: dict, param: str) -> None:
    refused(sampling.chat_params, fields, param)


@pytest.mark.parametrize(("fields", "param"), [
    ({"tools": [{"type": "function"}]}, "tools[0].function"),
    ({"tools": [{"type": "retrieval", "function": {"name": "f"}}]}, "tools[0].type"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": "x"}}]}, "tools[0].function.parameters"),
    ({"tool_choice": {"type": "function"}}, "tool_choice.function"),
    ({"tool_choice": 5}, "tool_choice"),
    ({"parallel_tool_calls": "yes"}, "parallel_tool_calls"),
    ({"reasoning_effort": "extreme"}, "reasoning_effort"),
    ({"messages": [{"role": "assistant", "tool_calls": [{"function": {"name": "f"}}]}]},
     "messages[0].tool_calls[0].function.arguments"),
])
def test_malformed_tool_fields_are_refused_naming_them(fields: dict, param: str) -> None:
    with pytest.raises(ApiError) as info:
        chat(**fields)
    assert info.value.param == param, info.value.message


def test_a_named_choice_is_the_functions_parameters() -> None:
    params = sampling.chat_params(chat(tools=[WEATHER, TIME],
                                       tool_choice={"type": "function", "function": {"name": "get_weather"}}))
    assert params.structured_outputs == StructuredOutputsParams(json=WEATHER["function"]["parameters"])
    params = sampling.chat_params(chat(tools=[WEATHER, TIME],
                                       tool_choice={"type": "function", "function": {"name": "get_time"}}))
    assert params.structured_outputs.json == {"type": "object", "properties": {}}


def test_a_required_choice_is_an_array_of_calls_of_the_tools() -> None:
    params = sampling.chat_params(chat(tools=[WEATHER, TIME], tool_choice="required"))
    schema = params.structured_outputs.json
    calls = [{"name": "get_weather", "parameters": {"city": "Paris"}}, {"name": "get_time", "parameters": {}}]
    jsonschema.validate(calls, schema)
    for wrong in ([], [{"name": "get_weather", "parameters": {}}], [{"name": "other", "parameters": {}}],
                  [{"name": "get_time"}]):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(wrong, schema)
    single = sampling.chat_params(chat(tools=[WEATHER, TIME], tool_choice="required", parallel_tool_calls=False))
    jsonschema.validate(calls[:1], single.structured_outputs.json)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(calls, single.structured_outputs.json)


def test_required_moves_the_tools_definitions_to_the_root() -> None:
    """pydantic writes ``$ref: #/$defs/X``: nested in the array of calls, the pointer must still resolve."""
    unit = {"type": "string", "enum": ["C", "F"]}
    tool = {"type": "function", "function": {"name": "t", "parameters": {
        "type": "object", "properties": {"unit": {"$ref": "#/$defs/Unit"}}, "required": ["unit"],
        "$defs": {"Unit": unit}}}}
    schema = sampling.chat_params(chat(tools=[tool], tool_choice="required")).structured_outputs.json
    assert schema["$defs"] == {"Unit": unit}
    jsonschema.validate([{"name": "t", "parameters": {"unit": "C"}}], schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate([{"name": "t", "parameters": {"unit": "K"}}], schema)
    other = {"type": "function", "function": {"name": "u", "parameters": {"type": "object", "$defs": {"Unit": {}}}}}
    refused(sampling.chat_params, {"tools": [tool, other], "tool_choice": "required"}, "tools")
    odd = {"type": "function", "function": {"name": "u", "parameters": {"type": "object", "definitions": [1]}}}
    refused(sampling.chat_params, {"tools": [odd], "tool_choice": "required"}, "tools")


def test_history_tool_calls_reach_the_template_with_arguments_as_objects() -> None:
    req = chat(messages=[
        {"role": "user", "content": "weather?"},
        {"role": "assistant", "content": None, "reasoning_content": "look it up",
         "tool_calls": [{"id": "call_1", "type": "function",
                         "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": [{"type": "text", "text": "sunny"}]},
    ], tools=[WEATHER], tool_choice="none")
    assert sampling.chat_messages(req) == [
        {"role": "user", "content": "weather?"},
        {"role": "assistant", "content": "", "reasoning_content": "look it up",
         "tool_calls": [{"id": "call_1", "type": "function",
                         "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
        {"role": "tool", "content": "sunny", "tool_call_id": "call_1"},
    ]
    assert sampling.chat_tools(req) == [WEATHER]


@pytest.mark.parametrize(("message", "param"), [
    ({"role": "user", "content": "x", "tool_calls": [{"function": {"name": "f", "arguments": "{}"}}]},
     "messages[0].tool_calls"),
    ({"role": "user", "content": "x", "tool_call_id": "c"}, "messages[0].tool_call_id"),
    ({"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": "{oops"}}]},
     "messages[0].tool_calls[0].function.arguments"),
    ({"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": "[1, 2]"}}]},
     "messages[0].tool_calls[0].function.arguments"),
    ({"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": "[" * 200 + "]" * 200}}]},
     "messages[0].tool_calls[0].function.arguments"),
])
def test_misplaced_or_malformed_history_is_refused(message: dict, param: str) -> None:
    with pytest.raises(ApiError) as info:
        sampling.chat_messages(chat(messages=[message]))
    assert info.value.param == param


# ---- calls read back from the output ----------------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(alphabet='ab"\\{}[],: \n'),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(alphabet='ab"\\{}', max_size=4), inner,
                                                                 max_size=3),
    max_leaves=8,
)
calls_strategy = st.lists(st.tuples(st.sampled_from(["f", "get_weather", 'q"x']), json_values, st.booleans()),
                          min_size=1, max_size=3)


def written(calls: list, indent: int | None) -> str:
    """The output text of a required choice, each call's keys in either order."""
    items = [({"name": name, "parameters": args} if name_first else {"parameters": args, "name": name})
             for name, args, name_first in calls]
    return json.dumps(items, indent=indent)


def run(stream: ForcedCallStream, text: str, cuts: list[int]) -> list:
    events, start = [], 0
    for cut in sorted(cuts) + [len(text)]:
        events += stream.feed(text[start:cut])
        start = cut
    return events + stream.finish()


@given(calls_strategy, st.sampled_from([None, 2]), st.data())
def test_a_required_choices_calls_are_the_same_for_every_split(calls: list, indent: int | None, data) -> None:
    text = written(calls, indent)
    cuts = data.draw(st.lists(st.integers(0, len(text)), max_size=8))
    events = run(ForcedCallStream(None), text, cuts)
    openings = [event for event in events if event.name is not None]
    assert [(e.index, e.name) for e in openings] == [(i, name) for i, (name, _, _) in enumerate(calls)]
    assert all(e.id and e.arguments == "" for e in openings) and len({e.id for e in openings}) == len(calls)
    for index, (_, args, _) in enumerate(calls):
        pieces = [e.arguments for e in events if e.index == index and e.name is None]
        assert json.loads("".join(pieces)) == args
        # nothing of a call's arguments comes before its name
        assert events.index(openings[index]) < min((events.index(e) for e in events
                                                    if e.index == index and e.name is None), default=len(events))


@given(json_values, st.data())
def test_a_named_choices_output_is_its_arguments(args: object, data) -> None:
    text = json.dumps(args)
    cuts = data.draw(st.lists(st.integers(0, len(text)), max_size=5))
    events = run(ForcedCallStream("f"), text, cuts)
    assert events[0].name == "f" and events[0].index == 0 and events[0].arguments == ""
    assert "".join(e.arguments for e in events[1:]) == text and {e.index for e in events} == {0}


def test_streamed_deltas_never_merge_a_calls_opening_with_its_arguments() -> None:
    stream = ForcedCallStream(None)
    events = tuple(stream.feed('[{"name": "f", "parameters": {"a": 1}}, {"name": "g", "parameters": {}}]'))
    groups = delta_calls(events)
    for group in groups:
        assert len({piece["index"] for piece in group}) == len(group)
    openings = [piece for group in groups for piece in group if "id" in piece]
    assert [(p["index"], p["type"], p["function"]) for p in openings] == [
        (0, "function", {"name": "f", "arguments": ""}), (1, "function", {"name": "g", "arguments": ""})]
    assert "".join(piece["function"]["arguments"] for group in groups for piece in group
                   if piece["index"] == 0) == '{"a": 1}'


# ---- a choice's message ----------------------------------------------------------------------------------

HERMES = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'


@pytest.mark.parametrize("rules", [
    ChatOutputRules(tool_parser=get_tool_parser("hermes")),
    ChatOutputRules(tool_parser=get_tool_parser("hermes"), reasoning=get_reasoning_parser("qwen3")),
    ChatOutputRules(forced=True, function="get_weather"),
])
def test_a_message_and_its_stream_carry_the_same_calls(rules: ChatOutputRules) -> None:
    reasoning = "<think>\nthe user wants weather\n</think>\n\n" if rules.reasoning else ""
    text = reasoning + (HERMES if rules.tool_parser else '{"city": "Paris"}')
    message = rules.choice(None).message(text)
    assert message["content"] is None
    [call] = message["tool_calls"]
    assert call["type"] == "function" and call["id"].startswith("call_")
    assert (call["function"]["name"], json.loads(call["function"]["arguments"])) == ("get_weather",
                                                                                      {"city": "Paris"})
    assert message.get("reasoning_content") == ("the user wants weather" if rules.reasoning else None)
    output = rules.choice(None)
    deltas = [output.feed(text[i:i + 3]) for i in range(0, len(text), 3)] + [output.finish()]
    assert output.made_calls
    assert "".join(d.reasoning for d in deltas) == (message.get("reasoning_content") or "")
    assert "".join(d.content for d in deltas) == ""
    pieces = [piece for d in deltas for group in delta_calls(d.calls) for piece in group]
    assert [p["function"]["name"] for p in pieces if "id" in p] == ["get_weather"]
    assert json.loads("".join(p["function"]["arguments"] for p in pieces)) == {"city": "Paris"}


def test_text_without_calls_is_content_and_reasoning_may_be_left_out() -> None:
    rules = ChatOutputRules(tool_parser=get_tool_parser("hermes"), reasoning=get_reasoning_parser("qwen3"),
                            include_reasoning=False)
    output = rules.choice(None)
    assert output.message("<think>hmm</think>It is sunny.") == {"role": "assistant", "content": "It is sunny."}
    assert not output.made_calls


# ---- the options ------------------------------------------------------------------------------------------

def test_the_parser_options_offer_every_registered_parser() -> None:
    assert TOOL_CALL_PARSERS == tuple(tool_parsers.TOOL_PARSERS)
    assert REASONING_PARSERS == tuple(reasoning.REASONING_PARSERS)


def test_auto_tool_choice_needs_a_parser() -> None:
    with pytest.raises(InvalidConfig, match="tool_call_parser") as info:
        ServerSettings(enable_auto_tool_choice=True)
    assert info.value.options == ("enable_auto_tool_choice", "tool_call_parser")
    with pytest.raises(InvalidConfig, match="hermes"):
        ServerSettings(tool_call_parser="nope")
    settings = ServerSettings(enable_auto_tool_choice=True, tool_call_parser="hermes", reasoning_parser="qwen3")
    assert settings.tool_call_parser == "hermes" and settings.reasoning_parser == "qwen3"
