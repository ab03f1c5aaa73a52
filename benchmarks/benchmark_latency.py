"""Prefill time and time per decode step of the model runner, optionally against transformers.

    python -m benchmarks.benchmark_latency                              # default model, bf16, batch 1 8 32
    python -m benchmarks.benchmark_latency --batch-sizes 1 32 --input-len 64 --output-len 128 --compare-transformers

For each batch size, ``B`` prompts of ``--input-len`` random token ids are
prefilled in one step (timed), then ``--output-len`` greedy decode steps run
for all ``B`` sequences (each timed). Decode tokens/s is ``B / step time``.
With ``--compare-transformers``, transformers' ``generate`` runs the same
model, dtype and prompts in the same process: its decode rate is
``B * (output_len - 1) / (t(output_len tokens) - t(1 token))``, which takes
its prefill out. Figures are medians over ``--num-iters`` repeats.

``--competing-load N`` runs the measurements beside N busy processes at
nice 0 (started once the runner is up), as on a box shared with other work;
``--threads 2`` against the default ``0`` then shows what the thread
governor (`atom_trio.runner.cpu_threads`) is worth.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

import torch

from atom_trio.config import EngineConfig
from atom_trio.core.plan import SeqChunk, StepPlan
from atom_trio.runner import ModelRunner
from atom_trio.sampling_params import SamplingParams

from .peers.offline_workload import competing_load

GREEDY = SamplingParams(temperature=0.0, ignore_eos=True)


def runner_latency(runner: ModelRunner, prompts: list[list[int]], output_len: int) -> tuple[float, float]:
    """(prefill seconds, median seconds per decode step) for one batch."""
    block_size = runner.block_size
    blocks_per_seq = -(-(len(prompts[0]) + output_len) // block_size)
    tables = [list(range(i * blocks_per_seq, (i + 1) * blocks_per_seq)) for i in range(len(prompts))]

    def plan(step: int, tokens: list[list[int]], start: int) -> StepPlan:
        chunks = [
            SeqChunk(
                seq_id=i,
                token_ids=t,
                start_pos=start,
                block_table=tables[i],
                prompt_len=len(prompts[i]),
                sample=True,
                sampling_params=GREEDY,
            )
            for i, t in enumerate(tokens)
        ]
        finished = list(range(len(prompts))) if step == 0 else []  # forget the previous repeat's histories
        return StepPlan(step_id=step, chunks=chunks, finished_seq_ids=finished)

    start = time.perf_counter()
    result = runner.execute(plan(0, prompts, 0))
    prefill = time.perf_counter() - start
    steps = []
    for step in range(1, output_len):
        tokens = [[t] for t in result.token_ids]
        start = time.perf_counter()
        result = runner.execute(plan(step, tokens, len(prompts[0]) + step - 1))
        steps.append(time.perf_counter() - start)
    return prefill, statistics.median(steps)


def transformers_decode_rate(model, prompts: list[list[int]], output_len: int) -> tuple[float, float]:
    """(prefill seconds, decode tokens/s) of ``generate`` on the same prompts."""
    input_ids = torch.tensor(prompts)
    attention_mask = torch.ones_like(input_ids)

    def generate(n: int) -> float:
        start = time.perf_counter()
        with torch.inference_mode():
            model.generate(
                input_ids,
                attention_mask=attention_mask,
                max_new_tokens=n,
                min_new_tokens=n,
                do_sample=False,
                pad_token_id=model.config.eos_token_id,
            )
        return time.perf_counter() - start

    first = generate(1)
    full = generate(output_len)
    return first, len(prompts) * (output_len - 1) / (full - first)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="default: the built-in SmolLM2-135M-Instruct")
    parser.add_argument("--dtype", default="bfloat16", choices=["auto", "float32", "bfloat16", "float16"])
    parser.add_argument("--load-format", default="auto", choices=["auto", "safetensors", "gguf", "dummy"])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--input-len", type=int, default=64)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--num-iters", type=int, default=3)
    parser.add_argument(
        "--threads", type=int, default=0, help="CPU threads (EngineConfig.cpu_threads; 0: follow the free cores)"
    )
    parser.add_argument("--level", type=int, default=None, choices=range(4), help="see EngineConfig.level")
    parser.add_argument("--compare-transformers", action="store_true")
    parser.add_argument("--competing-load", type=int, default=0, help="busy processes (nice 0) while measuring")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    block_size = 16
    blocks = max(args.batch_sizes) * -(-(args.input_len + args.output_len) // block_size)
    config = EngineConfig(
        model=args.model,
        dtype=args.dtype,
        load_format=args.load_format,
        num_kv_blocks=blocks,
        block_size=block_size,
        level=args.level,
        cpu_threads=args.threads,
    )
    start = time.perf_counter()
    runner = ModelRunner(config)
    print(f"runner ready in {time.perf_counter() - start:.1f} s (level {runner.level})")
    rng = random.Random(args.seed)
    hf_model = None
    if args.compare_transformers:
        hf_model = load_transformers_model(config, runner.dtype)

    print(
        f"model {config.model_name}, {runner.dtype}, {runner.device}, {torch.get_num_threads()} threads, "
        f"input {args.input_len}, output {args.output_len}, median of {args.num_iters}"
        + (f", beside {args.competing_load} busy processes" if args.competing_load else "")
    )
    header = f"{'batch':>5} | {'prefill ms':>10} | {'decode ms/step':>14} | {'decode tok/s':>12}"
    if hf_model is not None:
        header += f" | {'HF prefill ms':>13} | {'HF decode tok/s':>15} | {'ratio':>6}"
    print(header)
    print("-" * len(header))
    with competing_load(args.competing_load):
        measure(runner, hf_model, args, rng)
    runner.close()


def measure(runner: ModelRunner, hf_model, args: argparse.Namespace, rng: random.Random) -> None:
    """One row per batch size."""
    for batch in args.batch_sizes:
        prompts = [[rng.randrange(100, runner.vocab_size) for _ in range(args.input_len)] for _ in range(batch)]
        runs = [runner_latency(runner, prompts, args.output_len) for _ in range(args.num_iters)]
        prefill = statistics.median(r[0] for r in runs)
        step = statistics.median(r[1] for r in runs)
        row = f"{batch:>5} | {prefill * 1e3:>10.1f} | {step * 1e3:>14.2f} | {batch / step:>12.1f}"
        if hf_model is not None:
            hf_runs = [transformers_decode_rate(hf_model, prompts, args.output_len) for _ in range(args.num_iters)]
            hf_prefill = statistics.median(r[0] for r in hf_runs)
            hf_rate = statistics.median(r[1] for r in hf_runs)
            row += f" | {hf_prefill * 1e3:>13.1f} | {hf_rate:>15.1f} | {batch / step / hf_rate:>5.2f}x"
        print(row, flush=True)


def load_transformers_model(config: EngineConfig, dtype: torch.dtype):
    """transformers' own implementation of the model the runner loaded, with the same weights and dtype."""
    import transformers

    from atom_trio.loader.resolve import resolve_model

    resolved = resolve_model(config)
    if resolved.load_format == "dummy":
        raise SystemExit("--compare-transformers needs real weights (not --load-format dummy)")
    if resolved.path.is_file():  # a GGUF file
        return transformers.AutoModelForCausalLM.from_pretrained(
            resolved.path.parent, gguf_file=resolved.path.name, dtype=dtype
        ).eval()
    return transformers.AutoModelForCausalLM.from_pretrained(resolved.path, dtype=dtype).eval()


if __name__ == "__main__":
    main()
