"""Where a step's time goes: the engine's and the runner's phase timers over a workload, and a profiler trace.

    python -m benchmarks.step_timeline --num-seqs 16 --input-len 64 --output-len 32          # CPU, default model
    python3 -m benchmarks.step_timeline --config qwen3-0.6b --tokenizer-from DIR --num-seqs 256 \\
        --input-len 512 --output-len 256 --load-format dummy --dtype bfloat16 --profile-steps 32
    python3 -m benchmarks.step_timeline --config qwen3-0.6b --tokenizer-from DIR --dataset nano-vllm ...

The engine runs with the thread executor, so that the runner's timers
(`atom_trio.runner.profiling.RUNNER_PHASES`) are readable next to the
engine's (`atom_trio.engine.engine.STEP_PHASES`); everything else is the
engine's as configured (asynchronous scheduling, graphs, compile level).
``fixed``: ``--num-seqs`` requests of ``--input-len`` random tokens and
``--output-len`` output tokens each, all submitted at once, so the steady
state is a decode batch of ``--num-seqs``; ``nano-vllm``: nano-vllm's
workload (`benchmarks.datasets.nano_vllm_requests`). ``--config`` runs a
real model's shapes (`atom_trio.testing.REAL_CONFIGS`) with the tokenizer of
``--tokenizer-from`` (pass ``--load-format dummy``).

It prints each phase's median, p90 and mean per step in µs, the steps and
output tokens per second, and with ``--profile-steps N`` a torch profiler
trace of N steps from the middle of the run: on CUDA the device's busy time
and the idle gaps between its kernels (what the host leaves unused), on the
CPU the steps' host time as the trace records it.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import attrs
import trio

from atom_trio import SamplingParams, open_engine
from atom_trio import options

from .datasets import BenchRequest, get_tokenizer, nano_vllm_requests, random_requests

GAP_US = 20.0
"""Idle gaps on the device shorter than this are kernel-to-kernel launch latency, not the host's doing."""


