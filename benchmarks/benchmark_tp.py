"""Decode time per step through the whole engine at several tensor-parallel sizes, in one run.

    python3 -m benchmarks.benchmark_tp --tokenizer-from .gpu_models/smollm2-tokenizer --tp 1 2 --batch-sizes 1 64
    python3 -m benchmarks.benchmark_tp --tokenizer-from ... --tp 1 --async-scheduling off on   # its gain
    python3 -m benchmarks.benchmark_tp --tokenizer-from ... --config qwen3-30b-a3b --tp 2 --expert-parallel off on

Llama-3.1-8B shapes (or ``--config``'s, ``atom_trio.testing.REAL_CONFIGS``)
with dummy weights (``--load-format dummy``), bf16, the process executor
(one worker per rank, NCCL between them). For each TP size (and each
``--async-scheduling`` and ``--expert-parallel`` setting) one engine starts;
for each batch size ``B``, ``B`` requests of
``--input-len`` random tokens are submitted at once with ``ignore_eos`` and
``--output-len`` greedy tokens. The time per decode step is read from the
streams, which is what a user sees: it covers scheduling, the plan's trip to
the workers, the forward (a CUDA graph), the all-reduces, sampling and
detokenizing. Request 0's step time is taken over the window in which every
request of the batch is decoding (after the last first token), as elapsed
time over tokens, so merged deltas do not skew it. Dummy weights are drawn per
tensor from the seed, so every TP size runs the same model.

``--async-scheduling off on`` runs each TP size both ways (planning step
N+1 while step N runs, or not); the engines get the same prompts, and the
greedy tokens of each batch's request 0 are compared between the two.
``--expert-parallel off on`` runs a mixture of experts both ways at each TP
size: ``TP=N`` slices every expert across the ranks, ``EP=N`` gives each rank
whole experts (``--enable-expert-parallel``); attention is tensor-parallel
in both. Request 0's tokens are compared the same way (the two sum the
experts' partial results in different orders, so bf16 rounding may flip a
near-tie).
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import statistics
import tempfile
import time
from pathlib import Path

import trio

from atom_trio import SamplingParams, open_engine
from atom_trio.config import EngineConfig
from atom_trio.testing import REAL_CONFIGS, write_model_dir


async def decode_step_seconds(engine, prompts: list[list[int]], output_len: int) -> tuple[float, list[int]]:
    """Request 0's time per decode step while every request of the batch decodes, and its tokens."""
    params = SamplingParams(temperature=0.0, max_tokens=output_len, ignore_eos=True)
    first_token_times: list[float] = [0.0] * len(prompts)
    progress: list[tuple[float, int]] = []  # request 0: (time, tokens so far)
    tokens: list[int] = []

    async def one(i: int, prompt: list[int]) -> None:
        count = 0
        async for out in engine.generate(prompt, params):
            now = time.perf_counter()
            count += len(out.outputs[0].token_ids)
            if not first_token_times[i]:
                first_token_times[i] = now
            if i == 0:
                progress.append((now, count))
                tokens.extend(out.outputs[0].token_ids)

    async with trio.open_nursery() as nursery:
        for i, prompt in enumerate(prompts):
            nursery.start_soon(one, i, prompt)
    all_decoding = max(first_token_times)
    window = [(t, n) for t, n in progress if t >= all_decoding]
    (t0, n0), (t1, n1) = window[0], window[-1]
    if n1 - n0 < 8:
        raise SystemExit(f"only {n1 - n0} steps with the whole batch decoding; raise --output-len")
    return (t1 - t0) / (n1 - n0), tokens


