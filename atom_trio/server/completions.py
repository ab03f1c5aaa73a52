"""``/v1/completions`` and ``/v1/chat/completions``: one generation path, two response shapes.

A request becomes a `Generation` (see generation.py); its outputs are folded
into per-choice state (`Choice`). The two APIs differ only in how a choice and
its deltas are rendered (`CompletionFormat`, `ChatFormat`), so streaming,
usage, logprobs and error handling are written once.

Choice indices follow vLLM: prompt ``i``'s sample ``j`` is choice ``i * n + j``.

With ``echo``, a choice starts with its prompt, and with ``logprobs`` too, with
the prompt tokens' logprobs (the first token's is null), as OpenAI's legacy
completions did; vLLM's ``prompt_logprobs`` choice field carries them as well.

A chat choice's text becomes its message through `ChatOutputRules`
(chat_output.py: reasoning, tool calls); a streamed piece may become several
chunks, since a tool call's opening and its arguments go out apart.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from typing import TYPE_CHECKING, Any

import attrs
import trio

from ..engine.input_processor import INLINE_TOKENS, chat_template_variables, python_lane
from ..errors import InvalidRequest
from . import json_body, sampling
from .chat_output import ChatOutputRules, ChoiceOutput, chat_rules, delta_calls
from .errors import (
    ApiError,
    bad_request,
    from_exception,
    internal_error,
    model_not_found,
)
from .generation import Generation, start_generation
from .json_body import dumps_stepwise
from .schemas import (
    ChatCompletionRequest,
    CompletionRequest,
    SamplingFields,
    StreamOptions,
    read_request,
)

if TYPE_CHECKING:
    from ..engine import Prompt
    from ..outputs import CompletionOutput, RequestOutput
    from .state import ServerState

log = logging.getLogger("atom_trio.server")


#: (token id, logprob, top alternatives as (token id, logprob)) for one token; the
#: logprob and alternatives are None for an echoed prompt's first token.
LogprobEntry = tuple[int, float | None, list[tuple[int, float]] | None]


@attrs.define(eq=False)
class Choice:
    """Everything one choice produced so far."""

    index: int
    text: str = ""
    token_ids: list[int] = attrs.Factory(list)
    logprobs: list[LogprobEntry] = attrs.Factory(list)
    echoed: bool = False
    text_offset: int = 0  # where the next streamed logprob's token starts in the choice's text
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    prompt: str | None = None  # the prompt as the engine rendered it (a chat's, through the template)


@attrs.define(eq=False)
class Usage:
    prompt_tokens: dict[int, int] = attrs.Factory(dict)  # per prompt index
    cached_tokens: dict[int, int] = attrs.Factory(dict)
    completion_tokens: int = 0

    def add(self, prompt_index: int, output: RequestOutput, *, generated: bool = True) -> None:
        self.prompt_tokens[prompt_index] = len(output.prompt_token_ids or ())
        self.cached_tokens[prompt_index] = output.num_cached_tokens or 0
        if generated:
            self.completion_tokens += sum(len(o.token_ids) for o in output.outputs)

    def render(self) -> dict[str, Any]:
        prompt = sum(self.prompt_tokens.values())
        return {
            "prompt_tokens": prompt,
            "completion_tokens": self.completion_tokens,
            "total_tokens": prompt + self.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": sum(self.cached_tokens.values())},
        }


def token_logprobs(output: CompletionOutput) -> list[LogprobEntry]:
    """(token id, logprob, top alternatives) for each new token of a `CompletionOutput` delta."""
    if output.logprobs is None:
        return []
    tops = output.top_logprobs or [[] for _ in output.logprobs]
    return list(zip(output.token_ids, output.logprobs, tops, strict=True))


@attrs.define(eq=False)
class CompletionFormat:
    decode: Callable[[Sequence[int]], str]  # the engine's: token ids to text
    want_logprobs: bool
    object_name = "text_completion"
    chunk_object_name = "text_completion"
    id_prefix = "cmpl-"

    def _token(self, token_id: int) -> str:
        return self.decode([token_id])

    def logprobs(self, entries: list[LogprobEntry], offset: int) -> tuple[Any, int]:
        """Render a run of tokens' logprobs whose text starts at ``offset``; return it and the next offset."""
        if not self.want_logprobs:
            return None, offset
        tokens = [self._token(t) for t, _, _ in entries]
        offsets = []
        for text in tokens:
            offsets.append(offset)
            offset += len(text)
        rendered = {
            "tokens": tokens,
            "token_logprobs": [lp for _, lp, _ in entries],
            "top_logprobs": [None if top is None else {self._token(t): lp for t, lp in top} for _, _, top in entries],
            "text_offset": offsets,
        }
        return rendered, offset

    def choice(self, choice: Choice, text: str, logprobs: Any, *, final: bool) -> dict[str, Any]:
        return {
            "index": choice.index,
            "text": text,
            "logprobs": logprobs,
            "finish_reason": choice.finish_reason,
            "stop_reason": choice.stop_reason,
        }

    def stream_deltas(self, choice: Choice, text: str, logprobs: Any) -> list[dict[str, Any]]:
        """A streamed piece of a choice as its chunks' choice entries (the last carries the finish reason)."""
        return [self.choice(choice, text, logprobs, final=False)]

    def opening(self, choice: Choice) -> dict[str, Any] | None:
        return None

    def prompt_logprobs(self, per_token: list[dict[int, float] | None] | None) -> dict[str, Any]:
        """vLLM's extra choice field: ``{token_id: {logprob, decoded_token}}`` per prompt token (the first null)."""
        rendered = None
        if per_token is not None:
            rendered = [
                None if logprobs is None
                else {str(t): {"logprob": lp, "decoded_token": self._token(t)} for t, lp in logprobs.items()}
                for logprobs in per_token
            ]
        return {"prompt_logprobs": rendered}


