"""From an API request to the engine's inputs: prompts and `SamplingParams`.

Both APIs share these fields, with two differences that clients rely on:
completions default to 16 new tokens (OpenAI's and vLLM's default) while chat
runs to the end of the context, and completions ask for ``logprobs: N`` where
chat asks for ``logprobs: true, top_logprobs: N``.

Completions with ``echo`` and ``logprobs: N`` (how lm-evaluation-harness scores
log-likelihoods) also get the prompt's logprobs, as in vLLM: the engine is asked
for ``prompt_logprobs=N``. ``echo`` with ``max_tokens: 0`` returns the prompt
alone: the engine cannot generate zero tokens, and prefill samples one anyway,
so it generates one that the response leaves out (vLLM does the same).

Structured output comes from one field of a request, whichever the client
knows: OpenAI's ``response_format`` (``json_object``, ``json_schema``), vLLM's
``structured_outputs`` or its older ``guided_json`` / ``guided_regex`` /
``guided_choice`` / ``guided_grammar``. Each becomes the same
`StructuredOutputsParams`; two at once are refused, and every error about the
grammar names the field the client sent (`grammar_param`). A chat's
``tool_choice: "required"`` or named function is structured output too, built
from the tools (tool_choice.py), and takes the place of the others.
"""

from __future__ import annotations

from typing import Any, Literal

from ..errors import InvalidRequest
from ..sampling_params import SamplingParams, StructuredOutputsParams
from . import json_body
from .errors import bad_request
from .schemas import (
    ChatCompletionRequest,
    CompletionRequest,
    NamedToolChoice,
    SamplingFields,
    TokenizeRequest,
    ToolCall,
)
from .tool_choice import find_tool, named_schema, required_schema

#: vLLM's older structured-output fields, and the `StructuredOutputsParams` field each sets.
_GUIDED = {"guided_json": "json", "guided_regex": "regex", "guided_choice": "choice", "guided_grammar": "grammar"}
_STRUCTURED_FIELDS = ("json", "json_object", "regex", "choice", "grammar")

COMPLETION_DEFAULT_MAX_TOKENS = 16


def _logit_bias(raw: dict[str, float] | None) -> dict[int, float] | None:
    if not raw:
        return None
    try:
        return {int(token): bias for token, bias in raw.items()}
    except ValueError:
        raise bad_request("logit_bias keys must be token ids (integers as strings)", param="logit_bias") from None


def _common(req: SamplingFields, *, max_tokens: int | None, logprobs: int | None) -> dict[str, Any]:
    if req.stream_options is not None and not req.stream:
        raise bad_request("stream_options is only allowed with stream=true", param="stream_options")
    fields: dict[str, Any] = dict(
        n=req.n,
        temperature=req.temperature,
        top_p=req.top_p,
        top_k=req.top_k,
        min_p=req.min_p,
        seed=req.seed,
        min_tokens=req.min_tokens,
        stop=req.stop,
        stop_token_ids=req.stop_token_ids,
        ignore_eos=req.ignore_eos,
        presence_penalty=req.presence_penalty,
        frequency_penalty=req.frequency_penalty,
        repetition_penalty=req.repetition_penalty,
        logit_bias=_logit_bias(req.logit_bias),
        skip_special_tokens=req.skip_special_tokens,
        include_stop_str_in_output=req.include_stop_str_in_output,
        logprobs=logprobs,
    )
    # None means "the engine's default"; max_tokens=None is meaningful (to the end of the context).
    kwargs = {name: value for name, value in fields.items() if value is not None}
    return {**kwargs, "max_tokens": max_tokens}


def echo_only(req: CompletionRequest) -> bool:
    """Whether the response is the echoed prompt alone (``echo`` with ``max_tokens: 0``)."""
    return bool(req.echo) and req.max_tokens == 0


def _requested_grammars(req: SamplingFields) -> list[tuple[str, dict[str, Any]]]:
    """Each field of the request that asks for structured output, with the `StructuredOutputsParams` it means."""
    found: list[tuple[str, dict[str, Any]]] = []
    response_format = req.response_format
    if response_format is not None and response_format.type == "json_object":
        found.append(("response_format", {"json_object": True}))
    elif response_format is not None and response_format.type == "json_schema":
        if response_format.json_schema is None or response_format.json_schema.schema is None:
            raise bad_request("response_format of type json_schema needs json_schema.schema", param="response_format")
        found.append(("response_format", {"json": response_format.json_schema.schema}))
    if req.structured_outputs is not None:
        fields = {name: getattr(req.structured_outputs, name) for name in _STRUCTURED_FIELDS}
        found.append(("structured_outputs", {name: value for name, value in fields.items() if value is not None}))
    found.extend((name, {field: getattr(req, name)}) for name, field in _GUIDED.items() if getattr(req, name) is not None)
    return found


def _grammar(param: str, fields: dict[str, Any]) -> StructuredOutputsParams:
    try:
        return StructuredOutputsParams(**fields)
    except InvalidRequest as exc:
        raise bad_request(f"{param}: {exc}", param=param) from None


def _structured_outputs(req: SamplingFields) -> StructuredOutputsParams | None:
    requested = _requested_grammars(req)
    if len(requested) > 1:
        names = " and ".join(param for param, _ in requested)
        raise bad_request(f"{names} each ask for structured output; give one", param=requested[1][0])
    return _grammar(*requested[0]) if requested else None


def grammar_param(req: SamplingFields) -> str | None:
    """The request field that asked for structured output: the ``param`` of an error about its grammar."""
    if isinstance(req, ChatCompletionRequest) and _forced_tool_choice(req):
        return "tools"
    requested = _requested_grammars(req)
    return requested[0][0] if requested else None


