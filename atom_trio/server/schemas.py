"""Request bodies of the OpenAI-compatible API: attrs classes structured by a strict cattrs converter.

cattrs is lax by default (``"5"`` becomes 5, ``"no"`` becomes True); the hooks
here accept a JSON value only when its JSON type is the declared one, and
``detailed_validation`` collects *every* problem so one 400 lists them all.

Fields of the OpenAI (and vLLM) API that atom_trio does not implement are not
declared on the classes: a request that sets one to anything but its neutral
value is refused naming it (`UNSUPPORTED`), and a field nobody defines is
refused as unrecognized, as OpenAI itself does. Nothing is ignored silently.

A body comes in as bytes and leaves as a request class through `read_request`:
a small one is decoded and structured on the event loop, a large one in the
engine's `python_lane` worker thread (json_body.py says why and how), so no
body, whatever its size or shape, holds the event loop for more than a few
milliseconds. A chat's messages are counted before anything else is done with
them (`MAX_CHAT_MESSAGES`).
"""

from __future__ import annotations

import json
import types
import typing
from collections.abc import Callable
from typing import Any, Literal, TypeVar

import attrs
import cattrs
import cattrs.cols
import trio
from cattrs.errors import ForbiddenExtraKeysError

from ..engine.input_processor import MAX_CHAT_MESSAGES, python_lane
from . import json_body
from .errors import ApiError, bad_request

T = TypeVar("T")

Role = Literal["system", "developer", "user", "assistant", "tool"]
#: One prompt as a client may send it: text or token ids.
PromptInput = typing.Union[str, list[int]]
#: A message's content: a string, or text parts joined into one.
MessageContent = typing.NewType("MessageContent", str)
#: ``stop``: a string or a list of strings, as a list.
StopStrings = typing.NewType("StopStrings", list)
#: A JSON schema given as an object or as its JSON text (vLLM's ``guided_json``, ``structured_outputs.json``).
JsonSchema = dict[str, Any] | str
#: OpenAI's ``reasoning_effort`` values; only a chat template that reads the variable gives them meaning.
ReasoningEffort = Literal["none", "minimal", "low", "medium", "high", "xhigh", "max"]


@attrs.frozen(kw_only=True)
class StreamOptions:
    include_usage: bool | None = None
    continuous_usage_stats: bool | None = None


@attrs.frozen(kw_only=True)
class FunctionCall:
    """A call an assistant made: the function's name and its arguments as a JSON object's text."""

    name: str
    arguments: str


@attrs.frozen(kw_only=True)
class ToolCall:
    """One of an assistant message's ``tool_calls``, as OpenAI returned it."""

    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCall


@attrs.frozen(kw_only=True)
class ChatMessage:
    """A message; content parts of type ``text`` are joined, other part types are refused.

    An assistant message may carry the ``tool_calls`` it made (its content then
    may be null) and the ``reasoning_content`` it returned; a ``tool`` message
    carries a call's result and the ``tool_call_id`` it answers.
    """

    role: Role
    content: MessageContent | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None
    reasoning_content: str | None = None


@attrs.frozen(kw_only=True)
class FunctionDefinition:
    """A function the model may call; ``parameters`` is the JSON schema of its arguments (an object)."""

    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


@attrs.frozen(kw_only=True)
class Tool:
    type: Literal["function"]
    function: FunctionDefinition


@attrs.frozen(kw_only=True)
class FunctionName:
    name: str


@attrs.frozen(kw_only=True)
class NamedToolChoice:
    """``tool_choice`` naming the one function the model must call."""

    type: Literal["function"]
    function: FunctionName


#: ``tool_choice``: a mode, or the function to call.
ToolChoice = Literal["none", "auto", "required"] | NamedToolChoice


@attrs.frozen(kw_only=True)
class JsonSchemaFormat:
    """``response_format.json_schema``: the schema the output must match (enforced whatever ``strict`` says)."""

    name: str
    description: str | None = None
    schema: dict[str, Any] | None = None
    strict: bool | None = None


