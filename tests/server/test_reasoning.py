"""Reasoning parsers on outputs written as Qwen3 and DeepSeek-R1 write them: the reasoning and content
they split, for each way the prompt may have left the think block, batch and streamed at any split."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from atom_trio import config
from atom_trio.errors import InvalidConfig
from atom_trio.server.reasoning import REASONING_PARSERS, ReasoningParser, get_reasoning_parser

THINKING = "<think>\nThe user asks for 17 * 23. 17 * 20 = 340, 17 * 3 = 51, so 391.\n</think>\n\n17 × 23 = **391**."
CLOSE_ONLY = "The user says hi. I should greet back.\n</think>\n\nHello! How can I help?"
PLAIN = "Hello! How can I help?\n"
EMPTY_THINK = "<think>\n\n</think>\n\nHello!"
CUT_OFF = "<think>\nLet me count the letters: s, t, r"
REASONING = "The user asks for 17 * 23. 17 * 20 = 340, 17 * 3 = 51, so 391."

# (parser, output, open_at_start, expected reasoning, expected content)
SPLITS = [
    # Qwen3's hybrid template: the model writes <think> itself, or nothing when thinking is off.
    ("qwen3", THINKING, None, REASONING, "17 × 23 = **391**."),
    ("qwen3", THINKING, False, REASONING, "17 × 23 = **391**."),
    ("qwen3", EMPTY_THINK, None, None, "Hello!"),
    ("qwen3", PLAIN, None, None, PLAIN),
    ("qwen3", PLAIN, False, None, PLAIN),
    ("qwen3", CUT_OFF, None, "Let me count the letters: s, t, r", None),
    # Qwen3 thinking-only templates open <think> in the prompt: only </think> is generated.
    ("qwen3", CLOSE_ONLY, None, "The user says hi. I should greet back.", "Hello! How can I help?"),
    ("qwen3", CLOSE_ONLY, True, "The user says hi. I should greet back.", "Hello! How can I help?"),
    ("qwen3", "Still thinking about it", True, "Still thinking about it", None),
    # A prompt that closed the block (enable_thinking=False): a later </think> is just text.
    ("qwen3", CLOSE_ONLY, False, None, CLOSE_ONLY),
    # DeepSeek-R1: the template opens <think>, so text before </think> is reasoning, and with none at all
    # (cut off while thinking) all of it is.
    ("deepseek_r1", CLOSE_ONLY, None, "The user says hi. I should greet back.", "Hello! How can I help?"),
    ("deepseek_r1", THINKING, None, REASONING, "17 × 23 = **391**."),
    ("deepseek_r1", "Okay, so the user wants", None, "Okay, so the user wants", None),
    ("deepseek_r1", CUT_OFF, None, "Let me count the letters: s, t, r", None),
    ("deepseek_r1", PLAIN, False, None, PLAIN),
    ("deepseek_r1", EMPTY_THINK, None, None, "Hello!"),
]

SAMPLES = [(name, text, open_at_start) for name, text, open_at_start, _, _ in SPLITS]


def streamed(name: str, pieces: list[str], open_at_start: bool | None) -> tuple[str | None, str | None]:
    stream = get_reasoning_parser(name).stream(open_at_start=open_at_start)
    deltas = [stream.feed(piece) for piece in pieces] + [stream.finish()]
    for reasoning, content in deltas:
        assert reasoning != "" and content != ""  # nothing new is None
    reasoning = "".join(reasoning or "" for reasoning, _ in deltas)
    content = "".join(content or "" for _, content in deltas)
    return reasoning or None, content or None


@pytest.mark.parametrize(("name", "text", "open_at_start", "reasoning", "content"), SPLITS)
def test_recorded_outputs_split(
    name: str, text: str, open_at_start: bool | None, reasoning: str | None, content: str | None
) -> None:
    assert get_reasoning_parser(name).extract(text, open_at_start=open_at_start) == (reasoning, content)


@pytest.mark.parametrize(("name", "text", "open_at_start"), SAMPLES)
def test_every_stream_boundary_splits_as_batch(name: str, text: str, open_at_start: bool | None) -> None:
    expected = get_reasoning_parser(name).extract(text, open_at_start=open_at_start)
    assert streamed(name, list(text), open_at_start) == expected
    for cut in range(len(text) + 1):
        assert streamed(name, [text[:cut], text[cut:]], open_at_start) == expected


FRAGMENTS = ["<think>", "</think>", "<thi", "</th", "<", ">", "\n", "\n\n", " ", "a", "é", "think"]


@pytest.mark.parametrize(("name", "open_at_start"), list(itertools.product(REASONING_PARSERS, [None, True, False])))
@settings(max_examples=150, deadline=None)
@given(parts=st.lists(st.sampled_from(FRAGMENTS), max_size=25), data=st.data())
def test_any_output_splits_alike_at_any_split(
    name: str, open_at_start: bool | None, parts: list[str], data: st.DataObject
) -> None:
    text = "".join(parts)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(text)), max_size=10)))
    pieces = [text[a:b] for a, b in itertools.pairwise([0, *cuts, len(text)])]
    assert streamed(name, pieces, open_at_start) == get_reasoning_parser(name).extract(
        text, open_at_start=open_at_start
    )


@pytest.mark.parametrize("name", sorted(REASONING_PARSERS))
@given(text=st.text(st.characters(exclude_characters="<"), max_size=60))
def test_output_after_a_closed_block_is_content_verbatim(name: str, text: str) -> None:
    assert get_reasoning_parser(name).extract(text, open_at_start=False) == (None, text or None)


def test_text_streams_at_once_when_the_start_is_known() -> None:
    parser = get_reasoning_parser("qwen3")
    thinking = parser.stream(open_at_start=True)
    assert thinking.feed("Let me see") == ("Let me see", None)
    assert thinking.feed(". Done</th") == (". Done", None)  # "</th" may end the block
    assert thinking.feed("ink>\n\nHi") == (None, "Hi")
    answering = parser.stream(open_at_start=False)
    assert answering.feed("Hi there") == (None, "Hi there")


def test_qwen3_holds_an_undecided_output_until_it_shows_its_start() -> None:
    stream = get_reasoning_parser("qwen3").stream()
    assert stream.feed("Hmm, a greeting") == (None, None)
    assert stream.feed(".</think>Hi") == ("Hmm, a greeting.", "Hi")
    undecided = get_reasoning_parser("qwen3").stream()
    assert undecided.feed("Hello") == (None, None)
    assert undecided.finish() == (None, "Hello")


@pytest.mark.parametrize(
    ("prompt", "open_after"),
    [
        ("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n", None),
        ("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n<think>\n", True),
        ("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n", False),
        ("<｜User｜>Hi<｜Assistant｜><think>\n", True),
        ("<think>\nold\n</think>\n\nanswer<|im_end|>\n<|im_start|>assistant\n<think>\n", True),
    ],
)
def test_open_after_reads_the_prompt(prompt: str, open_after: bool | None) -> None:
    assert ReasoningParser.open_after(prompt) is open_after


def test_registry_has_vllms_names_and_refuses_others() -> None:
    assert set(REASONING_PARSERS) == {"qwen3", "deepseek_r1", "openai_gptoss"}
    assert tuple(REASONING_PARSERS) == config.REASONING_PARSERS  # the choices --reasoning-parser offers
    for name, parser in REASONING_PARSERS.items():
        assert isinstance(get_reasoning_parser(name), parser)
    with pytest.raises(InvalidConfig, match="qwen3, deepseek_r1, openai_gptoss") as error:
        get_reasoning_parser("gpt_oss")
    assert error.value.options == ("reasoning_parser",)
