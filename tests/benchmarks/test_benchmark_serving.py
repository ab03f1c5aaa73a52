"""benchmark_serving: its metric arithmetic, its arrival process, its datasets, and a real run
against the real server (default model) whose saved JSON must agree with what the server counted."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families

from atom_trio.testing import server_process
from benchmarks.benchmark_serving import (
    BenchmarkError,
    RequestResult,
    arrival_offsets,
    build_payload,
    chunk_text,
    compute_metrics,
    parse_goodput,
    peak_concurrency,
)
from benchmarks.datasets import BenchRequest, get_tokenizer, jsonl_requests, nano_vllm_requests, random_requests

REPO = Path(__file__).resolve().parents[2]


def result(ttft: float, itl: list[float], latency: float, n_out: int, *, n_in: int = 10, start: float = 0.0):
    request = BenchRequest(prompt=[1] * n_in, prompt_len=n_in, output_len=n_out)
    return RequestResult(
        request=request, success=True, start=start, ttft=ttft, itl=itl, latency=latency,
        prompt_tokens=n_in, output_tokens=n_out,
    )  # fmt: skip


# ---------------------------------------------------------------- metrics on synthetic timings


def test_metrics_follow_vllm_definitions():
    results = [
        result(0.100, [0.010, 0.020, 0.030], 0.200, 4, n_in=10, start=0.0),  # TPOT (0.2-0.1)/3
        result(0.300, [0.050], 0.400, 2, n_in=20, start=0.1),  # TPOT 0.1
        result(0.050, [], 0.050, 1, n_in=30, start=0.15),  # one token: no TPOT, no ITL
        RequestResult(request=BenchRequest(prompt=[1], prompt_len=1, output_len=5), error="HTTP 500: boom"),
    ]
    m = compute_metrics(results, 2.0, percentiles=(50.0, 99.0))
    assert m["completed"] == 3 and m["failed"] == 1
    assert m["total_input_tokens"] == 60 and m["total_output_tokens"] == 7
    assert m["request_throughput"] == pytest.approx(1.5)
    assert m["output_throughput"] == pytest.approx(3.5)
    assert m["total_token_throughput"] == pytest.approx(33.5)
    assert m["request_goodput"] is None
    assert m["mean_ttft_ms"] == pytest.approx(150.0)
    assert m["median_ttft_ms"] == pytest.approx(100.0)
    assert m["mean_tpot_ms"] == pytest.approx((100 / 3 + 100) / 2)
    assert m["mean_itl_ms"] == pytest.approx(27.5)
    assert m["median_itl_ms"] == pytest.approx(25.0)
    assert m["mean_e2el_ms"] == pytest.approx(650 / 3)
    assert m["p50_e2el_ms"] == pytest.approx(200.0)
    assert m["p99_ttft_ms"] == pytest.approx(np.percentile([100, 300, 50], 99))
    assert m["max_concurrent_requests"] == 3  # [0, .2], [.1, .5], [.15, .2] all overlap at 0.15


def test_goodput_counts_requests_within_every_slo():
    results = [result(0.1, [0.01], 0.2, 2), result(0.6, [0.01], 0.7, 2), result(0.1, [0.5], 0.7, 2)]
    m = compute_metrics(results, 1.0, goodput_slos=parse_goodput(["ttft:500", "tpot:200"]))
    assert m["request_goodput"] == pytest.approx(1.0)  # only the first meets both
    with pytest.raises(BenchmarkError, match="goodput"):
        parse_goodput(["itl:5"])


def test_output_tokens_are_counted_with_the_tokenizer_only_without_usage():
    tokenizer = get_tokenizer(None)
    text = " the quick brown fox jumps over the lazy dog"
    r = result(0.1, [0.01], 0.2, 99)
    r.output_tokens, r.generated_text = None, text
    m = compute_metrics([r], 1.0, tokenizer=tokenizer)
    assert m["total_output_tokens"] == len(tokenizer.encode(text, add_special_tokens=False))
    with pytest.raises(BenchmarkError, match="no usage"):
        compute_metrics([r], 1.0)


timings = st.lists(
    st.tuples(
        st.floats(0.001, 5.0),  # ttft
        st.lists(st.floats(0.0, 1.0), max_size=8),  # itl
        st.integers(1, 64),  # output tokens
    ),
    min_size=1,
    max_size=30,
)


@settings(max_examples=60, deadline=None)
@given(timings)
def test_summary_statistics_are_ordered(samples):
    results = [result(ttft, itl, ttft + sum(itl) + 0.001, n) for ttft, itl, n in samples]
    m = compute_metrics(results, 10.0, percentiles=(50.0, 90.0, 99.0))
    for name in ("ttft", "tpot", "itl", "e2el"):
        lo, hi = m[f"p50_{name}_ms"], m[f"p99_{name}_ms"]
        assert m[f"median_{name}_ms"] == pytest.approx(lo)
        assert lo <= m[f"p90_{name}_ms"] + 1e-9 and m[f"p90_{name}_ms"] <= hi + 1e-9
        assert m[f"std_{name}_ms"] >= 0
    assert m["mean_ttft_ms"] <= m["mean_e2el_ms"]
    assert m["total_output_tokens"] == sum(n for _, _, n in samples)


def test_peak_concurrency_of_disjoint_and_nested_intervals():
    def at(start, latency):
        r = result(0.01, [], latency, 1, start=start)
        return r

    assert peak_concurrency([at(0, 1), at(1, 1), at(2, 1)]) == 1  # back to back: never two at once
    assert peak_concurrency([at(0, 10), at(1, 1), at(2, 1), at(2.5, 1)]) == 3


# ---------------------------------------------------------------- arrivals


@pytest.mark.parametrize("burstiness", [1.0, 0.5, 4.0])
def test_arrivals_have_the_requested_mean_rate(burstiness):
    rate, n = 8.0, 20_000
    offsets = arrival_offsets(n, rate, burstiness, rng=np.random.default_rng(0))
    assert offsets[0] == 0.0 and np.all(np.diff(offsets) >= 0)
    assert (n - 1) / offsets[-1] == pytest.approx(rate, rel=0.03)
    gaps = np.diff(offsets)
    # a gamma(k, 1/(rate k)) gap has variance 1 / (k rate^2): Poisson (k=1) is exponential
    assert gaps.var() == pytest.approx(1 / (burstiness * rate**2), rel=0.1)


def test_infinite_rate_sends_everything_at_once():
    assert arrival_offsets(5, math.inf, rng=np.random.default_rng(0)).tolist() == [0.0] * 5
    with pytest.raises(ValueError):
        arrival_offsets(5, 0.0, rng=np.random.default_rng(0))


# ---------------------------------------------------------------- payloads and datasets


def test_payloads_for_completions_and_chat():
    ids = BenchRequest(prompt=[5, 6, 7], prompt_len=3, output_len=9)
    body = build_payload("completions", ids, model="m", ignore_eos=True, temperature=0.0)
    assert body["prompt"] == [5, 6, 7] and body["max_tokens"] == 9 and body["ignore_eos"] is True
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True}
    text = BenchRequest(prompt="hi", prompt_len=1, output_len=4)
    body = build_payload("chat", text, model="m", ignore_eos=False, temperature=0.0)
    assert body["messages"] == [{"role": "user", "content": "hi"}] and body["max_completion_tokens"] == 4
    assert "ignore_eos" not in body
    with pytest.raises(BenchmarkError):
        build_payload("chat", ids, model="m", ignore_eos=False, temperature=0.0)
    assert chunk_text("chat", {"choices": [{"delta": {"role": "assistant"}}]}) == ""
    assert chunk_text("chat", {"choices": [{"delta": {"content": "x"}}]}) == "x"
    assert chunk_text("completions", {"choices": [], "usage": {"completion_tokens": 3}}) == ""


def test_random_dataset_lengths_prefix_and_vocabulary():
    tokenizer = get_tokenizer(None)
    special = set(tokenizer.all_special_ids)
    exact = random_requests(tokenizer, num_prompts=20, input_len=40, output_len=7, prefix_len=5, seed=3)
    assert [r.prompt_len for r in exact] == [45] * 20 and [r.output_len for r in exact] == [7] * 20
    assert all(len(r.prompt) == 45 and not special & set(r.prompt) for r in exact)
    assert len({tuple(r.prompt[:5]) for r in exact}) == 1 and len({tuple(r.prompt[5:]) for r in exact}) == 20
    assert random_requests(tokenizer, num_prompts=20, input_len=40, output_len=7, prefix_len=5, seed=3) == exact
    ranged = random_requests(tokenizer, num_prompts=200, input_len=100, output_len=50, range_ratio=0.5, seed=1)
    assert all(50 <= r.prompt_len <= 150 and 25 <= r.output_len <= 75 for r in ranged)
    assert len({r.prompt_len for r in ranged}) > 20


def test_jsonl_dataset(tmp_path):
    tokenizer = get_tokenizer(None)
    path = tmp_path / "prompts.jsonl"
    path.write_text('{"prompt": "Hello there", "output_len": 5}\n\n{"prompt": "What is the capital of Japan?"}\n')
    requests = jsonl_requests(path, tokenizer, num_prompts=5, output_len=32)
    assert len(requests) == 5  # cycles through the file
    by_prompt = {r.prompt: r for r in requests}
    assert by_prompt["Hello there"].output_len == 5
    assert by_prompt["What is the capital of Japan?"].output_len == 32
    assert by_prompt["Hello there"].prompt_len == len(tokenizer.encode("Hello there", add_special_tokens=False))
    path.write_text('{"text": "no prompt field"}\n')
    with pytest.raises(ValueError, match="prompts.jsonl:1"):
        jsonl_requests(path, tokenizer, num_prompts=1, output_len=8)


def test_nano_vllm_workload():
    requests = nano_vllm_requests()
    assert len(requests) == 256
    assert all(100 <= r.prompt_len <= 1024 and 100 <= r.output_len <= 1024 for r in requests)
    assert all(0 <= t <= 10000 for r in requests for t in r.prompt)
    assert nano_vllm_requests() == requests


# ---------------------------------------------------------------- the real server


@pytest.fixture(scope="module")
def server(tmp_path_factory, default_model_dir):
    """`atom-trio serve` with the default model on a free port, stopped after the module."""
    with server_process(log_path=tmp_path_factory.mktemp("server") / "server.log") as server:
        yield server.url


def token_counters(base_url: str) -> dict[str, float]:
    """The server's own prompt and generation token counters, from /metrics."""
    text = httpx.get(f"{base_url}/metrics", timeout=10).text
    counters = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name.endswith(("prompt_tokens_total", "generation_tokens_total")):
                counters[sample.name.rsplit(":", 1)[-1]] = sample.value
    assert set(counters) == {"prompt_tokens_total", "generation_tokens_total"}, counters
    return counters


