"""GLM-4.5 calls: the name, then each argument as a key tag and a value tag, between ``<tool_call>`` tags.

    <tool_call>get_weather
    <arg_key>city</arg_key>
    <arg_value>Paris</arg_value>
    <arg_key>days</arg_key>
    <arg_value>3</arg_value>
    </tool_call>

GLM's template writes string values raw and every other value as JSON, so a value that parses as JSON
keeps its type (``3`` is a number) and any other is a string. GLM-4.6 and 4.7 write the same tags, with
or without the newlines.
"""

from __future__ import annotations

import re

from .base import Block, BlockResult, ToolCall, ToolParser, arguments_json, delimited, is_name, loads

START = "<tool_call>"
END = "</tool_call>"
_NAME = re.compile(r"\s*([^\s<]+)")
_ARGUMENT = re.compile(r"\s*<arg_key>(.*?)</arg_key>\s*<arg_value>(.*?)</arg_value>", re.DOTALL)


def _value(text: str) -> object:
    try:
        return loads(text)
    except ValueError:
        return text


def _call(body: str) -> ToolCall | None:
    name = _NAME.match(body)
    if name is None or not is_name(name[1]):
        return None
    arguments = {}
    pos = name.end()
    while (argument := _ARGUMENT.match(body, pos)) is not None:
        arguments[argument[1].strip()] = _value(argument[2])
        pos = argument.end()
    encoded = arguments_json(arguments)
    if body[pos:].strip() or encoded is None:
        return None
    return ToolCall(name[1], encoded)


class Glm45ToolParser(ToolParser):
    markers = (START,)

    def _parse_block(self, text: str, start: int, final: bool) -> BlockResult:
        body = delimited(text, start + len(START), END, final)
        if not isinstance(body, tuple):
            return body
        call = _call(body[0])
        return Block(body[1], (call,)) if call is not None else None
