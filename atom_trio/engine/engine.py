"""`AsyncEngine` and `open_engine`: the engine as a trio nursery.

A request's way through it has three parts:

- **intake**, in the caller's task at the first iteration of `generate`: the
  `InputProcessor` tokenizes the prompt (on a thread when it is long) and runs
  every admission check, then a ``structured_outputs`` grammar is compiled
  (on a thread, cached; one the grammar engine refuses is an
  `InvalidRequest`); the admitted request goes to the scheduler's queue,
  its output state to the `OutputProcessor`, and the step loop wakes up.
- the **step loop** (a task): asks the scheduler for a plan, has the executor
  launch it (the model computes on a worker thread or in worker processes;
  the event loop stays free), collects the result, lets the scheduler digest
  it, and passes the per-sequence outputs on through a small channel. With
  asynchronous scheduling (the default on a GPU) it plans and launches the
  next step before collecting the previous one. With nothing to run it
  sleeps on an event that intake sets. Between two steps it also runs the
  profiler's start and stop on every rank (`BetweenSteps`). A plan with
  grammar-constrained rows has their token bitmask filled before it is
  launched (`StructuredOutputs`); other plans skip that entirely.
- **delivery** (a task): the `OutputProcessor` turns each step's token deltas
  into text deltas, applies stop strings (the engine then aborts the
  sequence in the scheduler with reason "stop"), and puts one
  `RequestOutput` per request per step into that request's `OutputBuffer`.
  It works while the next step computes.

Both tasks time their phases (`STEP_PHASES`) into rings that `step_phases`
summarises, cheap enough to stay on: where the host's time per step goes.

Aborts (a reader that left, a stop string) go straight to the scheduler,
which frees the blocks at once, even while a step that includes the
sequence is in flight (its result is then ignored).

A failure in either task, or of the executor while no step runs (a worker
process killed: a third task awaits `Executor.wait_failed`), kills the
engine at once: it logs one ERROR line with the cause, every waiting request
raises `EngineDeadError` (its ``__cause__`` is the failure), new requests are
refused, `is_healthy` turns false, `wait_dead` returns, and the tasks end.
The body of the ``async with`` is *not* cancelled, so its readers see the
error; when the body then exits, `open_engine` raises `EngineDeadError`.
Leaving the block (normally, by an error or by cancellation) cancels the
tasks (a running step finishes first), ends any request still streaming
with `EngineDeadError`, and closes the executor, which releases the model.
"""

from __future__ import annotations

import collections
import functools
import gc
import logging
import time
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from contextlib import asynccontextmanager, contextmanager
from typing import TYPE_CHECKING, Any

import attrs
import trio

from atom_trio._phase_timers import PhaseStats, PhaseTimers
from atom_trio.config import EngineConfig

from ._between_steps import BetweenSteps
from ._stream import OutputBuffer, RequestStream
from .input_processor import InputProcessor, Prompt
from .output_processor import OutputProcessor, RequestState
from .structured_outputs import StructuredOutputs
from atom_trio.errors import EngineDeadError
from atom_trio.outputs import EngineStats
from atom_trio.sampling_params import SamplingParams

if TYPE_CHECKING:
    from atom_trio.executor import Executor

    from atom_trio.core.plan import StepPlan
    from atom_trio.core.scheduler import Scheduler
    from atom_trio.core.sequence import SeqOutput

log = logging.getLogger("atom_trio.engine")

# Steps the delivery task may fall behind before the step loop waits for it.
_OUTPUT_BACKLOG_STEPS = 2

STEP_PHASES = ("schedule", "launch", "collect", "execute", "update", "deliver")
"""The engine's timed phases (`AsyncEngine.step_phases`): the step loop's scheduler calls and its awaits
on the executor (``launch`` and ``collect`` with asynchronous scheduling, ``execute`` without), and the
delivery task's detokenization and hand-over of one step's outputs."""