def run_benchmark_cli(base_url: str, out_dir: Path, *args: str) -> dict:
    completed = subprocess.run(
        [sys.executable, "-m", "benchmarks.benchmark_serving", "--base-url", base_url, "--save-result",
         "--result-dir", str(out_dir), "--result-filename", "result.json", "--disable-tqdm", *args],
        cwd=REPO, capture_output=True, text=True, timeout=240, env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )  # fmt: skip
    assert completed.returncode == 0, completed.stdout + completed.stderr
    assert "Serving Benchmark Result" in completed.stdout
    return json.loads((out_dir / "result.json").read_text())


def check_consistent(r: dict, *, num_prompts: int, max_concurrency: int) -> None:
    """What every saved result must satisfy, whatever the server's speed."""
    n = num_prompts
    assert r["completed"] == n and r["failed"] == 0 and r["errors"] == []
    for key in ("input_lens", "output_lens", "ttfts", "e2els", "tpots", "itls", "start_times", "generated_texts"):
        assert len(r[key]) == n, key
    assert all(r["usage_reported"])
    assert r["total_input_tokens"] == sum(r["input_lens"])
    assert r["total_output_tokens"] == sum(r["output_lens"])
    assert r["request_throughput"] == pytest.approx(n / r["duration"])
    assert r["output_throughput"] == pytest.approx(r["total_output_tokens"] / r["duration"])
    assert r["total_token_throughput"] == pytest.approx(
        (r["total_input_tokens"] + r["total_output_tokens"]) / r["duration"]
    )
    assert 1 <= r["max_concurrent_requests"] <= max_concurrency
    for ttft, e2el, itl, n_out, tpot, text in zip(
        r["ttfts"], r["e2els"], r["itls"], r["output_lens"], r["tpots"], r["generated_texts"]
    ):
        assert 0 < ttft <= e2el <= r["duration"]
        assert ttft + sum(itl) <= e2el + 1e-6
        assert len(itl) <= n_out - 1  # a chunk carries at least one token
        assert tpot == pytest.approx((e2el - ttft) / (n_out - 1))
        assert text
    for name in ("ttft", "tpot", "itl", "e2el"):
        keys = [f"{stat}_{name}_ms" for stat in ("mean", "median", "std", "p90", "p99")]
        assert all(isinstance(r[k], float) for k in keys), keys
        assert 0 < r[f"median_{name}_ms"] <= r[f"p90_{name}_ms"] <= r[f"p99_{name}_ms"]
    assert r["mean_ttft_ms"] < r["mean_e2el_ms"]


