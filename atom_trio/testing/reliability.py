"""What the reliability suite and ``benchmarks/soak.py`` share: a live server's state, and the soak itself.

The soak plays many clients at once against a real server: completions and chat, streamed and not, several
samples and several prompts, stop strings, logprobs, prompts that share long prefixes (so the prefix cache
hands blocks between requests), and clients that give up mid-request. It checks every answer that should
have come, measures ``/health`` from a process of its own (the soak's own event loop would add its lag to
every reading) and samples the server's resident memory; `SoakReport` holds what it saw and `verdict`
says what is wrong with it. Synchronous on purpose, like `server_process`: a test calls it as it is and
the benchmark script runs it from ``main``.
"""

from __future__ import annotations

import json
import math
import multiprocessing
import os
import random
import statistics
import time
from collections import Counter
from pathlib import Path
from typing import Any

import attrs
import httpx
import trio

FULL_SCALE = os.environ.get("ATOM_TRIO_RELIABILITY", "ci") == "full"
"""``ATOM_TRIO_RELIABILITY=full``: the reliability suite at the scale docs/reliability.md records, not CI's."""


def scale(ci: int, full: int) -> int:
    """``full`` at full scale, else ``ci``."""
    return full if FULL_SCALE else ci


# ---- a live server's state ----------------------------------------------------------------------------


def scrape_metrics(url: str, *, timeout: float = 10.0) -> dict[str, float]:
    """``/metrics`` as ``{name: value}``, each name without its ``atom_trio:`` prefix and labels summed over,
    plus ``request_success_total:<reason>`` per finish reason."""
    text = httpx.get(url + "/metrics", timeout=timeout).text
    values: Counter[str] = Counter()
    for line in text.splitlines():
        if not line.startswith("atom_trio:"):
            continue
        series, _, value = line.rpartition(" ")
        name, _, labels = series.removeprefix("atom_trio:").partition("{")
        values[name] += float(value)
        if name == "request_success_total" and 'finished_reason="' in labels:
            reason = labels.split('finished_reason="', 1)[1].split('"', 1)[0]
            values[f"{name}:{reason}"] += float(value)
    return dict(values)


def wait_drained(url: str, *, timeout: float = 60.0) -> dict[str, float]:
    """Wait until nothing runs, waits or sits undelivered, and every KV block is free again; the metrics then.

    ``kv_cache_usage_perc`` is exactly 0 only when every block sits on a free list (the block manager's
    usage is ``1 - free / total``), so this is the accounting check a client can make: any block a finished
    or aborted request still held would keep it above 0.

    Raises:
        AssertionError: naming what was still held when ``timeout`` ran out.
    """
    deadline = time.monotonic() + timeout
    while True:
        metrics = scrape_metrics(url)
        held = {name: metrics.get(name) for name in ("kv_cache_usage_perc", "num_requests_running",
                                                       "num_requests_waiting", "http_pending_outputs")}
        if not any(held.values()):
            return metrics
        if time.monotonic() > deadline:
            raise AssertionError(f"not drained {timeout} s after the load stopped: {held}")
        time.sleep(0.1)


KV_MAPPING_MIN_BYTES = 256 * 2**20
"""An anonymous mapping this large in the soak's server is its KV cache (the default model's largest tensor is
113 MB); see `rss_bytes`."""


def rss_bytes(pid: int) -> int:
    """The resident memory of process ``pid``, less the pages of its KV cache, from /proc.

    The CPU KV cache is a lazily zeroed mapping: its pages become resident
    as blocks are first written, up to the cache's size, which is use, not
    a leak. So the soak's leak check counts everything else.
    """
    total = kv = 0
    size = 0
    anonymous = False
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        fields = line.split()
        if not fields[0].endswith(":"):  # a mapping's header: address range, perms, offset, device, inode, path
            anonymous = len(fields) < 6 or fields[5] == "/dev/zero"  # no file (a shared one shows /dev/zero)
        elif fields[0] == "Size:":
            size = int(fields[1]) * 1024
        elif fields[0] == "Rss:":
            rss = int(fields[1]) * 1024
            total += rss
            if anonymous and size >= KV_MAPPING_MIN_BYTES:
                kv += rss
    return total - kv