def device_timeline(trace: dict[str, Any], step_event: str) -> dict[str, Any]:
    """The device's busy and idle time in a Chrome trace (torch profiler), within the recorded steps.

    Busy time is the union of the kernels' and copies' intervals; the idle
    gaps are what lies between them, from the first to the last. Without
    device events (a CPU run) only the steps' host durations are given.
    """
    events = [e for e in trace.get("traceEvents", []) if e.get("ph") == "X"]
    steps = sorted(float(e["dur"]) for e in events if e.get("name") == step_event)
    summary: dict[str, Any] = {"steps": len(steps)}
    if steps:
        summary["step_host_median_us"] = steps[len(steps) // 2]
    device = sorted(
        (float(e["ts"]), float(e["ts"]) + float(e["dur"]))
        for e in events
        if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")
    )
    if not device:
        return summary
    merged: list[list[float]] = [list(device[0])]
    for start, end in device[1:]:
        if start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    gaps = sorted((b[0] - a[1] for a, b in itertools.pairwise(merged)), reverse=True)
    window = merged[-1][1] - merged[0][0]
    busy = sum(end - start for start, end in merged)
    long_gaps = [g for g in gaps if g >= GAP_US]
    summary.update(
        window_us=window,
        busy_us=busy,
        busy_fraction=busy / window if window else 0.0,
        idle_gaps_over_threshold=len(long_gaps),
        idle_in_long_gaps_us=sum(long_gaps),
        largest_gaps_us=[round(g, 1) for g in gaps[:8]],
        device_time_per_step_us=busy / len(steps) if steps else None,
    )
    return summary


def print_phases(title: str, phases: dict[str, Any]) -> None:
    print(f"{title}: median / p90 / mean per step, µs (count)")
    for name, stats in phases.items():
        print(f"  {name:9} {stats.median_us:9.1f} {stats.p90_us:9.1f} {stats.mean_us:9.1f}   ({stats.count})")


async def run(args: argparse.Namespace, config: Any, requests: list[BenchRequest], temperature: float) -> dict:
    tracing = args.profile_steps > 0

    async def run_one(engine: Any, i: int, request: BenchRequest, counts: list[int]) -> None:
        params = SamplingParams(
            temperature=temperature, max_tokens=request.output_len, ignore_eos=True, seed=config.seed + i
        )
        async for out in engine.generate(request.prompt, params):
            counts[i] += len(out.outputs[0].token_ids)

    async with open_engine(config) as engine:
        runner = engine.executor.runner
        warm = [0] * 4
        async with trio.open_nursery() as nursery:  # warm-up: first launches of each kernel variant
            for i in range(4):
                nursery.start_soon(run_one, engine, i, BenchRequest(prompt=requests[0].prompt[:16], prompt_len=16, output_len=8), warm)
        engine.step_phases(clear=True)
        runner.phases.clear()
        counts = [0] * len(requests)
        steps_before = engine.stats().num_steps
        trace_file = None
        start = time.perf_counter()
        async with trio.open_nursery() as nursery:
            for i, request in enumerate(requests):
                nursery.start_soon(run_one, engine, i, request, counts)
            if tracing:
                while engine.stats().num_steps - steps_before < args.profile_after:
                    await trio.sleep(0.005)
                prefix = os.path.join(args.trace_dir or tempfile.mkdtemp(prefix="step-timeline-"), "trace")
                await engine.start_profile(prefix)
                profiled_from = engine.stats().num_steps
                while engine.stats().num_steps - profiled_from < args.profile_steps and nursery.child_tasks:
                    await trio.sleep(0.002)
                trace_file = (await engine.stop_profile())[0]
        elapsed = time.perf_counter() - start
        num_steps = engine.stats().num_steps - steps_before
        engine_phases, runner_phases = engine.step_phases(), runner.phases.summary()
    result = {
        "elapsed_s": elapsed,
        "steps": num_steps,
        "output_tokens": sum(counts),
        "output_tokens_per_s": sum(counts) / elapsed,
        "step_ms": elapsed / max(1, num_steps) * 1e3,
        "engine_phases": {k: attrs.asdict(v) for k, v in engine_phases.items()},
        "runner_phases": {k: attrs.asdict(v) for k, v in runner_phases.items()},
    }
    print(
        f"{len(requests)} requests, {sum(counts)} output tokens in {elapsed:.2f} s: "
        f"{result['output_tokens_per_s']:.0f} output tok/s, {num_steps} steps, {result['step_ms']:.2f} ms per step"
    )
    print_phases("engine (event loop; launch/collect/execute await the executor)", engine_phases)
    print_phases("runner (its thread; forward includes inputs)", runner_phases)
    if trace_file is not None:
        from atom_trio.runner.profiling import STEP_EVENT

        timeline = device_timeline(json.loads(Path(trace_file).read_text()), STEP_EVENT)
        result["trace"] = {"path": trace_file, **timeline}
        print(f"profiler trace {trace_file}:")
        for key, value in timeline.items():
            print(f"  {key}: {round(value, 3) if isinstance(value, float) else value}")
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.step_timeline", description=__doc__.split("\n")[0])
    parser.add_argument("--dataset", default="fixed", choices=["fixed", "nano-vllm"])
    parser.add_argument("--num-seqs", type=int, default=None, help="requests: 16 (fixed; the decode batch), 256 (nano-vllm)")
    parser.add_argument("--input-len", type=int, default=64)
    parser.add_argument("--output-len", type=int, default=32)
    parser.add_argument("--temperature", type=float, default=None, help="default: 0 (fixed), 0.6 (nano-vllm)")
    parser.add_argument("--config", default=None, help="a real model's shapes (atom_trio.testing.REAL_CONFIGS)")
    parser.add_argument("--tokenizer-from", type=Path, default=None, help="with --config: a dir with tokenizer.json")
    parser.add_argument("--models-dir", type=Path, default=Path(tempfile.gettempdir()) / "atom_trio_dummy_models")
    parser.add_argument("--profile-steps", type=int, default=0, help="steps to record with the torch profiler")
    parser.add_argument("--profile-after", type=int, default=64, help="steps of the run before recording starts")
    parser.add_argument("--trace-dir", default=None)
    parser.add_argument("--output-json", default=None)
    options.add_arguments(parser)  # every engine flag (--dtype, --load-format, --max-num-seqs, ...)
    args = parser.parse_args(argv)
    values = vars(args)
    if args.config is not None:
        from atom_trio.testing import REAL_CONFIGS, write_model_dir

        if args.tokenizer_from is None:
            parser.error("--config needs --tokenizer-from")
        model_dir = write_model_dir(args.models_dir / f"{args.config}-dummy", REAL_CONFIGS[args.config], args.tokenizer_from)
        values = {**values, "model": str(model_dir)}
    config, _ = options.load(values, os.environ)
    num_seqs = args.num_seqs or (16 if args.dataset == "fixed" else 256)
    config = attrs.evolve(config, executor="thread")
    if args.dataset == "nano-vllm":
        requests = nano_vllm_requests(num_seqs=num_seqs, seed=config.seed)
        temperature = 0.6 if args.temperature is None else args.temperature
    else:
        requests = random_requests(
            get_tokenizer(config.model, config.tokenizer),
            num_prompts=num_seqs,
            input_len=args.input_len,
            output_len=args.output_len,
            seed=config.seed,
        )
        temperature = 0.0 if args.temperature is None else args.temperature
    result = trio.run(run, args, config, requests, temperature)
    if args.output_json:
        Path(args.output_json).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
