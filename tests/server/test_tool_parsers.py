"""Tool-call parsers on outputs written in each model family's own format: the calls and content they
yield, batch and streamed at any split, the events in OpenAI's order, and nothing lost or raised on
output that is not a valid call."""

from __future__ import annotations

import itertools
import json
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from atom_trio import config
from atom_trio.errors import InvalidConfig
from atom_trio.server.tool_parsers import (
    TOOL_PARSERS,
    ContentDelta,
    ToolCall,
    ToolCallDelta,
    get_tool_parser,
    new_call_id,
)

DS_BEGIN, DS_END = "<｜tool▁calls▁begin｜>", "<｜tool▁calls▁end｜>"
DS_CALL, DS_CALL_END, DS_SEP = ("<｜tool▁call▁begin｜>", "<｜tool▁call▁end｜>", "<｜tool▁sep｜>")
KIMI_BEGIN, KIMI_END = "<|tool_calls_section_begin|>", "<|tool_calls_section_end|>"
KIMI_CALL, KIMI_ARGS, KIMI_CALL_END = ("<|tool_call_begin|>", "<|tool_call_argument_begin|>", "<|tool_call_end|>")

UNICODE_ARGS = {
    "to": "José",
    "text": 'He said "bonjour" — 你好 é',
    "meta": {"tags": ["a", "b"], "priority": 2, "ratio": 0.5, "urgent": True, "reply_to": None},
}
#: UNICODE_ARGS as a model writes it: spaced, with escaped quotes and a \u escape.
UNICODE_JSON = (
    '{"to": "José", "text": "He said \\"bonjour\\" — 你好 \\u00e9", '
    '"meta": {"tags": ["a", "b"], "priority": 2, "ratio": 0.5, "urgent": true, "reply_to": null}}'
)


def ds_call(name: str, arguments: str) -> str:
    return f"{DS_CALL}function{DS_SEP}{name}\n```json\n{arguments}\n```{DS_CALL_END}"


def kimi_call(name: str, index: int, arguments: str) -> str:
    return f"{KIMI_CALL}functions.{name}:{index}{KIMI_ARGS}{arguments}{KIMI_CALL_END}"


