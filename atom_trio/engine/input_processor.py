"""The one way in: from a caller's prompt and sampling parameters to a request the scheduler queues.

Every admission check lives here, in the order a request meets them: the
engine is alive; the sampling parameters are in range for this model (their
token ids inside the vocabulary, logprobs within ``max_logprobs``); the
waiting queue has room; the prompt is within bounds (`MAX_CHAT_MESSAGES`
messages, `PROMPT_CHARS_PER_TOKEN` characters per token of context, before and
after the chat template renders it; a list of token ids shorter than the
context) and tokenizes (chat messages through the model's chat template); it
is not empty, holds only token ids of the vocabulary and leaves room to
generate within the context. Tokenizing a long prompt runs on a worker
thread, so the engine may die or the queue fill meanwhile: those two are
checked again just before the request is admitted. (``/detokenize`` takes at
most a context's worth of known ids.)

The chat template is the model's, always, and it renders in transformers'
sandboxed Jinja environment (``ImmutableSandboxedEnvironment``, in
``transformers.utils.chat_template_utils``): a template cannot reach Python's
internals. A caller adds only plain data for it (``chat_template_kwargs``:
JSON values, within `MAX_TEMPLATE_KWARGS_ITEMS` and
`MAX_TEMPLATE_KWARGS_CHARS`), under names that are neither
``apply_chat_template``'s own parameters (``chat_template``, ``tokenize``,
``tools``...) nor what the template already gets (``messages``, the special
tokens, its functions): those would replace the template or what it renders.
A chat's ``tools`` are OpenAI's tool definitions, handed to the template as
``apply_chat_template(tools=...)`` does, so the model sees them in the format it
was trained on; a chat with tools always renders on a worker thread, since
their size is not bounded by the messages' content.

Client work and the event loop. Rendering, tokenizing and detokenizing take
time that the client chooses, and the event loop must not wait for it. A hop
to a worker thread costs about 75 us here, so work that stays under half a
millisecond runs inline (a text of at most `INLINE_CHARS` characters, a chat of
at most `INLINE_MESSAGES` messages and `INLINE_CHARS` characters of content, at
most `INLINE_TOKENS` token ids to check or decode); anything larger goes to a
thread. A thread does not free the event loop by itself, since both need the
GIL (the Rust tokenizer's single ``encode`` holds it throughout: 1.3 s for
1.2 million characters here). Its batch calls (``encode_batch_fast``,
``decode_batch``) release it, so those run in trio's default thread lane,
while Python work (rendering, checking long lists) runs in `python_lane`, one
thread for all requests, because each extra busy Python thread multiplies how
long the event loop waits for the GIL (measured here: one delayed a 1 ms timer
by at most 6 ms, two by 60 ms).

What passes comes out as an `EngineRequest` under a key of its own, which is
all the scheduler needs; the scheduler trusts it and checks nothing again.
The HTTP server only parses JSON into typed requests and leaves every check
against the model to this module.
"""

from __future__ import annotations

import functools
import inspect
import itertools
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

import attrs
import jinja2.defaults
import trio

from atom_trio.errors import ContextLengthExceeded, EngineOverloaded, InvalidRequest
from atom_trio.sampling_params import SamplingParams

if TYPE_CHECKING:
    from atom_trio.core.scheduler import Scheduler

T = TypeVar("T")

#: What `AsyncEngine.generate` takes: text, token ids, or chat messages.
Prompt = str | Sequence[int] | Sequence[Mapping[str, Any]]

#: The most messages a chat may have: far beyond any conversation a context holds, and a bound on the
#: template's work.
MAX_CHAT_MESSAGES = 10_000
#: A prompt's characters (a chat's content, then its rendered text) may number at most this many per token
#: of the context: more than any tokenizer packs into a token on average, so only a prompt that could never
#: fit is refused, before it is tokenized.
PROMPT_CHARS_PER_TOKEN = 64
#: The most values (scalars, arrays, objects) ``chat_template_kwargs`` may hold, nested ones included.
MAX_TEMPLATE_KWARGS_ITEMS = 1_000
#: The most characters of strings (keys included) ``chat_template_kwargs`` may hold.
MAX_TEMPLATE_KWARGS_CHARS = 65_536
#: Work up to these sizes runs on the event loop (each well under a millisecond here).
INLINE_CHARS = 1024
INLINE_MESSAGES = 8
INLINE_TOKENS = 1024

