"""Offline throughput through the library: every request submitted at once, timed to the last token.

    python -m benchmarks.benchmark_throughput --dtype bfloat16 --num-prompts 32 --input-len 64 --output-len 128
    python -m benchmarks.benchmark_throughput --dataset nano-vllm

``random``: ``--num-prompts`` prompts of ``--input-len`` random ordinary token ids (vLLM's random
dataset), ``--output-len`` tokens each, greedy. ``nano-vllm``: nano-vllm's own ``bench.py`` workload
(256 prompts of random ids, input and output lengths uniform in 100-1024, temperature 0.6), so
its published tokens/s compare directly. EOS is ignored in both, so every request generates exactly
its output length. Engine flags are the server's (``--max-num-seqs``, ``--block-size``, ...).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import trio

from atom_trio import SamplingParams, open_engine
from atom_trio import options

from .datasets import BenchRequest, get_tokenizer, nano_vllm_requests, random_requests


async def measure(config: Any, requests: list[BenchRequest], *, temperature: float, seed: int) -> dict[str, Any]:
    """Run ``requests`` concurrently through one engine (after a short warm-up) and count tokens."""
    generated = [0] * len(requests)

    async def run_one(engine: Any, i: int, request: BenchRequest) -> None:
        params = SamplingParams(
            temperature=temperature, max_tokens=request.output_len, ignore_eos=True, seed=seed + i if temperature else None
        )
        async for out in engine.generate(request.prompt, params):
            generated[i] += len(out.outputs[0].token_ids)

    async with open_engine(config) as engine:
        await run_one(engine, 0, BenchRequest(prompt=list(requests[0].prompt)[:16], prompt_len=16, output_len=4))
        generated[0] = 0
        start = time.perf_counter()
        async with trio.open_nursery() as nursery:
            for i, request in enumerate(requests):
                nursery.start_soon(run_one, engine, i, request)
        elapsed = time.perf_counter() - start

    prompt_tokens = sum(r.prompt_len for r in requests)
    output_tokens = sum(generated)
    return {
        "elapsed_time": elapsed,
        "num_requests": len(requests),
        "total_prompt_tokens": prompt_tokens,
        "total_output_tokens": output_tokens,
        "requests_per_second": len(requests) / elapsed,
        "output_tokens_per_second": output_tokens / elapsed,
        "tokens_per_second": (prompt_tokens + output_tokens) / elapsed,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.benchmark_throughput", description=__doc__.split("\n")[0])
    parser.add_argument("--dataset", "--dataset-name", dest="dataset", default="random", choices=["random", "nano-vllm"])
    parser.add_argument("--num-prompts", type=int, default=None, help="default: 32 (random), 256 (nano-vllm)")
    parser.add_argument("--input-len", type=int, default=64)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--temperature", type=float, default=None, help="default: 0 (random), 0.6 (nano-vllm)")
    parser.add_argument("--output-json", default=None, help="write the results here as JSON")
    options.add_arguments(parser)  # every engine flag (--model, --dtype, --seed, --max-num-seqs, ...)
    args = parser.parse_args(argv)
    config, _ = options.load(vars(args), os.environ)

    if args.dataset == "nano-vllm":
        requests = nano_vllm_requests(num_seqs=args.num_prompts or 256, seed=config.seed)
        temperature = 0.6 if args.temperature is None else args.temperature
    else:
        tokenizer = get_tokenizer(config.model, config.tokenizer)
        requests = random_requests(
            tokenizer,
            num_prompts=args.num_prompts or 32,
            input_len=args.input_len,
            output_len=args.output_len,
            seed=config.seed,
        )
        temperature = 0.0 if args.temperature is None else args.temperature

    result = trio.run(lambda: measure(config, requests, temperature=temperature, seed=config.seed))
    print(
        f"Throughput: {result['requests_per_second']:.2f} requests/s, "
        f"{result['tokens_per_second']:.2f} total tokens/s, {result['output_tokens_per_second']:.2f} output tokens/s "
        f"({result['num_requests']} requests, {result['total_prompt_tokens']} prompt + "
        f"{result['total_output_tokens']} output tokens in {result['elapsed_time']:.2f} s)"
    )
    if args.output_json:
        record = {"dataset": args.dataset, "temperature": temperature, "model": config.model_name, "dtype": config.dtype, **result}
        Path(args.output_json).write_text(json.dumps(record, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
