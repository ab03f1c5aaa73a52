"""GPT-OSS's harmony outputs through the ``openai_gptoss`` reasoning parser and the ``openai`` tool parser.

The outputs are written as gpt-oss writes them after its prompt's ``<|start|>assistant`` (the stop
tokens ``<|return|>`` and ``<|call|>`` absent, as the engine leaves them out of the text): reasoning,
a preamble, calls in either header form, a final answer. Each goes through both stages, as a chat
response does, whole and streamed split at every boundary, and must give the same message.
"""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from atom_trio.server.chat_output import ChatOutputRules
from atom_trio.server.reasoning import get_reasoning_parser
from atom_trio.server.tool_parsers import ContentDelta, ToolCall, ToolCallDelta, get_tool_parser

ANALYSIS = "<|channel|>analysis<|message|>User asks: 17 * 23. 17 * 20 = 340, plus 51: 391.<|end|>"
FINAL = "<|start|>assistant<|channel|>final<|message|>17 × 23 = **391**."
CALL = (
    "<|start|>assistant<|channel|>commentary to=functions.get_weather <|constrain|>json"
    '<|message|>{"city": "Paris", "days": 3}'
)
ROLE_CALL = '<|start|>assistant to=functions.get_time<|channel|>commentary json<|message|>{"zone": "CET"}'
PREAMBLE = "<|start|>assistant<|channel|>commentary<|message|>Let me look that up.<|end|>"

# (output, reasoning, content, calls)
CONVERSATIONS = [
    (ANALYSIS + FINAL, "User asks: 17 * 23. 17 * 20 = 340, plus 51: 391.", "17 × 23 = **391**.", []),
    (ANALYSIS + CALL, "User asks: 17 * 23. 17 * 20 = 340, plus 51: 391.", None,
     [ToolCall("get_weather", '{"city":"Paris","days":3}')]),
    (ANALYSIS + PREAMBLE + CALL + "<|call|>", "User asks: 17 * 23. 17 * 20 = 340, plus 51: 391.",
     "Let me look that up.", [ToolCall("get_weather", '{"city":"Paris","days":3}')]),
    # The first message's recipient in its role part: the prompt ended with "<|start|>assistant".
    (' to=functions.get_time<|channel|>commentary json<|message|>{"zone": "CET"}', None, None,
     [ToolCall("get_time", '{"zone":"CET"}')]),
    (ANALYSIS + ROLE_CALL, "User asks: 17 * 23. 17 * 20 = 340, plus 51: 391.", None,
     [ToolCall("get_time", '{"zone":"CET"}')]),
    ("<|channel|>final<|message|>Hi!", None, "Hi!", []),
    # Cut off while reasoning; a call cut off inside its arguments stays content, as every format's does.
    ("<|channel|>analysis<|message|>Let me count: s, t, r", "Let me count: s, t, r", None, []),
    (ANALYSIS + CALL[:-5], "User asks: 17 * 23. 17 * 20 = 340, plus 51: 391.",
     '<|channel|>commentary to=functions.get_weather<|message|>{"city": "Paris", "days', []),
    # Not harmony at all: content, verbatim.
    ("Plain text <|end|> here", None, "Plain text <|end|> here", []),
]  # fmt: skip


def whole(text: str) -> tuple[str | None, str | None, list[ToolCall]]:
    reasoning, rest = get_reasoning_parser("openai_gptoss").extract(text)
    extracted = get_tool_parser("openai").extract(rest or "")
    return reasoning, extracted.content, extracted.calls


def streamed(pieces: list[str]) -> tuple[str | None, str | None, list[ToolCall]]:
    """Both stages fed piece by piece, as a streamed chat choice is."""
    reasoning_stream, tool_stream = get_reasoning_parser("openai_gptoss").stream(), get_tool_parser("openai").stream()
    reasoning, events = "", []
    for piece in [*pieces, None]:
        more_reasoning, more_content = reasoning_stream.feed(piece) if piece is not None else reasoning_stream.finish()
        assert more_reasoning != "" and more_content != ""  # nothing new is None
        reasoning += more_reasoning or ""
        events += tool_stream.feed(more_content or "")
    events += tool_stream.finish()
    content = "".join(event.text for event in events if isinstance(event, ContentDelta))
    deltas = [event for event in events if isinstance(event, ToolCallDelta)]
    calls = [ToolCall(first.name, rest.arguments) for first, rest in itertools.pairwise(deltas) if first.name]
    return reasoning or None, content or None, calls


@pytest.mark.parametrize(("text", "reasoning", "content", "calls"), CONVERSATIONS)
def test_recorded_outputs_become_reasoning_content_and_calls(text, reasoning, content, calls):
    assert whole(text) == (reasoning, content, calls)


@pytest.mark.parametrize("text", [text for text, *_ in CONVERSATIONS])
def test_every_stream_boundary_gives_the_whole_result(text):
    expected = whole(text)
    assert streamed(list(text)) == expected
    for cut in range(len(text) + 1):
        assert streamed([text[:cut], text[cut:]]) == expected


FRAGMENTS = [
    "<|channel|>", "analysis", "final", "commentary", " to=functions.f", " <|constrain|>json", "<|message|>",
    "<|end|>", "<|start|>assistant", "<|call|>", "<|return|>", "<|cha", "<|", '{"a": 1}', "{", "}", " ", "x", "é",
]  # fmt: skip


@settings(max_examples=150, deadline=None)
@given(parts=st.lists(st.sampled_from(FRAGMENTS), max_size=25), data=st.data())
def test_any_output_splits_alike_at_any_split(parts, data):
    text = "".join(parts)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(text)), max_size=10)))
    assert streamed([text[a:b] for a, b in itertools.pairwise([0, *cuts, len(text)])]) == whole(text)


def test_reasoning_streams_as_it_comes_and_holds_back_only_a_possible_marker():
    stream = get_reasoning_parser("openai_gptoss").stream()
    assert stream.feed("<|chan") == (None, None)
    assert stream.feed("nel|>analysis<|message|>Thinking") == ("Thinking", None)
    assert stream.feed(" more<|e") == (" more", None)
    assert stream.feed("nd|><|start|>assistant<|channel|>final<|message|>Hi") == (None, "Hi")
    assert stream.finish() == (None, None)


def test_the_parser_asks_for_the_special_tokens():
    assert get_reasoning_parser("openai_gptoss").keeps_special_tokens
    assert not get_reasoning_parser("qwen3").keeps_special_tokens


def test_a_chat_message_from_a_harmony_output():
    rules = ChatOutputRules(tool_parser=get_tool_parser("openai"), reasoning=get_reasoning_parser("openai_gptoss"))
    output = rules.choice(None)
    message = output.message(ANALYSIS + PREAMBLE + CALL)
    assert message["reasoning_content"] == "User asks: 17 * 23. 17 * 20 = 340, plus 51: 391."
    assert message["content"] == "Let me look that up."
    ((call,),) = [message["tool_calls"]]
    assert call["function"] == {"name": "get_weather", "arguments": '{"city":"Paris","days":3}'}
    assert output.made_calls
