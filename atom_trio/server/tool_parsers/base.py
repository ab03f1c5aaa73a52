"""What every tool-call parser shares: the call and stream-event types, the scanning loop, JSON helpers.

A format only says where a call block may start (`ToolParser._block_start`) and what a block that starts
there holds (`ToolParser._parse_block`). The loop in `ToolCallStream` does the rest, the same way for
batch and streaming: `ToolParser.extract` is one stream fed the whole text, so a split at any point
yields the same calls and content.

Choices every format follows:

- A call block is sent whole, once it is complete and valid. A call cannot be taken back once a client
  has it, and a block that breaks off (``max_tokens``) or turns out malformed must stay content, as it
  does in batch; so a call's arguments arrive in one piece after its name, not token by token.
- Text that does not form a valid call is content, verbatim: a marker that begins no valid block is
  plain text from its first character on, and scanning resumes after that character.
- Whitespace next to a call belongs to the call block (the newlines models put around their markers), so
  a run of whitespace is held back until what follows it shows whether a call starts there.
- Arguments are a JSON object re-serialized compactly; ``NaN``, infinities and nesting too deep for
  `json` make a block malformed rather than an invalid JSON string.
"""

from __future__ import annotations

import abc
import json
import math
import re
import secrets
from typing import Any

import attrs


@attrs.frozen
class ToolCall:
    """One function call the model made; ``arguments`` is a JSON object as a string."""

    name: str
    arguments: str


@attrs.frozen
class ExtractedToolCalls:
    """A whole output split into its content (``None`` when empty) and its calls, in order."""

    content: str | None
    calls: list[ToolCall]


@attrs.frozen
class ContentDelta:
    """Plain text to stream as ``delta.content``."""

    text: str


@attrs.frozen
class ToolCallDelta:
    """A piece of ``delta.tool_calls[index]``: the first carries ``id`` and ``name``, later ones ``arguments``."""

    index: int
    id: str | None
    name: str | None
    arguments: str


ToolStreamEvent = ContentDelta | ToolCallDelta


def new_call_id() -> str:
    """A fresh tool-call id in OpenAI's shape (``call_`` and 24 random hex digits)."""
    return "call_" + secrets.token_hex(12)


class _Wait:
    """`ToolParser._parse_block`'s answer when the block may still complete: hold it back."""


WAIT = _Wait()


def incomplete(final: bool) -> _Wait | None:
    """What a block cut short by the end of the text is: `WAIT` for more, or, when the output is over, no call."""
    return None if final else WAIT


@attrs.frozen
class Block:
    """A complete call block: it ends at ``end`` (an index into the scanned text) and holds ``calls``."""

    end: int
    calls: tuple[ToolCall, ...]


BlockResult = Block | _Wait | None


class ToolParser(abc.ABC):
    """Splits a model's output into content and tool calls, in one model family's format.

    Subclasses set ``markers`` (the strings that open a call block) and implement `_parse_block`.
    Instances hold no state: each `stream` has its own.
    """

    markers: tuple[str, ...] = ()

    def extract(self, text: str) -> ExtractedToolCalls:
        """The content and calls of a whole output; never raises on what the model wrote."""
        segments = ToolCallStream(self)._scan(text, final=True)
        content = "".join(segment for segment in segments if isinstance(segment, str))
        calls = [segment for segment in segments if isinstance(segment, ToolCall)]
        return ExtractedToolCalls(content=content or None, calls=calls)

    def stream(self) -> ToolCallStream:
        """A parser for one output arriving in pieces."""
        return ToolCallStream(self)

    def _block_start(self, text: str, pos: int, at_output_start: bool) -> tuple[int, bool] | None:
        """Where the first call block may start at or after ``pos``: ``(index, marker_complete)``.

        ``marker_complete`` is false when ``text`` ends in the first characters of a marker, which only
        more text can confirm. ``at_output_start`` says nothing but whitespace came before ``pos``.
        """
        found: tuple[int, bool] | None = None
        for marker in self.markers:
            index = text.find(marker, pos)
            if index >= 0 and (found is None or index < found[0]):
                found = (index, True)
            partial = _partial_suffix(text, pos, marker)
            if partial is not None and (found is None or partial < found[0]):
                found = (partial, False)
        return found

    @abc.abstractmethod
    def _parse_block(self, text: str, start: int, final: bool) -> BlockResult:
        """The call block opening with a complete marker at ``text[start]``.

        A `Block` once it is complete and valid, ``None`` when it cannot be one (the marker is then plain
        text), `WAIT` while more text may still complete it; with ``final`` there is no more text, so
        never `WAIT`. The answer for a text must not change when more text is appended, except from `WAIT`.
        """


