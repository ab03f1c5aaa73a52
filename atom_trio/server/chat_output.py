"""A chat choice's generated text as OpenAI's message: ``content``, ``reasoning_content`` and ``tool_calls``.

The text passes through up to two stages, the same way whole and streamed:

1. with ``--reasoning-parser``, the reasoning parser splits the model's
   reasoning (``<think>...</think>``) from the rest;
2. the rest is the content, unless the request has tools: with
   ``tool_choice: "auto"`` the tool parser of ``--tool-call-parser`` finds the
   calls in it; with ``required`` or a named function the rest *is* the calls
   (tool_choice.py), as the grammar made it.

Calls take OpenAI's shape: ``{"id", "type": "function", "function": {"name",
"arguments"}}`` with the arguments as a JSON string; a message with calls and
no other text has ``content: null``, and a choice that made calls and stopped
by itself finishes with ``"tool_calls"``. Streamed, a call's first delta
carries its ``index``, ``id``, ``type`` and name with empty arguments, and the
arguments follow in later deltas of the same index; each call has an index of
its own.
"""

from __future__ import annotations

from typing import Any

import attrs

from ..config import ServerSettings
from .errors import bad_request
from .reasoning import ReasoningParser, ReasoningStream, get_reasoning_parser
from .sampling import tool_choice
from .schemas import ChatCompletionRequest, NamedToolChoice
from .tool_choice import ForcedCallStream
from .tool_parsers import (
    ContentDelta,
    ToolCallDelta,
    ToolCallStream,
    ToolParser,
    ToolStreamEvent,
    get_tool_parser,
    new_call_id,
)


@attrs.frozen
class ChatOutputRules:
    """What one request's choices hold besides content; each choice gets its own `ChoiceOutput`.

    Attributes:
        reasoning: splits reasoning from the answer (``--reasoning-parser``); None keeps it in the content.
        include_reasoning: whether the response carries the reasoning (vLLM's ``include_reasoning``); when
            not, it is dropped, never merged into the content.
        tool_parser: finds calls in the answer (``tool_choice: "auto"``).
        forced: the answer is the calls (``tool_choice: "required"`` or a named function).
        function: a named function's name, when ``forced``.
    """

    reasoning: ReasoningParser | None = None
    include_reasoning: bool = True
    tool_parser: ToolParser | None = None
    forced: bool = False
    function: str | None = None

    def choice(self, prompt: str | None) -> ChoiceOutput:
        """The output of one choice of a request whose rendered prompt is ``prompt``: whether the prompt
        leaves a reasoning block open decides where the output starts."""
        open_at_start = ReasoningParser.open_after(prompt) if self.reasoning is not None and prompt else None
        return ChoiceOutput(self, open_at_start)


def chat_rules(req: ChatCompletionRequest, settings: ServerSettings) -> ChatOutputRules:
    """The rules of a chat request on this server.

    Raises:
        ApiError: 400 naming ``tool_choice`` for ``auto`` (the default with tools) on a server without
            ``--enable-auto-tool-choice`` (vLLM's message): without a parser the calls would stay prose.
    """
    mode = tool_choice(req)
    tool_parser = None
    if mode == "auto":
        if not settings.enable_auto_tool_choice or settings.tool_call_parser is None:
            raise bad_request('"auto" tool choice requires --enable-auto-tool-choice and --tool-call-parser to be '
                              'set (or give tool_choice "required", "none" or a named function)', param="tool_choice")
        tool_parser = get_tool_parser(settings.tool_call_parser)
    return ChatOutputRules(
        reasoning=get_reasoning_parser(settings.reasoning_parser) if settings.reasoning_parser else None,
        include_reasoning=req.include_reasoning is not False,
        tool_parser=tool_parser,
        forced=mode in ("required", "named"),
        function=req.tool_choice.function.name if isinstance(req.tool_choice, NamedToolChoice) else None,
    )


@attrs.frozen
class ChatDelta:
    """What one piece of a choice's text adds to its message."""

    content: str = ""
    reasoning: str = ""
    calls: tuple[ToolCallDelta, ...] = ()

    def then(self, later: ChatDelta) -> ChatDelta:
        return ChatDelta(self.content + later.content, self.reasoning + later.reasoning, self.calls + later.calls)


