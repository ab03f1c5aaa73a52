"""`AsyncEngine` and `open_engine`: the engine as a trio nursery.

Inside ``async with open_engine(config) as engine:`` two tasks run:

- the **step loop**: asks the scheduler for a plan, has the executor
  launch it (the model computes on a worker thread or in worker processes;
  the event loop stays free), collects the result, lets the scheduler digest
  it, and passes the per-sequence outputs on through a small channel. With
  asynchronous scheduling (the default on a GPU) it plans and launches the
  next step before collecting the previous one. With nothing to run it
  sleeps on an event that intake sets.
- the **detokenizer**: turns each step's token deltas into text deltas (one
  `Detokenizer` per completion), applies stop strings (aborting the
  sequence in the scheduler with reason "stop"), and puts one
  `RequestOutput` per request per step into that request's `OutputBuffer`.
  It works while the next step computes.

Intake runs in the caller's task, at the first iteration of `generate`:
validation, tokenization (on a thread when the prompt is long), context and
queue checks, then `Scheduler.add_request` and a wake-up for the step loop.
Aborts (a reader that left, a stop string) go straight to the scheduler,
which frees the blocks at once, even while a step that includes the
sequence is in flight (its result is then ignored).

A failure in either task kills the engine: every waiting request raises
`EngineDeadError` (its ``__cause__`` is the failure), new requests are
refused, `is_healthy` turns false, `wait_dead` returns, and both tasks end.
The body of the ``async with`` is *not* cancelled, so its readers see the
error; when the body then exits, `open_engine` raises `EngineDeadError`.
Leaving the block (normally, by an error or by cancellation) cancels the
tasks (a running step finishes first), ends any request still streaming
with `EngineDeadError`, and closes the executor, which releases the model.
"""

from __future__ import annotations

import collections
import itertools
import math
import sys
import time
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from contextlib import asynccontextmanager, contextmanager
from typing import TYPE_CHECKING, Any

import attrs
import trio

from atom_trio.config import EngineConfig

from ._stream import OutputBuffer, RequestStream
from .detokenizer import Detokenizer
from atom_trio.errors import ContextLengthExceeded, EngineDeadError, EngineOverloaded, InvalidRequest
from atom_trio.outputs import CompletionOutput, EngineStats, RequestMetrics, RequestOutput
from atom_trio.sampling_params import SamplingParams

if sys.version_info < (3, 11):
    from exceptiongroup import BaseExceptionGroup

if TYPE_CHECKING:
    from atom_trio.executor import Executor

    from atom_trio.core.plan import StepPlan
    from atom_trio.core.scheduler import Scheduler
    from atom_trio.core.sequence import SeqOutput

# Prompts longer than this (in characters) are tokenized on a worker thread.
_TOKENIZE_INLINE_MAX_CHARS = 4096
# Steps the detokenizer may fall behind before the step loop waits for it.
_OUTPUT_BACKLOG_STEPS = 2

Prompt = str | Sequence[int] | Sequence[Mapping[str, Any]]


@attrs.define(eq=False)
class _Request:
    """The engine's state of one admitted request: its completions' detokenizers and its output buffer."""

    key: str  # the scheduler's id for it: unique for the engine's lifetime, whatever the caller's request_id
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    detokenizers: list[Detokenizer]
    buffer: OutputBuffer = attrs.Factory(OutputBuffer)
    metrics: RequestMetrics = attrs.Factory(lambda: RequestMetrics(arrival_time=time.monotonic()))
    cumulative_logprobs: list[float] = attrs.Factory(list)
    num_cached_tokens: int = 0
    last_finish_reason: str | None = None

    @property
    def finished(self) -> bool:
        return all(d.finished for d in self.detokenizers)