def percentile(values: list[float], q: float) -> float:
    """The ``q``-th percentile (0-100), nearest rank; nan for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q / 100 * len(ordered)) - 1))]


# ---- the soak ---------------------------------------------------------------------------------------------

_PREFIXES = (
    "You are a meticulous assistant for a public library. Answer in one or two short sentences, cite no "
    "sources, and never invent opening hours. If a question is about a book, give its author first. ",
    "System notice: the following is a transcript of a customer support chat for a bicycle repair shop. "
    "The agent is friendly, names parts precisely, and always suggests checking tyre pressure first. ",
    "Translate the following English sentence into French, keeping names unchanged and using the formal "
    "form of address throughout. Do not add explanations or alternatives; give one translation only. ",
)
_TOPICS = ("the weather", "a red bicycle", "the tallest mountain", "prime numbers", "a quiet library",
           "the river Seine", "breakfast", "a broken chain", "Jules Verne", "the number seven")
_STOPS = (None, None, None, ["\n"], [".", "!"], [" the"])

SOAK_API_KEY = "soak-key"
SOAK_SERVER_ARGS = (
    "--device", "cpu", "--dtype", "float32", "--max-model-len", "512", "--num-kv-blocks", "768", "--max-num-seqs", "128",
    "--api-key", SOAK_API_KEY, "--shutdown-timeout", "30",
)  # fmt: skip
"""The soak's server: the default model on the CPU (in float32: CPUs without bf16 instructions run it
several times faster than bf16), a KV cache small enough that 64 clients of up to three
samples each sometimes run it out (so preemption is soaked too), and the API key on."""


@attrs.frozen(kw_only=True)
class SoakConfig:
    """How big and how hostile the soak is.

    Attributes:
        requests: API requests sent in all.
        concurrency: clients at once; each sends its next request when its last one ends.
        max_tokens: the most tokens a request asks for (each asks for a random number up to it).
        cancel_fraction: the share of requests whose client gives up at a random moment.
        request_timeout: an answer (or the end of a stream) later than this counts as a stuck request.
        health_interval: seconds between two ``/health`` probes.
    """

    requests: int = 300
    concurrency: int = 64
    seed: int = 0
    max_tokens: int = 24
    cancel_fraction: float = 0.15
    request_timeout: float = 300.0
    health_interval: float = 0.1
    api_key: str | None = None


@attrs.frozen
class PlannedRequest:
    path: str
    body: dict[str, Any]
    cancel_after: float | None
    """Seconds after which the client gives up (closes the connection); None: it waits for the answer."""
    read_chunks: int | None
    """For streams: the client closes the stream after this many events; None: it reads to the end."""


def plan_request(rng: random.Random, config: SoakConfig) -> PlannedRequest:
    """One request of the mix, drawn from ``rng``."""
    chat = rng.random() < 0.4
    stream = rng.random() < 0.5
    prompts = [rng.choice(_PREFIXES) + f"Tell me about {rng.choice(_TOPICS)} ({rng.randrange(1000)})."
               for _ in range(1 if chat or rng.random() < 0.8 else 2)]
    body: dict[str, Any] = {
        "max_tokens": rng.randint(1, config.max_tokens),
        "n": rng.choice((1, 1, 1, 2, 3)),
        "temperature": rng.choice((0.0, 0.7, 1.0)),
        "stream": stream,
    }
    if (stop := rng.choice(_STOPS)) is not None:
        body["stop"] = stop
    if rng.random() < 0.2:
        body["seed"] = rng.randrange(2**31)
    if rng.random() < 0.15:
        body.update({"logprobs": True, "top_logprobs": 2} if chat else {"logprobs": 2})
    if stream and rng.random() < 0.3:
        body["stream_options"] = {"include_usage": True}
    if chat:
        body["messages"] = [{"role": "user", "content": prompts[0]}]
    else:
        body["prompt"] = prompts if len(prompts) > 1 else prompts[0]
    cancel_after = read_chunks = None
    if rng.random() < config.cancel_fraction:
        if stream and rng.random() < 0.5:
            read_chunks = rng.randint(1, 4)
        else:
            cancel_after = rng.uniform(0.0, 1.5)
    return PlannedRequest("/v1/chat/completions" if chat else "/v1/completions", body, cancel_after, read_chunks)


@attrs.define
class SoakReport:
    """What one soak saw. ``failures`` describes every request that should have succeeded and did not."""

    config: SoakConfig
    sent: int = 0
    succeeded: int = 0
    cancelled: int = 0
    completion_tokens: int = 0
    failures: list[str] = attrs.Factory(list)
    duration_s: float = 0.0
    health_latencies_s: list[float] = attrs.Factory(list)
    health_errors: int = 0
    rss_samples: list[tuple[float, int]] = attrs.Factory(list)
    """(seconds since the soak started, the server's resident bytes)."""
    drained: dict[str, float] = attrs.Factory(dict)
    """The server's metrics once the load stopped and it drained."""

    def health_p99_ms(self) -> float:
        return 1000 * percentile(self.health_latencies_s, 99)

    def rss_growth_second_half(self) -> float:
        """Growth of resident memory from the soak's midpoint to its end, as a fraction of the midpoint's.

        Each end is the median of the samples in a window of a tenth of the soak around it, so one
        allocator hiccup does not decide it.
        """
        if len(self.rss_samples) < 4:
            return math.nan
        end = self.rss_samples[-1][0]
        window = end / 10

        def around(t: float) -> float:
            near = [rss for at, rss in self.rss_samples if abs(at - t) <= window / 2]
            return statistics.median(near) if near else min(self.rss_samples, key=lambda s: abs(s[0] - t))[1]

        return around(end) / around(end / 2) - 1

    def summary(self) -> dict[str, Any]:
        return {
            "requests": self.sent,
            "succeeded": self.succeeded,
            "cancelled_by_client": self.cancelled,
            "failed": len(self.failures),
            "completion_tokens": self.completion_tokens,
            "duration_s": round(self.duration_s, 1),
            "health_probes": len(self.health_latencies_s),
            "health_errors": self.health_errors,
            "health_p50_ms": round(1000 * percentile(self.health_latencies_s, 50), 2),
            "health_p99_ms": round(self.health_p99_ms(), 2),
            "health_max_ms": round(1000 * max(self.health_latencies_s, default=math.nan), 2),
            "rss_mid_mib": round(self.rss_samples[len(self.rss_samples) // 2][1] / 2**20, 1) if self.rss_samples else None,
            "rss_end_mib": round(self.rss_samples[-1][1] / 2**20, 1) if self.rss_samples else None,
            "rss_growth_second_half_pct": round(100 * self.rss_growth_second_half(), 2),
            "kv_cache_usage_after": self.drained.get("kv_cache_usage_perc"),
            "finished_by_reason": {k.split(":", 1)[1]: v for k, v in self.drained.items()
                                   if k.startswith("request_success_total:")},
        }

    def verdict(self, *, max_health_p99_ms: float = 50.0, max_rss_growth: float = 0.05) -> list[str]:
        """What is wrong with this soak; empty when it passed."""
        problems = [f"{len(self.failures)} requests failed, e.g. {self.failures[:3]}"] if self.failures else []
        if self.health_errors:
            problems.append(f"/health failed {self.health_errors} times")
        if not self.health_p99_ms() < max_health_p99_ms:
            problems.append(f"/health p99 {self.health_p99_ms():.1f} ms >= {max_health_p99_ms} ms")
        if not self.rss_growth_second_half() < max_rss_growth:
            problems.append(f"RSS grew {100 * self.rss_growth_second_half():.1f}% over the second half")
        return problems


def run_soak(url: str, server_pid: int, config: SoakConfig) -> SoakReport:
    """Run the soak against the server at ``url`` (process ``server_pid``), then wait for it to drain."""
    report = SoakReport(config)
    probes, results = multiprocessing.get_context("spawn").Pipe()
    prober = multiprocessing.get_context("spawn").Process(
        target=_probe_health, args=(url, config.health_interval, results), daemon=True)
    prober.start()
    try:
        trio.run(_soak, url, server_pid, config, report)
    finally:
        probes.send("stop")
        if probes.poll(60):
            report.health_latencies_s, report.health_errors = probes.recv()
        prober.join(10)
        if prober.is_alive():
            prober.kill()
    report.drained = wait_drained(url)
    return report


def _probe_health(url: str, interval: float, conn: Any) -> None:
    """In a process of its own: GET /health every ``interval`` until told to stop; send back the latencies."""
    latencies: list[float] = []
    errors = 0
    with httpx.Client(timeout=30) as http:
        while not conn.poll(interval):
            start = time.perf_counter()
            try:
                ok = http.get(url + "/health").status_code == 200
            except httpx.TransportError:
                ok = False
            latencies.append(time.perf_counter() - start)
            errors += not ok
    conn.send((latencies, errors))


async def _soak(url: str, server_pid: int, config: SoakConfig, report: SoakReport) -> None:
    rng = random.Random(config.seed)
    plans = [plan_request(rng, config) for _ in range(config.requests)]
    headers = {"Authorization": f"Bearer {config.api_key}"} if config.api_key else {}
    limits = httpx.Limits(max_connections=config.concurrency + 8, max_keepalive_connections=config.concurrency)
    start = time.monotonic()
    async with httpx.AsyncClient(base_url=url, headers=headers, limits=limits, timeout=None) as http:
        async with trio.open_nursery() as nursery:
            sampling = trio.CancelScope()
            nursery.start_soon(_sample_rss, server_pid, start, report, sampling)
            async with trio.open_nursery() as clients:
                queue = iter(plans)
                for _ in range(config.concurrency):
                    clients.start_soon(_client, http, queue, config, report)
            report.duration_s = time.monotonic() - start
            sampling.cancel()


async def _sample_rss(pid: int, start: float, report: SoakReport, scope: trio.CancelScope) -> None:
    with scope:
        while True:
            report.rss_samples.append((time.monotonic() - start, rss_bytes(pid)))
            await trio.sleep(0.5)


async def _client(http: httpx.AsyncClient, queue: Any, config: SoakConfig, report: SoakReport) -> None:
    for plan in queue:
        report.sent += 1
        problem, tokens = None, 0
        with trio.move_on_after(plan.cancel_after if plan.cancel_after is not None else math.inf) as giving_up:
            with trio.move_on_after(config.request_timeout) as stuck:
                try:
                    problem, tokens = await _send(http, plan)
                except (httpx.HTTPError, ValueError) as exc:
                    problem, tokens = f"{type(exc).__name__}: {exc}", 0
        if giving_up.cancelled_caught or problem is _WALKED_AWAY:
            report.cancelled += 1
        elif stuck.cancelled_caught:
            report.failures.append(f"no answer within {config.request_timeout} s: {plan}")
        elif problem:
            report.failures.append(f"{problem}: {plan}")
        else:
            report.succeeded += 1
            report.completion_tokens += tokens


_WALKED_AWAY = "the client closed the stream, as planned"


async def _send(http: httpx.AsyncClient, plan: PlannedRequest) -> tuple[str | None, int]:
    """Send one request; (what was wrong with its answer or None, completion tokens)."""
    body = plan.body
    if not body["stream"]:
        response = await http.post(plan.path, json=body)
        if response.status_code != 200:
            return f"status {response.status_code} {response.text[:300]}", 0
        answer = response.json()
        texts = {c["index"]: c["message"]["content"] if "message" in c else c["text"] for c in answer["choices"]}
        reasons = {c["index"]: c["finish_reason"] for c in answer["choices"]}
        return _check(plan, texts, reasons), answer["usage"]["completion_tokens"]
    texts: dict[int, str] = {}
    reasons: dict[int, str | None] = {}
    events = 0
    done = False
    async with http.stream("POST", plan.path, json=body) as response:
        if response.status_code != 200:
            return f"status {response.status_code} {(await response.aread())[:300]!r}", 0
        async for line in response.aiter_lines():
            if not line.startswith("data: "):
                continue
            events += 1
            if line == "data: [DONE]":
                done = True
                break
            event = json.loads(line[6:])
            if "error" in event:
                return f"error event {event['error']}", 0
            for choice in event["choices"]:
                delta = choice["delta"].get("content") or "" if "delta" in choice else choice["text"]
                texts[choice["index"]] = texts.get(choice["index"], "") + delta
                if choice.get("finish_reason"):
                    reasons[choice["index"]] = choice["finish_reason"]
            if plan.read_chunks is not None and events >= plan.read_chunks:
                return _WALKED_AWAY, 0
    if not done:
        return "the stream ended without [DONE]", 0
    return _check(plan, texts, reasons), 0


def _check(plan: PlannedRequest, texts: dict[int, str], reasons: dict[int, str | None]) -> str | None:
    body = plan.body
    prompts = len(body["prompt"]) if isinstance(body.get("prompt"), list) else 1
    expected = set(range(prompts * body["n"]))
    if set(reasons) != expected or not set(texts) <= expected:
        return f"choices {sorted(set(texts) | set(reasons))}, expected {sorted(expected)}"
    if any(reason not in ("stop", "length") for reason in reasons.values()):
        return f"finish reasons {reasons}"
    for stop in body.get("stop") or ():
        if any(stop in text for text in texts.values()):
            return f"stop string {stop!r} in the output {texts}"
    return None


__all__ = [
    "FULL_SCALE", "SOAK_API_KEY", "SOAK_SERVER_ARGS", "PlannedRequest", "SoakConfig", "SoakReport", "percentile",
    "plan_request", "rss_bytes", "run_soak", "scale", "scrape_metrics", "wait_drained",
]
