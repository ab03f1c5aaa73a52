"""The one way out: from the scheduler's per-sequence outputs to each request's stream of deltas.

For every admitted request it keeps what the caller's deltas are made of:
one `Detokenizer` per completion (text deltas, UTF-8 safe, and stop
strings), the cumulative logprobs, the metrics, and the `OutputBuffer` the
caller's `RequestStream` reads. Each step's outputs become at most one
`RequestOutput` per request, holding the deltas of its completions that
moved. A stop string ends a completion here, before the scheduler knows:
`process_outputs` reports those completions so that the engine aborts their
sequences. It also keeps the counters behind `EngineStats` (tokens in and
out, finished requests by reason).
"""

from __future__ import annotations

import collections
import math
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import attrs

from ._stream import OutputBuffer
from .detokenizer import Detokenizer
from atom_trio.outputs import CompletionOutput, EngineStats, RequestMetrics, RequestOutput

if TYPE_CHECKING:
    from atom_trio.core.scheduler import SchedulerStats
    from atom_trio.core.sequence import SeqOutput

    from .input_processor import EngineRequest


@attrs.define(eq=False)
class RequestState:
    """One admitted request on its way out: its completions' detokenizers and its output buffer."""

    request: EngineRequest
    detokenizers: list[Detokenizer]
    buffer: OutputBuffer = attrs.Factory(OutputBuffer)
    metrics: RequestMetrics = attrs.Factory(lambda: RequestMetrics(arrival_time=time.monotonic()))
    cumulative_logprobs: list[float] = attrs.Factory(list)
    num_cached_tokens: int = 0
    last_finish_reason: str | None = None

    @property
    def finished(self) -> bool:
        for detokenizer in self.detokenizers:  # a loop, not all(): read for every request every step
            if not detokenizer.finished:
                return False
        return True