_MAX_TEMPLATE_KWARGS_DEPTH = 32
_PYTHON_LANE: trio.lowlevel.RunVar[trio.CapacityLimiter] = trio.lowlevel.RunVar("atom_trio python lane")


def python_lane() -> trio.CapacityLimiter:
    """The one worker thread (per trio run) for Python work on a client's input: rendering a chat, decoding
    and checking a large request body. A second busy Python thread would make the event loop wait longer for
    the GIL; work that releases the GIL goes to trio's default lane instead."""
    try:
        return _PYTHON_LANE.get()
    except LookupError:
        lane = trio.CapacityLimiter(1)
        _PYTHON_LANE.set(lane)
        return lane


@attrs.frozen(kw_only=True)
class EngineRequest:
    """A request that passed every admission check.

    Attributes:
        key: the scheduler's id for it, unique for the engine's lifetime
            whatever the caller's ``request_id``.
        request_id: the caller's id, echoed in every output.
        prompt: the prompt's text (rendered, for chat messages); None when given as token ids.
    """

    key: str
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams


class InputProcessor:
    """Tokenizes prompts and admits requests for one engine.

    Args:
        tokenizer: the model's tokenizer (transformers, fast).
        scheduler: whose waiting queue is bounded and whose ``max_model_len``
            (the model's, capped at what the KV cache holds) prompts must fit.
        vocab_size: the model's vocabulary; every token id a request names lies below it.
        max_logprobs: the most alternatives ``logprobs`` and ``prompt_logprobs`` may ask for.
        max_queued_requests: beyond this many waiting requests, new ones are refused.
        check_alive: raises `EngineDeadError` once the engine cannot take requests.
    """

    def __init__(
        self,
        tokenizer: Any,
        scheduler: Scheduler,
        *,
        vocab_size: int,
        max_logprobs: int,
        max_queued_requests: int,
        check_alive: Callable[[], None],
    ) -> None:
        self._tokenizer = tokenizer
        self._scheduler = scheduler
        self._vocab_size = vocab_size
        self._max_logprobs = max_logprobs
        self._max_queued_requests = max_queued_requests
        self._check_alive = check_alive
        self._keys = map(str, itertools.count())
        self._reserved_template_names = _reserved_template_names(tokenizer)
        self._token_texts: dict[int, str] = {}

    async def process(
        self,
        prompt: Prompt,
        params: SamplingParams,
        *,
        request_id: str | None,
        add_generation_prompt: bool,
        chat_template_kwargs: Mapping[str, Any],
        tools: Sequence[Mapping[str, Any]] | None = None,
    ) -> EngineRequest:
        """Run every admission check and tokenize; the request the scheduler may queue now.

        Raises:
            InvalidRequest: a parameter or the prompt is not acceptable (``param`` names it).
            ContextLengthExceeded: the prompt, with ``max_tokens``, does not fit the context.
            EngineOverloaded: the waiting queue is full.
            EngineDeadError: the engine has died or shut down.
        """
        self._check_alive()
        params.validate(vocab_size=self._vocab_size, max_logprobs=self._max_logprobs)
        self._check_queue()
        max_model_len = self._scheduler.max_model_len
        if _looks_like_token_ids(prompt) and len(prompt) >= max_model_len:  # refused before any work on it
            raise ContextLengthExceeded(prompt_tokens=len(prompt), max_model_len=max_model_len,
                                        max_tokens=params.max_tokens)
        text, token_ids = await self.encode_prompt(
            prompt,
            add_generation_prompt=add_generation_prompt,
            chat_template_kwargs=chat_template_kwargs,
            add_special_tokens=None,
            tools=tools,
        )
        if not token_ids:
            raise InvalidRequest("the prompt must not be empty", param="prompt")
        if len(token_ids) >= max_model_len or (
            params.max_tokens is not None and len(token_ids) + params.max_tokens > max_model_len
        ):
            raise ContextLengthExceeded(
                prompt_tokens=len(token_ids), max_model_len=max_model_len, max_tokens=params.max_tokens
            )
        if min(token_ids) < 0 or max(token_ids) >= self._vocab_size:
            raise InvalidRequest(f"prompt token ids must be in [0, {self._vocab_size})", param="prompt")
        self._check_alive()  # it may have died or closed while the prompt was tokenized
        self._check_queue()
        key = next(self._keys)
        return EngineRequest(
            key=key,
            request_id=request_id if request_id is not None else key,
            prompt=text,
            prompt_token_ids=token_ids,
            params=params,
        )

    def _check_queue(self) -> None:
        waiting = self._scheduler.stats().num_waiting_requests  # requests, whatever their n
        if waiting >= self._max_queued_requests:
            raise EngineOverloaded(
                f"{waiting} requests are waiting (max_queued_requests={self._max_queued_requests}); retry later"
            )

    async def encode_prompt(
        self,
        prompt: Prompt,
        *,
        add_generation_prompt: bool,
        chat_template_kwargs: Mapping[str, Any] | None,
        add_special_tokens: bool | None,
        tools: Sequence[Mapping[str, Any]] | None = None,
    ) -> tuple[str | None, list[int]]:
        """The prompt's text (``None`` for token ids) and token ids, exactly as admission sees them.

        Chat messages go through the model's chat template, which writes its own
        special tokens; a plain string gets the tokenizer's (BOS). ``add_special_tokens``
        overrides either default (None keeps them).

        Raises:
            InvalidRequest: the prompt has no shape of `Prompt`, is beyond the bounds this module lists, or the
                template refuses it; ``chat_template_kwargs`` holds a name or value it may not.
        """
        max_chars = PROMPT_CHARS_PER_TOKEN * self._scheduler.max_model_len
        if isinstance(prompt, str):
            _check_chars(len(prompt), max_chars, "prompt")
            return prompt, await self._tokenize(prompt, True if add_special_tokens is None else add_special_tokens)
        if _looks_like_token_ids(prompt):
            if len(prompt) <= INLINE_TOKENS:
                return None, _token_ids(prompt)
            return None, await _in_python_lane(_token_ids, prompt)
        if isinstance(prompt, Sequence) and prompt and isinstance(prompt[0], Mapping):
            if len(prompt) > MAX_CHAT_MESSAGES:
                raise InvalidRequest(
                    f"a chat may have at most {MAX_CHAT_MESSAGES} messages, not {len(prompt)}", param="messages"
                )
            kwargs = self._template_kwargs(chat_template_kwargs or {})
            render = functools.partial(self._render_chat, prompt, add_generation_prompt, kwargs, max_chars, tools)
            if not tools and len(prompt) <= INLINE_MESSAGES and _content_chars(prompt) <= INLINE_CHARS:
                text = render()
            else:
                text = await _in_python_lane(render)
            # The template already wrote the special tokens it wants (BOS included).
            return text, await self._tokenize(text, bool(add_special_tokens))
        raise InvalidRequest(
            "the prompt must be a string, a list of token ids or a list of chat messages", param="prompt"
        )

    async def _tokenize(self, text: str, add_special_tokens: bool) -> list[int]:
        if len(text) <= INLINE_CHARS:
            return self._encode(text, add_special_tokens=add_special_tokens)
        return await trio.to_thread.run_sync(
            lambda: self._encode(text, add_special_tokens=add_special_tokens), thread_name="atom-trio tokenize"
        )

    def _encode(self, text: str, *, add_special_tokens: bool) -> list[int]:
        # The Rust tokenizer directly: encoding is read-only there, so threads
        # may encode at once (transformers' wrapper reconfigures truncation
        # and padding on every call, which races between threads). Its batch
        # call releases the GIL while it works; the single one does not.
        return self._tokenizer.backend_tokenizer.encode_batch_fast([text], add_special_tokens=add_special_tokens)[0].ids

    def _template_kwargs(self, kwargs: Mapping[str, Any]) -> dict[str, Any]:
        """``chat_template_kwargs``, if every name is one a caller may set and every value plain, bounded data."""
        if len(kwargs) > MAX_TEMPLATE_KWARGS_ITEMS:
            raise _too_much_template_data()
        for name in kwargs:
            param = f"chat_template_kwargs.{name}"
            if not isinstance(name, str) or not name.isidentifier() or name.startswith("_"):
                raise InvalidRequest(f"{param}: a template variable's name must be an identifier not starting "
                                     "with an underscore", param="chat_template_kwargs")
            if name in self._reserved_template_names:
                raise InvalidRequest(
                    f"{param} may not be set: the server renders the model's own chat template, and "
                    f"{name!r} would replace it or what it is given (set add_generation_prompt at the top level)",
                    param=param,
                )
        _check_template_data(kwargs)
        return dict(kwargs)

    def _render_chat(
        self,
        messages: Sequence[Mapping[str, Any]],
        add_generation_prompt: bool,
        kwargs: Mapping[str, Any],
        max_chars: int,
        tools: Sequence[Mapping[str, Any]] | None,
    ) -> str:
        if not all(isinstance(m, Mapping) for m in messages):
            raise InvalidRequest(
                "the prompt must be a string, a list of token ids or a list of chat messages", param="prompt"
            )
        _check_chars(_content_chars(messages), max_chars, "messages")
        try:
            text = self._tokenizer.apply_chat_template(
                [dict(m) for m in messages], tools=[dict(t) for t in tools] if tools else None, tokenize=False,
                add_generation_prompt=add_generation_prompt, **kwargs,
            )
        except Exception as exc:  # jinja errors (the sandbox's too), a missing template, a message it rejects
            raise InvalidRequest(f"cannot apply the chat template: {exc}", param="messages") from exc
        _check_chars(len(text), max_chars, "messages", rendered=True)
        return text

    async def detokenize(self, token_ids: Sequence[int], *, check_ids: bool = True) -> str:
        """The text of token ids, as ``tokenizer.decode`` gives it (special tokens included), long ones decoded
        on a worker thread.

        With ``check_ids`` (``/detokenize``), each must be one the tokenizer knows, and there may be at most
        ``max_model_len`` of them (as many as any sequence of the model has; the Rust tokenizer takes the list
        while holding the GIL, about 14 ns an id here); without it (echoing a prompt that admission has
        checked against the model's vocabulary and context), ids it does not know are left out.
        """
        max_model_len = self._scheduler.max_model_len
        if check_ids and len(token_ids) > max_model_len:
            raise InvalidRequest(f"tokens may hold at most {max_model_len} ids (the context), not {len(token_ids)}",
                                 param="tokens")
        if len(token_ids) <= INLINE_TOKENS:
            if check_ids:
                self._check_known(token_ids)
            return self._decode(token_ids)
        if check_ids:
            await _in_python_lane(self._check_known, token_ids)
        return await trio.to_thread.run_sync(self._decode, token_ids, thread_name="atom-trio detokenize")

    def token_text(self, token_id: int) -> str:
        """One token's text, as ``tokenizer.decode([token_id])`` gives it: for logprobs, remembered per token so
        that rendering many alternatives costs a dictionary lookup each."""
        text = self._token_texts.get(token_id)
        if text is None:
            text = self._token_texts[token_id] = self._tokenizer.decode([token_id])
        return text

    def _check_known(self, ids: Sequence[int]) -> None:
        known = len(self._tokenizer)
        if not all(type(t) is int and 0 <= t < known for t in ids):
            raise InvalidRequest(f"tokens holds a token id outside [0, {known})", param="tokens")

    def _decode(self, ids: Sequence[int]) -> str:
        """``tokenizer.decode(ids)``, through the Rust tokenizer's batch call, which releases the GIL."""
        text = self._tokenizer.backend_tokenizer.decode_batch([list(ids)], skip_special_tokens=False)[0]
        return self._tokenizer.clean_up_tokenization(text) if _cleans_up(self._tokenizer) else text