@attrs.define(eq=False)
class ChatFormat(CompletionFormat):
    rules: ChatOutputRules = attrs.Factory(ChatOutputRules)
    _outputs: dict[int, ChoiceOutput] = attrs.Factory(dict)
    object_name = "chat.completion"
    chunk_object_name = "chat.completion.chunk"
    id_prefix = "chatcmpl-"

    def _output(self, choice: Choice) -> ChoiceOutput:
        output = self._outputs.get(choice.index)
        if output is None:
            output = self._outputs[choice.index] = self.rules.choice(choice.prompt)
        return output

    @staticmethod
    def _finish_reason(choice: Choice, output: ChoiceOutput) -> str | None:
        """OpenAI's ``tool_calls`` for a choice that called a tool and stopped by itself."""
        return "tool_calls" if output.made_calls and choice.finish_reason == "stop" else choice.finish_reason

    def _entry(self, token_id: int, logprob: float) -> dict[str, Any]:
        text = self._token(token_id)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode())}

    def logprobs(self, entries: list[LogprobEntry], offset: int) -> tuple[Any, int]:
        if not self.want_logprobs:
            return None, offset
        content = [
            {**self._entry(t, lp), "top_logprobs": [self._entry(a, alp) for a, alp in top]} for t, lp, top in entries
        ]
        return {"content": content}, offset

    def choice(self, choice: Choice, text: str, logprobs: Any, *, final: bool) -> dict[str, Any]:
        assert final, "a chat choice streams through stream_deltas"
        output = self._output(choice)
        message = output.message(text)
        return {"index": choice.index, "message": message, "logprobs": logprobs,
                "finish_reason": self._finish_reason(choice, output), "stop_reason": choice.stop_reason}

    def stream_deltas(self, choice: Choice, text: str, logprobs: Any) -> list[dict[str, Any]]:
        output = self._output(choice)
        delta = output.feed(text)
        if choice.finish_reason is not None:
            delta = delta.then(output.finish())
        first: dict[str, Any] = {}
        if delta.reasoning:
            first["reasoning_content"] = delta.reasoning
        if delta.content or not (delta.reasoning or delta.calls):
            first["content"] = delta.content
        groups = delta_calls(delta.calls)
        bodies = [first] + [{"tool_calls": group} for group in groups[1:]]
        if groups:
            first["tool_calls"] = groups[0]
        entries = [{"index": choice.index, "delta": body, "logprobs": None, "finish_reason": None,
                    "stop_reason": None} for body in bodies]
        entries[0]["logprobs"] = logprobs
        entries[-1].update(finish_reason=self._finish_reason(choice, output), stop_reason=choice.stop_reason)
        return entries

    def opening(self, choice: Choice) -> dict[str, Any] | None:
        return {"index": choice.index, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                "finish_reason": None}

    def prompt_logprobs(self, per_token: list[dict[int, float] | None] | None) -> dict[str, Any]:
        return {}


