"""A scripted load test to adapt: step up the concurrency against a running server and watch latency.

    atom-trio serve --port 8000 &                      # or any OpenAI-compatible server
    python examples/load_test.py --base-url http://127.0.0.1:8000

Each step sends fresh random prompts (token ids, so lengths are exact) at one concurrency level
and prints a line of throughput and latency; the full vLLM-style table of the last step follows.
Change ``LEVELS`` / the workload below, or pass a request rate to test open-loop arrivals. Run it
from the repository root (it reuses ``benchmarks.benchmark_serving``).
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import httpx
import trio

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere in the repo

from benchmarks.benchmark_serving import METRICS, fetch_model_id, format_table, run_benchmark  # noqa: E402
from benchmarks.datasets import get_tokenizer, random_requests  # noqa: E402

LEVELS = (1, 4, 16)  # concurrent requests per step
PROMPTS_PER_LEVEL = 2  # x the level: enough requests to keep every slot busy for a while
INPUT_LEN, OUTPUT_LEN = 128, 64


async def main(base_url: str, request_rate: float) -> None:
    async with httpx.AsyncClient(timeout=30) as client:
        model = await fetch_model_id(client, base_url)
    tokenizer = await trio.to_thread.run_sync(get_tokenizer, model)
    print(f"model {model}: {INPUT_LEN} prompt tokens, {OUTPUT_LEN} output tokens, rate {request_rate}")
    print(f"{'concurrency':>11} {'req/s':>8} {'out tok/s':>10} {'TTFT p50':>9} {'TTFT p99':>9} {'TPOT p50':>9} {'failed':>7}")
    for step, level in enumerate(LEVELS):
        requests = random_requests(
            tokenizer,
            num_prompts=PROMPTS_PER_LEVEL * level,
            input_len=INPUT_LEN,
            output_len=OUTPUT_LEN,
            seed=step,  # fresh prompts each step: no step rides on the previous one's prefix cache
        )
        result = await run_benchmark(
            api_url=f"{base_url}/v1/completions",
            model=model,
            requests=requests,
            request_rate=request_rate,
            max_concurrency=level,
            ignore_eos=True,
            tokenizer=tokenizer,
            percentiles=(50.0, 99.0),
            progress=False,
        )
        print(
            f"{level:>11} {result['request_throughput']:>8.2f} {result['output_throughput']:>10.1f} "
            f"{result['p50_ttft_ms']:>8.0f}ms {result['p99_ttft_ms']:>7.0f}ms {result['p50_tpot_ms']:>7.1f}ms "
            f"{result['failed']:>7}"
        )
    print(format_table(result, selected_metrics=METRICS, percentiles=(50.0, 99.0)))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--base-url", default="http://127.0.0.1:8000")
    parser.add_argument("--request-rate", type=float, default=math.inf, help="requests/s per step (Poisson); inf = closed loop")
    args = parser.parse_args()
    trio.run(main, args.base_url.rstrip("/"), args.request_rate)