def _looks_like_token_ids(prompt: Prompt) -> bool:
    return not isinstance(prompt, str) and isinstance(prompt, Sequence) and (not prompt or isinstance(prompt[0], int))


def _token_ids(prompt: Sequence[Any]) -> list[int]:
    if not all(isinstance(t, int) for t in prompt):
        raise InvalidRequest(
            "the prompt must be a string, a list of token ids or a list of chat messages", param="prompt"
        )
    return list(prompt)


def _content_chars(messages: Sequence[Mapping[str, Any]]) -> int:
    return sum(len(str(m.get("content") or "")) for m in messages if isinstance(m, Mapping))


def _check_chars(chars: int, max_chars: int, param: str, *, rendered: bool = False) -> None:
    if chars > max_chars:
        what = "the rendered chat" if rendered else "the prompt"
        raise InvalidRequest(
            f"{what} has {chars} characters, more than any prompt that fits this model's context could "
            f"({max_chars}: {PROMPT_CHARS_PER_TOKEN} per token)",
            param=param,
        )


async def _in_python_lane(work: Callable[..., T], *args: Any) -> T:
    return await trio.to_thread.run_sync(work, *args, limiter=python_lane(), thread_name="atom-trio python lane")


def chat_template_variables(tokenizer: Any) -> frozenset[str]:
    """The variables the tokenizer's chat template reads (none without a template), as transformers finds them.

    For options that only some templates understand (``reasoning_effort``): a
    request may set one only where the template reads it, so it is never
    accepted and silently ignored.
    """
    # transformers' own reading of a template (jinja2's undeclared variables), cached per template
    from transformers.utils.chat_template_utils import _get_template_variables

    template = tokenizer.chat_template
    return _get_template_variables(template) if isinstance(template, str) else frozenset()