class AsyncEngine:
    """The running engine; get one from `open_engine`.

    Attributes:
        config: the configuration it was started with.
        tokenizer: the model's tokenizer (transformers), for library callers;
            the server goes through `encode_prompt`, `detokenize` and `decode`.
        max_model_len: the context length requests must fit in.
    """

    def __init__(self, config: EngineConfig, tokenizer: Any, executor: Executor, scheduler: Scheduler) -> None:
        self.config = config
        self.tokenizer = tokenizer
        self.max_model_len = scheduler.max_model_len  # the model's, capped at what the KV cache holds
        self._executor = executor
        self._scheduler = scheduler
        self._inputs = InputProcessor(
            tokenizer,
            scheduler,
            vocab_size=executor.facts.vocab_size,
            max_logprobs=config.max_logprobs,
            max_queued_requests=config.max_queued_requests,
            check_alive=self._check_alive,
        )
        self._outputs = OutputProcessor(tokenizer)
        self._structured_outputs = StructuredOutputs(
            tokenizer, vocab_size=executor.facts.vocab_size, eos_token_ids=executor.facts.eos_token_ids
        )
        self._token = trio.lowlevel.current_trio_token()
        self._work = trio.Event()
        self._tasks_scope = trio.CancelScope()
        self._death: BaseException | None = None
        self._dead = trio.Event()
        self._closed = False
        self._num_steps = 0
        self._between_steps = BetweenSteps(lambda: self._work.set())
        self._phases = PhaseTimers(STEP_PHASES)

    # ---- public API -------------------------------------------------------

    def generate(
        self,
        prompt: Prompt,
        params: SamplingParams | None = None,
        *,
        request_id: str | None = None,
        add_generation_prompt: bool = True,
        chat_template_kwargs: Mapping[str, Any] | None = None,
        tools: Sequence[Mapping[str, Any]] | None = None,
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
            tools: for chat messages, the tools (OpenAI's ``{"type": "function", "function": {...}}``) the
                chat template renders into the prompt, as ``apply_chat_template(tools=...)`` does.

        Returns:
            An async iterator of `RequestOutput`, each holding what is new
            since the previous one; the last has ``finished=True``. Admission
            errors raise at the first iteration.
        """
        params = params if params is not None else SamplingParams()
        chat_kwargs = dict(chat_template_kwargs or {})

        async def admit() -> tuple[OutputBuffer, Any]:
            state = await self._admit(prompt, params, request_id, add_generation_prompt, chat_kwargs, tools)
            return state.buffer, lambda: self._abort_request(state.request.key)

        return RequestStream(admit, self._token)

    async def encode_prompt(
        self,
        prompt: Prompt,
        *,
        add_generation_prompt: bool = True,
        chat_template_kwargs: Mapping[str, Any] | None = None,
        add_special_tokens: bool | None = None,
        tools: Sequence[Mapping[str, Any]] | None = None,
    ) -> tuple[str | None, list[int]]:
        """The prompt's text (``None`` for token ids) and token ids, exactly as `generate` would see them.

        Chat messages are rendered with the model's chat template; a long
        prompt is tokenized on a worker thread. ``add_special_tokens``
        overrides whether the tokenizer adds its special tokens (BOS): by
        default a plain string gets them and a rendered chat does not.
        """
        return await self._inputs.encode_prompt(
            prompt,
            add_generation_prompt=add_generation_prompt,
            chat_template_kwargs=chat_template_kwargs,
            add_special_tokens=add_special_tokens,
            tools=tools,
        )

    async def detokenize(self, token_ids: Sequence[int], *, check_ids: bool = True) -> str:
        """The text of token ids, special tokens included; a long list is decoded on a worker thread.

        With ``check_ids`` (ids a client sent to be decoded), `InvalidRequest` for an id the tokenizer does
        not know; without (a token-id prompt to echo, which `generate` checks itself), nothing is checked.
        """
        return await self._inputs.detokenize(token_ids, check_ids=check_ids)

    def decode(self, token_ids: Sequence[int]) -> str:
        """The tokenizer's text for a few token ids, special tokens included and nothing checked.

        For the tokens of logprobs: one token's text is remembered, so many alternatives cost little.
        """
        if len(token_ids) == 1:
            return self._inputs.token_text(token_ids[0])
        return self.tokenizer.decode(list(token_ids))

    @property
    def executor(self) -> Executor:
        """The executor running the model (tests reach the runner through it; the engine owns its lifetime)."""
        return self._executor

    async def start_profile(self, trace_prefix: str) -> list[str]:
        """Start the torch profiler on every rank, where its steps run, between two steps; the trace paths.

        Rank ``r`` marks each step in its trace, records at most
        `atom_trio.runner.profiling.MAX_STEPS` of them, and writes
        ``{trace_prefix}-rank{r}.trace.json`` at `stop_profile`.

        Raises:
            ProfilerError: a rank could not start (none is left profiling); the engine serves on.
            EngineDeadError: the engine has stopped.
        """
        return await self._call_between_steps(self._executor.start_profile, trace_prefix)

    async def stop_profile(self) -> list[str]:
        """Stop every rank's profiler between two steps and write its trace; the trace paths, by rank.

        Raises:
            ProfilerError: no profile runs, or a rank could not write its trace; the engine serves on.
            EngineDeadError: the engine has stopped.
        """
        return await self._call_between_steps(self._executor.stop_profile)

    async def _call_between_steps(self, work: Any, *args: Any) -> Any:
        self._check_alive()
        result = await self._between_steps.call(functools.partial(work, *args))
        if result is None:
            self._check_alive()
            raise EngineDeadError("the engine has shut down")
        return result.unwrap()

    def is_healthy(self) -> bool:
        """Whether the engine accepts and serves requests (false once dead or shut down)."""
        return self._death is None and not self._closed

    async def wait_dead(self) -> EngineDeadError:
        """Wait until the engine dies; return the `EngineDeadError` its requests see (with ``__cause__``).

        A server runs this in a task next to its listener and stops serving
        when it returns. It does not return on a normal shutdown.
        """
        await self._dead.wait()
        return self._dead_error()

    def stats(self) -> EngineStats:
        """The scheduler's counters plus the engine's totals."""
        return self._outputs.stats(self._scheduler.stats(), num_steps=self._num_steps)

    def step_phases(self, *, clear: bool = False) -> dict[str, PhaseStats]:
        """Host time per step by phase (`STEP_PHASES`) over the last few thousand steps; ``clear`` forgets them after.

        ``launch``, ``collect`` and ``execute`` are the event loop's waits on the
        executor, so they include the runner's work (on its thread or in the
        workers) and, for ``collect``, the device's.
        """
        summary = self._phases.summary()
        if clear:
            self._phases.clear()
        return summary

    # ---- intake (runs in the caller's task) --------------------------------

    async def _admit(
        self,
        prompt: Prompt,
        params: SamplingParams,
        request_id: str | None,
        add_generation_prompt: bool,
        chat_template_kwargs: dict[str, Any],
        tools: Sequence[Mapping[str, Any]] | None,
    ) -> RequestState:
        request = await self._inputs.process(
            prompt,
            params,
            request_id=request_id,
            add_generation_prompt=add_generation_prompt,
            chat_template_kwargs=chat_template_kwargs,
            tools=tools,
        )
        grammar = None
        if request.params.structured_outputs is not None:
            grammar = await self._structured_outputs.matcher_factory(request.params.structured_outputs)
            self._check_alive()  # the engine may have stopped while it compiled
        state = self._outputs.add_request(request)
        self._scheduler.add_request(request.key, request.prompt_token_ids, request.params, grammar)
        self._work.set()
        return state

    def _check_alive(self) -> None:
        if self._death is not None:
            raise self._dead_error()
        if self._closed:
            raise EngineDeadError("the engine has shut down")

    def _abort_request(self, key: str) -> None:
        """The reader went away: forget the request and free its blocks."""
        if self._outputs.abort_request(key):  # not when finished, or when the engine has stopped
            self._scheduler.abort_request(key)

    # ---- the tasks -----------------------------------------------------------

    async def _run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        send, receive = trio.open_memory_channel(_OUTPUT_BACKLOG_STEPS)
        with self._tasks_scope:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._guarded, self._step_loop, send)
                nursery.start_soon(self._guarded, self._deliver_loop, receive)
                nursery.start_soon(self._guarded, self._watch_executor)
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
        scheduler, executor, phases = self._scheduler, self._executor, self._phases
        pipelined = scheduler.max_in_flight > 1
        in_flight: collections.deque[StepPlan] = collections.deque()
        async with send:
            while True:
                if self._between_steps.pending and not in_flight:
                    await self._between_steps.run_pending()
                    continue
                plan = None
                if len(in_flight) < scheduler.max_in_flight and not self._between_steps.pending:
                    self._work = trio.Event()  # before schedule(): a request arriving from now on wakes us
                    start = time.perf_counter_ns()
                    plan = scheduler.schedule()
                    if plan is not None:
                        phases.since("schedule", start)
                    if plan is None and not in_flight:
                        await self._work.wait()
                        continue
                    if plan is not None and plan.token_bitmask is not None:
                        self._structured_outputs.fill(plan.token_bitmask)
                start = time.perf_counter_ns()
                if plan is None:
                    result = await executor.collect()
                    start = phases.since("collect", start)
                    outputs = scheduler.update(in_flight.popleft(), result)
                elif pipelined:
                    await executor.launch(plan)
                    phases.since("launch", start)
                    in_flight.append(plan)
                    continue
                else:  # one step at a time: one hop to the model and back, not two
                    result = await executor.execute(plan)
                    start = phases.since("execute", start)
                    outputs = scheduler.update(plan, result)
                phases.since("update", start)
                self._num_steps += 1
                if outputs:
                    await send.send(outputs)

    async def _watch_executor(self) -> None:
        """Die as soon as the executor fails, not at the next step, which may be long in coming while idle."""
        raise await self._executor.wait_failed()

    async def _deliver_loop(self, receive: trio.MemoryReceiveChannel[list[SeqOutput]]) -> None:
        async with receive:
            async for outputs in receive:
                start = time.perf_counter_ns()
                for key, index in self._outputs.process_outputs(outputs):
                    self._scheduler.abort_request(key, index, reason="stop")
                self._phases.since("deliver", start)

    # ---- death and shutdown -----------------------------------------------

    def _die(self, cause: BaseException) -> None:
        """A task failed: fail every request, refuse new ones, stop the tasks."""
        if self._death is not None:
            return
        self._death = cause
        # One line that says why; the traceback (a worker's is in the notes) at debug level.
        log.error("the engine died: %s: %s", type(cause).__name__, cause,
                  exc_info=cause if log.isEnabledFor(logging.DEBUG) else None)
        self._outputs.fail_all(self._dead_error)
        self._between_steps.close()
        self._dead.set()
        self._tasks_scope.cancel()

    def _dead_error(self) -> EngineDeadError:
        error = EngineDeadError(f"the engine has stopped after a failure: {self._death!r}")
        error.__cause__ = self._death
        return error

    def shutdown(self) -> None:
        """Refuse new requests and end every running one with `EngineDeadError` ("the engine has shut down").

        Leaving `open_engine` does this first. A server calls it when its
        grace period for running requests is over, so that each ends with an
        error its client can read rather than with a cut connection.
        """
        self._closed = True
        self._outputs.fail_all(lambda: EngineDeadError("the engine has shut down"))
        self._between_steps.close()


def _make_config(config: EngineConfig | None, fields: dict[str, Any]) -> EngineConfig:
    if config is None:
        return EngineConfig(**fields)
    if fields:
        return attrs.evolve(config, **fields)
    return config


@contextmanager
def _startup_objects_frozen() -> Iterator[None]:
    """Keep what exists once the engine runs (torch, the model, the tokenizer) out of the cyclic GC's walks.

    A full collection walks every tracked object while holding the GIL: with
    the default model loaded that is ~380,000 objects and 170-220 ms here,
    which stalls the event loop whenever requests have allocated enough to
    trigger one. Frozen, they are skipped (the walk takes microseconds) and
    still freed by reference counting; they are unfrozen when the engine
    closes, so a cycle among them can be collected again afterwards.
    """
    gc.collect()
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


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
        InvalidConfig: an option this machine cannot run, before anything loads.
    """
    from atom_trio.executor import check_device, open_executor, wants_async_scheduling
    from atom_trio.loader.tokenizer import load_tokenizer

    from atom_trio.core.scheduler import Scheduler

    config = _make_config(config, fields)
    await trio.to_thread.run_sync(check_device, config, thread_name="atom-trio device check")  # imports torch
    tokenizer = await trio.to_thread.run_sync(load_tokenizer, config, thread_name="atom-trio tokenizer load")
    # The engine's tasks never raise (a failure kills the engine instead), so
    # an error out of these nurseries came from the body: it leaves as raised.
    with _lone_errors_unwrapped():
        async with open_executor(config) as executor:
            scheduler = Scheduler(
                num_blocks=executor.facts.num_kv_blocks,
                block_size=executor.facts.block_size,
                max_num_seqs=config.max_num_seqs,
                max_num_batched_tokens=config.max_num_batched_tokens,
                max_model_len=executor.facts.max_model_len,
                enable_prefix_caching=config.enable_prefix_caching,
                eos_token_ids=executor.facts.eos_token_ids,
                max_in_flight=2 if wants_async_scheduling(config) else 1,
                num_speculative_tokens=(
                    0 if config.speculative_config is None else config.speculative_config.num_speculative_tokens
                ),
                kv_cache_windows=executor.facts.kv_cache_windows,
            )
            engine = AsyncEngine(config, tokenizer, executor, scheduler)
            try:
                async with trio.open_nursery() as nursery:
                    await nursery.start(engine._run)
                    try:
                        with _startup_objects_frozen():
                            yield engine
                    finally:
                        nursery.cancel_scope.cancel()
            finally:
                engine.shutdown()
            if engine._death is not None:
                raise engine._dead_error()
