"""Kimi-K2 calls: a section of calls, each ``functions.NAME:INDEX`` and a JSON object between markers.

    <|tool_calls_section_begin|><|tool_call_begin|>functions.get_weather:0<|tool_call_argument_begin|>{"city": "Paris"}<|tool_call_end|><|tool_call_begin|>functions.get_time:1<|tool_call_argument_begin|>{}<|tool_call_end|><|tool_calls_section_end|>

Kimi's own id (``functions.get_weather:0``) is not unique across turns, so calls get fresh ids like every
other format. The model sometimes writes the section markers in the singular; both are accepted.
"""

from __future__ import annotations

import re

from .base import BlockResult, ToolParser, parse_section

BEGINS = ("<|tool_calls_section_begin|>", "<|tool_call_section_begin|>")
ENDS = ("<|tool_calls_section_end|>", "<|tool_call_section_end|>")
CALL_BEGIN = "<|tool_call_begin|>"
CALL_END = "<|tool_call_end|>"
_CALL = re.compile(
    r"\s*(?:functions\.)?(?P<name>[^\s:<]+):\d+\s*<\|tool_call_argument_begin\|>(?P<arguments>.*)", re.DOTALL
)


class KimiK2ToolParser(ToolParser):
    markers = BEGINS

    def _parse_block(self, text: str, start: int, final: bool) -> BlockResult:
        begin = next(begin for begin in BEGINS if text.startswith(begin, start))
        return parse_section(
            text, start, final, begin=begin, ends=ENDS, call_begin=CALL_BEGIN, call_end=CALL_END, call=_CALL
        )
