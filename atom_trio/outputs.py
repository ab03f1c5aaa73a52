"""What the engine hands back: per-request outputs (vLLM's shape) and engine-wide counters.

While a request streams, each `RequestOutput` carries only what is new since
the previous one (a *delta*: the new text and token ids of each completion
that advanced). `RequestOutput.add` folds a later delta into an earlier one;
the engine uses it to merge the deltas a slow reader has not collected yet
(so a lagging stream holds one merged output, never a queue), and the
synchronous `LLM` uses it to assemble complete outputs.
"""

from __future__ import annotations

from typing import Literal

import attrs

FinishReason = Literal["stop", "length", "abort"]


@attrs.define(kw_only=True, eq=False)
class CompletionOutput:
    """One of a request's ``n`` completions (or, while streaming, what it gained in one delta).

    Attributes:
        index: which of the ``n`` completions this is.
        text: the generated text (a delta while streaming).
        token_ids: the generated token ids (a delta while streaming); they
            include the token that completed a stop string or was a stop token.
        finish_reason: ``"stop"`` (EOS, a stop token or a stop string),
            ``"length"`` (max_tokens or the context) or ``"abort"``; ``None`` while running.
        stop_reason: the stop string or stop token id that ended it; ``None`` for EOS and length.
        logprobs: when the request asked for logprobs, the logprob of each token in ``token_ids``.
        top_logprobs: when asked, for each token in ``token_ids`` the requested
            number of ``(token_id, logprob)`` alternatives, most likely first.
        cumulative_logprob: the sum of all logprobs so far (not a delta), when asked.
    """

    index: int
    text: str = ""
    token_ids: list[int] = attrs.Factory(list)
    finish_reason: FinishReason | None = None
    stop_reason: int | str | None = None
    logprobs: list[float] | None = None
    top_logprobs: list[list[tuple[int, float]]] | None = None
    cumulative_logprob: float | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def add(self, later: CompletionOutput) -> None:
        """Append a later delta of the same completion to this one."""
        self.text += later.text
        self.token_ids.extend(later.token_ids)
        self.logprobs = _extended(self.logprobs, later.logprobs)
        self.top_logprobs = _extended(self.top_logprobs, later.top_logprobs)
        if later.cumulative_logprob is not None:
            self.cumulative_logprob = later.cumulative_logprob
        self.finish_reason = later.finish_reason
        self.stop_reason = later.stop_reason


def _extended(mine: list | None, later: list | None) -> list | None:
    if later is None:
        return mine
    if mine is None:
        return list(later)
    mine.extend(later)
    return mine


@attrs.define(kw_only=True, eq=False)
class RequestMetrics:
    """Timestamps of one request (``time.monotonic()``), shared by all of its outputs and updated in place."""

    arrival_time: float
    first_token_time: float | None = None
    finished_time: float | None = None


@attrs.define(kw_only=True, eq=False)
class RequestOutput:
    """One output of a request: a delta while streaming, the whole result from `LLM.generate`.

    ``outputs`` lists the completions that advanced (all ``n`` of them in a
    complete result), in index order. ``finished`` turns true on the last
    output of the request, once every completion has finished.

    ``prompt_logprobs`` (vLLM's shape), when the request asked for them, comes
    with the first output: one entry per prompt token, ``None`` for the first
    (nothing precedes it), else ``{token_id: logprob}`` holding the prompt
    token itself first, then the requested number of most likely tokens.
    """

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    num_cached_tokens: int
    metrics: RequestMetrics
    prompt_logprobs: list[dict[int, float] | None] | None = None

    def add(self, later: RequestOutput) -> None:
        """Fold a later delta of the same request into this one (text concatenated, tokens appended)."""
        if self.prompt_logprobs is None:
            self.prompt_logprobs = later.prompt_logprobs
        by_index = {c.index: c for c in self.outputs}
        for completion in later.outputs:
            mine = by_index.get(completion.index)
            if mine is None:
                self.outputs.append(completion)
            else:
                mine.add(completion)
        self.outputs.sort(key=lambda c: c.index)
        self.finished = later.finished
        self.num_cached_tokens = later.num_cached_tokens


@attrs.frozen(kw_only=True)
class EngineStats:
    """A snapshot of the engine's counters, for metrics endpoints and tests.

    The first group comes from the scheduler's `SchedulerStats`; the rest are
    totals since the engine started. ``num_waiting`` and ``num_running`` count
    requests, whatever their ``n``: a request is waiting from admission until
    the first of its sequences is scheduled, then running until it finishes
    or is aborted (a preempted request stays running). ``finished_requests``
    counts each finished request once, under the finish reason of its last
    completion.
    """

    num_running: int
    num_waiting: int
    kv_cache_usage: float
    prefix_cache_queries: int
    prefix_cache_hits: int
    num_preemptions: int
    num_steps: int
    prompt_tokens_total: int
    generation_tokens_total: int
    finished_requests: dict[str, int]
    spec_num_drafts: int = 0
    """Speculative decoding: verify steps of a sequence, the draft tokens they verified, those accepted,
    and how often the draft at each position (0 first) was accepted."""
    spec_num_draft_tokens: int = 0
    spec_num_accepted_tokens: int = 0
    spec_accepted_per_position: tuple[int, ...] = ()
