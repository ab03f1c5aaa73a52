"""DeepSeek-V3 calls, as its chat template writes them: a section of calls, each a name and a fenced JSON block.

    <｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>get_weather
    ```json
    {"city": "Paris"}
    ```<｜tool▁call▁end｜>
    <｜tool▁call▁begin｜>function<｜tool▁sep｜>get_time
    ```json
    {}
    ```<｜tool▁call▁end｜><｜tool▁calls▁end｜>

(The bars and the separator in the markers are the full-width ``｜`` and ``▁`` of DeepSeek's vocabulary.)
"""

from __future__ import annotations

import re

from .base import BlockResult, ToolParser, parse_section

BEGIN = "<｜tool▁calls▁begin｜>"
END = "<｜tool▁calls▁end｜>"
CALL_BEGIN = "<｜tool▁call▁begin｜>"
CALL_END = "<｜tool▁call▁end｜>"
_CALL = re.compile(r"function<｜tool▁sep｜>(?P<name>\S+)[ \t]*\n```(?:json)?\n(?P<arguments>.*)\n```\s*", re.DOTALL)


class DeepSeekV3ToolParser(ToolParser):
    markers = (BEGIN,)

    def _parse_block(self, text: str, start: int, final: bool) -> BlockResult:
        return parse_section(
            text, start, final, begin=BEGIN, ends=(END,), call_begin=CALL_BEGIN, call_end=CALL_END, call=_CALL
        )
