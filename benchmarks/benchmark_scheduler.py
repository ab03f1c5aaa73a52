"""Microbenchmark: the host's work per decode step with many running sequences, by phase.

No model runs: each step's sampled tokens are drawn at random on the host,
so what is timed is the host work around the model that grows with the
batch, in the order a step does it:

- ``schedule`` and ``update``: the scheduler (`Scheduler.schedule`, `Scheduler.update`);
- ``inputs``: the runner's input preparation (`InputBatch.record` and
  `InputBatch.prepare`: token histories and the flat batch, on the host);
- ``sample``: the sampler's host work for a batch of mixed parameters
  (greedy, top-p, seeded, penalties) on logits of a small vocabulary, so that
  its kernels cost little and its per-row Python shows;
- ``deliver``: the output processor (detokenization, deltas, one
  `RequestOutput` per request into its buffer, which a reader empties after
  every step, untimed).

It reports the thread's CPU time per phase (median and p90, µs); on a shared
machine CPU time is the fairer number (wall time also counts the moments
another process held the core). ``--phases`` picks some; ``schedule`` and
``update`` alone need neither torch nor a tokenizer. It uses only interfaces
that have not changed, so a baseline tree runs the same file::

    python -m benchmarks.benchmark_scheduler --num-seqs 256 --steps 500
    PYTHONPATH=/path/to/baseline python benchmarks/benchmark_scheduler.py --num-seqs 256 --steps 500
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from pathlib import Path
from typing import Any

import trio

from atom_trio.core.plan import StepResult
from atom_trio.core.scheduler import Scheduler
from atom_trio.sampling_params import SamplingParams

PHASES = ("schedule", "inputs", "sample", "update", "deliver")


def fake_result(plan, rng: random.Random, vocab_size: int) -> StepResult:
    num = sum(1 for c in plan.chunks if c.sample)
    return StepResult(
        step_id=plan.step_id,
        token_ids=[rng.randrange(vocab_size) for _ in range(num)],
        logprobs=[None] * num,
        top_logprobs=[None] * num,
    )


def mixed_params(i: int) -> SamplingParams:
    """Row ``i``'s parameters: a quarter each greedy, top-p, seeded top-k, penalized."""
    kind = i % 4
    if kind == 0:
        return SamplingParams(max_tokens=None, ignore_eos=True, temperature=0.0)
    if kind == 1:
        return SamplingParams(max_tokens=None, ignore_eos=True, temperature=0.8, top_p=0.9)
    if kind == 2:
        return SamplingParams(max_tokens=None, ignore_eos=True, temperature=0.7, top_k=20, seed=i)
    return SamplingParams(max_tokens=None, ignore_eos=True, temperature=1.0, presence_penalty=0.3, repetition_penalty=1.1)


