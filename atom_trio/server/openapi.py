"""``GET /openapi.json``: an OpenAPI 3.1 document of the API, generated from the request classes.

The request bodies are the attrs classes of schemas.py, so their JSON Schemas
are derived by walking those classes' fields and types, never written by hand:
a field added to a class is in the document at once, with the type the strict
converter enforces. Three types are structured by hooks of their own (a
``stop`` that may be one string, OpenAI's four prompt shapes, a message
content that may be text parts); `_HOOKED` gives each the schema of what its
hook accepts. A union of different JSON types (``tool_choice``: a mode or an
object) is an ``anyOf`` of its members, as its hook dispatches on the JSON type. So a body the document refuses, the server refuses too (the
reliability suite's schemathesis run checks it). The document says nothing of
ranges (a temperature of 500 is a valid number here and a 400 there), and
leaves out the fields the server knows but does not implement
(`schemas.UNSUPPORTED`): they are accepted only at their neutral values, and a
document listing them would invite clients to send them.

The document exists so that generic tools can drive the API: client
generators, and the reliability suite's schemathesis run, which fuzzes every
operation from it.
"""

from __future__ import annotations

import functools
import types
import typing
from collections.abc import Callable
from typing import Any, Literal

import attrs
from quart import Blueprint

from .. import __version__
from . import schemas
from .schemas import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    MessageContent,
    PromptInput,
    StopStrings,
    TokenizeRequest,
)

_NULL = {"type": "null"}
_TOKEN_IDS = {"type": "array", "items": {"type": "integer"}, "minItems": 1}