@attrs.define(eq=False)
class ChoiceOutput:
    """One choice's text through the rules' stages: `message` for a whole text, `feed` / `finish` while it
    streams."""

    rules: ChatOutputRules
    open_at_start: bool | None = None
    made_calls: bool = False
    _reasoning: ReasoningStream | None = attrs.field(default=None, init=False)
    _calls: ForcedCallStream | ToolCallStream | None = attrs.field(default=None, init=False)

    def __attrs_post_init__(self) -> None:
        if self.rules.reasoning is not None:
            self._reasoning = self.rules.reasoning.stream(open_at_start=self.open_at_start)
        if self.rules.forced:
            self._calls = ForcedCallStream(self.rules.function)
        elif self.rules.tool_parser is not None:
            self._calls = self.rules.tool_parser.stream()

    def message(self, text: str) -> dict[str, Any]:
        """The message of a whole text: ``content`` (null when only calls were made), ``reasoning_content``
        (with a reasoning parser) and ``tool_calls`` (when any)."""
        reasoning, content = (self.rules.reasoning.extract(text, open_at_start=self.open_at_start)
                              if self.rules.reasoning else (None, text))
        calls: list[dict[str, Any]] = []
        if isinstance(self._calls, ForcedCallStream):
            calls = _whole_calls(self._calls.feed(content or "") + self._calls.finish())
            content = None
        elif self.rules.tool_parser is not None:
            extracted = self.rules.tool_parser.extract(content or "")
            content = extracted.content
            calls = [_call(new_call_id(), call.name, call.arguments) for call in extracted.calls]
        self.made_calls = bool(calls)
        message: dict[str, Any] = {"role": "assistant", "content": content or (None if calls else "")}
        if self.rules.reasoning is not None and self.rules.include_reasoning:
            message["reasoning_content"] = reasoning
        if calls:
            message["tool_calls"] = calls
        return message

    def feed(self, text: str) -> ChatDelta:
        reasoning, answer = self._reasoning.feed(text) if self._reasoning is not None else ("", text)
        return self._delta(reasoning, self._answer(answer))

    def finish(self) -> ChatDelta:
        """What the stages held back, once the text is complete."""
        reasoning, answer = self._reasoning.finish() if self._reasoning is not None else ("", "")
        events = self._answer(answer)
        if self._calls is not None:
            events += self._calls.finish()
        return self._delta(reasoning, events)

    def _answer(self, text: str | None) -> list[ToolStreamEvent]:
        if not text:
            return []
        return self._calls.feed(text) if self._calls is not None else [ContentDelta(text)]

    def _delta(self, reasoning: str | None, events: list[ToolStreamEvent]) -> ChatDelta:
        content = "".join(event.text for event in events if isinstance(event, ContentDelta))
        calls = tuple(event for event in events if isinstance(event, ToolCallDelta))
        self.made_calls = self.made_calls or bool(calls)
        return ChatDelta(content=content, reasoning=(reasoning or "") if self.rules.include_reasoning else "",
                         calls=calls)


def _call(call_id: str, name: str, arguments: str) -> dict[str, Any]:
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}


def _whole_calls(events: list[ToolCallDelta]) -> list[dict[str, Any]]:
    """Tool-call deltas joined into whole calls."""
    calls: dict[int, dict[str, Any]] = {}
    for event in events:
        if event.name is not None:
            calls[event.index] = _call(event.id or new_call_id(), event.name, "")
        calls[event.index]["function"]["arguments"] += event.arguments
    return list(calls.values())


def delta_calls(events: tuple[ToolCallDelta, ...]) -> list[list[dict[str, Any]]]:
    """Tool-call deltas in OpenAI's streamed shape, grouped so that no group names an index twice (each group
    goes out as one chunk): a call's opening, with empty arguments, is never merged with its arguments."""
    groups: list[list[dict[str, Any]]] = []
    seen: set[int] = set()
    for event in events:
        if event.name is not None:
            rendered = {"index": event.index, "id": event.id, "type": "function",
                        "function": {"name": event.name, "arguments": ""}}
            pieces = [rendered] + ([{"index": event.index, "function": {"arguments": event.arguments}}]
                                   if event.arguments else [])
        else:
            pieces = [{"index": event.index, "function": {"arguments": event.arguments}}]
        for piece in pieces:
            last = groups[-1][-1] if groups else None
            if last is not None and last["index"] == piece["index"] and "id" not in last and "id" not in piece:
                last["function"]["arguments"] += piece["function"]["arguments"]  # two pieces of arguments
                continue
            if not groups or piece["index"] in seen:
                groups.append([])
                seen = set()
            groups[-1].append(piece)
            seen.add(piece["index"])
    return groups