# (parser, model output, expected content, expected calls as (name, arguments))
CALLS = [
    # hermes: Hermes 2 Pro, Qwen2.5, Qwen3
    (
        "hermes",
        (
            '<tool_call>\n{"name": "get_current_weather", "arguments": {"location": "San Francisco, CA", "unit": '
            '"fahrenheit"}}\n</tool_call>'
        ),
        None,
        [("get_current_weather", {"location": "San Francisco, CA", "unit": "fahrenheit"})],
    ),
    (
        "hermes",
        (
            "Let me check the weather in both cities.\n\n"
            '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
            '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Tokyo"}}\n</tool_call>'
        ),
        "Let me check the weather in both cities.",
        [("get_weather", {"city": "Paris"}), ("get_weather", {"city": "Tokyo"})],
    ),
    (
        "hermes",
        f'<tool_call>\n{{"name": "send_message", "arguments": {UNICODE_JSON}}}\n</tool_call>',
        None,
        [("send_message", UNICODE_ARGS)],
    ),
    (
        "hermes",
        '<tool_call>\n{"name": "list_files", "arguments": {}}\n</tool_call>\nDone.',
        "Done.",
        [("list_files", {})],
    ),
    (
        "hermes",  # the arguments as a JSON string, as some fine-tunes write them
        '<tool_call>{"name": "get_weather", "arguments": "{\\"city\\": \\"Oslo\\"}"}</tool_call>',
        None,
        [("get_weather", {"city": "Oslo"})],
    ),
    (
        "hermes",  # a valid call, then one without a usable name: the second stays text
        '<tool_call>\n{"name": "a", "arguments": {}}\n</tool_call>\n<tool_call>\n{"name": 1}\n</tool_call>',
        '<tool_call>\n{"name": 1}\n</tool_call>',
        [("a", {})],
    ),
    # llama3_json: Llama 3.1 / 3.2 / 3.3
    (
        "llama3_json",
        '{"name": "get_weather", "parameters": {"city": "Paris", "unit": "celsius"}}',
        None,
        [("get_weather", {"city": "Paris", "unit": "celsius"})],
    ),
    (
        "llama3_json",
        (
            '<|python_tag|>{"name": "get_weather", "parameters": {"city": "Paris"}}; '
            '{"name": "get_time", "parameters": {"timezone": "Europe/Paris"}}'
        ),
        None,
        [("get_weather", {"city": "Paris"}), ("get_time", {"timezone": "Europe/Paris"})],
    ),
    (
        "llama3_json",
        'Let me look that up.<|python_tag|>{"name": "search", "parameters": {"query": "llama 3.1 release"}}',
        "Let me look that up.",
        [("search", {"query": "llama 3.1 release"})],
    ),
    (
        "llama3_json",
        f'\n{{"name": "send_message", "parameters": {UNICODE_JSON}}}',
        None,
        [("send_message", UNICODE_ARGS)],
    ),
    (
        "llama3_json",
        '{"name": "get_weather", "arguments": {"city": "Oslo"}}',
        None,
        [("get_weather", {"city": "Oslo"})],
    ),
    # mistral: before tokenizer v11 (a JSON list) and from v11 on (name[ARGS]{...})
    (
        "mistral",
        (
            '[TOOL_CALLS] [{"name": "get_current_weather", "arguments": {"location": "Paris, France", "format": '
            '"celsius"}}]'
        ),
        None,
        [("get_current_weather", {"location": "Paris, France", "format": "celsius"})],
    ),
    (
        "mistral",
        (
            'Checking both.[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Paris"}}, '
            '{"name": "get_time", "arguments": {}}]'
        ),
        "Checking both.",
        [("get_weather", {"city": "Paris"}), ("get_time", {})],
    ),
    (
        "mistral",
        '[TOOL_CALLS]get_current_weather[ARGS]{"location": "Paris, France", "format": "celsius"}',
        None,
        [("get_current_weather", {"location": "Paris, France", "format": "celsius"})],
    ),
    (
        "mistral",
        (
            'I will check both cities.[TOOL_CALLS]get_weather[ARGS]{"city": "Paris"}'
            '[TOOL_CALLS]get_weather[ARGS]{"city": "Tokyo"}'
        ),
        "I will check both cities.",
        [("get_weather", {"city": "Paris"}), ("get_weather", {"city": "Tokyo"})],
    ),
    ("mistral", f"[TOOL_CALLS]send_message[ARGS]{UNICODE_JSON}", None, [("send_message", UNICODE_ARGS)]),
    (
        "mistral",  # text decoded without [ARGS]
        '[TOOL_CALLS]get_weather{"city": "Paris"}',
        None,
        [("get_weather", {"city": "Paris"})],
    ),
    # deepseek_v3
    (
        "deepseek_v3",
        DS_BEGIN + ds_call("get_weather", '{"location": "Hangzhou"}') + DS_END,
        None,
        [("get_weather", {"location": "Hangzhou"})],
    ),
    (
        "deepseek_v3",
        "I'll check both.\n\n"
        + DS_BEGIN
        + ds_call("get_weather", '{"location": "Paris"}')
        + "\n"
        + ds_call("get_time", '{"timezone": "Europe/Paris"}')
        + DS_END,
        "I'll check both.",
        [("get_weather", {"location": "Paris"}), ("get_time", {"timezone": "Europe/Paris"})],
    ),
    ("deepseek_v3", DS_BEGIN + ds_call("send_message", UNICODE_JSON) + DS_END, None, [("send_message", UNICODE_ARGS)]),
    (
        "deepseek_v3",  # stopped before the section's end marker
        DS_BEGIN + ds_call("get_weather", '{\n  "location": "Paris"\n}'),
        None,
        [("get_weather", {"location": "Paris"})],
    ),
    # glm45: GLM-4.5 / 4.6, and 4.7's form without newlines
    (
        "glm45",
        (
            "<tool_call>get_weather\n<arg_key>city</arg_key>\n<arg_value>Beijing</arg_value>\n"
            "<arg_key>date</arg_key>\n<arg_value>2024-06-27</arg_value>\n</tool_call>"
        ),
        None,
        [("get_weather", {"city": "Beijing", "date": "2024-06-27"})],
    ),
    (
        "glm45",
        (
            "I'll look both up.\n<tool_call>get_weather\n<arg_key>city</arg_key>\n<arg_value>Paris</arg_value>\n"
            "<arg_key>days</arg_key>\n<arg_value>3</arg_value>\n</tool_call>\n"
            "<tool_call>search\n<arg_key>query</arg_key>\n<arg_value>Paris events</arg_value>\n"
            '<arg_key>filters</arg_key>\n<arg_value>{"free": true, "tags": ["music", "art"]}</arg_value>\n'
            "<arg_key>exact</arg_key>\n<arg_value>false</arg_value>\n</tool_call>"
        ),
        "I'll look both up.",
        [
            ("get_weather", {"city": "Paris", "days": 3}),
            ("search", {"query": "Paris events", "filters": {"free": True, "tags": ["music", "art"]}, "exact": False}),
        ],
    ),
    (
        "glm45",
        (
            '<tool_call>send_message\n<arg_key>text</arg_key>\n<arg_value>He said "bonjour" — 你好</arg_value>\n'
            '<arg_key>meta</arg_key>\n<arg_value>{"note": "\\"quoted\\"", "to": "José"}</arg_value>\n</tool_call>'
        ),
        None,
        [("send_message", {"text": 'He said "bonjour" — 你好', "meta": {"note": '"quoted"', "to": "José"}})],
    ),
    ("glm45", "<tool_call>list_files\n</tool_call>", None, [("list_files", {})]),
    (
        "glm45",
        "<tool_call>get_weather<arg_key>city</arg_key><arg_value>Oslo</arg_value></tool_call>",
        None,
        [("get_weather", {"city": "Oslo"})],
    ),
    # kimi_k2
    (
        "kimi_k2",
        KIMI_BEGIN + kimi_call("get_weather", 0, '{"city": "Beijing"}') + KIMI_END,
        None,
        [("get_weather", {"city": "Beijing"})],
    ),
    (
        "kimi_k2",
        "I'll check both."
        + KIMI_BEGIN
        + kimi_call("get_weather", 0, '{"city": "Paris"}')
        + kimi_call("get_time", 1, '{"timezone": "Europe/Paris"}')
        + KIMI_END,
        "I'll check both.",
        [("get_weather", {"city": "Paris"}), ("get_time", {"timezone": "Europe/Paris"})],
    ),
    (
        "kimi_k2",
        KIMI_BEGIN + kimi_call("send_message", 0, UNICODE_JSON) + KIMI_END,
        None,
        [("send_message", UNICODE_ARGS)],
    ),
    (
        "kimi_k2",  # an id without the "functions." prefix, and the singular section markers
        "<|tool_call_section_begin|>"
        + f'{KIMI_CALL}get_weather:0 {KIMI_ARGS} {{"city": "Oslo"}} {KIMI_CALL_END}'
        + "<|tool_call_section_end|>",
        None,
        [("get_weather", {"city": "Oslo"})],
    ),
]

