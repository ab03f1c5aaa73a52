"""Speculative decoding (n-gram prompt lookup, EAGLE): what it gains, measured against plain decoding in the same run.

    python -m benchmarks.spec_decode                 # CPU, default model, batch 1: copy-heavy and chat prompts
    python -m benchmarks.spec_decode --gpu           # GPU, Llama-3.1-8B shapes, dummy weights: verify vs decode
    python -m benchmarks.spec_decode --gpu --method eagle   # the same, drafting with an EAGLE head's shapes

CPU mode: two engines on the default model, one with
``speculative_config={"method": "ngram", ...}`` and one without, generate
the same prompts one at a time (batch 1, greedy), interleaved request by
request so that load changes hit both alike. Two prompt sets: copy-heavy
(repeat or rewrite a paragraph: drafts are often right) and ordinary chat
(they rarely are; the back-off must keep the cost under 5%). Reported: output
tokens per second with and without, the speed-up (median over rounds), and
the mean acceptance length (tokens per verify step: 1 + accepted / verify steps).

GPU mode: one runner with Llama-3.1-8B's shapes and dummy weights; at batch 1,
8 and 32 and a context of ``--context-len`` tokens, the median time of a
plain decode step (one token per sequence, CUDA graphs) and of a verify step
with k = 1..4 drafts per sequence (k + 1 tokens each, eager), and from those
the implied speed-up at per-draft acceptance rates 0.5-0.9: a verify step
yields ``(1 - a**(k + 1)) / (1 - a)`` tokens per sequence on average, so the
speed-up is that times ``t_decode / t_verify`` (the drafter's own cost is
added to the verify step: the n-gram drafter's, measured on the host, or
with ``--method eagle`` an EAGLE head's at Llama-3.1-8B's shapes, one layer,
dummy weights: the median time of one proposal of k drafts for the whole
batch, each sequence's window of target hidden states full, in steady state).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

PARAGRAPHS = [
    (
        "The lighthouse keeper climbed the spiral stairs every evening at dusk, lit the great lamp, and wrote the "
        "weather, the ships he saw and the state of the sea into a leather logbook that his grandfather had started."
    ),
    (
        "To bake the bread, mix the flour, water, salt and yeast, knead the dough for ten minutes, let it rise for "
        "two hours in a warm place, shape it into a loaf, and bake it at two hundred and twenty degrees for forty "
        "minutes."
    ),
    (
        "The committee met on Tuesday to review the budget, approved the new library wing, postponed the decision "
        "on the parking garage, and asked the treasurer to report on the pension fund at the next meeting in March."
    ),
]
COPY_PROMPTS = [f"Repeat this paragraph exactly, word for word.\n\n{p}\n\nRepeated:\n" for p in PARAGRAPHS] + [
    f"Rewrite the following text without changing a single word:\n{p}\nRewritten text:\n" for p in PARAGRAPHS
]
CHAT_PROMPTS = [
    "What are three good habits for staying healthy?",
    "Write a short poem about autumn leaves.",
    "Explain why the sky is blue to a ten-year-old.",
    "Give me some ideas for a birthday party for a friend who loves board games.",
    "How do I make a cup of green tea?",
    "What should I pack for a weekend hiking trip?",
]


def cpu_benchmark(args: argparse.Namespace) -> dict:
    from atom_trio import LLM, SamplingParams

    spec_config = {
        "method": "ngram",
        "num_speculative_tokens": args.k,
        "prompt_lookup_min": args.prompt_lookup_min,
        "prompt_lookup_max": args.prompt_lookup_max,
    }
    common = {"dtype": args.dtype, "seed": 0, "max_model_len": 1024, "num_kv_blocks": 256}
    spec = LLM(speculative_config=spec_config, **common)
    plain = LLM(**common)
    params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens)

    def chat(prompt: str) -> list[dict]:
        return [{"role": "user", "content": prompt}]

    def one(llm, prompt: list[dict]) -> tuple[float, int]:
        start = time.perf_counter()
        [out] = llm.generate([prompt], params, use_tqdm=False)
        return time.perf_counter() - start, len(out.outputs[0].token_ids)

    results: dict = {"load_average": os.getloadavg(), "speculative_config": spec_config}
    for name, prompts in (("copy", COPY_PROMPTS), ("chat", CHAT_PROMPTS)):
        token_prompts = [chat(p) for p in prompts]
        for p in token_prompts[:2]:  # warm both engines up
            one(spec, p), one(plain, p)
        before = spec.stats()
        ratios, spec_time, plain_time, spec_tokens, plain_tokens = [], 0.0, 0.0, 0, 0
        for _ in range(args.rounds):
            for p in token_prompts:
                (ts, ns), (tp, np_) = one(spec, p), one(plain, p)
                ratios.append((ns / ts) / (np_ / tp))
                spec_time, plain_time, spec_tokens, plain_tokens = spec_time + ts, plain_time + tp, spec_tokens + ns, plain_tokens + np_
        after = spec.stats()
        drafts = after.spec_num_drafts - before.spec_num_drafts
        accepted = after.spec_num_accepted_tokens - before.spec_num_accepted_tokens
        results[name] = {
            "spec_tokens_per_s": spec_tokens / spec_time,
            "plain_tokens_per_s": plain_tokens / plain_time,
            "speedup_median": statistics.median(ratios),
            "speedup_overall": (spec_tokens / spec_time) / (plain_tokens / plain_time),
            "verify_steps": drafts,
            "draft_tokens": after.spec_num_draft_tokens - before.spec_num_draft_tokens,
            "accepted_tokens": accepted,
            "mean_acceptance_length": 1 + accepted / drafts if drafts else None,
        }
        print(f"{name}: {json.dumps(results[name])}", flush=True)
    spec.close()
    plain.close()
    return results


def gpu_benchmark(args: argparse.Namespace) -> dict:
    import torch

    from atom_trio.config import EngineConfig
    from atom_trio.core.plan import SeqChunk, StepPlan
    from atom_trio.runner import ModelRunner
    from atom_trio.runner.drafter import NgramDrafter
    from atom_trio.sampling_params import SamplingParams
    from atom_trio.testing import REAL_CONFIGS, write_model_dir

    model_dir = write_model_dir(Path(tempfile.mkdtemp(prefix="llama-3.1-8b-shapes-")), REAL_CONFIGS["llama-3.1-8b"])
    batch_sizes = args.batch_sizes
    runner = ModelRunner(
        EngineConfig(
            model=str(model_dir), load_format="dummy", dtype="bfloat16", seed=0, max_num_seqs=max(batch_sizes),
            max_num_batched_tokens=max(args.context_len, max(batch_sizes) * 5), max_model_len=4096,
        )
    )
    greedy = SamplingParams(temperature=0.0, ignore_eos=True)
    size = runner.block_size
    steps = args.steps
    blocks_per_seq = -(-(args.context_len + steps * 6 + 8) // size)
    results: dict = {"device": torch.cuda.get_device_name(), "context_len": args.context_len, "steps": {}}
    step_id = 0

    def run(chunks: list[SeqChunk], finished: list[int] = ()) -> list[int]:
        nonlocal step_id
        step_id += 1
        return runner.execute(StepPlan(step_id=step_id, chunks=chunks, finished_seq_ids=list(finished))).token_ids

    def timed(batch: int, k: int) -> float:
        """Median seconds of a step where each of ``batch`` sequences runs its token and ``k`` drafts."""
        tables = [list(range(i * blocks_per_seq, (i + 1) * blocks_per_seq)) for i in range(batch)]
        prompt = [int(t) for t in torch.randint(0, 32000, (args.context_len,))]
        for i in range(batch):  # prefill one sequence at a time (the step's token budget)
            run([SeqChunk(i, prompt, 0, tables[i], len(prompt), True, greedy)], finished=[i])
        pos = len(prompt)
        times = []
        for _ in range(steps):
            chunks = [
                SeqChunk(i, [7] + [11] * k, pos, tables[i], len(prompt), True, greedy, None, k) for i in range(batch)
            ]
            torch.cuda.synchronize()
            start = time.perf_counter()
            run(chunks)
            times.append(time.perf_counter() - start)
            pos += 1  # as if one draft were accepted: the next chunk starts inside this one's drafts
        return statistics.median(times[2:])

    context = [int(t) for t in torch.randint(0, 32000, (args.context_len,))]
    if args.method == "eagle":
        eagle = eagle_drafter(runner, model_dir)
        draft_cost = {(batch, k): eagle_propose_s(eagle, batch, k, context, steps) for batch in batch_sizes
                      for k in range(1, 5)}
        results["eagle_propose_s"] = {f"batch{b}_k{k}": s for (b, k), s in draft_cost.items()}
    else:
        drafter = NgramDrafter(4, 2, 4)
        start = time.perf_counter()
        for _ in range(100):
            drafter.propose_one(context)
        draft_s = (time.perf_counter() - start) / 100
        results["ngram_propose_s_per_seq"] = draft_s
        draft_cost = {(batch, k): draft_s * batch for batch in batch_sizes for k in range(1, 5)}
    for batch in batch_sizes:
        decode = timed(batch, 0)
        row = {"decode_s": decode}
        for k in range(1, 5):
            verify = timed(batch, k) + draft_cost[batch, k]
            row[f"verify_k{k}_s"] = verify
            for a in (0.5, 0.6, 0.7, 0.8, 0.9):
                tokens = (1 - a ** (k + 1)) / (1 - a)
                row[f"speedup_k{k}_a{a}"] = tokens * decode / verify
        results["steps"][batch] = row
        print(f"batch {batch}: {json.dumps(row)}", flush=True)
    runner.close()
    return results


def eagle_drafter(runner, model_dir: Path):
    """An EAGLE drafter on ``runner``'s target: a head of Llama-3.1-8B's shapes (one layer), dummy weights."""
    import attrs

    from atom_trio.runner.drafter import EagleDrafter
    from atom_trio.testing import REAL_CONFIGS, write_model_dir

    head_config = {**REAL_CONFIGS["llama-3.1-8b"], "num_hidden_layers": 1}
    head_dir = write_model_dir(model_dir.parent / "eagle-head", head_config)
    spec = {"method": "eagle", "num_speculative_tokens": 4, "draft_model": str(head_dir)}
    runner.config = attrs.evolve(runner.config, speculative_config=spec)
    return EagleDrafter(runner)


def eagle_propose_s(drafter, batch: int, k: int, context: list[int], steps: int) -> float:
    """Median seconds of one proposal of ``k`` drafts for ``batch`` greedy sequences whose windows are full."""
    import torch

    from atom_trio.runner.drafter import DraftRequest
    from atom_trio.sampling_params import SamplingParams

    greedy = SamplingParams(temperature=0.0, ignore_eos=True)
    hidden_size = drafter.model.config.hidden_size

    def hidden(n: int) -> torch.Tensor:
        return torch.randn(n, hidden_size, dtype=torch.bfloat16, device=drafter.device)

    drafter.num_tokens = k
    tokens = list(context)
    drafter.forget(range(batch))
    window = drafter.hidden_window
    drafter.propose([DraftRequest(i, tokens, len(context), greedy, hidden(window)) for i in range(batch)])
    times = []
    for _ in range(steps):  # two tokens a step (one draft accepted), continuing each window
        tokens = tokens + [11, 7]
        requests = [DraftRequest(i, tokens, len(context), greedy, hidden(2)) for i in range(batch)]
        torch.cuda.synchronize()
        start = time.perf_counter()
        drafter.propose(requests)  # reads the drafts on the host: the step's sync
        times.append(time.perf_counter() - start)
    return statistics.median(times[2:])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--gpu", action="store_true", help="the GPU mode (Llama-3.1-8B shapes, dummy weights)")
    parser.add_argument("--method", choices=["ngram", "eagle"], default="ngram", help="GPU mode: whose drafting cost")
    parser.add_argument("--k", type=int, default=3, help="num_speculative_tokens (CPU mode)")
    parser.add_argument("--prompt-lookup-min", type=int, default=2)
    parser.add_argument("--prompt-lookup-max", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=96)
    parser.add_argument("--rounds", type=int, default=2, help="passes over each prompt set (CPU mode)")
    parser.add_argument("--dtype", default="float32", help="CPU mode's dtype")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 32], help="GPU mode")
    parser.add_argument("--context-len", type=int, default=512, help="GPU mode: tokens before the timed steps")
    parser.add_argument("--steps", type=int, default=20, help="GPU mode: timed steps per shape")
    parser.add_argument("--output", help="write the figures here as JSON")
    args = parser.parse_args(argv)
    results = gpu_benchmark(args) if args.gpu else cpu_benchmark(args)
    if args.output:
        Path(args.output).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
