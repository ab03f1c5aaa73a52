"""``tool_choice: "required"`` and a named function: tool calls enforced by a grammar, not parsed from prose.

The model is constrained to a JSON schema built from the tools' parameters, so
even a small model that was never taught a tool-call format calls a tool, with
arguments that match its schema. The generated text *is* the calls: no tool
parser reads it.

- A named function: the output is that function's arguments, a value of its
  ``parameters`` schema.
- ``required``: the output is a JSON array of ``{"name": ..., "parameters": ...}``
  objects, each the name of one of the tools and arguments of its schema (an
  ``anyOf`` over the tools); at least one, and at most one unless
  ``parallel_tool_calls``. vLLM builds the same schema.

`ForcedCallStream` turns the output, as it streams, into OpenAI's tool-call
deltas (the call's id and name first, then its arguments in pieces, one index
per call); the whole output goes through it once for a response that is not
streamed, so both shapes carry the same calls. An output cut short by
``max_tokens`` gives the calls as far as they got, with ``finish_reason: "length"``.
"""

from __future__ import annotations

import json
from typing import Any

import attrs

from .errors import bad_request
from .schemas import NamedToolChoice, Tool
from .tool_parsers import ToolCallDelta, new_call_id

#: The arguments schema of a function that declares no parameters: an object, as OpenAI's clients expect.
NO_PARAMETERS: dict[str, Any] = {"type": "object", "properties": {}}
#: Where a schema keeps the definitions its ``$ref`` points at (the 2020-12 name and the draft-07 one).
_DEFINITIONS = ("$defs", "definitions")


def find_tool(tools: list[Tool], choice: NamedToolChoice) -> Tool:
    """The tool a named ``tool_choice`` names; a 400 naming ``tool_choice`` when no tool has that name."""
    for tool in tools:
        if tool.function.name == choice.function.name:
            return tool
    raise bad_request(f"tool_choice names the function {choice.function.name!r}, which is not among the tools",
                      param="tool_choice")


def named_schema(tool: Tool) -> dict[str, Any]:
    """The output of a named ``tool_choice``: the function's arguments."""
    return tool.function.parameters or NO_PARAMETERS


def required_schema(tools: list[Tool], *, parallel: bool) -> dict[str, Any]:
    """The output of ``tool_choice: "required"``: an array of calls, each one tool's name and arguments.

    A schema's ``$ref`` points from the root of the tool's parameters (``#/$defs/X``,
    which pydantic writes); nested in the array the root moves, so the definitions
    move up to the array's root, where the same pointers find them.

    Raises:
        ApiError: 400 naming ``tools`` when two tools define the same name differently.
    """
    definitions: dict[str, dict[str, Any]] = {key: {} for key in _DEFINITIONS}
    variants = []
    for tool in tools:
        parameters = dict(tool.function.parameters or NO_PARAMETERS)
        for key in _DEFINITIONS:
            found = parameters.pop(key, None) or {}
            if not isinstance(found, dict):
                raise bad_request(f"tools: the parameters of {tool.function.name!r} have {key} that is not an "
                                  "object", param="tools")
            for name, definition in found.items():
                if definitions[key].setdefault(name, definition) != definition:
                    raise bad_request(f"tools define {key}.{name} differently; the tools' parameters share one "
                                      f"set of {key} when tool_choice is 'required'", param="tools")
        variants.append({
            "type": "object",
            "properties": {"name": {"type": "string", "enum": [tool.function.name]}, "parameters": parameters},
            "required": ["name", "parameters"],
            "additionalProperties": False,
        })
    schema: dict[str, Any] = {"type": "array", "minItems": 1, "items": {"anyOf": variants}}
    if not parallel:
        schema["maxItems"] = 1
    schema.update({key: found for key, found in definitions.items() if found})
    return schema