class AsyncEngine:
    """The running engine; get one from `open_engine`.

    Attributes:
        config: the configuration it was started with.
        tokenizer: the model's tokenizer (transformers).
        max_model_len: the context length requests must fit in.
    """

    def __init__(self, config: EngineConfig, tokenizer: Any, executor: Executor, scheduler: Scheduler) -> None:
        self.config = config
        self.tokenizer = tokenizer
        self.max_model_len = scheduler.max_model_len  # the model's, capped at what the KV cache holds
        self._executor = executor
        self._scheduler = scheduler
        self._token = trio.lowlevel.current_trio_token()
        self._keys = map(str, itertools.count())
        self._requests: dict[str, _Request] = {}
        self._work = trio.Event()
        self._tasks_scope = trio.CancelScope()
        self._death: BaseException | None = None
        self._dead = trio.Event()
        self._closed = False
        self._num_steps = 0
        self._prompt_tokens_total = 0
        self._generation_tokens_total = 0
        self._finished_requests: collections.Counter[str] = collections.Counter()

    # ---- public API -------------------------------------------------------

    def generate(
        self,
        prompt: Prompt,
        params: SamplingParams | None = None,
        *,
        request_id: str | None = None,
        add_generation_prompt: bool = True,
        chat_template_kwargs: Mapping[str, Any] | None = None,
    ) -> RequestStream:
        """Submit a request; iterate the result for its output deltas.

        Args:
            prompt: text, token ids, or chat messages (``[{"role": ..., "content": ...}, ...]``,
                rendered with the model's chat template).
            params: how to sample; `SamplingParams()` when omitted.
                ``max_tokens=None`` means "until the context is full".
            request_id: echoed in every output; need not be unique.
            add_generation_prompt: for chat messages, end the prompt with the
                assistant turn's opening.
            chat_template_kwargs: extra variables for the chat template.

        Returns:
            An async iterator of `RequestOutput`, each holding what is new
            since the previous one; the last has ``finished=True``. Admission
            errors raise at the first iteration.
        """
        params = params if params is not None else SamplingParams()
        chat_kwargs = dict(chat_template_kwargs or {})

        async def admit() -> tuple[OutputBuffer, Any]:
            request = await self._admit(prompt, params, request_id, add_generation_prompt, chat_kwargs)
            return request.buffer, lambda: self._abort_request(request)

        return RequestStream(admit, self._token)

    @property
    def executor(self) -> Executor:
        """The executor running the model (tests reach the runner through it; the engine owns its lifetime)."""
        return self._executor

    def is_healthy(self) -> bool:
        """Whether the engine accepts and serves requests (false once dead or shut down)."""
        return self._death is None and not self._closed and self._executor.failure is None

    async def wait_dead(self) -> EngineDeadError:
        """Wait until the engine dies; return the `EngineDeadError` its requests see (with ``__cause__``).

        A server runs this in a task next to its listener and stops serving
        when it returns. It does not return on a normal shutdown.
        """
        await self._dead.wait()
        return self._dead_error()

    def stats(self) -> EngineStats:
        """The scheduler's counters plus the engine's totals."""
        s = self._scheduler.stats()
        return EngineStats(
            num_running=s.num_running,
            num_waiting=s.num_waiting,
            kv_cache_usage=s.kv_cache_usage,
            prefix_cache_queries=s.prefix_cache_queries,
            prefix_cache_hits=s.prefix_cache_hits,
            num_preemptions=s.num_preemptions,
            num_steps=self._num_steps,
            prompt_tokens_total=self._prompt_tokens_total,
            generation_tokens_total=self._generation_tokens_total,
            finished_requests=dict(self._finished_requests),
        )

    # ---- intake (runs in the caller's task) --------------------------------

    async def _admit(
        self,
        prompt: Prompt,
        params: SamplingParams,
        request_id: str | None,
        add_generation_prompt: bool,
        chat_template_kwargs: dict[str, Any],
    ) -> _Request:
        self._check_alive()
        params.validate(vocab_size=self._executor.vocab_size, max_logprobs=self.config.max_logprobs)
        self._check_queue()
        text, token_ids = await self.encode_prompt(
            prompt, add_generation_prompt=add_generation_prompt, chat_template_kwargs=chat_template_kwargs
        )
        if not token_ids:
            raise InvalidRequest("the prompt must not be empty", param="prompt")
        if min(token_ids) < 0 or max(token_ids) >= self._executor.vocab_size:
            raise InvalidRequest(f"prompt token ids must be in [0, {self._executor.vocab_size})", param="prompt")
        if len(token_ids) >= self.max_model_len or (
            params.max_tokens is not None and len(token_ids) + params.max_tokens > self.max_model_len
        ):
            raise ContextLengthExceeded(
                prompt_tokens=len(token_ids), max_model_len=self.max_model_len, max_tokens=params.max_tokens
            )
        self._check_alive()  # it may have died or closed while the prompt was tokenized
        self._check_queue()
        key = next(self._keys)
        request = _Request(
            key=key,
            request_id=request_id if request_id is not None else key,
            prompt=text,
            prompt_token_ids=token_ids,
            params=params,
            detokenizers=[Detokenizer(self.tokenizer, params, token_ids) for _ in range(params.n)],
            cumulative_logprobs=[0.0] * params.n,
        )
        self._scheduler.add_request(key, token_ids, params)
        self._requests[key] = request
        self._work.set()
        return request

    def _check_alive(self) -> None:
        if self._death is not None:
            raise self._dead_error()
        if self._closed:
            raise EngineDeadError("the engine has shut down")

    def _check_queue(self) -> None:
        waiting = self._scheduler.stats().num_waiting
        if waiting >= self.config.max_queued_requests:
            raise EngineOverloaded(
                f"{waiting} requests are waiting (max_queued_requests={self.config.max_queued_requests}); retry later"
            )

    async def encode_prompt(
        self,
        prompt: Prompt,
        *,
        add_generation_prompt: bool = True,
        chat_template_kwargs: dict[str, Any] | None = None,
        add_special_tokens: bool | None = None,
    ) -> tuple[str | None, list[int]]:
        """The prompt's text (``None`` for token ids) and token ids, exactly as `generate` would see them.

        Chat messages go through the model's chat template, which writes its own
        special tokens; a plain string gets the tokenizer's (BOS). ``add_special_tokens``
        overrides either default (the ``/tokenize`` endpoint's field).
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
        return self.tokenizer.backend_tokenizer.encode(text, add_special_tokens=add_special_tokens).ids

    def _render_chat(
        self,
        messages: Sequence[Mapping[str, Any]],
        add_generation_prompt: bool,
        kwargs: dict[str, Any],
        add_special_tokens: bool,
    ) -> tuple[str, list[int]]:
        try:
            text = self.tokenizer.apply_chat_template(
                [dict(m) for m in messages], tokenize=False, add_generation_prompt=add_generation_prompt, **kwargs
            )
        except Exception as exc:  # jinja errors, a missing template, a message the template rejects
            raise InvalidRequest(f"cannot apply the chat template: {exc}", param="messages") from exc
        # The template already wrote the special tokens it wants (BOS included).
        return text, self._encode(text, add_special_tokens=add_special_tokens)

    def _abort_request(self, request: _Request) -> None:
        """The reader went away: forget the request and free its blocks."""
        if self._requests.pop(request.key, None) is None:
            return  # finished, or the engine has stopped
        request.metrics.finished_time = time.monotonic()
        self._finished_requests["abort"] += 1
        self._scheduler.abort_request(request.key)

    # ---- the tasks -----------------------------------------------------------

    async def _run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        send, receive = trio.open_memory_channel(_OUTPUT_BACKLOG_STEPS)
        with self._tasks_scope:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._guarded, self._step_loop, send)
                nursery.start_soon(self._guarded, self._detokenize_loop, receive)
                task_status.started()

    async def _guarded(self, task: Any, *args: Any) -> None:
        try:
            await task(*args)
        except Exception as exc:
            self._die(exc)

    async def _step_loop(self, send: trio.MemorySendChannel[list[SeqOutput]]) -> None:
        """Launch the scheduler's plans and hand their results back to it, up to its ``max_in_flight`` at once.

        With one in flight a step runs start to end; with two (asynchronous
        scheduling) the next plan is launched before the previous one's
        tokens are collected, so the device never waits for the host.
        """
        scheduler, executor = self._scheduler, self._executor
        pipelined = scheduler.max_in_flight > 1
        in_flight: collections.deque[StepPlan] = collections.deque()
        async with send:
            while True:
                plan = None
                if len(in_flight) < scheduler.max_in_flight:
                    self._work = trio.Event()  # before schedule(): a request arriving from now on wakes us
                    plan = scheduler.schedule()
                    if plan is None and not in_flight:
                        await self._work.wait()
                        continue
                if plan is None:
                    outputs = scheduler.update(in_flight.popleft(), await executor.collect())
                elif pipelined:
                    await executor.launch(plan)
                    in_flight.append(plan)
                    continue
                else:  # one step at a time: one hop to the model and back, not two
                    outputs = scheduler.update(plan, await executor.execute(plan))
                self._num_steps += 1
                if outputs:
                    await send.send(outputs)

    async def _detokenize_loop(self, receive: trio.MemoryReceiveChannel[list[SeqOutput]]) -> None:
        async with receive:
            async for outputs in receive:
                self._deliver(outputs)

    def _deliver(self, outputs: list[SeqOutput]) -> None:
        """Detokenize one step's outputs and hand each request one delta."""
        deltas: dict[str, list[CompletionOutput]] = {}
        prompt_logprobs: dict[str, list[dict[int, float] | None]] = {}
        for out in outputs:
            request = self._requests.get(out.request_id)
            if request is None:
                continue  # aborted by its reader
            if out.prompt_logprobs is not None:
                # {token_id: logprob} per token, the prompt token first (once, even when also among the top)
                prompt_logprobs[out.request_id] = [None if e is None else dict(e) for e in out.prompt_logprobs]
            completion = self._advance(request, out)
            if completion is not None:
                deltas.setdefault(out.request_id, []).append(completion)
        now = time.monotonic()
        for key, completions in deltas.items():
            request = self._requests[key]
            if request.metrics.first_token_time is None:
                request.metrics.first_token_time = now
                self._prompt_tokens_total += len(request.prompt_token_ids)
            finished = request.finished
            if finished:
                request.metrics.finished_time = now
                del self._requests[key]
                self._finished_requests[request.last_finish_reason or "abort"] += 1
            request.buffer.put(
                RequestOutput(
                    request_id=request.request_id,
                    prompt=request.prompt,
                    prompt_token_ids=request.prompt_token_ids,
                    outputs=sorted(completions, key=_by_index),
                    finished=finished,
                    num_cached_tokens=request.num_cached_tokens,
                    metrics=request.metrics,
                    prompt_logprobs=prompt_logprobs.get(key),
                )
            )

    def _advance(self, request: _Request, out: SeqOutput) -> CompletionOutput | None:
        """Feed one sequence's new tokens to its detokenizer; the completion's delta, or None if it had ended."""
        detokenizer = request.detokenizers[out.index]
        if detokenizer.finished:
            return None  # a stop string ended it; the scheduler had not heard yet
        ended_by_token = out.finish_reason == "stop" and not isinstance(out.stop_reason, str)
        text = detokenizer.update(out.new_token_ids, finished=out.finish_reason is not None, stop_token=ended_by_token)
        finish_reason, stop_reason = out.finish_reason, out.stop_reason
        if text.stop_string is not None:
            finish_reason, stop_reason = "stop", text.stop_string
            if out.finish_reason is None:
                self._scheduler.abort_request(request.key, out.index, reason="stop")
        token_ids = out.new_token_ids[: text.num_tokens]
        logprobs = top_logprobs = cumulative = None
        if request.params.logprobs is not None and out.logprobs is not None:
            logprobs = out.logprobs[: text.num_tokens]
            top_logprobs = out.top_logprobs[: text.num_tokens] if out.top_logprobs is not None else None
            request.cumulative_logprobs[out.index] += math.fsum(logprobs)
            cumulative = request.cumulative_logprobs[out.index]
        request.num_cached_tokens = max(request.num_cached_tokens, out.num_cached_tokens)
        if finish_reason is not None:
            request.last_finish_reason = finish_reason
        self._generation_tokens_total += len(token_ids)
        return CompletionOutput(
            index=out.index,
            text=text.text,
            token_ids=token_ids,
            finish_reason=finish_reason,
            stop_reason=stop_reason,
            logprobs=logprobs,
            top_logprobs=top_logprobs,
            cumulative_logprob=cumulative,
        )

    # ---- death and shutdown -----------------------------------------------

    def _die(self, cause: BaseException) -> None:
        """A task failed: fail every request, refuse new ones, stop the tasks."""
        if self._death is not None:
            return
        self._death = cause
        self._fail_all(self._dead_error)
        self._dead.set()
        self._tasks_scope.cancel()

    def _dead_error(self) -> EngineDeadError:
        error = EngineDeadError(f"the engine has stopped after a failure: {self._death!r}")
        error.__cause__ = self._death
        return error

    def _close(self) -> None:
        self._closed = True
        self._fail_all(lambda: EngineDeadError("the engine has shut down"))

    def _fail_all(self, make_error: Any) -> None:
        requests, self._requests = self._requests, {}
        for request in requests.values():
            request.buffer.fail(make_error())


