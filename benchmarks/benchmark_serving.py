"""Load an OpenAI-compatible server and report its throughput and latencies.

    python -m benchmarks.benchmark_serving --base-url http://127.0.0.1:8000 \\
        --dataset-name random --random-input-len 64 --random-output-len 128 --ignore-eos \\
        --num-prompts 32 --max-concurrency 8 --save-result

The flags and the metrics are vLLM's (and ATOM's, which copied them), so numbers taken with this
tool and with theirs mean the same thing:

* TTFT: time from sending the request to the first streamed chunk that carries text.
* ITL: the gap between successive text chunks of one request (a chunk holding several tokens is
  one gap, as in vLLM).
* TPOT: ``(E2EL - TTFT) / (output_tokens - 1)`` per request with more than one output token.
* E2EL: time from sending the request to the end of its stream.

Token counts come from the server's own ``usage`` (requested with ``stream_options.include_usage``);
only a server that sends none is counted with the tokenizer. Requests are streamed over httpx on
trio, arrive as a Poisson process (or a gamma process with ``--burstiness``, or all at once with
``--request-rate inf``), and are capped at ``--max-concurrency`` in flight.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any, Literal

import attrs
import httpx
import numpy as np
import trio
from tqdm import tqdm

from .datasets import BenchRequest, get_tokenizer, jsonl_requests, random_requests

Api = Literal["completions", "chat"]

#: --backend names users know from vLLM and ATOM, and the endpoint each one defaults to.
BACKEND_ENDPOINTS: dict[str, str] = {
    "openai": "/v1/completions",
    "vllm": "/v1/completions",
    "atom": "/v1/completions",
    "atom-trio": "/v1/completions",
    "sglang": "/v1/completions",
    "lmdeploy": "/v1/completions",
    "openai-chat": "/v1/chat/completions",
    "vllm-chat": "/v1/chat/completions",
    "atom-trio-chat": "/v1/chat/completions",
}

METRICS = ("ttft", "tpot", "itl", "e2el")
METRIC_NAMES = {
    "ttft": "Time to First Token",
    "tpot": "Time per Output Token (excl. 1st token)",
    "itl": "Inter-token Latency",
    "e2el": "End-to-end Latency",
}


class BenchmarkError(RuntimeError):
    """The benchmark cannot run (server unreachable, first request refused, bad arguments)."""


@attrs.define(kw_only=True)
class RequestResult:
    """What the client saw of one request. Times are in seconds; ``start`` is ``time.perf_counter()``."""

    request: BenchRequest
    success: bool = False
    start: float = 0.0
    ttft: float = 0.0
    latency: float = 0.0
    itl: list[float] = attrs.Factory(list)
    prompt_tokens: int | None = None  # from the server's usage
    output_tokens: int | None = None  # from the server's usage
    generated_text: str = ""
    error: str = ""


def api_for_endpoint(endpoint: str) -> Api:
    return "chat" if endpoint.rstrip("/").endswith("chat/completions") else "completions"


def build_payload(
    api: Api, request: BenchRequest, *, model: str, ignore_eos: bool, temperature: float
) -> dict[str, Any]:
    """The streaming request body for ``request``: token ids or text on /v1/completions, a user
    message on /v1/chat/completions. ``ignore_eos`` (a vLLM extension) is sent only when set, so
    servers that refuse unknown fields still take the default load."""
    payload: dict[str, Any] = {
        "model": model,
        "temperature": temperature,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if api == "chat":
        prompt = request.prompt
        if not isinstance(prompt, str):
            raise BenchmarkError("chat endpoints take text prompts; build the dataset with as_text=True")
        payload["messages"] = [{"role": "user", "content": prompt}]
        payload["max_completion_tokens"] = request.output_len
    else:
        payload["prompt"] = request.prompt
        payload["max_tokens"] = request.output_len
    if ignore_eos:
        payload["ignore_eos"] = True
    return payload


def chunk_text(api: Api, chunk: dict[str, Any]) -> str:
    """The text one streamed chunk adds (empty for role-only, finish-only and usage chunks)."""
    choices = chunk.get("choices") or []
    if not choices:
        return ""
    if api == "chat":
        delta = choices[0].get("delta") or {}
        return (delta.get("content") or "") + (delta.get("reasoning_content") or "")
    return choices[0].get("text") or ""


async def send_request(
    client: httpx.AsyncClient,
    api_url: str,
    api: Api,
    request: BenchRequest,
    *,
    model: str,
    ignore_eos: bool,
    temperature: float,
) -> RequestResult:
    """Stream one request and time its chunks; any failure is recorded, never raised."""
    payload = build_payload(api, request, model=model, ignore_eos=ignore_eos, temperature=temperature)
    result = RequestResult(request=request)
    text: list[str] = []
    result.start = last = time.perf_counter()
    try:
        async with client.stream("POST", api_url, json=payload) as response:
            if response.status_code != 200:
                body = (await response.aread()).decode(errors="replace")
                result.error = f"HTTP {response.status_code}: {body[:500]}"
                return result
            async for line in response.aiter_lines():
                now = time.perf_counter()
                if not line.startswith("data:"):
                    continue
                data = line[len("data:") :].strip()
                if data == "[DONE]":
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    result.error = f"error in stream: {chunk['error']}"
                    return result
                if piece := chunk_text(api, chunk):
                    if not text:
                        result.ttft = now - result.start
                    else:
                        result.itl.append(now - last)
                    last = now
                    text.append(piece)
                if usage := chunk.get("usage"):
                    result.prompt_tokens = usage.get("prompt_tokens")
                    result.output_tokens = usage.get("completion_tokens")
        result.latency = time.perf_counter() - result.start
        if not text and result.output_tokens is None:
            result.error = "the stream ended without any output or usage"
            return result
        if not text:  # tokens that decode to no text (e.g. a skipped special token): first seen at the end
            result.ttft = result.latency
        result.generated_text = "".join(text)
        result.success = True
    except (httpx.HTTPError, json.JSONDecodeError) as exc:
        result.error = f"{type(exc).__name__}: {exc}"
    return result


def arrival_offsets(
    num_requests: int, request_rate: float, burstiness: float = 1.0, *, rng: np.random.Generator
) -> np.ndarray:
    """When each request is sent, in seconds after the first (which goes at 0).

    Gaps are gamma-distributed with mean ``1 / request_rate``: ``burstiness=1`` is a Poisson
    process, lower is burstier, higher more regular (vLLM's ``--burstiness``). An infinite rate
    sends everything at once.
    """
    if num_requests == 0:
        return np.zeros(0)
    if math.isinf(request_rate):
        return np.zeros(num_requests)
    if request_rate <= 0 or burstiness <= 0:
        raise ValueError("request_rate and burstiness must be positive")
    gaps = rng.gamma(shape=burstiness, scale=1.0 / (request_rate * burstiness), size=num_requests - 1)
    return np.concatenate([[0.0], np.cumsum(gaps)])


def _percentile_key(p: float) -> str:
    return f"p{int(p) if float(p).is_integer() else p}"


def parse_goodput(specs: list[str] | None) -> dict[str, float]:
    """``["ttft:500", "tpot:50"]`` -> SLOs in milliseconds per metric (vLLM's ``--goodput``)."""
    slos = {}
    for spec in specs or []:
        name, _, value = spec.partition(":")
        if name not in ("ttft", "tpot", "e2el") or not value:
            raise BenchmarkError(f"--goodput takes ttft:MS, tpot:MS or e2el:MS, got {spec!r}")
        slos[name] = float(value)
    return slos


def token_counts(result: RequestResult, tokenizer: Any = None) -> tuple[int, int]:
    """(prompt, output) tokens of a successful request: the server's usage, else the dataset's
    prompt length and the generated text re-tokenized."""
    n_in = result.prompt_tokens if result.prompt_tokens is not None else result.request.prompt_len
    if result.output_tokens is not None:
        return n_in, result.output_tokens
    if tokenizer is None:
        raise BenchmarkError("the server sent no usage and no tokenizer was given to count tokens")
    return n_in, len(tokenizer.encode(result.generated_text, add_special_tokens=False))


def compute_metrics(
    results: list[RequestResult],
    duration: float,
    *,
    tokenizer: Any = None,
    selected_metrics: tuple[str, ...] = METRICS,
    percentiles: tuple[float, ...] = (90.0, 99.0),
    goodput_slos: dict[str, float] | None = None,
) -> dict[str, Any]:
    """Summarize a run with vLLM's metric names (times in milliseconds, throughputs per second).

    Failed requests count in ``failed`` only. A successful request's tokens are the server's
    ``usage``; without usage, its prompt length is the dataset's and its output is re-tokenized
    (``tokenizer`` is then required).
    """
    ok = [r for r in results if r.success]
    input_lens, output_lens, ttfts, tpots, itls, e2els = [], [], [], [], [], []
    good = 0
    for r in ok:
        n_in, n_out = token_counts(r, tokenizer)
        input_lens.append(n_in)
        output_lens.append(n_out)
        ttfts.append(r.ttft)
        e2els.append(r.latency)
        itls.extend(r.itl)
        tpot = (r.latency - r.ttft) / (n_out - 1) if n_out > 1 else None
        if tpot is not None:
            tpots.append(tpot)
        per_request = {"ttft": r.ttft, "tpot": tpot or 0.0, "e2el": r.latency}
        if goodput_slos and all(per_request[k] * 1000 <= v for k, v in goodput_slos.items()):
            good += 1

    total_in, total_out = sum(input_lens), sum(output_lens)
    metrics: dict[str, Any] = {
        "duration": duration,
        "completed": len(ok),
        "failed": len(results) - len(ok),
        "total_input_tokens": total_in,
        "total_output_tokens": total_out,
        "request_throughput": len(ok) / duration,
        "request_goodput": good / duration if goodput_slos else None,
        "output_throughput": total_out / duration,
        "total_token_throughput": (total_in + total_out) / duration,
        "max_output_tokens_per_s": peak_chunk_rate(ok),
        "max_concurrent_requests": peak_concurrency(results),
    }
    samples = {"ttft": ttfts, "tpot": tpots, "itl": itls, "e2el": e2els}
    for name in selected_metrics:
        values = np.asarray(samples[name] or [0.0]) * 1000
        metrics[f"mean_{name}_ms"] = float(np.mean(values))
        metrics[f"median_{name}_ms"] = float(np.median(values))
        metrics[f"std_{name}_ms"] = float(np.std(values))
        for p in percentiles:
            metrics[f"{_percentile_key(p)}_{name}_ms"] = float(np.percentile(values, p))
    return metrics


def peak_concurrency(results: list[RequestResult]) -> int:
    """The most requests in flight at once, from their start and end times."""
    events = sorted(
        [(r.start, 1) for r in results if r.latency > 0] + [(r.start + r.latency, -1) for r in results if r.latency > 0],
        key=lambda e: (e[0], e[1]),
    )
    peak = current = 0
    for _, step in events:
        current += step
        peak = max(peak, current)
    return peak


def peak_chunk_rate(results: list[RequestResult]) -> float:
    """The most text chunks received in any one-second window from the start (vLLM's "peak output
    token throughput", which also counts a chunk as a token)."""
    times = []
    for r in results:
        t = r.start + r.ttft
        times.append(t)
        for gap in r.itl:
            t += gap
            times.append(t)
    if not times:
        return 0.0
    start = min(r.start for r in results)
    counts = np.bincount(np.floor(np.asarray(times) - start).astype(np.int64))
    return float(counts.max())


def format_table(metrics: dict[str, Any], *, selected_metrics: tuple[str, ...], percentiles: tuple[float, ...]) -> str:
    """The result table in vLLM's layout."""
    lines = ["{s:{c}^50}".format(s=" Serving Benchmark Result ", c="=")]

    def row(label: str, value: Any, fmt: str = "<10.2f") -> None:
        lines.append(f"{label:<40}{value:{fmt}}")

    row("Successful requests:", metrics["completed"], "<10")
    row("Failed requests:", metrics["failed"], "<10")
    if metrics.get("max_concurrency") is not None:
        row("Maximum request concurrency:", metrics["max_concurrency"], "<10")
    row("Benchmark duration (s):", metrics["duration"])
    row("Total input tokens:", metrics["total_input_tokens"], "<10")
    row("Total generated tokens:", metrics["total_output_tokens"], "<10")
    row("Request throughput (req/s):", metrics["request_throughput"])
    if metrics["request_goodput"] is not None:
        row("Request goodput (req/s):", metrics["request_goodput"])
    row("Output token throughput (tok/s):", metrics["output_throughput"])
    row("Peak output token throughput (tok/s):", metrics["max_output_tokens_per_s"])
    row("Peak concurrent requests:", metrics["max_concurrent_requests"], "<10")
    row("Total Token throughput (tok/s):", metrics["total_token_throughput"])
    for name in selected_metrics:
        lines.append("{s:{c}^50}".format(s=METRIC_NAMES[name], c="-"))
        upper = name.upper()
        row(f"Mean {upper} (ms):", metrics[f"mean_{name}_ms"])
        row(f"Median {upper} (ms):", metrics[f"median_{name}_ms"])
        for p in percentiles:
            key = _percentile_key(p)
            row(f"{key.upper()} {upper} (ms):", metrics[f"{key}_{name}_ms"])
    lines.append("=" * 50)
    return "\n".join(lines)


async def fetch_model_id(client: httpx.AsyncClient, base_url: str) -> str:
    """The first model the server lists on /v1/models (what to send as ``model`` when none is given)."""
    try:
        response = await client.get(f"{base_url}/v1/models")
        response.raise_for_status()
        return response.json()["data"][0]["id"]
    except (httpx.HTTPError, KeyError, IndexError, ValueError) as exc:
        raise BenchmarkError(f"could not read the model id from {base_url}/v1/models: {exc}") from exc


async def run_benchmark(
    *,
    api_url: str,
    model: str,
    requests: list[BenchRequest],
    request_rate: float = math.inf,
    burstiness: float = 1.0,
    max_concurrency: int | None = None,
    ignore_eos: bool = False,
    temperature: float = 0.0,
    seed: int = 0,
    tokenizer: Any = None,
    selected_metrics: tuple[str, ...] = METRICS,
    percentiles: tuple[float, ...] = (90.0, 99.0),
    goodput_slos: dict[str, float] | None = None,
    request_timeout: float = 6 * 3600,
    ready_timeout: float = 0.0,
    initial_test: bool = True,
    progress: bool = True,
) -> dict[str, Any]:
    """Send ``requests`` to ``api_url`` and return the metrics plus per-request arrays.

    The first request is first sent alone (not counted) so that a wrong URL, model or payload
    fails at once with the server's answer; with ``ready_timeout`` that test is retried while the
    server is not yet listening, for servers still starting up.
    """
    api = api_for_endpoint(api_url)
    send = dict(model=model, ignore_eos=ignore_eos, temperature=temperature)
    limits = httpx.Limits(max_connections=max_concurrency, max_keepalive_connections=max_concurrency)
    async with httpx.AsyncClient(timeout=httpx.Timeout(request_timeout), limits=limits) as client:
        if initial_test and requests:
            deadline = trio.current_time() + ready_timeout
            while True:
                test = await send_request(client, api_url, api, requests[0], **send)
                if test.success or not test.error.startswith("ConnectError") or trio.current_time() > deadline:
                    break
                await trio.sleep(1.0)
            if not test.success:
                raise BenchmarkError(f"the initial test request to {api_url} failed: {test.error}")

        results: list[RequestResult | None] = [None] * len(requests)
        limiter = trio.CapacityLimiter(max_concurrency) if max_concurrency else None
        bar = tqdm(total=len(requests), disable=not progress, desc="requests")

        async def one(i: int, request: BenchRequest) -> None:
            if limiter is None:
                results[i] = await send_request(client, api_url, api, request, **send)
            else:
                async with limiter:
                    results[i] = await send_request(client, api_url, api, request, **send)
            bar.update(1)

        offsets = arrival_offsets(len(requests), request_rate, burstiness, rng=np.random.default_rng(seed))
        start = time.perf_counter()
        trio_start = trio.current_time()
        async with trio.open_nursery() as nursery:
            for i, (offset, request) in enumerate(zip(offsets, requests)):
                await trio.sleep_until(trio_start + offset)
                nursery.start_soon(one, i, request)
        duration = time.perf_counter() - start
        bar.close()

    done = [r for r in results if r is not None]
    metrics = compute_metrics(
        done,
        duration,
        tokenizer=tokenizer,
        selected_metrics=selected_metrics,
        percentiles=percentiles,
        goodput_slos=goodput_slos,
    )
    metrics["max_concurrency"] = max_concurrency
    ok = [r for r in done if r.success]
    counts = [token_counts(r, tokenizer) for r in ok]
    n_out = [n for _, n in counts]
    return {
        **metrics,
        # per-request arrays (successful requests, in dataset order; times in seconds)
        "input_lens": [n for n, _ in counts],
        "output_lens": n_out,
        "requested_input_lens": [r.request.prompt_len for r in ok],
        "requested_output_lens": [r.request.output_len for r in ok],
        "usage_reported": [r.output_tokens is not None for r in ok],
        "start_times": [r.start - start for r in ok],
        "ttfts": [r.ttft for r in ok],
        "e2els": [r.latency for r in ok],
        "tpots": [(r.latency - r.ttft) / (n - 1) if n > 1 else None for r, n in zip(ok, n_out)],
        "itls": [r.itl for r in ok],
        "generated_texts": [r.generated_text for r in ok],
        "errors": [r.error for r in done if not r.success],
    }


def plot_latencies(result: dict[str, Any], path: Path, *, selected_metrics: tuple[str, ...]) -> bool:
    """Histograms of the per-request latencies as a PNG; False (and a note on stderr) without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("--plot needs matplotlib (pip install matplotlib); no plot written.", file=sys.stderr)
        return False
    samples = {
        "ttft": result["ttfts"],
        "tpot": [t for t in result["tpots"] if t is not None],
        "itl": [gap for gaps in result["itls"] for gap in gaps],
        "e2el": result["e2els"],
    }
    fig, axes = plt.subplots(1, len(selected_metrics), figsize=(4.5 * len(selected_metrics), 3.5), squeeze=False)
    for ax, name in zip(axes[0], selected_metrics):
        values = np.asarray(samples[name]) * 1000
        ax.hist(values, bins=40)
        if len(values):
            ax.axvline(np.median(values), color="k", linestyle="--", label="median")
            ax.axvline(np.percentile(values, 99), color="r", linestyle=":", label="p99")
        ax.set_title(METRIC_NAMES[name], fontsize=9)
        ax.set_xlabel("ms")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def add_cli_args(parser: argparse.ArgumentParser) -> None:
    """vLLM's / ATOM's benchmark_serving flags (those this tool implements)."""
    add = parser.add_argument
    add("--backend", default="atom-trio", choices=sorted(BACKEND_ENDPOINTS), help="selects the default --endpoint")
    add("--base-url", default=None, help="server URL, e.g. http://127.0.0.1:8000 (overrides --host/--port)")
    add("--host", default="127.0.0.1")
    add("--port", type=int, default=8000)
    add("--endpoint", default=None, help="API path; default from --backend (/v1/completions or /v1/chat/completions)")
    add("--model", default=None, help="model id to send; default: the first one on the server's /v1/models")
    add("--served-model-name", default=None, help="model id to send when it differs from --model")
    add("--tokenizer", default=None, help="tokenizer name or path; default: --model's (the built-in model's if none)")
    add("--dataset-name", default="random", choices=["random", "jsonl", "custom"])
    add("--dataset-path", default=None, help="JSONL file of {'prompt': ..., 'output_len': ...} lines")
    add("--custom-output-len", type=int, default=256, help="output tokens for JSONL lines that give none")
    add("--random-input-len", type=int, default=1024)
    add("--random-output-len", type=int, default=128)
    add("--random-range-ratio", type=float, default=0.0)
    add("--random-prefix-len", type=int, default=0)
    add("--num-prompts", type=int, default=1000)
    add("--max-concurrency", type=int, default=None)
    add("--request-rate", type=float, default=math.inf, help="requests per second (Poisson arrivals); inf = all at once")
    add("--burstiness", type=float, default=1.0, help="gamma shape of the arrival gaps: 1 = Poisson")
    add("--ignore-eos", action="store_true")
    add("--temperature", type=float, default=0.0)
    add("--seed", type=int, default=0)
    add("--percentile-metrics", default=",".join(METRICS), help="comma-separated subset of ttft,tpot,itl,e2el")
    add("--metric-percentiles", default="90,99", help="comma-separated percentiles, e.g. 50,90,99")
    add("--goodput", nargs="+", default=None, help="SLOs as KEY:MS (ttft, tpot, e2el)")
    add("--save-result", action="store_true")
    add("--result-dir", default=None)
    add("--result-filename", default=None)
    add("--plot", nargs="?", const="", default=None, help="write a PNG of the latency distributions (needs matplotlib)")
    add("--ready-check-timeout-sec", type=float, default=0.0, help="wait this long for the server to start listening")
    add("--request-timeout", type=float, default=6 * 3600)
    add("--disable-tqdm", action="store_true")


def build_requests(args: argparse.Namespace, tokenizer: Any, api: Api) -> list[BenchRequest]:
    if args.dataset_name == "random":
        return random_requests(
            tokenizer,
            num_prompts=args.num_prompts,
            input_len=args.random_input_len,
            output_len=args.random_output_len,
            range_ratio=args.random_range_ratio,
            prefix_len=args.random_prefix_len,
            seed=args.seed,
            as_text=api == "chat",
        )
    if not args.dataset_path:
        raise BenchmarkError("--dataset-name jsonl needs --dataset-path")
    return jsonl_requests(
        args.dataset_path, tokenizer, num_prompts=args.num_prompts, output_len=args.custom_output_len, seed=args.seed
    )


async def amain(args: argparse.Namespace) -> dict[str, Any]:
    base_url = (args.base_url or f"http://{args.host}:{args.port}").rstrip("/")
    endpoint = args.endpoint or BACKEND_ENDPOINTS[args.backend]
    api = api_for_endpoint(endpoint)
    model_id = args.served_model_name or args.model
    if model_id is None:
        async with httpx.AsyncClient(timeout=30) as client:
            model_id = await fetch_model_id(client, base_url)
    tokenizer = await trio.to_thread.run_sync(get_tokenizer, args.model or model_id, args.tokenizer)
    requests = build_requests(args, tokenizer, api)
    selected = tuple(m.strip() for m in args.percentile_metrics.split(",") if m.strip())
    if unknown := set(selected) - set(METRICS):
        raise BenchmarkError(f"--percentile-metrics: unknown {sorted(unknown)}; choose from {','.join(METRICS)}")
    percentiles = tuple(float(p) for p in args.metric_percentiles.split(",") if p.strip())
    print(f"{len(requests)} requests to {base_url}{endpoint} (model {model_id}), rate {args.request_rate}, "
          f"concurrency {args.max_concurrency or 'unlimited'}")
    result = await run_benchmark(
        api_url=f"{base_url}{endpoint}",
        model=model_id,
        requests=requests,
        request_rate=args.request_rate,
        burstiness=args.burstiness,
        max_concurrency=args.max_concurrency,
        ignore_eos=args.ignore_eos,
        temperature=args.temperature,
        seed=args.seed,
        tokenizer=tokenizer,
        selected_metrics=selected,
        percentiles=percentiles,
        goodput_slos=parse_goodput(args.goodput),
        request_timeout=args.request_timeout,
        ready_timeout=args.ready_check_timeout_sec,
        progress=not args.disable_tqdm,
    )
    print(format_table(result, selected_metrics=selected, percentiles=percentiles))
    for error in sorted(set(result["errors"]))[:5]:
        print(f"error: {error}", file=sys.stderr)

    result = {
        "date": datetime.now().strftime("%Y%m%d-%H%M%S"),
        "backend": args.backend,
        "api_url": f"{base_url}{endpoint}",
        "model_id": model_id,
        "tokenizer_id": args.tokenizer or args.model or model_id,
        "dataset_name": args.dataset_name,
        "num_prompts": len(requests),
        "request_rate": "inf" if math.isinf(args.request_rate) else args.request_rate,
        "burstiness": args.burstiness,
        "ignore_eos": args.ignore_eos,
        "temperature": args.temperature,
        "seed": args.seed,
        "random_input_len": args.random_input_len,
        "random_output_len": args.random_output_len,
        "random_range_ratio": args.random_range_ratio,
        "random_prefix_len": args.random_prefix_len,
        "percentile_metrics": list(selected),
        "metric_percentiles": list(percentiles),
        **result,
    }
    stem = Path(args.result_filename).stem if args.result_filename else (
        f"{args.backend}-{args.request_rate}qps"
        + (f"-concurrency{args.max_concurrency}" if args.max_concurrency else "")
        + f"-{model_id.rstrip('/').split('/')[-1]}-{result['date']}"
    )
    result_dir = Path(args.result_dir or ".")
    if args.save_result:
        result_dir.mkdir(parents=True, exist_ok=True)
        path = result_dir / (args.result_filename or f"{stem}.json")
        path.write_text(json.dumps(result, indent=1))
        print(f"result saved to {path}")
    if args.plot is not None:
        png = Path(args.plot) if args.plot else result_dir / f"{stem}.png"
        png.parent.mkdir(parents=True, exist_ok=True)
        if plot_latencies(result, png, selected_metrics=selected):
            print(f"plot saved to {png}")
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.benchmark_serving", description=__doc__.split("\n")[0])
    add_cli_args(parser)
    args = parser.parse_args(argv)
    try:
        result = trio.run(amain, args)
    except BenchmarkError as exc:
        print(f"benchmark_serving: {exc}", file=sys.stderr)
        return 2
    return 1 if result["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
