"""Prometheus metrics with vLLM's names under an ``atom_trio:`` prefix.

Gauges and counters the engine already keeps (running/waiting requests, KV
usage, prefix-cache tokens, preemptions, token counters) are read from
``engine.stats()`` at scrape time by a custom collector, so there is one source
of truth and nothing to keep in sync. Latencies only the HTTP side sees (time to
first token, inter-token latency, end-to-end latency) are observed by the
handlers, and the outputs the handlers hold for their responses are counted at
scrape time over the live generations.

Each app gets its own `CollectorRegistry`: several servers in one process (tests)
never share or clash.

The same counters feed the stats line that `log_stats` writes every few
seconds while the engine works (vLLM's "Avg prompt throughput..." line), for
whoever watches the log rather than a dashboard.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import trio
from prometheus_client import CollectorRegistry, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from ..engine import AsyncEngine
    from ..outputs import EngineStats
    from .generation import Generation

stats_log = logging.getLogger("atom_trio.stats")

PREFIX = "atom_trio:"

_LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
                    10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
_ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3,
                0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)

# (metric name, EngineStats attribute, help); gauges then counters.
_GAUGES = (
    ("num_requests_running", "num_running",
     "Requests scheduled and not finished, whatever their n (while preempted too)."),
    ("num_requests_waiting", "num_waiting",
     "Requests admitted none of whose sequences has been scheduled yet, whatever their n."),
    ("kv_cache_usage_perc", "kv_cache_usage", "Fraction of KV cache blocks in use (0..1)."),
)
_COUNTERS = (
    ("prompt_tokens", "prompt_tokens_total", "Prompt tokens processed (prefill)."),
    ("generation_tokens", "generation_tokens_total", "Tokens generated."),
    ("prefix_cache_queries", "prefix_cache_queries", "Prompt tokens looked up in the prefix cache."),
    ("prefix_cache_hits", "prefix_cache_hits", "Prompt tokens found in the prefix cache."),
    ("num_preemptions", "num_preemptions", "Sequences preempted (recomputed) for lack of KV blocks."),
    ("spec_decode_num_drafts", "spec_num_drafts", "Speculative decoding: draft runs verified (one per sequence per step)."),
    ("spec_decode_num_draft_tokens", "spec_num_draft_tokens", "Speculative decoding: draft tokens verified."),
    ("spec_decode_num_accepted_tokens", "spec_num_accepted_tokens", "Speculative decoding: draft tokens accepted."),
)


class EngineStatsCollector(Collector):
    """Reads ``engine.stats()`` at each scrape; reports nothing while no engine is up."""

    def __init__(self, get_engine: Callable[[], AsyncEngine | None], model_name: str) -> None:
        self._get_engine = get_engine
        self._model_name = model_name

    def collect(self) -> Iterator[Any]:
        engine = self._get_engine()
        if engine is None:
            return
        stats = engine.stats()
        labels = [self._model_name]
        for name, attr, doc in _GAUGES:
            family = GaugeMetricFamily(PREFIX + name, doc, labels=["model_name"])
            family.add_metric(labels, float(getattr(stats, attr)))
            yield family
        for name, attr, doc in _COUNTERS:
            family = CounterMetricFamily(PREFIX + name, doc, labels=["model_name"])
            family.add_metric(labels, float(getattr(stats, attr)))
            yield family
        per_position = CounterMetricFamily(
            PREFIX + "spec_decode_num_accepted_tokens_per_pos",
            "Speculative decoding: draft tokens accepted, by position in the draft run (0 first).",
            labels=["model_name", "position"],
        )
        for position, count in enumerate(stats.spec_accepted_per_position):
            per_position.add_metric([self._model_name, str(position)], float(count))
        yield per_position
        success = CounterMetricFamily(PREFIX + "request_success", "Finished requests, by finish reason.",
                                      labels=["model_name", "finished_reason"])
        for reason, count in sorted(stats.finished_requests.items()):
            success.add_metric([self._model_name, reason], float(count))
        yield success
        healthy = GaugeMetricFamily(PREFIX + "engine_healthy", "1 while the engine runs, 0 once it died.",
                                    labels=["model_name"])
        healthy.add_metric(labels, 1.0 if engine.is_healthy() else 0.0)
        yield healthy


class ServerMetrics:
    """The registry of one server, and the histograms its handlers observe."""

    def __init__(self, get_engine: Callable[[], AsyncEngine | None], model_name: str) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.model_name = model_name
        label = ["model_name"]
        self.time_to_first_token = Histogram(
            PREFIX + "time_to_first_token_seconds", "Time from request arrival to its first token.",
            label, buckets=_LATENCY_BUCKETS, registry=self.registry,
        ).labels(model_name)
        self.inter_token_latency = Histogram(
            PREFIX + "inter_token_latency_seconds", "Time between successive outputs of a request.",
            label, buckets=_ITL_BUCKETS, registry=self.registry,
        ).labels(model_name)
        self.e2e_request_latency = Histogram(
            PREFIX + "e2e_request_latency_seconds", "Time from request arrival to its last token.",
            label, buckets=_LATENCY_BUCKETS, registry=self.registry,
        ).labels(model_name)
        self.generations: weakref.WeakSet[Generation] = weakref.WeakSet()
        """The API requests' generations while they live (`start_generation` adds each)."""
        Gauge(
            PREFIX + "http_pending_outputs",
            "Outputs the engine produced that HTTP responses have not taken yet: at most one per prompt of a "
            "running request, since later deltas merge into it.",
            label, registry=self.registry,
        ).labels(model_name).set_function(lambda: sum(g.buffered for g in list(self.generations)))
        self.registry.register(EngineStatsCollector(get_engine, model_name))

    def render(self) -> bytes:
        return generate_latest(self.registry)


def stats_line(before: EngineStats, after: EngineStats, seconds: float) -> str | None:
    """What the engine did between two snapshots ``seconds`` apart, as one line; None if it ran no step."""
    if after.num_steps == before.num_steps:
        return None
    queries = after.prefix_cache_queries - before.prefix_cache_queries
    hits = after.prefix_cache_hits - before.prefix_cache_hits
    return (
        f"prompt throughput: {(after.prompt_tokens_total - before.prompt_tokens_total) / seconds:.1f} tokens/s, "
        f"generation throughput: {(after.generation_tokens_total - before.generation_tokens_total) / seconds:.1f} "
        f"tokens/s, running: {after.num_running} reqs, waiting: {after.num_waiting} reqs, "
        f"KV cache usage: {after.kv_cache_usage:.1%}, prefix cache hit rate: {hits / queries if queries else 0:.1%}"
    )


async def log_stats(get_engine: Callable[[], AsyncEngine | None], interval: float) -> None:
    """Log a `stats_line` every ``interval`` seconds in which the engine ran a step; silent while it idles."""
    before: EngineStats | None = None
    since = trio.current_time()
    while True:
        engine = get_engine()
        after, now = (engine.stats(), trio.current_time()) if engine is not None else (None, since)
        line = stats_line(before, after, now - since) if before is not None and after is not None else None
        if line is not None:
            stats_log.info("%s", line)
        before, since = after, now
        await trio.sleep(interval)
