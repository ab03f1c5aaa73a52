"""The scripted GPU serving run: dummy-weight Llama-3.1-8B behind ``atom-trio serve``, and nano-vllm's workload.

    python3 -m benchmarks.gpu_serving --tokenizer-from DIR --out RESULTS_DIR
    python3 -m benchmarks.gpu_serving --tokenizer-from DIR --out RESULTS_DIR --config qwen3-30b-a3b \
        --input-len 2048 --output-len 1024 --thread-runs "" --process-runs 10:100 --skip-nano-vllm
    python3 -m benchmarks.gpu_serving --tokenizer-from DIR --out RESULTS_DIR --config gpt-oss-20b \
        --output-len 1024 --thread-runs "" --skip-nano-vllm     # MXFP4 experts; --unquantized: bf16 experts

On one GPU, in one go, with random weights of real shapes (``--load-format dummy``; bf16, or the codes and
scales of the config's ``quantization_config`` unless ``--unquantized``):

1. ``atom-trio serve`` with Llama-3.1-8B shapes (or ``--config``'s: a name in ``atom_trio.testing.REAL_CONFIGS``
   or a ``config.json`` path),
   loaded by ``benchmarks.benchmark_serving`` with random prompts of ``--input-len`` tokens (1024) and
   ``--output-len`` output tokens (256, ``--ignore-eos``): first with ``--executor thread`` at
   concurrency 16, then with the process executor (the CUDA default) at concurrency 1, 16 and 64; the two
   runs at 16 (same prompts, same seed) are the thread-against-process comparison. ``--serve-args`` adds
   flags to both servers' command lines (``--enable-expert-parallel``, ``--max-num-batched-tokens 8192``...).
2. nano-vllm's offline workload with Qwen3-0.6B shapes through ``benchmarks.benchmark_throughput``
   (``--max-model-len 4096``).

Every server gets one unrecorded warm-up load first (``--max-num-seqs`` prompts of ``--input-len`` tokens,
32 out, at full concurrency), and the nano-vllm run a 16-prompt warm-up run: Triton compiles each new kernel
variant (mixed prefill+decode batches, every decode batch size) on first use, which otherwise stalls the first
measured requests for seconds and favours whichever server starts second (the compile cache is on disk).
Each step writes its JSON into ``--out`` as it finishes and the server logs go there too, so a run cut off
by a time limit still returns what it measured. The exact commands are printed before they run (a server's
with ``{port}``: each takes a free port when it starts).

No weights travel, only a tokenizer (``--tokenizer-from``: any byte-level BPE ``tokenizer.json``, such as
the default model's). Its vocabulary is padded with placeholder tokens up to each model's ``vocab_size``:
random weights generate ids over the whole model vocabulary, and an id the tokenizer does not know decodes
to no text, which would hide most tokens from the text-chunk timings (TTFT, ITL) of ``benchmark_serving``.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

from atom_trio.testing import QWEN3_0_6B, add_model_shapes_arguments, model_shapes, server_process, write_model_dir

ENGINE_FLAGS = ["--load-format", "dummy", "--dtype", "bfloat16", "--max-model-len", "4096"]


def show(cmd: list[str]) -> str:
    return " ".join(cmd).replace(sys.executable, "python3")


def run_logged(cmd: list[str], *, timeout: float) -> int:
    print(f"\n$ {show(cmd)}", flush=True)
    try:
        return subprocess.run(cmd, timeout=timeout).returncode
    except subprocess.TimeoutExpired:
        print(f"timed out after {timeout:.0f} s", flush=True)
        return 124


def serving_cmd(
    url: str, model_dir: Path, *, concurrency: int, prompts: int, input_len: int, output_len: int, seed: int
) -> list[str]:
    return [sys.executable, "-m", "benchmarks.benchmark_serving", "--base-url", url, "--tokenizer", str(model_dir),
            "--dataset-name", "random", "--random-input-len", str(input_len), "--random-output-len", str(output_len),
            "--ignore-eos", "--num-prompts", str(prompts), "--max-concurrency", str(concurrency),
            "--metric-percentiles", "50,90,99", "--seed", str(seed), "--disable-tqdm"]


def serving_runs(args: argparse.Namespace, model_dir: Path, executor: str, runs: list[tuple[int, int]]) -> list[dict]:
    """Start one server with ``executor``, warm it up, and run ``benchmark_serving`` at each (concurrency, prompts).

    The server is ``atom-trio serve`` on a free port, logging to ``serve-<executor>.log`` in ``--out``, stopped
    with SIGTERM (its drain path).
    """
    serve = [sys.executable, "-m", "atom_trio", "serve", "--model", str(model_dir.resolve()), *ENGINE_FLAGS,
             "--executor", executor, "--max-num-seqs", str(args.max_num_seqs), *shlex.split(args.serve_args),
             "--host", "127.0.0.1", "--port", "{port}"]
    summary = []
    print(f"\n$ {show(serve)}", flush=True)
    started = time.perf_counter()
    try:
        with server_process(command=serve, log_path=args.out / f"serve-{executor}.log",
                            ready_timeout=args.startup_timeout) as server:
            startup = time.perf_counter() - started
            print(f"server ready on {server.url} in {startup:.1f} s", flush=True)
            warmup = serving_cmd(server.url, model_dir, concurrency=args.max_num_seqs, prompts=args.max_num_seqs,
                                 input_len=args.input_len, output_len=32,
                                 seed=1)  # another seed: no prefix-cache hits on the measured prompts
            run_logged(warmup, timeout=args.step_timeout)
            for concurrency, prompts in runs:
                name = f"serving-{executor}-c{concurrency}.json"
                cmd = serving_cmd(server.url, model_dir, concurrency=concurrency, prompts=prompts,
                                  input_len=args.input_len, output_len=args.output_len, seed=0)
                cmd += ["--save-result", "--result-dir", str(args.out), "--result-filename", name]
                rc = run_logged(cmd, timeout=args.step_timeout)
                summary.append(dict(executor=executor, concurrency=concurrency, num_prompts=prompts, rc=rc,
                                    server_startup_s=startup, result=name if (args.out / name).exists() else None))
    except (RuntimeError, TimeoutError) as exc:  # the server exited or never became healthy
        print(f"FAILED: {exc}", flush=True)
        summary.append(dict(executor=executor, error=str(exc)))
    return summary


def print_table(out: Path) -> None:
    """The serving results as a markdown table (medians and p99 in ms)."""
    cols = ["ttft", "tpot", "itl", "e2el"]
    print("\n| executor | conc. | prompts | ok/failed | duration s | req/s | out tok/s | total tok/s | "
          + " | ".join(f"{c.upper()} p50 / p99" for c in cols) + " |")
    print("|---" * (8 + len(cols)) + "|")
    for path in sorted(out.glob("serving-*.json")):
        r = json.loads(path.read_text())
        executor = path.stem.split("-")[1]
        lat = " | ".join(f"{r[f'median_{c}_ms']:.1f} / {r[f'p99_{c}_ms']:.1f}" for c in cols)
        print(f"| {executor} | {r['max_concurrency']} | {r['num_prompts']} | {r['completed']}/{r['failed']} | "
              f"{r['duration']:.2f} | {r['request_throughput']:.2f} | {r['output_throughput']:.0f} | "
              f"{r['total_token_throughput']:.0f} | {lat} |")


def runs_arg(text: str) -> list[tuple[int, int]]:
    """``"1:8,16:64"`` -> ``[(1, 8), (16, 64)]`` (concurrency, number of prompts)."""
    return [(int(c), int(n)) for c, n in (item.split(":") for item in text.split(",") if item.strip())]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python3 -m benchmarks.gpu_serving", description=__doc__.split("\n")[0])
    parser.add_argument("--tokenizer-from", type=Path, required=True, help="dir with tokenizer.json + tokenizer_config.json")
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "gpu-serving-results")))
    parser.add_argument("--models-dir", type=Path, default=Path("/tmp/atom_trio_dummy_models"))
    add_model_shapes_arguments(parser)
    parser.add_argument("--input-len", type=int, default=1024, help="random prompt tokens")
    parser.add_argument("--output-len", type=int, default=256, help="output tokens of each measured request")
    parser.add_argument(
        "--serve-args",
        default="",
        help='more flags for atom-trio serve, as one string: --serve-args="--max-num-batched-tokens 8192"',
    )
    parser.add_argument("--startup-timeout", type=float, default=240)
    parser.add_argument("--step-timeout", type=float, default=150)
    parser.add_argument("--max-num-seqs", type=int, default=64, help="of both servers (the largest concurrency)")
    parser.add_argument("--process-runs", type=runs_arg, default=runs_arg("1:8,16:64,64:128"),
                        help="CONCURRENCY:PROMPTS,... against the process-executor server ('' for none)")
    parser.add_argument("--thread-runs", type=runs_arg, default=runs_arg("16:64"),
                        help="CONCURRENCY:PROMPTS,... against the thread-executor server ('' for none)")
    parser.add_argument("--skip-nano-vllm", action="store_true")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)

    shapes = model_shapes(args.config, unquantized=args.unquantized)
    name = Path(args.config).stem + ("-unquantized" if args.unquantized else "")
    served = write_model_dir(args.models_dir / f"{name}-dummy", shapes, args.tokenizer_from)
    qwen = write_model_dir(args.models_dir / "qwen3-0.6b-dummy", QWEN3_0_6B, args.tokenizer_from)
    began = time.perf_counter()
    summary: list[dict] = []
    for executor, runs in (("thread", args.thread_runs), ("process", args.process_runs)):
        if runs:
            summary += serving_runs(args, served, executor, runs)
    if not args.skip_nano_vllm:
        cmd = [sys.executable, "-m", "benchmarks.benchmark_throughput", "--dataset", "nano-vllm", "--model", str(qwen),
               *ENGINE_FLAGS]
        run_logged([*cmd, "--num-prompts", "16"], timeout=args.step_timeout)  # warm-up: fills the compile cache
        cmd += ["--output-json", str(args.out / "throughput-nano-vllm.json")]
        summary.append(dict(step="nano-vllm", rc=run_logged(cmd, timeout=args.step_timeout)))
    print(f"\nall steps in {time.perf_counter() - began:.0f} s")
    print(json.dumps(summary, indent=1))
    print_table(args.out)
    nano = args.out / "throughput-nano-vllm.json"
    if nano.exists():
        print("\nnano-vllm workload:", nano.read_text())
    return 0 if all(s.get("rc", 1) == 0 for s in summary) else 1


if __name__ == "__main__":
    sys.exit(main())
