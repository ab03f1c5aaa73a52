"""The one way in: from a caller's prompt and sampling parameters to a request the scheduler queues.

Every admission check lives here, in the order a request meets them: the
engine is alive; the sampling parameters are in range for this model (their
token ids inside the vocabulary, logprobs within ``max_logprobs``); the
waiting queue has room; the prompt tokenizes (chat messages through the
model's chat template); it is not empty, holds only token ids of the
vocabulary and leaves room to generate within the context. Tokenizing a long
prompt runs on a worker thread, so the engine may die or the queue fill
meanwhile: those two are checked again just before the request is admitted.

What passes comes out as an `EngineRequest` under a key of its own, which is
all the scheduler needs; the scheduler trusts it and checks nothing again.
The HTTP server only parses JSON into typed requests and leaves every check
against the model to this module.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import attrs
import trio

from atom_trio.errors import ContextLengthExceeded, EngineOverloaded, InvalidRequest
from atom_trio.sampling_params import SamplingParams

if TYPE_CHECKING:
    from atom_trio.core.scheduler import Scheduler

#: What `AsyncEngine.generate` takes: text, token ids, or chat messages.
Prompt = str | Sequence[int] | Sequence[Mapping[str, Any]]

# Prompts longer than this (in characters) are tokenized on a worker thread.
_TOKENIZE_INLINE_MAX_CHARS = 4096


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

    async def process(
        self,
        prompt: Prompt,
        params: SamplingParams,
        *,
        request_id: str | None,
        add_generation_prompt: bool,
        chat_template_kwargs: Mapping[str, Any],
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
        text, token_ids = await self.encode_prompt(
            prompt,
            add_generation_prompt=add_generation_prompt,
            chat_template_kwargs=chat_template_kwargs,
            add_special_tokens=None,
        )
        if not token_ids:
            raise InvalidRequest("the prompt must not be empty", param="prompt")
        if min(token_ids) < 0 or max(token_ids) >= self._vocab_size:
            raise InvalidRequest(f"prompt token ids must be in [0, {self._vocab_size})", param="prompt")
        max_model_len = self._scheduler.max_model_len
        if len(token_ids) >= max_model_len or (
            params.max_tokens is not None and len(token_ids) + params.max_tokens > max_model_len
        ):
            raise ContextLengthExceeded(
                prompt_tokens=len(token_ids), max_model_len=max_model_len, max_tokens=params.max_tokens
            )
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
        waiting = self._scheduler.stats().num_waiting
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
    ) -> tuple[str | None, list[int]]:
        """The prompt's text (``None`` for token ids) and token ids, exactly as admission sees them.

        Chat messages go through the model's chat template, which writes its own
        special tokens; a plain string gets the tokenizer's (BOS). ``add_special_tokens``
        overrides either default (None keeps them).
        """
        if isinstance(prompt, str):
            special = True if add_special_tokens is None else add_special_tokens
            encode = lambda: (prompt, self._encode(prompt, add_special_tokens=special))  # noqa: E731
            size = len(prompt)
        elif isinstance(prompt, Sequence) and all(isinstance(t, int) for t in prompt):
            return None, list(prompt)
        elif isinstance(prompt, Sequence) and prompt and all(isinstance(m, Mapping) for m in prompt):
            encode = lambda: self._render_chat(  # noqa: E731
                prompt, add_generation_prompt, chat_template_kwargs or {}, bool(add_special_tokens)
            )
            size = sum(len(str(m.get("content") or "")) for m in prompt)
        else:
            raise InvalidRequest(
                "the prompt must be a string, a list of token ids or a list of chat messages", param="prompt"
            )
        if size <= _TOKENIZE_INLINE_MAX_CHARS:
            return encode()
        return await trio.to_thread.run_sync(encode, thread_name="atom-trio tokenize")

    def _encode(self, text: str, *, add_special_tokens: bool) -> list[int]:
        # The Rust tokenizer directly: encoding is read-only there, so threads
        # may encode at once (transformers' wrapper reconfigures truncation
        # and padding on every call, which races between threads).
        return self._tokenizer.backend_tokenizer.encode(text, add_special_tokens=add_special_tokens).ids

    def _render_chat(
        self,
        messages: Sequence[Mapping[str, Any]],
        add_generation_prompt: bool,
        kwargs: Mapping[str, Any],
        add_special_tokens: bool,
    ) -> tuple[str, list[int]]:
        try:
            text = self._tokenizer.apply_chat_template(
                [dict(m) for m in messages], tokenize=False, add_generation_prompt=add_generation_prompt, **kwargs
            )
        except Exception as exc:  # jinja errors, a missing template, a message the template rejects
            raise InvalidRequest(f"cannot apply the chat template: {exc}", param="messages") from exc
        # The template already wrote the special tokens it wants (BOS included).
        return text, self._encode(text, add_special_tokens=add_special_tokens)

    def detokenize(self, token_ids: Sequence[int]) -> str:
        """The text of token ids a client sent (``/detokenize``); each must be one the tokenizer knows."""
        known = len(self._tokenizer)
        if any(not 0 <= t < known for t in token_ids):
            raise InvalidRequest(f"tokens holds a token id outside [0, {known})", param="tokens")
        return self._tokenizer.decode(list(token_ids))