_HOOKED: dict[Any, dict[str, Any]] = {
    StopStrings: {"anyOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}}]},
    list[PromptInput]: {
        "description": "A string, an array of strings, an array of token ids or an array of token-id arrays.",
        "anyOf": [
            {"type": "string"},
            {"type": "array", "items": {"type": "string"}, "minItems": 1},
            _TOKEN_IDS,
            {"type": "array", "items": _TOKEN_IDS, "minItems": 1},
        ],
    },
    MessageContent: {
        "description": "Text, or an array of text parts (joined with newlines).",
        "anyOf": [
            {"type": "string"},
            {"type": "array", "items": {
                "type": "object", "required": ["type", "text"],
                "properties": {"type": {"const": "text"}, "text": {"type": "string"}},
            }},
        ],
    },
}
"""The types `schemas.make_converter` structures with hooks of its own, as the JSON their hooks accept."""

_PLAIN = {int: "integer", float: "number", str: "string", bool: "boolean", type(None): "null"}


def type_schema(tp: Any, components: dict[str, Any]) -> dict[str, Any]:
    """The JSON Schema of values the strict converter structures into ``tp``; attrs classes go into ``components``."""
    if tp in _HOOKED:
        return _HOOKED[tp]
    if tp is Any:
        return {}
    if tp in _PLAIN:
        return {"type": _PLAIN[tp]}
    if attrs.has(tp):
        if tp.__name__ not in components:
            components[tp.__name__] = {}  # reserved first: a class may refer to itself
            components[tp.__name__] = class_schema(tp, components)
        return {"$ref": f"#/components/schemas/{tp.__name__}"}
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Literal:
        return {"type": "string", "enum": list(args)}
    if origin in (typing.Union, types.UnionType):
        return {"anyOf": [type_schema(arg, components) for arg in args]}
    if origin is list:
        return {"type": "array", "items": type_schema(args[0], components)}
    if origin is dict:
        return {"type": "object", "additionalProperties": type_schema(args[1], components)}
    raise TypeError(f"no JSON Schema for {tp!r}")


def class_schema(cls: type, components: dict[str, Any]) -> dict[str, Any]:
    """An object with one property per attrs field; unknown properties are refused, as the converter does."""
    hints = typing.get_type_hints(cls, vars(schemas))
    fields = attrs.fields(cls)
    schema: dict[str, Any] = {
        "type": "object",
        "properties": {f.name: type_schema(hints[f.name], components) for f in fields},
        "additionalProperties": False,
    }
    required = [f.name for f in fields if f.default is attrs.NOTHING]
    if required:
        schema["required"] = required
    if cls.__doc__:
        schema["description"] = cls.__doc__.strip().split("\n\n")[0]
    return schema


_ERROR = {
    "type": "object",
    "required": ["error"],
    "properties": {"error": {
        "type": "object",
        "required": ["message", "type", "param", "code"],
        "properties": {
            "message": {"type": "string"},
            "type": {"type": "string"},
            "param": {"type": ["string", "null"]},
            "code": {"type": ["string", "null"]},
        },
    }},
}
"""OpenAI's error envelope (`errors.ApiError.body`), which every error answer carries."""

# (method, path, request class, success content types, summary)
_OPERATIONS: tuple[tuple[str, str, type | None, tuple[str, ...], str], ...] = (
    ("post", "/v1/completions", CompletionRequest, ("application/json", "text/event-stream"),
     "Complete one or more prompts (streamed as server-sent events with `stream`)."),
    ("post", "/v1/chat/completions", ChatCompletionRequest, ("application/json", "text/event-stream"),
     "Answer a conversation through the model's chat template (streamed with `stream`)."),
    ("get", "/v1/models", None, ("application/json",), "The served model."),
    ("post", "/tokenize", TokenizeRequest, ("application/json",),
     "Token ids of a prompt or of chat messages rendered through the chat template."),
    ("post", "/detokenize", DetokenizeRequest, ("application/json",), "The text of token ids."),
    ("get", "/tokenizer_info", None, ("application/json",),
     "The tokenizer's configuration (special tokens, class) and chat template, as vLLM serves them."),
    ("get", "/health", None, (), "200 (no body) while the engine runs, 503 otherwise."),
    ("get", "/version", None, ("application/json",), "The server's version."),
    ("get", "/metrics", None, ("text/plain",), "Prometheus metrics."),
)


def _operation(path: str, request_class: type | None, content_types: tuple[str, ...], summary: str,
               components: dict[str, Any], guarded: bool) -> dict[str, Any]:
    ok: dict[str, Any] = {"description": "Success."}
    if content_types:
        ok["content"] = {t: {} for t in content_types}
    operation: dict[str, Any] = {
        "summary": summary,
        "operationId": path.strip("/").replace("/", "_"),
        "responses": {
            "200": ok,
            "default": {"description": "An error in OpenAI's envelope.",
                        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}},
        },
    }
    if request_class is not None:
        operation["requestBody"] = {"required": True, "content": {
            "application/json": {"schema": type_schema(request_class, components)}}}
    if guarded:
        operation["security"] = [{"apiKey": []}]
    return operation


@functools.cache
def openapi_document(guarded: Callable[[str], bool]) -> dict[str, Any]:
    """The whole document; ``guarded(path)`` says which paths need the API key. Built once per predicate."""
    components: dict[str, Any] = {"Error": _ERROR}
    paths: dict[str, dict[str, Any]] = {}
    for method, path, request_class, content_types, summary in _OPERATIONS:
        paths.setdefault(path, {})[method] = _operation(
            path, request_class, content_types, summary, components, guarded(path))
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "atom_trio",
            "version": __version__,
            "description": "OpenAI-compatible completions and chat completions, vLLM's tokenizer routes, "
                           "health, version and Prometheus metrics. With an API key set, the operations "
                           "that name `apiKey` need `Authorization: Bearer KEY`.",
        },
        "paths": paths,
        "components": {
            "schemas": components,
            "securitySchemes": {"apiKey": {"type": "http", "scheme": "bearer"}},
        },
    }


def openapi_blueprint(guarded: Callable[[str], bool]) -> Blueprint:
    """The blueprint serving ``GET /openapi.json``; ``guarded`` is the app's API key rule."""
    blueprint = Blueprint("openapi", __name__)

    @blueprint.get("/openapi.json")
    async def openapi_json() -> dict[str, Any]:
        return openapi_document(guarded)

    return blueprint


__all__ = ["openapi_blueprint", "openapi_document"]