@attrs.define(eq=False)
class ForcedCallStream:
    """The tool calls in a forced choice's output, as deltas while it streams.

    ``function`` names the one function of a named choice (the output is its
    arguments); None reads ``required``'s array of calls. Feed it the output's
    text in pieces of any size, then `finish`.
    """

    function: str | None
    _started: bool = False
    _scanner: _CallArrayScanner = attrs.Factory(lambda: _CallArrayScanner())

    def feed(self, text: str) -> list[ToolCallDelta]:
        if self.function is None:
            return self._scanner.feed(text)
        events = []
        if not self._started:
            self._started = True
            events.append(ToolCallDelta(index=0, id=new_call_id(), name=self.function, arguments=""))
        if text:
            events.append(ToolCallDelta(index=0, id=None, name=None, arguments=text))
        return events

    def finish(self) -> list[ToolCallDelta]:
        return self.feed("") if self.function is not None and not self._started else []


@attrs.define(eq=False)
class _CallArrayScanner:
    """Reads ``[{"name": "f", "parameters": {...}}, ...]`` a character at a time, as it arrives.

    It follows only what it needs: the nesting depth, whether it is inside a
    string, and at the depth of a call's object, which key's value comes next.
    A call opens (id and name) once its name is whole; the raw text of its
    ``parameters`` value streams as the arguments, held back until the name
    is known if the parameters come first.
    """

    _depth: int = 0
    _in_string: bool = False
    _escaped: bool = False
    _index: int = -1
    _key: str | None = None  # the key whose value comes next in the current call's object
    _token: list[str] = attrs.Factory(list)  # a key or a name being read, quotes included
    _reading: str | None = None  # "key" or "name" while reading one; "parameters" while its value streams
    _name: str | None = None
    _arguments: list[str] = attrs.Factory(list)  # the current call's arguments not yet sent
    _events: list[ToolCallDelta] = attrs.Factory(list)

    def feed(self, text: str) -> list[ToolCallDelta]:
        for char in text:
            self._char(char)
        self._flush()
        events, self._events = self._events, []
        return events

    def _flush(self) -> None:
        """Send the current call's arguments so far, once its name has opened it."""
        if self._name is not None and self._arguments:
            self._events.append(ToolCallDelta(index=self._index, id=None, name=None,
                                              arguments="".join(self._arguments)))
            self._arguments.clear()

    def _char(self, char: str) -> None:
        if self._reading == "parameters":
            self._parameters_char(char)
            return
        if self._in_string:
            self._token.append(char)
            if self._string_char(char):
                self._string_done()
            return
        if self._depth == 2 and self._key == "parameters" and not char.isspace() and char != ":":
            self._reading = "parameters"  # the value's first character: from here on it is the arguments
            self._parameters_char(char)
            return
        if char == '"':
            self._in_string = True
            self._token = [char]
            self._reading = "key" if self._key is None else "name" if self._key == "name" else None
        elif char in "[{":
            self._depth += 1
            if self._depth == 2:  # a new call
                self._flush()
                self._index += 1
                self._key, self._name = None, None
                self._arguments.clear()
        elif char in "]}":
            self._depth -= 1
        elif char == "," and self._depth == 2:
            self._key = None

    def _string_char(self, char: str) -> bool:
        """Follow one character inside a string; whether it closed the string."""
        if self._escaped:
            self._escaped = False
        elif char == "\\":
            self._escaped = True
        elif char == '"':
            self._in_string = False
            return True
        return False

    def _string_done(self) -> None:
        if self._reading == "key":
            self._key = json.loads("".join(self._token))
        elif self._reading == "name":
            self._name = json.loads("".join(self._token))
            self._events.append(ToolCallDelta(index=self._index, id=new_call_id(), name=self._name, arguments=""))
        self._reading = None

    def _parameters_char(self, char: str) -> None:
        """One character of the parameters value; the value ends where its nesting closes (or, for a scalar, at
        the comma or brace after it)."""
        if self._in_string:
            self._string_char(char)
        elif char == '"':
            self._in_string = True
        elif char in "[{":
            self._depth += 1
        elif char in "]}" and self._depth > 2:
            self._depth -= 1
        elif char in ",}" and self._depth == 2:  # the end of a scalar value: the character belongs to the object
            self._reading, self._key = None, None
            self._char(char)
            return
        self._arguments.append(char)
        if self._depth == 2 and not self._in_string and char in "]}\"":  # a container or a string just closed
            self._reading, self._key = None, "done"