class ToolCallStream:
    """One output fed in pieces: `feed` returns the events each piece completes, `finish` the rest."""

    def __init__(self, parser: ToolParser) -> None:
        self._parser = parser
        self._pending = ""
        self._started = False  # content or a call was produced: the output no longer starts here
        self._after_call = False  # whitespace here follows a call, so it belongs to that call's block
        self._calls = 0

    def feed(self, delta_text: str) -> list[ToolStreamEvent]:
        return self._events(self._scan(delta_text, final=False))

    def finish(self) -> list[ToolStreamEvent]:
        return self._events(self._scan("", final=True))

    def _events(self, segments: list[str | ToolCall]) -> list[ToolStreamEvent]:
        events: list[ToolStreamEvent] = []
        for segment in segments:
            if isinstance(segment, str):
                events.append(ContentDelta(segment))
            else:
                events.append(ToolCallDelta(self._calls, new_call_id(), segment.name, ""))
                events.append(ToolCallDelta(self._calls, None, None, segment.arguments))
                self._calls += 1
        return events

    def _scan(self, delta_text: str, *, final: bool) -> list[str | ToolCall]:
        text = self._pending + delta_text
        out: list[str | ToolCall] = []
        pos = 0
        while pos < len(text):
            found = self._parser._block_start(text, pos, at_output_start=not self._started)
            if found is None:
                keep = len(text) if final else _before_trailing_space(text, pos, len(text))
                self._text(out, text[pos:keep])
                pos = keep
                break
            start, marker_complete = found
            block = self._parser._parse_block(text, start, final) if marker_complete else incomplete(final)
            if block is None:  # no call here: the marker's first character is plain text
                self._text(out, text[pos : start + 1])
                pos = start + 1
            elif isinstance(block, _Wait):
                keep = _before_trailing_space(text, pos, start)
                self._text(out, text[pos:keep])
                pos = keep
                break
            else:
                self._text(out, text[pos : _before_trailing_space(text, pos, start)])
                out.extend(block.calls)
                self._started = self._after_call = True
                pos = block.end
        self._pending = text[pos:]
        return out

    def _text(self, out: list[str | ToolCall], text: str) -> None:
        if self._after_call:
            text = text.lstrip()
        if text:
            if out and isinstance(out[-1], str):
                out[-1] += text
            else:
                out.append(text)
            self._started = True
            self._after_call = False


def _partial_suffix(text: str, pos: int, marker: str) -> int | None:
    """The index where ``text`` ends in a proper prefix of ``marker`` (at or after ``pos``), if it does."""
    for length in range(min(len(marker) - 1, len(text) - pos), 0, -1):
        if text.endswith(marker[:length]):
            return len(text) - length
    return None


def _before_trailing_space(text: str, pos: int, end: int) -> int:
    """``end`` moved back over the whitespace that precedes it (not past ``pos``)."""
    while end > pos and text[end - 1].isspace():
        end -= 1
    return end


def skip_space(text: str, pos: int) -> int:
    while pos < len(text) and text[pos].isspace():
        pos += 1
    return pos


def is_prefix_at(text: str, pos: int, marker: str) -> bool:
    """Whether ``text`` ends, from ``pos`` on, with a proper prefix of ``marker`` (more text may complete it)."""
    rest = text[pos:]
    return len(rest) < len(marker) and marker.startswith(rest)