@attrs.define(eq=False)
class Response:
    """Folds a generation's outputs into choices and renders them in one API's shape."""

    fmt: CompletionFormat
    model: str
    n: int
    num_prompts: int
    echo_texts: list[str] | None = None  # completions' echo: the prompt texts
    echo_only: bool = False  # echo with max_tokens 0: the one token the engine generated is left out
    echo_top: int = 0  # with echo and logprobs, how many alternatives each prompt token shows
    id: str = attrs.Factory(lambda self: self.fmt.id_prefix + uuid.uuid4().hex, takes_self=True)
    created: int = attrs.Factory(lambda: int(time.time()))
    usage: Usage = attrs.Factory(Usage)
    choices: dict[int, Choice] = attrs.Factory(dict)
    prompt_logprobs: dict[int, list[dict[int, float] | None]] = attrs.Factory(dict)  # per prompt index

    def __attrs_post_init__(self) -> None:
        for i in range(self.num_prompts * self.n):
            self.choices[i] = Choice(index=i)

    def envelope(self, choices: list[dict[str, Any]], *, chunk: bool) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": self.fmt.chunk_object_name if chunk else self.fmt.object_name,
            "created": self.created,
            "model": self.model,
            "choices": choices,
        }

    def fold(self, prompt_index: int, output: RequestOutput, *, stream: bool) -> list[dict[str, Any]]:
        """Apply one `RequestOutput` delta; when streaming, return its rendered choice deltas."""
        self.usage.add(prompt_index, output, generated=not self.echo_only)
        if output.prompt_logprobs is not None:  # the request's first output (sibling 0's first token)
            self.prompt_logprobs[prompt_index] = output.prompt_logprobs
        deltas = []
        for delta in output.outputs:
            choice = self.choices[prompt_index * self.n + delta.index]
            text, token_ids, entries = delta.text, delta.token_ids, token_logprobs(delta)
            if self.echo_only:
                text, token_ids, entries = "", [], []
            if self.echo_texts is not None and not choice.echoed:
                choice.echoed = True
                text = self.echo_texts[prompt_index] + text
                entries = self._echo_logprobs(prompt_index, output.prompt_token_ids) + entries
            choice.prompt = output.prompt
            choice.text += text
            choice.token_ids.extend(token_ids)
            choice.logprobs.extend(entries)
            choice.finish_reason = delta.finish_reason
            choice.stop_reason = delta.stop_reason
            if stream and (text or token_ids or delta.finish_reason is not None):
                logprobs, choice.text_offset = self.fmt.logprobs(entries, choice.text_offset)
                deltas.extend(self.fmt.stream_deltas(choice, text, logprobs))
        return deltas

    def _echo_logprobs(self, prompt_index: int, prompt_token_ids: list[int]) -> list[LogprobEntry]:
        """The echoed prompt's tokens as logprob entries, when logprobs were asked for."""
        per_token = self.prompt_logprobs.get(prompt_index)
        if not self.fmt.want_logprobs or per_token is None:
            return []
        entries: list[LogprobEntry] = []
        for token, logprobs in zip(prompt_token_ids, per_token, strict=True):
            if logprobs is None:
                entries.append((token, None, None))
            else:  # the prompt token comes first, and need not be among the most likely
                top = sorted(logprobs.items(), key=lambda item: item[1], reverse=True)[: self.echo_top]
                entries.append((token, logprobs[token], top))
        return entries

    def rendering_work(self) -> int:
        """How many token texts `final` would render: each logprob entry's and its alternatives'."""
        tokens = sum(len(choice.logprobs) + len(self.prompt_logprobs.get(choice.index // self.n) or ())
                     for choice in self.choices.values())
        return tokens * (1 + self.echo_top)

    def final(self) -> dict[str, Any]:
        choices = []
        for choice in self.choices.values():
            logprobs, _ = self.fmt.logprobs(choice.logprobs, 0)
            rendered = self.fmt.choice(choice, choice.text, logprobs, final=True)
            rendered.update(self.fmt.prompt_logprobs(self.prompt_logprobs.get(choice.index // self.n)))
            choices.append(rendered)
        return {**self.envelope(choices, chunk=False), "usage": self.usage.render()}


def _sse(payload: dict[str, Any] | str) -> bytes:
    data = payload if isinstance(payload, str) else json.dumps(payload, separators=(",", ":"), ensure_ascii=False)
    return b"data: " + data.encode() + b"\n\n"


async def _fold_all(generation: Generation, response: Response) -> None:
    try:
        async for prompt_index, output in generation:
            response.fold(prompt_index, output, stream=False)
    finally:
        generation.cancel()


async def _stream(
    generation: Generation, response: Response, options: StreamOptions | None
) -> AsyncIterator[bytes]:
    """SSE body. Errors after the status went out are sent in-band, as vLLM does.

    ``include_usage`` adds a last chunk with the usage (every other chunk says
    ``"usage": null``); vLLM's ``continuous_usage_stats`` puts the usage so far
    on every chunk, which proxies use to bill streams that end early.
    """
    include_usage = bool(options and options.include_usage)
    continuous = bool(options and options.continuous_usage_stats)

    def usage_field() -> dict[str, Any]:
        if continuous:
            return {"usage": response.usage.render()}
        return {"usage": None} if include_usage else {}

    try:
        for choice in response.choices.values():
            opening = response.fmt.opening(choice)
            if opening is not None:
                yield _sse({**response.envelope([opening], chunk=True), **usage_field()})
        async for prompt_index, output in generation:
            for delta in response.fold(prompt_index, output, stream=True):
                yield _sse({**response.envelope([delta], chunk=True), **usage_field()})
        if include_usage:
            yield _sse({**response.envelope([], chunk=True), "usage": response.usage.render()})
    except Exception as exc:
        error = from_exception(exc)
        if error is None:
            log.exception("generation failed mid-stream")
            error = internal_error(exc)
        yield _sse(error.body())
    finally:
        generation.cancel()
    yield _sse("[DONE]")


async def handle(
    state: ServerState, nursery: trio.Nursery, body: bytes, *, chat: bool
) -> dict[str, Any] | bytes | AsyncIterator[bytes]:
    """Serve one request body: a plain response as a JSON dict (or already encoded, when large), an SSE byte
    stream when streaming."""
    engine = state.require_engine()
    req: CompletionRequest | ChatCompletionRequest = await read_request(
        ChatCompletionRequest if chat else CompletionRequest, body
    )
    if req.model is not None and req.model != state.model_name:
        raise model_not_found(req.model)
    if chat:
        assert isinstance(req, ChatCompletionRequest)
        params = sampling.chat_params(req)
        rules = chat_rules(req, state.settings)
        if req.skip_special_tokens is None and rules.reasoning is not None and rules.reasoning.keeps_special_tokens:
            params = attrs.evolve(params, skip_special_tokens=False)  # the format's markers are special tokens
        if json_body.fits_inline(body):
            prompts: list[Prompt] = [sampling.chat_messages(req)]
        else:  # tool calls in the history have arguments to decode, as long as the body allows
            prompts = [await trio.to_thread.run_sync(sampling.chat_messages, req, limiter=python_lane(),
                                                     thread_name="atom-trio chat messages")]
        generate_kwargs: dict[str, Any] = dict(
            add_generation_prompt=True if req.add_generation_prompt is None else req.add_generation_prompt,
            chat_template_kwargs=_template_kwargs(req, engine.tokenizer),
            tools=sampling.chat_tools(req),
        )
        fmt: CompletionFormat = ChatFormat(engine.decode, params.logprobs is not None, rules)
        echo_only = False
    else:
        assert isinstance(req, CompletionRequest)
        params = sampling.completion_params(req)
        prompts = list(req.prompt)
        generate_kwargs = {}
        fmt = CompletionFormat(engine.decode, params.logprobs is not None)
        echo_only = sampling.echo_only(req)
    try:
        generation = await start_generation(
            nursery, engine, prompts, params, state.metrics, state.activity, **generate_kwargs
        )
    except Exception as exc:
        raise _client_error(exc, req) from exc
    # Only once admitted (which checks n): a choice is allocated per prompt and sample.
    response = Response(fmt, state.model_name, params.n, len(prompts), echo_only=echo_only,
                        echo_top=params.logprobs or 0)
    if isinstance(req, CompletionRequest) and req.echo:  # token-id prompts decoded once admitted: within the context
        try:
            response.echo_texts = [p if isinstance(p, str) else await engine.detokenize(p, check_ids=False)
                                   for p in req.prompt]
        except BaseException:
            generation.cancel()
            raise
    if req.stream:
        return _stream(generation, response, req.stream_options)
    try:
        await _fold_all(generation, response)
    except Exception as exc:
        raise (from_exception(exc) or exc) from exc
    if response.rendering_work() <= INLINE_TOKENS:
        return response.final()
    # Many tokens with their alternatives: rendered and encoded off the event loop, a bounded piece at a time.
    return await trio.to_thread.run_sync(lambda: dumps_stepwise(response.final()), limiter=python_lane(),
                                         thread_name="atom-trio render response")


def _template_kwargs(req: ChatCompletionRequest, tokenizer: Any) -> dict[str, Any]:
    """``chat_template_kwargs``, with ``reasoning_effort`` for a template that reads it.

    Raises:
        ApiError: 400 naming ``reasoning_effort`` when the model's template does not read it, so the
            request would be served as if it had not been set.
    """
    kwargs = dict(req.chat_template_kwargs or {})
    if req.reasoning_effort is not None:
        if "reasoning_effort" not in chat_template_variables(tokenizer):
            raise bad_request("reasoning_effort is not supported by this model: its chat template does not read "
                              "reasoning_effort", param="reasoning_effort")
        kwargs["reasoning_effort"] = req.reasoning_effort
    return kwargs


def _client_error(exc: Exception, req: SamplingFields) -> Exception:
    """The client's error for an engine exception; an error about the grammar names the field that asked for it."""
    error = from_exception(exc)
    if error is None:
        return exc
    if isinstance(exc, InvalidRequest) and exc.param == "structured_outputs":
        param = sampling.grammar_param(req) or exc.param
        return ApiError(error.status, f"{param}: {error.message}", type=error.type, param=param, code=error.code)
    return error


__all__ = ["handle"]
