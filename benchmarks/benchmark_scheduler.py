"""Microbenchmark: host time per scheduler step (`schedule()` + `update()`) with many running decodes.

The model is replaced by a ready-made `StepResult` (random token ids), so
this measures the scheduler alone: what each decode step costs on the host
before and after the model runs. It reports wall-clock time and the thread's
CPU time; on a shared machine the CPU time is the fairer number (wall time
also counts the moments another process held the core). Run::

    python -m benchmarks.benchmark_scheduler --num-seqs 256 --steps 2000
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

from atom_trio.core.plan import StepResult
from atom_trio.sampling_params import SamplingParams
from atom_trio.core.scheduler import Scheduler


def fake_result(plan, rng: random.Random, vocab_size: int) -> StepResult:
    num = sum(1 for c in plan.chunks if c.sample)
    return StepResult(
        step_id=plan.step_id,
        token_ids=[rng.randrange(vocab_size) for _ in range(num)],
        logprobs=[None] * num,
        top_logprobs=[None] * num,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-seqs", type=int, default=256)
    parser.add_argument("--prompt-len", type=int, default=256)
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--no-enable-prefix-caching", dest="enable_prefix_caching", action="store_false")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    rng = random.Random(args.seed)
    vocab_size = 49152
    max_model_len = args.prompt_len + args.steps + 64
    blocks_per_seq = -(-max_model_len // args.block_size)
    scheduler = Scheduler(
        num_blocks=args.num_seqs * blocks_per_seq,
        block_size=args.block_size,
        max_num_seqs=args.num_seqs,
        max_num_batched_tokens=8192,
        max_model_len=max_model_len,
        enable_prefix_caching=args.enable_prefix_caching,
        eos_token_ids=frozenset({0}),
    )
    params = SamplingParams(max_tokens=None, ignore_eos=True, temperature=0.0)
    for i in range(args.num_seqs):
        prompt = [rng.randrange(1, vocab_size) for _ in range(args.prompt_len)]
        scheduler.add_request(f"req-{i}", prompt, params)
    # prefill everything so that every timed step is a batch of pure decodes
    while (plan := scheduler.schedule()) is not None and not all(len(c.token_ids) == 1 for c in plan.chunks):
        scheduler.update(plan, fake_result(plan, rng, vocab_size))
    scheduler.update(plan, fake_result(plan, rng, vocab_size))
    assert scheduler.stats().num_running == args.num_seqs

    wall, cpu = [], []
    for _ in range(args.steps):
        start, start_cpu = time.perf_counter(), time.thread_time()
        plan = scheduler.schedule()
        mid, mid_cpu = time.perf_counter(), time.thread_time()
        result = fake_result(plan, rng, vocab_size)  # the model's work: not timed
        resume, resume_cpu = time.perf_counter(), time.thread_time()
        scheduler.update(plan, result)
        end, end_cpu = time.perf_counter(), time.thread_time()
        assert len(plan.chunks) == args.num_seqs
        wall.append((mid - start) + (end - resume))
        cpu.append((mid_cpu - start_cpu) + (end_cpu - resume_cpu))

    print(
        f"schedule()+update() with {args.num_seqs} running decodes, block_size={args.block_size}, "
        f"prefix caching {'on' if args.enable_prefix_caching else 'off'}, {args.steps} steps:"
    )
    for name, times in (("wall", wall), ("cpu", cpu)):
        times_ms = sorted(t * 1e3 for t in times)
        p99 = times_ms[min(len(times_ms) - 1, int(0.99 * len(times_ms)))]
        print(
            f"  {name:4}  median {statistics.median(times_ms):.3f} ms  p99 {p99:.3f} ms  "
            f"mean {statistics.fmean(times_ms):.3f} ms"
        )


if __name__ == "__main__":
    main()