#: A string (its closing quote captured when it has one) or a bracket; written so that it never backtracks.
_JSON_TOKEN = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*(")?|[{}\[\]]', re.DOTALL)


def json_end(text: str, start: int) -> int | None:
    """Where the JSON object or array opening at ``text[start]`` closes (one past it); ``None`` if it has not.

    Counts brackets outside strings only; whether the span is valid JSON is for `loads` to say.
    """
    depth = 0
    for match in _JSON_TOKEN.finditer(text, start):
        token = match.group()
        if token[0] == '"':
            if match.group(1) is None:  # a string that has not closed yet
                return None
            continue
        depth += 1 if token in "{[" else -1
        if depth == 0:
            return match.end()
    return None


class _NotJson(ValueError):
    pass


def _finite(number: str) -> float:
    value = float(number)
    if not math.isfinite(value):
        raise _NotJson(number)
    return value


def _no_constant(name: str) -> Any:
    raise _NotJson(name)


def loads(text: str) -> Any:
    """``json.loads`` that refuses what would not re-serialize as JSON; raises ValueError."""
    try:
        return json.loads(text, parse_float=_finite, parse_constant=_no_constant)
    except RecursionError:
        raise _NotJson("nested too deeply") from None


def compact(value: Any) -> str:
    """``value`` as compact JSON, non-ASCII kept (escaped only where a lone surrogate cannot be UTF-8)."""
    dumped = json.dumps(value, ensure_ascii=False, separators=(",", ":"))
    try:
        dumped.encode()
    except UnicodeEncodeError:
        dumped = json.dumps(value, separators=(",", ":"))
    return dumped


def arguments_json(value: Any) -> str | None:
    """A call's arguments as a JSON string: an object, or a string holding one; ``None`` for anything else."""
    try:
        if isinstance(value, str):
            value = loads(value)
        return compact(value) if isinstance(value, dict) else None
    except (ValueError, RecursionError):
        return None


_NAME = re.compile(r"[\w.\-]+")


def is_name(name: object) -> bool:
    """Whether ``name`` can be a function name (letters, digits, ``_``, ``-`` and ``.``)."""
    return isinstance(name, str) and _NAME.fullmatch(name) is not None


def call_from_object(value: Any, argument_keys: tuple[str, ...]) -> ToolCall | None:
    """A `ToolCall` from ``{"name": ..., <argument key>: {...}}``; missing arguments are ``{}``."""
    if not isinstance(value, dict) or not is_name(value.get("name")):
        return None
    key = next((key for key in argument_keys if key in value), None)
    arguments = arguments_json(value[key]) if key is not None else "{}"
    return ToolCall(value["name"], arguments) if arguments is not None else None


def loads_or_none(text: str) -> Any:
    try:
        return loads(text)
    except ValueError:
        return None


def delimited(text: str, pos: int, end_marker: str, final: bool) -> tuple[str, int] | _Wait | None:
    """The text from ``pos`` up to ``end_marker`` and the index after the marker; `WAIT` or ``None`` if absent."""
    end = text.find(end_marker, pos)
    if end < 0:
        return incomplete(final)
    return text[pos:end], end + len(end_marker)


def parse_section(
    text: str,
    start: int,
    final: bool,
    *,
    begin: str,
    ends: tuple[str, ...],
    call_begin: str,
    call_end: str,
    call: re.Pattern[str],
) -> BlockResult:
    """A section of calls: ``begin``, then calls each between ``call_begin`` and ``call_end`` (whitespace
    between them allowed), then one of ``ends``. ``call`` matches a call's whole text, naming its ``name``
    and its ``arguments`` (JSON).

    A section that stops after a complete call without its end is accepted once the output is over: the
    end marker is the model's last word before its end-of-turn token, and a stop can come first.
    """
    pos = start + len(begin)
    calls: list[ToolCall] = []
    while True:
        pos = skip_space(text, pos)
        end = next((end for end in ends if text.startswith(end, pos)), None)
        if end is not None:
            return Block(pos + len(end), tuple(calls)) if calls else None
        if text.startswith(call_begin, pos):
            body = delimited(text, pos + len(call_begin), call_end, final)
            if not isinstance(body, tuple):
                return body
            match = call.fullmatch(body[0])
            arguments = arguments_json(loads_or_none(match["arguments"])) if match is not None else None
            if arguments is None or not is_name(match["name"]):
                return None
            calls.append(ToolCall(match["name"], arguments))
            pos = body[1]
        elif pos == len(text) or any(is_prefix_at(text, pos, marker) for marker in (*ends, call_begin)):
            if not final:
                return WAIT
            return Block(pos, tuple(calls)) if calls else None
        else:
            return None