def completion_params(req: CompletionRequest) -> SamplingParams:
    if req.prompt_logprobs is not None and req.stream:
        raise bad_request("prompt_logprobs is not available with stream=true", param="prompt_logprobs")
    max_tokens = COMPLETION_DEFAULT_MAX_TOKENS if req.max_tokens is None else req.max_tokens
    if echo_only(req):
        max_tokens = 1
    prompt_logprobs = req.prompt_logprobs
    if prompt_logprobs is None and req.echo and req.logprobs is not None:
        prompt_logprobs = req.logprobs
    return SamplingParams(
        **_common(req, max_tokens=max_tokens, logprobs=req.logprobs), prompt_logprobs=prompt_logprobs,
        structured_outputs=_structured_outputs(req),
    )


def chat_params(req: ChatCompletionRequest) -> SamplingParams:
    if req.top_logprobs is not None and not req.logprobs:
        raise bad_request("top_logprobs requires logprobs=true", param="top_logprobs")
    logprobs = (req.top_logprobs or 0) if req.logprobs else None
    max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    structured = _structured_outputs(req)
    forced = _forced_tool_choice(req)
    if forced:
        if structured is not None:
            source = _requested_grammars(req)[0][0]
            raise bad_request(f"{source} cannot be combined with tool_choice {forced!r}: the tool calls are the "
                              "output", param=source)
        structured = _grammar("tools", {"json": _tool_schema(req)})
    return SamplingParams(**_common(req, max_tokens=max_tokens, logprobs=logprobs), structured_outputs=structured)


ToolChoiceMode = Literal["none", "auto", "required", "named"]


def tool_choice(req: ChatCompletionRequest) -> ToolChoiceMode:
    """What the request's tools are for: OpenAI's default is ``auto`` with tools and ``none`` without.

    Raises:
        ApiError: 400 naming ``tool_choice`` when it asks for a call and there are no tools.
    """
    choice = req.tool_choice
    if choice is None:
        return "auto" if req.tools else "none"
    if choice != "none" and not req.tools:
        raise bad_request("tool_choice needs tools: there is no function to call", param="tool_choice")
    return "named" if isinstance(choice, NamedToolChoice) else choice


def _forced_tool_choice(req: ChatCompletionRequest) -> Literal["required", "named"] | None:
    mode = tool_choice(req)
    return mode if mode in ("required", "named") else None


def _tool_schema(req: ChatCompletionRequest) -> dict[str, Any]:
    assert req.tools
    if isinstance(req.tool_choice, NamedToolChoice):
        return named_schema(find_tool(req.tools, req.tool_choice))
    return required_schema(req.tools, parallel=req.parallel_tool_calls is not False)


def chat_messages(req: ChatCompletionRequest | TokenizeRequest) -> list[dict[str, Any]]:
    """Messages as chat templates expect them. ``developer`` is OpenAI's new name for ``system``.

    A tool call in the history reaches the template with its arguments as an
    object, not as the JSON text OpenAI's clients send: that is what
    transformers' templates read (Llama 3.1's writes ``arguments | tojson``;
    Qwen3's takes either), and what vLLM hands them. Keys are set only when
    the message has them, since templates test ``'tool_calls' in message``.

    Raises:
        ApiError: 400 naming the message field that is misplaced or malformed.
    """
    out = []
    for i, message in enumerate(req.messages):
        role = "system" if message.role == "developer" else message.role
        item: dict[str, Any] = {"role": role, "content": message.content or ""}
        if message.name is not None:
            item["name"] = message.name
        if message.tool_calls:
            if role != "assistant":
                raise bad_request(f"messages[{i}].tool_calls: only an assistant message makes tool calls",
                                  param=f"messages[{i}].tool_calls")
            item["tool_calls"] = [_history_call(call, f"messages[{i}].tool_calls[{j}]")
                                  for j, call in enumerate(message.tool_calls)]
        if message.tool_call_id is not None:
            if role != "tool":
                raise bad_request(f"messages[{i}].tool_call_id: only a tool message answers a tool call",
                                  param=f"messages[{i}].tool_call_id")
            item["tool_call_id"] = message.tool_call_id
        if message.reasoning_content is not None:
            item["reasoning_content"] = message.reasoning_content
        out.append(item)
    if not out:
        raise bad_request("messages must not be empty", param="messages")
    return out


def _history_call(call: ToolCall, param: str) -> dict[str, Any]:
    try:
        arguments = json_body.decode(call.function.arguments.encode("utf-8", "surrogatepass"))
    except json_body.BodyError as exc:
        raise bad_request(f"{param}.function.arguments is not valid JSON: {exc}",
                          param=f"{param}.function.arguments") from None
    if not isinstance(arguments, dict):
        raise bad_request(f"{param}.function.arguments must be a JSON object", param=f"{param}.function.arguments")
    rendered: dict[str, Any] = {"type": "function", "function": {"name": call.function.name, "arguments": arguments}}
    if call.id is not None:
        rendered["id"] = call.id
    return rendered


def chat_tools(req: ChatCompletionRequest | TokenizeRequest) -> list[dict[str, Any]] | None:
    """The tools as the chat template gets them (OpenAI's shape, unset fields left out); None without tools."""
    if not req.tools:
        return None
    tools = []
    for tool in req.tools:
        function = {"name": tool.function.name}
        function.update({key: value for key in ("description", "parameters")
                         if (value := getattr(tool.function, key)) is not None})
        tools.append({"type": "function", "function": function})
    return tools