async def measure(
    config: EngineConfig, name: str, args: argparse.Namespace
) -> tuple[dict[int, float], dict[int, list[int]]]:
    """Milliseconds per decode step by batch size, and request 0's tokens of each batch's last run."""
    rng = random.Random(args.seed)
    rows, tokens = {}, {}
    start = time.perf_counter()
    async with open_engine(config) as engine:
        print(f"{name}: engine ready in {time.perf_counter() - start:.1f} s", flush=True)
        vocab = len(engine.tokenizer)
        for batch in [max(args.batch_sizes), *args.batch_sizes]:  # the first pass warms every kernel variant up
            prompts = [[rng.randrange(100, vocab) for _ in range(args.input_len)] for _ in range(batch)]
            runs = [await decode_step_seconds(engine, prompts, args.output_len) for _ in range(args.num_iters)]
            rows[batch] = statistics.median(seconds for seconds, _ in runs) * 1e3
            tokens[batch] = runs[-1][1]
    return rows, tokens


async def main_async(args: argparse.Namespace) -> dict:
    results: dict[str, dict[int, float]] = {}
    tokens: dict[str, dict[int, list[int]]] = {}
    variants = [(tp, mode, ep) for tp in args.tp for mode in args.async_scheduling for ep in args.expert_parallel]
    names = [
        ("EP" if ep == "on" else "TP") + f"={tp}" + (f" async {mode}" if len(args.async_scheduling) > 1 else "")
        for tp, mode, ep in variants
    ]
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = write_model_dir(Path(tmp) / args.config, REAL_CONFIGS[args.config], args.tokenizer_from)
        for (tp, mode, ep), name in zip(variants, names):
            config = EngineConfig(
                model=str(model_dir),
                load_format="dummy",
                dtype="bfloat16",
                tensor_parallel_size=tp,
                executor="process",
                max_num_seqs=max(args.batch_sizes),
                max_model_len=args.input_len + args.output_len + 16,
                max_num_batched_tokens=args.max_num_batched_tokens,
                gpu_memory_utilization=args.gpu_memory_utilization,
                enable_prefix_caching=False,
                async_scheduling=mode == "on",
                enable_expert_parallel=ep == "on",
            )
            results[name], tokens[name] = await measure(config, name, args)
    header = f"{'batch':>5} | " + " | ".join(f"{name} ms/step" for name in names)
    if len(names) > 1:
        header += " | " + " | ".join(f"{name}/{names[0]}" for name in names[1:])
    print(header)
    print("-" * len(header))
    for batch in args.batch_sizes:
        steps = [results[name][batch] for name in names]
        row = f"{batch:>5} | " + " | ".join(f"{s:>{len(name) + 8}.2f}" for s, name in zip(steps, names))
        if len(steps) > 1:
            row += " | " + " | ".join(f"{s / steps[0]:>8.2f}x" for s in steps[1:])
        print(row)
    same_tokens = {}
    for tp in args.tp:
        group = [name for (t, _, _), name in zip(variants, names) if t == tp]
        for name in group[1:]:  # each setting against the first at its TP size
            same_tokens[name] = {b: tokens[group[0]][b] == tokens[name][b] for b in args.batch_sizes}
            print(f"{name}: request 0's greedy tokens equal to {group[0]}'s: {same_tokens[name]}")
    return {
        "config": args.config,
        "input_len": args.input_len,
        "output_len": args.output_len,
        "ms_per_step": results,
        "same_tokens_as_first_of_tp_size": same_tokens,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokenizer-from", type=Path, required=True, help="a dir with tokenizer.json")
    parser.add_argument("--config", choices=sorted(REAL_CONFIGS), default="llama-3.1-8b", help="the model's shapes")
    parser.add_argument("--tp", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 64])
    parser.add_argument("--input-len", type=int, default=1024)
    parser.add_argument("--output-len", type=int, default=96)
    parser.add_argument("--num-iters", type=int, default=2)
    parser.add_argument("--max-num-batched-tokens", type=int, default=8192)
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.85)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--async-scheduling", nargs="+", choices=["on", "off"], default=["on"])
    parser.add_argument(
        "--expert-parallel", nargs="+", choices=["on", "off"], default=["off"], help="whole experts per rank"
    )
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    results = trio.run(main_async, args)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
