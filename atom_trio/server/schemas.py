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

Role = Literal["system", "developer", "user", "assistant"]
#: One prompt as a client may send it: text or token ids.
PromptInput = typing.Union[str, list[int]]
#: A message's content: a string, or text parts joined into one.
MessageContent = typing.NewType("MessageContent", str)


@attrs.frozen(kw_only=True)
class StreamOptions:
    include_usage: bool | None = None
    continuous_usage_stats: bool | None = None


@attrs.frozen(kw_only=True)
class ChatMessage:
    """A message; content parts of type ``text`` are joined, other part types are refused."""

    role: Role
    content: MessageContent | None = None
    name: str | None = None


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
    stop: list[str] | None = None
    stop_token_ids: list[int] | None = None
    include_stop_str_in_output: bool | None = None
    ignore_eos: bool | None = None
    min_tokens: int | None = None
    logit_bias: dict[str, float] | None = None
    skip_special_tokens: bool | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    user: str | None = None


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


@attrs.frozen(kw_only=True)
class TokenizeRequest:
    """``/tokenize`` takes a prompt or chat messages (vLLM's shape)."""

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool | None = None
    add_generation_prompt: bool | None = None
    chat_template_kwargs: dict[str, Any] | None = None


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


def _text_format(value: Any) -> bool:
    return _absent(value) or (isinstance(value, dict) and value.get("type") == "text")


_COMMON_UNSUPPORTED: dict[str, Callable[[Any], bool]] = {
    "best_of": _one_of(1),
    "use_beam_search": _absent,
    "length_penalty": _one_of(1, 1.0),
    "response_format": _text_format,
    "guided_json": _absent,
    "guided_regex": _absent,
    "guided_choice": _absent,
    "guided_grammar": _absent,
    "guided_decoding_backend": _absent,
    "structured_outputs": _absent,
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

UNSUPPORTED: dict[type, dict[str, Callable[[Any], bool]]] = {
    CompletionRequest: {**_COMMON_UNSUPPORTED, "suffix": _absent},
    ChatCompletionRequest: {
        **_COMMON_UNSUPPORTED,
        "tools": _absent,
        "tool_choice": _one_of("none"),
        "parallel_tool_calls": lambda value: True,  # meaningless without tools, which are refused
        "functions": _absent,
        "function_call": _one_of("none"),
        "reasoning_effort": _absent,
        "include_reasoning": _absent,
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


def _stop(value: Any, _: Any) -> list[str] | None:
    if value is None:
        return None
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


def make_converter() -> cattrs.Converter:
    conv = cattrs.Converter(forbid_extra_keys=True)
    for tp in (int, float, str, bool):
        conv.register_structure_hook(tp, _strict(tp))
    conv.register_structure_hook_factory(lambda t: typing.get_origin(t) is list,
                                         _container(list, cattrs.cols.list_structure_factory))
    conv.register_structure_hook_factory(lambda t: typing.get_origin(t) is dict,
                                         _container(dict, cattrs.cols.mapping_structure_factory))
    conv.register_structure_hook_factory(lambda t: typing.get_origin(t) is Literal, _literal)
    conv.register_structure_hook_func(lambda t: t == list[str] | None, _stop)
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
            for key in ("tool_calls", "tool_call_id", "function_call", "audio", "refusal"):
                if isinstance(message, dict) and not _absent(message.get(key)):
                    problems.append((f"messages[{i}].{key}", f"messages[{i}].{key} is not supported by this server"))
            if isinstance(message, dict):
                data["messages"][i] = {k: v for k, v in message.items()
                                       if k not in ("tool_calls", "tool_call_id", "function_call", "audio", "refusal")}
    result = None
    try:
        result = _converter.structure(data, cls)
    except Exception as exc:  # cattrs raises ClassValidationError (an ExceptionGroup) or a plain error
        for line in cattrs.transform_error(exc, path="$", format_exception=_format):
            message, _, path = line.rpartition(" @ ")
            param = _param(path)
            if message.startswith("unrecognized request argument"):
                problems.extend((name, f"unrecognized request argument: {name}") for name in _extra_names(message))
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