@attrs.frozen(kw_only=True)
class ResponseFormat:
    """OpenAI's ``response_format``: plain text, any JSON object, or JSON matching a schema."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


@attrs.frozen(kw_only=True)
class StructuredOutputs:
    """vLLM's ``structured_outputs``: exactly one of a JSON schema, any JSON object, a regex, a choice or an EBNF
    grammar."""

    json: JsonSchema | None = None
    json_object: bool | None = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None


@attrs.frozen(kw_only=True)
class SamplingFields:
    """Fields both generation APIs share. ``None`` means "the default"."""

    model: str | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None
    seed: int | None = None
    n: int | None = None
    stop: StopStrings | None = None
    stop_token_ids: list[int] | None = None
    include_stop_str_in_output: bool | None = None
    ignore_eos: bool | None = None
    min_tokens: int | None = None
    logit_bias: dict[str, float] | None = None
    skip_special_tokens: bool | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    user: str | None = None
    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputs | None = None
    guided_json: JsonSchema | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None


@attrs.frozen(kw_only=True)
class CompletionRequest(SamplingFields):
    prompt: list[PromptInput]
    echo: bool | None = None
    logprobs: int | None = None
    prompt_logprobs: int | None = None


@attrs.frozen(kw_only=True)
class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage]
    max_completion_tokens: int | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None
    add_generation_prompt: bool | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    tools: list[Tool] | None = None
    tool_choice: ToolChoice | None = None
    parallel_tool_calls: bool | None = None
    reasoning_effort: ReasoningEffort | None = None
    include_reasoning: bool | None = None


@attrs.frozen(kw_only=True)
class TokenizeRequest:
    """``/tokenize`` takes a prompt or chat messages (vLLM's shape)."""

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool | None = None
    add_generation_prompt: bool | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    tools: list[Tool] | None = None


@attrs.frozen(kw_only=True)
class DetokenizeRequest:
    model: str | None = None
    tokens: list[int]


# ---------------------------------------------------------------------------
# Fields we know but do not implement: name -> "is this value harmless?"

def _absent(value: Any) -> bool:
    return value is None or value is False or value == [] or value == {} or value == ""


def _one_of(*allowed: Any) -> Callable[[Any], bool]:
    return lambda value: _absent(value) or value in allowed


_COMMON_UNSUPPORTED: dict[str, Callable[[Any], bool]] = {
    "best_of": _one_of(1),
    "use_beam_search": _absent,
    "length_penalty": _one_of(1, 1.0),
    "guided_decoding_backend": _absent,
    "logits_processors": _absent,
    "allowed_token_ids": _absent,
    "bad_words": _absent,
    "truncate_prompt_tokens": _absent,
    "prompt_embeds": _absent,
    "priority": _one_of(0),
    "return_tokens_as_token_ids": _absent,
    "spaces_between_special_tokens": _one_of(True),
    "cache_salt": _absent,
    "kv_transfer_params": _absent,
    "vllm_xargs": _absent,
    "request_id": _absent,
    "add_special_tokens": _absent,
    "metadata": _absent,
    "store": _absent,
    "service_tier": _one_of("auto", "default"),
}

#: Message fields of OpenAI's that atom_trio does not implement, accepted only when absent or null.
_UNSUPPORTED_MESSAGE_FIELDS = ("function_call", "audio", "refusal")

UNSUPPORTED: dict[type, dict[str, Callable[[Any], bool]]] = {
    CompletionRequest: {**_COMMON_UNSUPPORTED, "suffix": _absent},
    ChatCompletionRequest: {
        **_COMMON_UNSUPPORTED,
        "functions": _absent,
        "function_call": _one_of("none"),
        "modalities": _one_of(["text"]),
        "audio": _absent,
        "prediction": _absent,
        "web_search_options": _absent,
        "continue_final_message": _absent,
        "documents": _absent,
        "chat_template": _absent,
        "mm_processor_kwargs": _absent,
        "echo": _absent,
        "prompt_logprobs": _absent,
    },
}


# ---------------------------------------------------------------------------
# The converter

def _strict(tp: type) -> Callable[[Any, Any], Any]:
    def hook(value: Any, _: Any) -> Any:
        # bool is an int subclass in Python but not in JSON; an int is a fine float.
        if type(value) is tp or (tp is float and type(value) is int):
            return value
        raise TypeError(f"expected {_json_type(tp)}, got {_json_type(type(value))}")

    return hook


def _json_type(tp: type) -> str:
    return {int: "integer", float: "number", str: "string", bool: "boolean", list: "array", dict: "object"}.get(
        tp, "null" if tp is type(None) else tp.__name__
    )


def _literal(tp: Any, _: Any = None) -> Callable[[Any, Any], Any]:
    allowed = typing.get_args(tp)

    def hook(value: Any, _: Any) -> Any:
        if value in allowed and type(value) is str:
            return value
        raise ValueError(f"must be one of {', '.join(map(repr, allowed))}, got {value!r}")

    return hook


def _stop(value: Any, _: Any) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and all(isinstance(s, str) for s in value):
        return value
    raise TypeError("expected a string or an array of strings")


def _is_token_ids(value: Any) -> bool:
    return isinstance(value, list) and all(type(t) is int for t in value)


def _prompt(value: Any, _: Any) -> list[str | list[int]]:
    """OpenAI's four prompt shapes, normalised to a list of prompts."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and value:
        if all(isinstance(p, str) for p in value):
            return value
        if _is_token_ids(value):
            return [value]
        if all(_is_token_ids(p) and p for p in value):
            return value
    raise TypeError("expected a non-empty string, array of strings, array of token ids or array of token-id arrays")


def _content(value: Any, _: Any) -> str | None:
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, list):
        texts = []
        for i, part in enumerate(value):
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise ValueError(f"content part {i} of type {kind!r} is not supported (only 'text' parts are)")
            texts.append(part["text"])
        return "\n".join(texts)
    raise TypeError("expected a string or an array of content parts")


def _container(json_kind: type, factory: Callable[..., Any]) -> Callable[[Any, cattrs.Converter], Any]:
    """cattrs' list/dict hook, but only for a JSON array/object (cattrs would iterate a string)."""

    def make(tp: Any, conv: cattrs.Converter) -> Callable[[Any, Any], Any]:
        inner = factory(tp, conv)

        def hook(value: Any, t: Any) -> Any:
            if type(value) is not json_kind:
                raise TypeError(f"expected {_json_type(json_kind)}, got {_json_type(type(value))}")
            return inner(value, t)

        return hook

    return make


def _json_kind(tp: Any) -> type:
    """The JSON type whose values structure into ``tp``: an attrs class or a dict from an object, and so on."""
    if attrs.has(tp) or typing.get_origin(tp) is dict:
        return dict
    if typing.get_origin(tp) is Literal:
        return str
    return typing.get_origin(tp) or tp


def _is_json_union(tp: Any) -> bool:
    """A union of two or more types of different JSON kinds (besides null), which cattrs cannot tell apart."""
    if typing.get_origin(tp) not in (typing.Union, types.UnionType):
        return False
    members = [arg for arg in typing.get_args(tp) if arg is not type(None)]
    return len(members) > 1 and len({_json_kind(arg) for arg in members}) == len(members)


def _json_union(tp: Any, conv: cattrs.Converter) -> Callable[[Any, Any], Any]:
    """Structure into the member whose JSON kind is the value's (``str | dict``, ``Literal[...] | SomeClass``)."""
    members = {_json_kind(arg): arg for arg in typing.get_args(tp)}

    def hook(value: Any, _: Any) -> Any:
        kind = type(value) if type(value) in members else None
        if kind is None and type(value) is int and float in members:
            kind = float
        if kind is None:
            raise TypeError(f"expected {' or '.join(_json_type(k) for k in members)}, got {_json_type(type(value))}")
        return value if kind is type(None) else conv.structure(value, members[kind])

    return hook


def make_converter() -> cattrs.Converter:
    conv = cattrs.Converter(forbid_extra_keys=True)
    for tp in (int, float, str, bool):
        conv.register_structure_hook(tp, _strict(tp))
    conv.register_structure_hook_factory(lambda t: typing.get_origin(t) is list,
                                         _container(list, cattrs.cols.list_structure_factory))
    conv.register_structure_hook_factory(lambda t: typing.get_origin(t) is dict,
                                         _container(dict, cattrs.cols.mapping_structure_factory))
    conv.register_structure_hook_factory(lambda t: typing.get_origin(t) is Literal, _literal)
    conv.register_structure_hook_factory(_is_json_union, _json_union)
    conv.register_structure_hook(StopStrings, _stop)
    conv.register_structure_hook_func(lambda t: t == list[PromptInput], _prompt)
    conv.register_structure_hook_func(lambda t: t == MessageContent | None, _content)
    return conv


_converter = make_converter()


def _format(exc: BaseException, _type: Any) -> str:
    if isinstance(exc, KeyError):
        return "required field missing"
    if isinstance(exc, ForbiddenExtraKeysError):
        return "unrecognized request argument(s): " + ", ".join(sorted(exc.extra_fields))
    if isinstance(exc, (TypeError, ValueError)) and str(exc):
        return str(exc)
    return cattrs.v.format_exception(exc, _type)


def _param(path: str) -> str | None:
    """``$.messages[1].content`` -> ``messages[1].content``; the top-level object -> None."""
    return path[2:] if path.startswith("$.") else None


def structure(cls: type[T], data: Any) -> T:
    """Structure a decoded JSON body into ``cls``, or raise one `ApiError` 400 listing every problem."""
    if not isinstance(data, dict):
        raise bad_request(f"the request body must be a JSON object, got {_json_type(type(data))}")
    messages = data.get("messages")
    if isinstance(messages, list) and len(messages) > MAX_CHAT_MESSAGES:
        raise bad_request(_too_many_messages(len(messages)), param="messages")
    problems: list[tuple[str | None, str]] = []
    checks = UNSUPPORTED.get(cls, {})
    data = dict(data)
    for name in [k for k in data if k in checks]:
        value = data.pop(name)
        if not checks[name](value):
            problems.append((name, f"{name}={json.dumps(value)[:80]} is not supported by this server"))
    if isinstance(data.get("messages"), list):
        for i, message in enumerate(data["messages"]):
            for key in _UNSUPPORTED_MESSAGE_FIELDS:
                if isinstance(message, dict) and not _absent(message.get(key)):
                    problems.append((f"messages[{i}].{key}", f"messages[{i}].{key} is not supported by this server"))
            if isinstance(message, dict):
                data["messages"][i] = {k: v for k, v in message.items() if k not in _UNSUPPORTED_MESSAGE_FIELDS}
    result = None
    try:
        result = _converter.structure(data, cls)
    except Exception as exc:  # cattrs raises ClassValidationError (an ExceptionGroup) or a plain error
        for line in cattrs.transform_error(exc, path="$", format_exception=_format):
            message, _, path = line.rpartition(" @ ")
            param = _param(path)
            if message.startswith("unrecognized request argument"):  # named with its object's path, if nested
                names = [f"{param}.{name}" if param else name for name in _extra_names(message)]
                problems.extend((name, f"unrecognized request argument: {name}") for name in names)
            else:
                problems.append((param, f"{param or 'body'}: {message}"))
    if problems:
        first = problems[0][0]
        if len(problems) == 1:
            raise bad_request(problems[0][1], param=first)
        raise bad_request(f"{len(problems)} problems in the request: " + "; ".join(m for _, m in problems), param=first)
    assert result is not None
    return result


def _extra_names(message: str) -> list[str]:
    return message.split(": ", 1)[1].split(", ")


def _too_many_messages(count: int | None = None) -> str:
    return f"messages may have at most {MAX_CHAT_MESSAGES} items" + (f", not {count}" if count is not None else "")


async def read_request(cls: type[T], body: bytes) -> T:
    """The body decoded and structured into ``cls``, off the event loop unless it is small.

    Raises:
        ApiError: 400 for a body that is not JSON this server takes or not a valid ``cls`` (every problem listed).
    """
    if json_body.fits_inline(body):
        return _read_request(cls, body)
    return await trio.to_thread.run_sync(
        _read_request, cls, body, limiter=python_lane(), thread_name="atom-trio read request"
    )


def _read_request(cls: type[T], body: bytes) -> T:
    return structure(cls, parse_json(body))


def parse_json(body: bytes) -> Any:
    """The JSON document in ``body``; an oversized ``messages`` array is refused before the rest is decoded.

    Raises:
        ApiError: 400 (``invalid_json``) with where and why.
    """
    try:
        return json_body.decode(body, limits={"messages": MAX_CHAT_MESSAGES})
    except json_body.TooManyItems:
        raise bad_request(_too_many_messages(), param="messages") from None
    except json_body.BodyError as exc:
        raise ApiError(400, f"the request body is not valid JSON: {exc}", code="invalid_json") from None