def _by_index(completion: CompletionOutput) -> int:
    return completion.index


def _make_config(config: EngineConfig | None, fields: dict[str, Any]) -> EngineConfig:
    if config is None:
        return EngineConfig(**fields)
    if fields:
        return attrs.evolve(config, **fields)
    return config


@contextmanager
def _lone_errors_unwrapped() -> Iterator[None]:
    """Re-raise a nursery's group of one exception as that exception, so callers can catch it by type."""
    try:
        yield
    except BaseExceptionGroup as group:
        error: BaseException = group
        while isinstance(error, BaseExceptionGroup) and len(error.exceptions) == 1:
            error = error.exceptions[0]
        if error is group:
            raise
        raise error from error.__cause__


@asynccontextmanager
async def open_engine(config: EngineConfig | None = None, /, **fields: Any) -> AsyncIterator[AsyncEngine]:
    """Start an engine for the body of an ``async with`` block.

    ``open_engine(EngineConfig(...))``, or ``open_engine(model=..., **fields)``
    for short (fields given with a config override it). The tokenizer and
    the model load on worker threads (or in the workers), off the event loop.

    Raises:
        EngineDeadError: when the block ends after the engine died (a step
            failed); ``__cause__`` is the failure. An exception from the body
            itself propagates as it was raised.
        ModelLoadError: the model or tokenizer could not be loaded.
    """
    from atom_trio.executor import open_executor, wants_async_scheduling
    from atom_trio.loader.tokenizer import load_tokenizer

    from atom_trio.core.scheduler import Scheduler

    config = _make_config(config, fields)
    tokenizer = await trio.to_thread.run_sync(load_tokenizer, config, thread_name="atom-trio tokenizer load")
    # The engine's tasks never raise (a failure kills the engine instead), so
    # an error out of these nurseries came from the body: it leaves as raised.
    with _lone_errors_unwrapped():
        async with open_executor(config) as executor:
            scheduler = Scheduler(
                num_blocks=executor.num_kv_blocks,
                block_size=executor.block_size,
                max_num_seqs=config.max_num_seqs,
                max_num_batched_tokens=config.max_num_batched_tokens,
                max_model_len=executor.max_model_len,
                enable_prefix_caching=config.enable_prefix_caching,
                eos_token_ids=executor.eos_token_ids,
                max_in_flight=2 if wants_async_scheduling(config) else 1,
            )
            engine = AsyncEngine(config, tokenizer, executor, scheduler)
            try:
                async with trio.open_nursery() as nursery:
                    await nursery.start(engine._run)
                    try:
                        yield engine
                    finally:
                        nursery.cancel_scope.cancel()
            finally:
                engine._close()
            if engine._death is not None:
                raise engine._dead_error()
