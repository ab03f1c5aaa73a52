"""Mistral calls after ``[TOOL_CALLS]``, in either of the two forms its tokenizers use.

Before tokenizer v11 (Mistral 7B v0.3, Mixtral 8x22B, Mistral Nemo) one marker opens a JSON list::

    [TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Paris"}}, {"name": "get_time", "arguments": {}}]

From v11 on (Mistral Small 3.2, Magistral, Devstral) each call has its own marker, then the name, then
``[ARGS]`` (absent from text decoded without special tokens) and the arguments object::

    [TOOL_CALLS]get_weather[ARGS]{"city": "Paris"}[TOOL_CALLS]get_time[ARGS]{}
"""

from __future__ import annotations

from .base import (
    Block,
    BlockResult,
    ToolCall,
    ToolParser,
    arguments_json,
    call_from_object,
    incomplete,
    is_name,
    is_prefix_at,
    json_end,
    loads_or_none,
    skip_space,
)

START = "[TOOL_CALLS]"
ARGS = "[ARGS]"


class MistralToolParser(ToolParser):
    markers = (START,)

    def _parse_block(self, text: str, start: int, final: bool) -> BlockResult:
        pos = skip_space(text, start + len(START))
        if pos == len(text):
            return incomplete(final)
        if text[pos] == "[" and not text.startswith(ARGS, pos) and not is_prefix_at(text, pos, ARGS):
            return self._json_list(text, pos, final)
        name_end = pos
        while name_end < len(text) and is_name(text[name_end]):
            name_end += 1
        args = name_end + len(ARGS) if text.startswith(ARGS, name_end) else name_end
        if args == len(text) or is_prefix_at(text, args, ARGS):
            return incomplete(final)
        name = text[pos:name_end]
        if text[args] != "{" or not is_name(name):
            return None
        end = json_end(text, args)
        if end is None:
            return incomplete(final)
        arguments = arguments_json(loads_or_none(text[args:end]))
        return Block(end, (ToolCall(name, arguments),)) if arguments is not None else None

    def _json_list(self, text: str, pos: int, final: bool) -> BlockResult:
        end = json_end(text, pos)
        if end is None:
            return incomplete(final)
        items = loads_or_none(text[pos:end])
        if not isinstance(items, list) or not items:
            return None
        calls = [call_from_object(item, ("arguments",)) for item in items]
        return Block(end, tuple(calls)) if None not in calls else None  # type: ignore[arg-type]
