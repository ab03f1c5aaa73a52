"""Hermes-style calls (Hermes 2 Pro, Qwen2.5, Qwen3): a JSON object between ``<tool_call>`` tags.

I'll look that up.
<tool_call>
{"name": "get_weather", "arguments": {"city": "Paris"}}
</tool_call>
<tool_call>
{"name": "get_time", "arguments": {"zone": "CET"}}
</tool_call>
"""

from __future__ import annotations

from .base import (
    Block,
    BlockResult,
    ToolParser,
    call_from_object,
    incomplete,
    is_prefix_at,
    json_end,
    loads_or_none,
    skip_space,
)

START = "<tool_call>"
END = "</tool_call>"


class HermesToolParser(ToolParser):
    markers = (START,)

    def _parse_block(self, text: str, start: int, final: bool) -> BlockResult:
        pos = skip_space(text, start + len(START))
        if pos == len(text):
            return incomplete(final)
        if text[pos] != "{":
            return None
        end = json_end(text, pos)
        if end is None:
            return incomplete(final)
        close = skip_space(text, end)
        if not text.startswith(END, close):
            return incomplete(final) if close == len(text) or is_prefix_at(text, close, END) else None
        # Some models write "parameters", the key of the Llama and OpenAI tool schemas.
        call = call_from_object(loads_or_none(text[pos:end]), ("arguments", "parameters"))
        return Block(close + len(END), (call,)) if call is not None else None
