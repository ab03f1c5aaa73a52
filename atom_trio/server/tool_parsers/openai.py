"""GPT-OSS calls (harmony): a ``commentary`` message addressed to a function, its body the JSON arguments.

    <|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>{"city": "Paris"}<|call|>

The ``openai_gptoss`` reasoning parser passes every call on in this form whatever header the model wrote
(`atom_trio.server.harmony`), so the two are used together, as in vLLM. ``<|call|>`` is a stop token: a
call that ends the output without it is whole once the output is over.
"""

from __future__ import annotations

import re

from .base import Block, BlockResult, ToolCall, ToolParser, arguments_json, incomplete, is_name, loads_or_none

START = "<|channel|>commentary to="
MESSAGE = "<|message|>"
END = "<|call|>"
_HEADER = re.compile(r"(?:functions\.)?(?P<name>[^\s<]+)\s*(?:<\|constrain\|>\s*\w+\s*)?")


class OpenAIToolParser(ToolParser):
    markers = (START,)

    def _parse_block(self, text: str, start: int, final: bool) -> BlockResult:
        body = text.find(MESSAGE, start)
        if body < 0:
            return incomplete(final)
        header = _HEADER.fullmatch(text, start + len(START), body)
        if header is None or not is_name(header["name"]):
            return None
        end = text.find(END, body)
        if end < 0 and not final:
            return incomplete(final)
        arguments = arguments_json(loads_or_none(text[body + len(MESSAGE) : end if end >= 0 else len(text)]))
        if arguments is None:
            return None
        return Block(end + len(END) if end >= 0 else len(text), (ToolCall(header["name"], arguments),))