def test_completions_run_matches_what_the_server_counted(server, tmp_path):
    n, in_len, out_len = 32, 16, 8
    before = token_counters(server)
    r = run_benchmark_cli(
        server, tmp_path, "--num-prompts", str(n), "--max-concurrency", "8",
        "--random-input-len", str(in_len), "--random-output-len", str(out_len), "--ignore-eos", "--seed", "7",
    )  # fmt: skip
    after = token_counters(server)

    check_consistent(r, num_prompts=n, max_concurrency=8)
    # token-id prompts are counted by the server exactly as sent; ignore_eos gives every token asked for
    assert r["input_lens"] == r["requested_input_lens"] == [in_len] * n
    assert r["output_lens"] == r["requested_output_lens"] == [out_len] * n
    # the server's own counters saw the same tokens, plus the one initial test request
    assert after["generation_tokens_total"] - before["generation_tokens_total"] == r["total_output_tokens"] + out_len
    assert after["prompt_tokens_total"] - before["prompt_tokens_total"] == r["total_input_tokens"] + in_len
    assert r["model_id"] and r["request_rate"] == "inf" and r["max_concurrency"] == 8


def test_chat_run_with_poisson_arrivals(server, tmp_path):
    n = 8
    r = run_benchmark_cli(
        server, tmp_path, "--backend", "openai-chat", "--num-prompts", str(n), "--max-concurrency", "4",
        "--request-rate", "20", "--random-input-len", "12", "--random-output-len", "8", "--ignore-eos",
    )  # fmt: skip
    check_consistent(r, num_prompts=n, max_concurrency=4)
    assert r["output_lens"] == [8] * n
    # the chat template wraps each prompt: the server counts more prompt tokens than the text alone
    assert all(used > asked for used, asked in zip(r["input_lens"], r["requested_input_lens"]))
    assert r["api_url"].endswith("/v1/chat/completions") and r["request_rate"] == 20.0