#: Outputs with no valid call: each is content, verbatim.
NO_CALLS = [
    ("hermes", "The capital of France is Paris."),
    ("hermes", "Wrap a call in <tool_call> tags."),
    ("hermes", '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris",}}\n</tool_call>'),
    ("hermes", '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Par'),
    ("hermes", '<tool_call>{"name": "f", "arguments": {"x": NaN}}</tool_call>'),
    ("hermes", '<tool_call>{"name": "f", "arguments": [1, 2]}</tool_call>'),
    ("hermes", '<tool_call>{"name": "f", "arguments": {}} and more</tool_call>'),
    ("llama3_json", "Paris is the capital of France.\n"),
    ("llama3_json", '{"answer": 42}'),
    ("llama3_json", '{"name": "get_weather", "parameters": {"city": "Paris"}'),
    ("llama3_json", 'As JSON: {"name": "get_weather", "parameters": {}}'),
    ("llama3_json", '<|python_tag|>brave_search.call(query="weather in Paris")'),
    ("mistral", "Paris is the capital of France."),
    ("mistral", "[TOOL_CALLS] is the marker Mistral models write before a call."),
    ("mistral", '[TOOL_CALLS]get_weather[ARGS]{"city": "Paris"'),
    ("mistral", '[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Paris"}}'),
    ("mistral", '[TOOL_CALLS] [{"title": "not a call"}]'),
    ("deepseek_v3", "Paris is the capital of France."),
    ("deepseek_v3", DS_BEGIN + ds_call("get_weather", '{"location": Paris}') + DS_END),
    ("deepseek_v3", DS_BEGIN + DS_CALL + "function" + DS_SEP + 'get_weather\n```json\n{"location": "Pa'),
    ("deepseek_v3", DS_BEGIN + DS_END),
    ("glm45", "Paris is the capital of France."),
    ("glm45", "<tool_call>get_weather\n<arg_key>city</arg_key>\n<arg_value>Paris</tool_call>"),
    ("glm45", "<tool_call>get_weather\n<arg_key>city</arg_key>\n<arg_value>Par"),
    ("glm45", "<tool_call>not a name\n</tool_call>"),
    ("kimi_k2", "Paris is the capital of France."),
    ("kimi_k2", KIMI_BEGIN + kimi_call("get_weather", 0, '{"city": ') + KIMI_END),
    ("kimi_k2", KIMI_BEGIN + KIMI_CALL + "functions.get_weather:0" + KIMI_ARGS + '{"city": "Bei'),
    ("kimi_k2", KIMI_BEGIN + KIMI_CALL + "get_weather" + KIMI_ARGS + "{}" + KIMI_CALL_END + KIMI_END),
]