class OutputProcessor:
    """The per-request output state of one engine, and its output counters.

    Args:
        tokenizer: the model's tokenizer, which the detokenizers decode with.
    """

    def __init__(self, tokenizer: Any) -> None:
        self._tokenizer = tokenizer
        self._requests: dict[str, RequestState] = {}
        self._prompt_tokens_total = 0
        self._generation_tokens_total = 0
        self._finished_requests: collections.Counter[str] = collections.Counter()

    def add_request(self, request: EngineRequest) -> RequestState:
        """Start tracking an admitted request; its buffer is what the caller reads."""
        n = request.params.n
        state = RequestState(
            request=request,
            detokenizers=[Detokenizer(self._tokenizer, request.params, request.prompt_token_ids) for _ in range(n)],
            cumulative_logprobs=[0.0] * n,
        )
        self._requests[request.key] = state
        return state

    def abort_request(self, key: str) -> bool:
        """The reader went away: forget the request. False when it had already finished or failed."""
        state = self._requests.pop(key, None)
        if state is None:
            return False
        state.metrics.finished_time = time.monotonic()
        self._finished_requests["abort"] += 1
        return True

    def fail_all(self, make_error: Callable[[], BaseException]) -> None:
        """End every request's stream with an error of its own (the engine died or shut down)."""
        requests, self._requests = self._requests, {}
        for state in requests.values():
            state.buffer.fail(make_error())

    def process_outputs(self, outputs: list[SeqOutput]) -> list[tuple[str, int]]:
        """Detokenize one step's outputs and hand each request one delta.

        A request of one completion (the common case) gets its delta as soon as
        its output is read; one of ``n > 1`` gathers its completions' first.

        Returns:
            ``(key, index)`` of each completion a stop string ended while its
            sequence still runs in the scheduler.
        """
        requests = self._requests
        gathered: dict[str, list[CompletionOutput]] = {}
        prompt_logprobs: dict[str, list[dict[int, float] | None]] = {}
        stopped: list[tuple[str, int]] = []
        now = time.monotonic()
        for out in outputs:
            state = requests.get(out.request_id)
            if state is None:
                continue  # aborted by its reader
            if out.prompt_logprobs is not None:
                # {token_id: logprob} per token, the prompt token first (once, even when also among the top)
                prompt_logprobs[out.request_id] = [None if e is None else dict(e) for e in out.prompt_logprobs]
            completion = self._advance(state, out)
            if completion is None:
                continue
            if completion.finish_reason is not None and out.finish_reason is None:
                stopped.append((out.request_id, out.index))  # ended by a stop string, still running in the scheduler
            if len(state.detokenizers) == 1:
                self._deliver(state, [completion], prompt_logprobs.get(out.request_id), now)
            else:
                gathered.setdefault(out.request_id, []).append(completion)
        for key, completions in gathered.items():
            self._deliver(requests[key], sorted(completions, key=_by_index), prompt_logprobs.get(key), now)
        return stopped

    def _deliver(
        self,
        state: RequestState,
        completions: list[CompletionOutput],
        prompt_logprobs: list[dict[int, float] | None] | None,
        now: float,
    ) -> None:
        """Put one step's delta of ``state``'s request into its buffer; forget the request once it has finished."""
        request = state.request
        if state.metrics.first_token_time is None:
            state.metrics.first_token_time = now
            self._prompt_tokens_total += len(request.prompt_token_ids)
        finished = state.finished
        if finished:
            state.metrics.finished_time = now
            del self._requests[request.key]
            self._finished_requests[state.last_finish_reason or "abort"] += 1
        state.buffer.put(
            RequestOutput(
                request_id=request.request_id,
                prompt=request.prompt,
                prompt_token_ids=request.prompt_token_ids,
                outputs=completions,
                finished=finished,
                num_cached_tokens=state.num_cached_tokens,
                metrics=state.metrics,
                prompt_logprobs=prompt_logprobs,
            )
        )

    def _advance(self, state: RequestState, out: SeqOutput) -> CompletionOutput | None:
        """Feed one sequence's new tokens to its detokenizer; the completion's delta, or None if it had ended."""
        detokenizer = state.detokenizers[out.index]
        if detokenizer.finished:
            return None  # a stop string ended it; the scheduler had not heard yet
        finish_reason, stop_reason, new_token_ids = out.finish_reason, out.stop_reason, out.new_token_ids
        ended_by_token = finish_reason == "stop" and not isinstance(stop_reason, str)
        text = detokenizer.update(new_token_ids, finished=finish_reason is not None, stop_token=ended_by_token)
        num_tokens = text.num_tokens
        if text.stop_string is not None:
            finish_reason, stop_reason = "stop", text.stop_string
        # the output's list is this delta's own (the scheduler sliced it), so it is kept, not copied
        token_ids = new_token_ids if num_tokens == len(new_token_ids) else new_token_ids[:num_tokens]
        logprobs = top_logprobs = cumulative = None
        if out.logprobs is not None and state.request.params.logprobs is not None:
            logprobs = out.logprobs[:num_tokens]
            top_logprobs = out.top_logprobs[:num_tokens] if out.top_logprobs is not None else None
            state.cumulative_logprobs[out.index] += math.fsum(logprobs)
            cumulative = state.cumulative_logprobs[out.index]
        state.num_cached_tokens = max(state.num_cached_tokens, out.num_cached_tokens)
        if finish_reason is not None:
            state.last_finish_reason = finish_reason
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

    def stats(self, scheduler: SchedulerStats, *, num_steps: int) -> EngineStats:
        """The scheduler's snapshot with this processor's totals and the engine's step count."""
        return EngineStats(
            num_running=scheduler.num_running_requests,
            num_waiting=scheduler.num_waiting_requests,
            kv_cache_usage=scheduler.kv_cache_usage,
            prefix_cache_queries=scheduler.prefix_cache_queries,
            prefix_cache_hits=scheduler.prefix_cache_hits,
            num_preemptions=scheduler.num_preemptions,
            num_steps=num_steps,
            prompt_tokens_total=self._prompt_tokens_total,
            generation_tokens_total=self._generation_tokens_total,
            finished_requests=dict(self._finished_requests),
            spec_num_drafts=scheduler.spec_num_drafts,
            spec_num_draft_tokens=scheduler.spec_num_draft_tokens,
            spec_num_accepted_tokens=scheduler.spec_num_accepted_tokens,
            spec_accepted_per_position=scheduler.spec_accepted_per_position,
        )


def _by_index(completion: CompletionOutput) -> int:
    return completion.index