def _reserved_template_names(tokenizer: Any) -> frozenset[str]:
    """Names a caller's template variable may not take.

    ``apply_chat_template``'s parameters (read from its signature, so a new one
    is covered too: ``chat_template``, ``tools``, ``documents``, ``tokenize``,
    ``return_dict``, ``add_generation_prompt``, ``continue_final_message``...),
    what its renderer passes the template (``messages``, ``conversations``), the
    special tokens it adds as variables (``bos_token``...), and the functions
    the template environment provides (``raise_exception``, ``range``...).
    """
    parameters = inspect.signature(tokenizer.apply_chat_template).parameters.values()
    names = {p.name for p in parameters if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)}
    names |= {"messages", "conversations", "return_assistant_tokens_mask"}
    names |= set(getattr(tokenizer, "SPECIAL_TOKENS_ATTRIBUTES", ())) | set(tokenizer.special_tokens_map)
    names |= set(jinja2.defaults.DEFAULT_NAMESPACE) | {"raise_exception", "strftime_now", "dict", "namespace"}
    return frozenset(names)


def _check_template_data(kwargs: Mapping[str, Any]) -> None:
    """Every value JSON data (null, booleans, numbers, strings, lists, objects with string keys), within the
    bounds; stops at the first value past them, so the check itself is bounded."""
    items = chars = 0
    stack: list[tuple[Any, int]] = [(value, 1) for value in kwargs.values()]
    while stack:
        value, depth = stack.pop()
        items += 1
        if items > MAX_TEMPLATE_KWARGS_ITEMS or depth > _MAX_TEMPLATE_KWARGS_DEPTH:
            raise _too_much_template_data()
        if isinstance(value, str):
            chars += len(value)
        elif isinstance(value, list):
            stack.extend((item, depth + 1) for item in value[: MAX_TEMPLATE_KWARGS_ITEMS + 1])
        elif isinstance(value, dict):
            for key, item in itertools.islice(value.items(), MAX_TEMPLATE_KWARGS_ITEMS + 1):
                if not isinstance(key, str):
                    raise InvalidRequest("chat_template_kwargs: object keys must be strings",
                                         param="chat_template_kwargs")
                chars += len(key)
                stack.append((item, depth + 1))
        elif value is not None and not isinstance(value, (bool, int, float)):
            raise InvalidRequest(
                f"chat_template_kwargs may hold only JSON data, not {type(value).__name__}",
                param="chat_template_kwargs",
            )
        if chars > MAX_TEMPLATE_KWARGS_CHARS:
            raise InvalidRequest(
                f"chat_template_kwargs may hold at most {MAX_TEMPLATE_KWARGS_CHARS} characters of strings",
                param="chat_template_kwargs",
            )


def _too_much_template_data() -> InvalidRequest:
    return InvalidRequest(
        f"chat_template_kwargs may hold at most {MAX_TEMPLATE_KWARGS_ITEMS} values, nested at most "
        f"{_MAX_TEMPLATE_KWARGS_DEPTH} deep", param="chat_template_kwargs"
    )


def _cleans_up(tokenizer: Any) -> bool:
    """Whether ``tokenizer.decode`` cleans up spaces after the Rust decoder, as transformers decides it (never
    for BPE, unless told to even so)."""
    if not getattr(tokenizer, "clean_up_tokenization_spaces", False):
        return False
    return type(tokenizer.backend_tokenizer.model).__name__ != "BPE" or bool(
        getattr(tokenizer, "clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output", False)
    )