SAMPLES = [(name, text) for name, text, _, _ in CALLS] + NO_CALLS
CALL_ID = re.compile(r"call_[0-9a-f]{24}")


def compact(arguments: dict) -> str:
    return json.dumps(arguments, ensure_ascii=False, separators=(",", ":"))


def streamed(parser_name: str, pieces: list[str]) -> tuple[str, list[ToolCall]]:
    """Feed ``pieces`` to a stream; check the events are in OpenAI's order; return content and calls."""
    stream = get_tool_parser(parser_name).stream()
    events = [event for piece in pieces for event in stream.feed(piece)] + stream.finish()
    content = "".join(event.text for event in events if isinstance(event, ContentDelta))
    names: list[str] = []
    arguments: list[str] = []
    ids: set[str] = set()
    for event in events:
        if isinstance(event, ToolCallDelta) and event.name is not None:
            assert event.index == len(names)  # calls numbered in order, each announced once
            assert event.id is not None and CALL_ID.fullmatch(event.id) and event.id not in ids
            assert event.arguments == ""  # the name comes before any argument
            ids.add(event.id)
            names.append(event.name)
            arguments.append("")
        elif isinstance(event, ToolCallDelta):
            assert event.index == len(names) - 1 and event.id is None
            arguments[event.index] += event.arguments
    return content, [ToolCall(name, args) for name, args in zip(names, arguments, strict=True)]


def batch(parser_name: str, text: str) -> tuple[str, list[ToolCall]]:
    extracted = get_tool_parser(parser_name).extract(text)
    assert extracted.content != ""  # empty content is None
    return extracted.content or "", extracted.calls


def pieces_at(text: str, cuts: list[int]) -> list[str]:
    bounds = [0, *sorted(cuts), len(text)]
    return [text[a:b] for a, b in itertools.pairwise(bounds)]


@pytest.mark.parametrize(("parser_name", "text", "content", "calls"), CALLS)
def test_recorded_calls(parser_name: str, text: str, content: str | None, calls: list) -> None:
    extracted = get_tool_parser(parser_name).extract(text)
    assert extracted.content == content
    assert extracted.calls == [ToolCall(name, compact(arguments)) for name, arguments in calls]
    for call, (_, arguments) in zip(extracted.calls, calls, strict=True):
        assert json.loads(call.arguments) == arguments


@pytest.mark.parametrize(("parser_name", "text"), NO_CALLS)
def test_output_without_a_valid_call_is_content_verbatim(parser_name: str, text: str) -> None:
    extracted = get_tool_parser(parser_name).extract(text)
    assert extracted.calls == []
    assert extracted.content == text


@pytest.mark.parametrize(("parser_name", "text"), SAMPLES)
def test_every_stream_boundary_yields_the_batch_result(parser_name: str, text: str) -> None:
    expected = batch(parser_name, text)
    assert streamed(parser_name, list(text)) == expected  # one character at a time
    for cut in range(len(text) + 1):
        assert streamed(parser_name, [text[:cut], text[cut:]]) == expected


@pytest.mark.parametrize(("parser_name", "text"), SAMPLES)
@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_arbitrary_stream_boundaries_yield_the_batch_result(parser_name: str, text: str, data: st.DataObject) -> None:
    cuts = data.draw(st.lists(st.integers(0, len(text)), max_size=12))
    assert streamed(parser_name, pieces_at(text, cuts)) == batch(parser_name, text)


