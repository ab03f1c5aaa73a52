"""Llama 3.x JSON calls: ``{"name": ..., "parameters": {...}}`` as the whole reply, or after ``<|python_tag|>``.

Llama 3.1's template asks for the JSON object alone, so a bare ``{`` opens calls only at the start of the
output (a JSON object later in prose is prose); ``<|python_tag|>`` opens them anywhere. Several calls are
separated by ``;``. An object at the start that is not a call (``{"answer": 42}``) stays content.

    <|python_tag|>{"name": "get_weather", "parameters": {"city": "Paris"}}; {"name": "get_time", "parameters": {}}
"""

from __future__ import annotations

from .base import (
    WAIT,
    Block,
    BlockResult,
    ToolCall,
    ToolParser,
    call_from_object,
    incomplete,
    json_end,
    loads_or_none,
    skip_space,
)

PYTHON_TAG = "<|python_tag|>"


class Llama3JsonToolParser(ToolParser):
    markers = (PYTHON_TAG,)

    def _block_start(self, text: str, pos: int, at_output_start: bool) -> tuple[int, bool] | None:
        if at_output_start:
            first = skip_space(text, pos)
            if first < len(text) and text[first] == "{":
                return first, True
        return super()._block_start(text, pos, at_output_start)

    def _parse_block(self, text: str, start: int, final: bool) -> BlockResult:
        pos = start + len(PYTHON_TAG) if text.startswith(PYTHON_TAG, start) else start
        calls: list[ToolCall] = []
        while True:  # one object, then another after each ";"
            pos = skip_space(text, pos)
            if pos == len(text):
                if not final:
                    return WAIT
                return Block(pos, tuple(calls)) if calls else None  # a trailing ";" is harmless
            if text[pos] != "{":
                return None
            end = json_end(text, pos)
            if end is None:
                return incomplete(final)
            call = call_from_object(loads_or_none(text[pos:end]), ("parameters", "arguments"))
            if call is None:
                return None
            calls.append(call)
            after = skip_space(text, end)
            if after == len(text) and not final:
                return WAIT  # a ";" and another call may follow
            if after == len(text) or text[after] != ";":
                return Block(end, tuple(calls))
            pos = after + 1