class HostStep:
    """The components of one decode step's host work, built for ``num_seqs`` running sequences."""

    def __init__(self, args: argparse.Namespace, phases: set[str]) -> None:
        self.rng = random.Random(args.seed)
        self.phases = phases
        self.block_size = args.block_size
        max_model_len = args.prompt_len + args.steps + 64
        blocks_per_seq = -(-max_model_len // args.block_size)
        self.scheduler = Scheduler(
            num_blocks=args.num_seqs * blocks_per_seq,
            block_size=args.block_size,
            max_num_seqs=args.num_seqs,
            max_num_batched_tokens=8192,
            max_model_len=max_model_len,
            enable_prefix_caching=args.enable_prefix_caching,
            eos_token_ids=frozenset({0}),
        )
        self.vocab_size = args.vocab
        self.inputs = self.sampler = self.outputs = self.plan = None
        if phases & {"inputs", "sample"}:
            import torch

            from atom_trio.layers.sampler import Sampler
            from atom_trio.runner.input_batch import InputBatch

            torch.set_num_threads(1)  # the host's own work; idle OpenMP threads spinning on a busy box would count
            self.torch = torch
            self.inputs = InputBatch(block_size=args.block_size, max_model_len=max_model_len, device=torch.device("cpu"))
            self.sampler = Sampler(frozenset({0}))
        keys = [f"req-{i}" for i in range(args.num_seqs)]
        prompts = [[self.rng.randrange(1, self.vocab_size) for _ in range(args.prompt_len)] for _ in keys]
        params = [mixed_params(i) for i in range(args.num_seqs)]
        self.buffers = {}
        if "deliver" in phases:
            from atom_trio.config import EngineConfig
            from atom_trio.engine.input_processor import EngineRequest
            from atom_trio.engine.output_processor import OutputProcessor
            from atom_trio.loader.tokenizer import load_tokenizer

            self.outputs = OutputProcessor(load_tokenizer(EngineConfig()))
            for key, prompt, p in zip(keys, prompts, params):
                request = EngineRequest(key=key, request_id=key, prompt=None, prompt_token_ids=prompt, params=p)
                self.buffers[key] = self.outputs.add_request(request).buffer
        for key, prompt, p in zip(keys, prompts, params):
            self.scheduler.add_request(key, prompt, p)

    async def run(self, timed: bool) -> dict[str, int]:
        """One step; the CPU nanoseconds of each phase."""
        clock = time.thread_time_ns
        times = {}
        start = clock()
        plan = self.plan = self.scheduler.schedule()
        times["schedule"] = clock() - start
        if self.inputs is not None:
            start = clock()
            self.inputs.forget(plan.finished_seq_ids)
            self.inputs.record(plan.chunks)
            self.inputs.prepare(plan.chunks)
            times["inputs"] = clock() - start
            if "sample" in self.phases and timed:
                sampled = [c for c in plan.chunks if c.sample]
                logits = self.torch.randn(len(sampled), self.vocab_size)
                start = clock()
                self.sampler.sample_on_device(logits, self.inputs.sample_requests(sampled))
                times["sample"] = clock() - start
        result = fake_result(plan, self.rng, self.vocab_size)  # the model's work: not timed
        start = clock()
        outputs = self.scheduler.update(plan, result)
        times["update"] = clock() - start
        if self.outputs is not None:
            start = clock()
            self.outputs.process_outputs(outputs)
            times["deliver"] = clock() - start
            for key in {out.request_id for out in outputs}:  # the readers: not timed
                await self.buffers[key].get()
        return times


async def measure(args: argparse.Namespace, phases: set[str]) -> dict[str, list[int]]:
    step = HostStep(args, phases)
    # prefill everything (untimed) so that every timed step is a batch of pure decodes
    while True:
        await step.run(timed=False)
        chunks = step.plan.chunks
        if len(chunks) == args.num_seqs and all(len(c.token_ids) == 1 for c in chunks):
            break
    recorded: dict[str, list[int]] = {phase: [] for phase in PHASES}
    for _ in range(args.steps):
        for phase, ns in (await step.run(timed=True)).items():
            if phase in phases:
                recorded[phase].append(ns)
    return {phase: values for phase, values in recorded.items() if values}


def summarize(recorded: dict[str, list[int]]) -> dict[str, dict[str, float]]:
    summary = {}
    for phase, values in recorded.items():
        us = sorted(v / 1e3 for v in values)
        summary[phase] = {"median_us": statistics.median(us), "p90_us": us[min(len(us) - 1, 9 * len(us) // 10)]}
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-seqs", type=int, default=256)
    parser.add_argument("--prompt-len", type=int, default=256, help="each sequence's context when the timing starts")
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument(
        "--vocab", type=int, default=512, help="token ids are drawn below it; the sampler's logits are this wide"
    )
    parser.add_argument("--phases", nargs="+", choices=PHASES, default=list(PHASES))
    parser.add_argument("--no-enable-prefix-caching", dest="enable_prefix_caching", action="store_false")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output-json", default=None)
    args = parser.parse_args()

    summary = summarize(trio.run(measure, args, set(args.phases)))
    print(
        f"host work per decode step, {args.num_seqs} running sequences of ~{args.prompt_len} tokens, "
        f"block_size={args.block_size}, prefix caching {'on' if args.enable_prefix_caching else 'off'}, "
        f"{args.steps} steps; thread CPU time, µs:"
    )
    for phase, row in summary.items():
        print(f"  {phase:9} median {row['median_us']:9.1f}  p90 {row['p90_us']:9.1f}")
    total = sum(row["median_us"] for row in summary.values())
    print(f"  {'sum':9} median {total:9.1f}")
    if args.output_json:
        record: dict[str, Any] = {"num_seqs": args.num_seqs, "prompt_len": args.prompt_len, "phases": summary}
        Path(args.output_json).write_text(json.dumps(record, indent=1))


if __name__ == "__main__":
    main()