FRAGMENTS = [
    "<tool_call>", "</tool_call>", "<tool_", "<|python_tag|>", "[TOOL_CALLS]", "[ARGS]", "[AR", DS_BEGIN, DS_END,
    DS_CALL, DS_CALL_END, DS_SEP, "function", "\n```json\n", "\n```", KIMI_BEGIN, KIMI_END, KIMI_CALL, KIMI_ARGS,
    KIMI_CALL_END, "functions.f:0", "<arg_key>", "</arg_key>", "<arg_value>", "</arg_value>", '{"name": "f", ',
    '"arguments": ', '"parameters": ', "{", "}", "[", "]", '"', "\\", ";", ",", ":", "1", "NaN", " ", "\n", "f",
    "é", "text",
]  # fmt: skip


@pytest.mark.parametrize("parser_name", sorted(TOOL_PARSERS))
@settings(max_examples=150, deadline=None)
@given(parts=st.lists(st.sampled_from(FRAGMENTS), max_size=30), data=st.data())
def test_any_output_parses_without_error_and_alike_at_any_split(
    parser_name: str, parts: list[str], data: st.DataObject
) -> None:
    text = "".join(parts)
    content, calls = batch(parser_name, text)
    if not calls:
        assert content == text  # nothing lost
    for call in calls:
        assert isinstance(json.loads(call.arguments), dict)
    cuts = data.draw(st.lists(st.integers(0, len(text)), max_size=10))
    assert streamed(parser_name, pieces_at(text, cuts)) == (content, calls)


@pytest.mark.parametrize("parser_name", sorted(TOOL_PARSERS))
@given(text=st.text(st.characters(exclude_characters="<[{|"), max_size=60))
def test_text_without_markers_is_content_verbatim(parser_name: str, text: str) -> None:
    assert batch(parser_name, text) == (text, [])


@pytest.mark.parametrize(
    ("parser_name", "pieces", "sent"),
    [
        ("hermes", ["Hello", " world"], ["Hello", " world"]),
        ("hermes", ["It uses <tool", "kit>."], ["It uses", " <toolkit>."]),
        ("mistral", ["See [TOOL", "S] below"], ["See", " [TOOLS] below"]),
        ("deepseek_v3", ["Hi <｜tool", "▁x"], ["Hi", " <｜tool▁x"]),
    ],
)
def test_content_is_held_back_only_while_it_may_start_a_call(
    parser_name: str, pieces: list[str], sent: list[str]
) -> None:
    stream = get_tool_parser(parser_name).stream()
    for piece, expected in zip(pieces, sent, strict=True):
        assert stream.feed(piece) == [ContentDelta(expected)]


def test_a_call_is_sent_when_its_block_closes() -> None:
    stream = get_tool_parser("hermes").stream()
    assert stream.feed('<tool_call>\n{"name": "f", "arguments": {"a": 1}}\n') == []
    first, arguments = stream.feed("</tool_call>")
    assert (first.index, first.name, first.arguments) == (0, "f", "")
    assert arguments == ToolCallDelta(0, None, None, '{"a":1}')
    assert stream.finish() == []


def test_a_truncated_call_is_flushed_as_content_at_the_end() -> None:
    stream = get_tool_parser("hermes").stream()
    text = '<tool_call>\n{"name": "f", "arguments": {"a": '
    assert stream.feed(text) == []
    assert stream.finish() == [ContentDelta(text)]


def test_call_ids_are_fresh() -> None:
    ids = {new_call_id() for _ in range(100)}
    assert len(ids) == 100 and all(CALL_ID.fullmatch(call_id) for call_id in ids)


def test_a_lone_surrogate_in_arguments_stays_valid_utf8() -> None:
    extracted = get_tool_parser("hermes").extract('<tool_call>{"name": "f", "arguments": {"s": "\\ud800"}}</tool_call>')
    (call,) = extracted.calls
    call.arguments.encode()
    assert json.loads(call.arguments) == {"s": "\ud800"}


def test_registry_has_vllms_names_and_refuses_others() -> None:
    assert set(TOOL_PARSERS) == {"hermes", "llama3_json", "mistral", "deepseek_v3", "glm45", "kimi_k2", "openai"}
    assert tuple(TOOL_PARSERS) == config.TOOL_CALL_PARSERS  # the choices --tool-call-parser offers
    for name in TOOL_PARSERS:
        assert isinstance(get_tool_parser(name), TOOL_PARSERS[name])
    with pytest.raises(InvalidConfig, match="hermes, llama3_json, mistral, deepseek_v3, glm45, kimi_k2, openai") as error:
        get_tool_parser("qwen")
    assert error.value.options == ("tool_call_parser",)
