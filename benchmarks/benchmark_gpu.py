"""Decode and prefill speed of the model runner on one GPU, against the HBM floor and transformers, in one run.

    python3 -m benchmarks.benchmark_gpu                    # Llama-3.1-8B shapes, bf16, dummy weights
    python3 -m benchmarks.benchmark_gpu --json out.json
    for l in 0 1 2 3; do python3 -m benchmarks.benchmark_gpu --level $l --skip-transformers; done   # compare levels
    python3 -m benchmarks.benchmark_gpu --config qwen3-30b-a3b --batch-sizes 1 8 32 128 \
        --transformers-batch-sizes 1 --gpu-memory-utilization 0.95      # a mixture of experts
    python3 -m benchmarks.benchmark_gpu --config deepseek-v2-lite --batch-sizes 1 32 128 \
        --transformers-batch-sizes 1 --transformers-experts eager      # latent attention
    for kv in auto fp8; do python3 -m benchmarks.benchmark_gpu --skip-transformers --batch-sizes 32 128 \
        --kv-cache-dtype $kv --json kv-$kv.json; done                  # an FP8 KV cache against bf16
    python3 -m benchmarks.benchmark_gpu --config gpt-oss-20b --batch-sizes 1 32 128 --skip-transformers \
        --json mxfp4.json                                              # MXFP4 experts, as published
    python3 -m benchmarks.benchmark_gpu --config gpt-oss-20b --unquantized --batch-sizes 1 32 128 \
        --skip-transformers --json bf16.json                           # the same shapes, bf16 experts

``--config`` picks the model's shapes (``atom_trio.testing.REAL_CONFIGS``, or a ``config.json`` path); a
config with a ``quantization_config`` gets dummy weights in that format (codes and scales, see
`atom_trio.loader.weights.draw_dummy_quantized`), unless ``--unquantized`` drops it. Measured, all in one
process on one card:

- the device-to-device copy bandwidth, and from it the floor of a decode
  step at each batch size: the bytes it must move (`benchmarks.roofline`:
  the weights it uses as stored, one embedding row per token, the KV cache
  at the median timed step's context, a sliding-window layer's window of
  it, the logits) over that bandwidth. For a
  mixture of experts, the routed experts it reads are those its router
  chose: counted per sparse layer over a few decode steps of each batch size
  (``decode_bN_distinct_experts``, the mean over layers), run eagerly at
  the end so that a hook sees the router's ids; ``decode_bN_floor_uniform_ms``
  is the floor for uniform random routing instead;
- transformers (SDPA) on a model of the same shapes and the same dummy
  weights (drawn as ``--load-format dummy`` draws them; a quantized config's
  model is built dense, as ``from_config`` builds it): the time per decode
  step of ``generate`` at each ``--transformers-batch-sizes`` (``(t(N
  tokens) - t(1 token)) / (N - 1)``, which takes the prefill out), and one
  forward of a 2048-token prompt; a mixture of experts is timed with each of
  ``--transformers-experts`` (``hf_eager_...``: its per-expert loop;
  ``hf_grouped_mm_...``: its default, a grouped GEMM, which its
  ``generate`` swaps for ``batched_mm`` while decoding on a GPU). It is then
  freed, and the runner takes the card;
- the runner (Triton kernels, KV cache sized by ``gpu_memory_utilization``)
  at ``--level`` (results under ``level_N``): its start-up time by phase and
  the decode graphs' memory; how many ``--capacity-tokens`` sequences its
  cache holds at once (``max_seqs_N``, sliding-window groups holding their
  window's blocks only; halve the bytes of an element with
  ``--kv-cache-dtype fp8`` and it doubles), and for latent attention
  (DeepSeek) against the same bytes holding keys and values per head
  (`latent_cache_capacity`);
  prefill of one 2048-token prompt (time, TFLOP/s of the parameters each
  token multiplies, a mixture's active experts only, against the bf16
  peak); time per decode step at batch 1, with CUDA graphs and, on the same
  runner, eagerly; decode tokens/s at each batch size with 1024 tokens of
  context; the same decode steps pipelined as async scheduling runs them
  (``async``: the next step launched before the host reads this one's
  tokens, which then feed it on the device).

Steps are timed from the host around ``execute`` (which returns sampled
tokens, so the device has finished); figures are medians after warm-up.
The JSON is written after transformers and again at the end, so a run cut
off by a time limit keeps the first half.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import itertools
import json
import logging
import random
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import attrs
import torch

from atom_trio.config import EngineConfig
from atom_trio.core.plan import PREVIOUS_TOKEN, SeqChunk, StepPlan
from atom_trio.layers import CachedAttention, FusedMoE, MLAAttention
from atom_trio.sampling_params import SamplingParams
from atom_trio.runner import ModelRunner
from atom_trio.runner.kv_cache import KVCacheLayout
from atom_trio.testing import add_model_shapes_arguments, model_shapes, write_model_dir
from benchmarks.roofline import expected_distinct_experts, moe_shape, prefill_flops, step_bytes

BF16_PEAK_TFLOPS = 789.0  # dense bf16 matmul measured on the H100 of the device tool
GREEDY = SamplingParams(temperature=0.0, ignore_eos=True)
DUMMY_SEED = 0  # of the runner's dummy weights, and of the same weights in transformers' model
ROUTING_STEPS = 8  # decode steps whose routing is counted, per batch size


def median_ms(fn: Callable[[], object], iters: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def copy_bandwidth() -> float:
    """Bytes per second of a 1 GiB device-to-device copy, counting the read and the write."""
    src = torch.empty(2**30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(20)]
    for _ in range(3):
        dst.copy_(src)
    for start, end in events:
        start.record()
        dst.copy_(src)
        end.record()
    torch.cuda.synchronize()
    ms = statistics.median(s.elapsed_time(e) for s, e in events)
    return 2 * src.numel() / (ms * 1e-3)


# -- transformers -----------------------------------------------------------------------------------


def transformers_baseline(
    model_dir: Path,
    input_len: int,
    prefill_len: int,
    steps: int,
    *,
    batch_sizes: list[int],
    experts_implementations: list[str | None],
) -> dict:
    """transformers' figures (keys ``hf_...``), each of ``experts_implementations`` in turn (``None``: dense).

    The model is freed before this returns, and what the card still holds is checked: the runner sizes its
    KV cache from the free memory.
    """
    import transformers

    from atom_trio.loader.weights import iter_dummy_weights

    config = transformers.AutoConfig.from_pretrained(model_dir)
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # built in bf16 on the card: no fp32 copy of the weights
    try:
        with torch.device("cuda"):
            model = transformers.AutoModelForCausalLM.from_config(config)
    finally:
        torch.set_default_dtype(previous)
    model = model.to(torch.bfloat16).eval()
    state = model.state_dict()
    with torch.no_grad():  # the runner's weights: its router then picks the same experts for the same tokens
        for name, tensor in iter_dummy_weights(config, dtype=torch.bfloat16, seed=DUMMY_SEED, device="cuda"):
            state[name].copy_(tensor)
    del state
    rng = random.Random(0)
    out = {}

    def generate(batch: int, n: int) -> Callable[[], object]:
        ids = torch.tensor(
            [[rng.randrange(1000, config.vocab_size) for _ in range(input_len)] for _ in range(batch)], device="cuda"
        )

        def run():
            with torch.inference_mode():
                model.generate(
                    ids,
                    attention_mask=torch.ones_like(ids),
                    max_new_tokens=n,
                    min_new_tokens=n,
                    do_sample=False,
                    pad_token_id=0,
                )

        return run

    prompt = torch.tensor([[rng.randrange(1000, config.vocab_size) for _ in range(prefill_len)]], device="cuda")
    for implementation in experts_implementations:
        tag = "hf" if implementation is None else f"hf_{implementation}"
        if implementation is not None:
            model.set_experts_implementation(implementation)
        for batch in batch_sizes:
            first = median_ms(generate(batch, 1), iters=3, warmup=1)
            full = median_ms(generate(batch, steps), iters=2, warmup=1)
            step_ms = (full - first) / (steps - 1)
            out[f"{tag}_decode_b{batch}_ms_per_step"] = step_ms
            out[f"{tag}_decode_b{batch}_tok_s"] = batch * 1e3 / step_ms
        with torch.inference_mode():
            out[f"{tag}_prefill_ms"] = median_ms(lambda: model(prompt, logits_to_keep=1), iters=5)
        print(json.dumps(out, indent=1), flush=True)
    del model
    gc.collect()
    torch.cuda.empty_cache()
    out["hf_left_allocated_GiB"] = torch.cuda.memory_allocated() / 2**30
    if out["hf_left_allocated_GiB"] > 1:
        raise RuntimeError(f"transformers' model still holds {out['hf_left_allocated_GiB']:.1f} GiB after it was freed")
    return out


# -- the runner ------------------------------------------------------------------------------------


class Driver:
    """Feeds the runner prefill and decode plans for a set of sequences with disjoint blocks.

    With several KV cache groups (sliding-window layers) each group gets blocks for every position: a
    sliding group's blocks are not released as they leave the window (the scheduler's work), which costs
    memory, not time, as the kernels read the window only.
    """

    def __init__(self, runner: ModelRunner) -> None:
        self.runner = runner
        self.next_block = 0
        self.next_seq = 0
        self.step = 0

    def start(self, prompts: list[list[int]], max_len: int, chunk_tokens: int) -> list[SeqChunk]:
        """Prefill ``prompts`` (at most ``chunk_tokens`` per step); returns each sequence's decode chunk."""
        block_size = self.runner.block_size
        groups = len(self.runner.kv_layout.windows)  # a table per KV cache group, each holding every position
        chunks = []
        for prompt in prompts:
            blocks = -(-max_len // block_size) * groups
            table = list(range(self.next_block, self.next_block + blocks))
            self.next_block += blocks
            chunks.append(
                SeqChunk(
                    seq_id=self.next_seq,
                    token_ids=prompt,
                    start_pos=0,
                    block_table=table,
                    prompt_len=len(prompt),
                    sample=True,
                    sampling_params=GREEDY,
                )
            )
            self.next_seq += 1
        if self.next_block > self.runner.num_kv_blocks:
            raise SystemExit(
                f"{len(prompts)} sequences of {max_len} tokens need {self.next_block} KV blocks; the cache has "
                f"{self.runner.num_kv_blocks}: raise --gpu-memory-utilization or lower --input-len"
            )
        per_step = max(1, chunk_tokens // len(prompts[0]))
        decode = []
        for i in range(0, len(chunks), per_step):
            group = chunks[i : i + per_step]
            decode += self.advance(group)
        return decode

    def advance(self, chunks: list[SeqChunk]) -> list[SeqChunk]:
        """Run one step of ``chunks``; returns the next decode chunk of each."""
        result = self.runner.execute(StepPlan(step_id=self.step, chunks=chunks))
        self.step += 1
        return [c.next_decode(t) for c, t in zip(chunks, result.token_ids)]

    def finish(self, chunks: list[SeqChunk]) -> None:
        self.runner.execute(StepPlan(step_id=self.step, chunks=[], finished_seq_ids=[c.seq_id for c in chunks]))
        self.next_block = 0


def decode_ms(driver: Driver, batch: int, input_len: int, steps: int, rng: random.Random) -> float:
    """Median milliseconds of one decode step of ``batch`` sequences past ``input_len`` tokens of context."""
    vocab = driver.runner.vocab_size
    prompts = [[rng.randrange(1000, vocab) for _ in range(input_len)] for _ in range(batch)]
    chunks = driver.start(prompts, input_len + steps + 8, driver.runner.config.max_num_batched_tokens)
    times = []
    for i in range(steps):
        start = time.perf_counter()
        chunks = driver.advance(chunks)
        if i >= 3:  # warm-up
            times.append(time.perf_counter() - start)
    driver.finish(chunks)
    return statistics.median(times) * 1e3


def decode_async_ms(
    driver: Driver, batch: int, input_len: int, steps: int, rng: random.Random, *, breakdown: list | None = None
) -> float:
    """`decode_ms` as the engine steps with async scheduling: step N+1 is launched before step N is read.

    Its decode chunks carry `PREVIOUS_TOKEN`, fed on the device, so what
    shows here is the device's time per step, the runner's own work around
    the graph included (input copies, feeding, sampling, the read-back).
    With ``breakdown``, the steps run under the profiler (their times are then
    the profiler's) and it receives their kernels and copies.
    """
    from torch.profiler import ProfilerActivity, profile

    runner = driver.runner
    prompts = [[rng.randrange(1000, runner.vocab_size) for _ in range(input_len)] for _ in range(batch)]
    chunks = driver.start(prompts, input_len + steps + 8, runner.config.max_num_batched_tokens)
    in_flight = runner.launch(StepPlan(step_id=driver.step, chunks=chunks))
    times = []
    with profile(activities=[ProfilerActivity.CUDA]) if breakdown is not None else contextlib.nullcontext() as prof:
        for i in range(steps):
            start = time.perf_counter()
            chunks = [c.next_decode(PREVIOUS_TOKEN) for c in chunks]
            launched = runner.launch(StepPlan(step_id=driver.step + 1 + i, chunks=chunks))
            runner.collect(in_flight)
            in_flight = launched
            if i >= 3:
                times.append(time.perf_counter() - start)
        runner.collect(in_flight)
    if breakdown is not None:
        breakdown += kernel_rows(prof, steps, f"async batch-{batch} decode steps")
    driver.step += steps + 1
    driver.finish(chunks)
    return statistics.median(times) * 1e3


def routed_experts(driver: Driver, batch: int, input_len: int, steps: int, rng: random.Random) -> list[float]:
    """How many distinct experts each sparse layer's router chose in a decode step of ``batch``, on average.

    ``steps`` decode steps after prompts of ``input_len`` random tokens, as `decode_ms` runs them, but
    through the model itself instead of its compiled forward and graphs, so that a hook on each `FusedMoE`
    sees the ids its router passes (hooks are on only for those steps: compiled code never meets them).
    One count per sparse layer in layer order, as `benchmarks.roofline.step_bytes` takes them.
    """
    runner = driver.runner
    layers = [m for m in runner.model.modules() if isinstance(m, FusedMoE)]
    prompts = [[rng.randrange(1000, runner.vocab_size) for _ in range(input_len)] for _ in range(batch)]
    chunks = driver.start(prompts, input_len + steps + 8, runner.config.max_num_batched_tokens)
    counts: dict[FusedMoE, list[int]] = {layer: [] for layer in layers}

    def count(layer: FusedMoE, args: tuple) -> None:  # args: (hidden, topk_weights, topk_ids)
        counts[layer].append(args[2].unique().numel())

    hooks = [layer.register_forward_pre_hook(count) for layer in layers]
    graphs, forward = runner.decode_graphs, runner.model_forward
    runner.decode_graphs, runner.model_forward = None, runner.model
    try:
        for _ in range(steps):
            chunks = driver.advance(chunks)
    finally:
        runner.decode_graphs, runner.model_forward = graphs, forward
        for hook in hooks:
            hook.remove()
    driver.finish(chunks)
    return [statistics.mean(counts[layer]) for layer in layers]


def graph_replay_ms(runner: ModelRunner, size: int, iters: int = 50) -> float:
    """Device time of one replay of the decode graph of ``size`` (its inputs as the last step left them)."""
    graph = runner.decode_graphs._graphs[size]
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(iters)]
    graph.replay()
    for start, end in events:
        start.record()
        graph.replay()
        end.record()
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in events)


def kernel_breakdown(run: Callable[[], object], what: str, iters: int = 20) -> list[dict]:
    """Device time per call of ``run``, by kernel and copy (CUPTI sees inside graphs), largest first."""
    from torch.profiler import ProfilerActivity, profile

    run()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            run()
        torch.cuda.synchronize()
    return kernel_rows(prof, iters, what)


def kernel_rows(prof, iters: int, what: str, top: int = 25) -> list[dict]:
    """The profile's device time per iteration by kernel and copy, largest first (printed, and the ``top`` returned)."""
    rows = [
        {"kernel": e.key[:120], "us_per_step": e.device_time_total / iters, "calls_per_step": e.count / iters}
        for e in prof.key_averages()
        if e.device_time_total > 0
    ]
    rows.sort(key=lambda r: -r["us_per_step"])
    total = sum(r["us_per_step"] for r in rows)
    print(f"{what}: {total:.0f} us of kernels and copies per step", flush=True)
    for r in rows[:top]:
        print(f"{r['us_per_step']:9.1f} us {r['calls_per_step']:6.1f}x  {r['kernel']}", flush=True)
    return rows[:top]


def blocks_held(runner: ModelRunner, tokens: int) -> int:
    """The KV blocks a decoding sequence of ``tokens`` tokens holds: all of the full group's, and of each sliding
    group's at most the window's (`BlockManager.max_tokens_alone` counts them so)."""
    blocks = -(-tokens // runner.block_size)
    return sum(blocks if w is None else min(blocks, -(-w // runner.block_size) + 1) for w in runner.kv_layout.windows)


class PerHeadKV(CachedAttention):
    """A layer that caches what multi-head attention would: every head's key (``key_dim``) and value
    (``value_dim``), laid out by ``backend``. Only declared, never allocated: what the latent cache saves."""

    def __init__(self, backend, num_heads: int, key_dim: int, value_dim: int) -> None:
        super().__init__()
        self.ops, self.num_heads, self.key_dim, self.value_dim = backend, num_heads, key_dim, value_dim

    def kv_cache_shapes(self, num_blocks: int, block_size: int) -> tuple[tuple[int, ...], ...]:
        return tuple(
            self.ops.kv_cache_shape(num_blocks, block_size, self.num_heads, dim) for dim in (self.key_dim, self.value_dim)
        )


def latent_cache_capacity(runner: ModelRunner, tokens: int) -> dict:
    """How many sequences of ``tokens`` tokens the runner's latent KV cache holds at once, and how many the same
    memory would hold with keys and values per head.

    Both counts come from the runner's own sizing (`KVCacheLayout`): its blocks as sized from the memory budget,
    and that budget (the blocks' bytes, within one block of it) over the block bytes of per-head layers with
    ``qk_nope_head_dim + qk_rope_head_dim`` key and ``v_head_dim`` value features a head.
    """
    config = runner.hf_config
    layout = runner.kv_layout
    heads = next(m for m in layout.layers if isinstance(m, MLAAttention)).num_heads
    key_dim, value_dim = config.qk_nope_head_dim + config.qk_rope_head_dim, config.v_head_dim
    per_head = KVCacheLayout(
        layers=[PerHeadKV(runner.backend, heads, key_dim, value_dim) for _ in layout.layers],
        block_size=layout.block_size,
        dtype=layout.dtype,
        device=layout.device,
    )
    budget = runner.num_kv_blocks * layout.block_bytes
    per_head_blocks = per_head.blocks_within(budget, "the latent cache's bytes, stored per head")
    blocks_per_seq = -(-tokens // layout.block_size)
    return {
        "kv_cache_GiB": budget / 2**30,
        "kv_block_bytes_latent": layout.block_bytes,
        "kv_block_bytes_per_head": per_head.block_bytes,
        f"max_seqs_{tokens}_latent": runner.num_kv_blocks // blocks_per_seq,
        f"max_seqs_{tokens}_per_head": per_head_blocks // blocks_per_seq,
    }


def runner_benchmark(
    model_dir: Path, hf_config: dict, level: int, bandwidth: float, args: argparse.Namespace
) -> dict:
    """The runner's figures at compile ``level`` for the model of ``hf_config``; the runner is closed afterwards."""
    results: dict = {}
    start = time.perf_counter()
    config = EngineConfig(
        model=str(model_dir),
        load_format="dummy",
        seed=DUMMY_SEED,
        dtype="bfloat16",
        max_num_seqs=max(args.batch_sizes),
        max_num_batched_tokens=args.prefill_len,
        gpu_memory_utilization=args.gpu_memory_utilization,
        level=level,
        kv_cache_dtype=args.kv_cache_dtype,
    )
    runner = ModelRunner(config)
    results["runner_start_s"] = time.perf_counter() - start
    results["startup_phases_s"] = runner.startup_seconds
    results["graph_GiB"] = runner.graph_bytes / 2**30
    results["graph_GiB_set_aside"] = runner.graph_bytes_budgeted / 2**30
    results["kv_cache_tokens"] = runner.num_kv_blocks * runner.block_size
    results["kv_cache_dtype"] = str(runner.kv_layout.dtype).removeprefix("torch.")
    results[f"max_seqs_{args.capacity_tokens}"] = runner.num_kv_blocks // blocks_held(runner, args.capacity_tokens)
    if any(isinstance(layer, MLAAttention) for layer in runner.kv_layout.layers):
        results.update(latent_cache_capacity(runner, args.capacity_tokens))
    # Quantized layers keep their scales (and zero points) as buffers beside the codes.
    scales = (b for name, b in runner.model.named_buffers() if name.endswith(("scale", "scales", "zeros")))
    weights = itertools.chain(runner.model.parameters(), scales)
    results["weight_GB"] = sum(t.numel() * t.element_size() for t in weights) / 1e9
    # Each timed decode step attends to the prompt, the prefill's token and the steps before it.
    context = args.input_len + 1 + (args.steps + 2) // 2  # the median timed step's (decode_ms skips 3)
    results["decode_floor_context"] = context

    rng = random.Random(0)
    driver = Driver(runner)
    prompt = [rng.randrange(1000, runner.vocab_size) for _ in range(args.prefill_len)]

    def prefill() -> None:
        driver.finish(driver.start([prompt], args.prefill_len + 1, args.prefill_len))

    prefill_ms = median_ms(prefill, iters=5)
    results["prefill_ms"] = prefill_ms
    results["prefill_tflops"] = prefill_flops(hf_config, args.prefill_len) / (prefill_ms * 1e-3) / 1e12
    results["prefill_share_of_peak"] = results["prefill_tflops"] / BF16_PEAK_TFLOPS

    for batch in args.batch_sizes:
        ms = decode_ms(driver, batch, args.input_len, args.steps, rng)
        results[f"decode_b{batch}_ms_per_step"] = ms
        results[f"decode_b{batch}_tok_s"] = batch * 1e3 / ms
        results[f"decode_b{batch}_async_ms_per_step"] = decode_async_ms(driver, batch, args.input_len, args.steps, rng)
        if runner.decode_graphs is not None:
            size = runner.decode_graphs.padded_size(batch)
            results[f"decode_b{batch}_graph_replay_ms"] = graph_replay_ms(runner, size)
        print(json.dumps({f"level_{level}": results}, indent=1), flush=True)
    if args.profile and runner.decode_graphs is not None:
        graph = runner.decode_graphs._graphs[runner.decode_graphs.padded_size(1)]
        results["decode_b1_kernels"] = kernel_breakdown(graph.replay, "decode graph of size 1")
        results["decode_b1_async_step_kernels"] = []
        decode_async_ms(driver, 1, args.input_len, 16, rng, breakdown=results["decode_b1_async_step_kernels"])
    if runner.decode_graphs is not None:  # the same runner and weights without its graphs
        graphs, runner.decode_graphs = runner.decode_graphs, None
        results["decode_b1_eager_ms_per_step"] = decode_ms(driver, 1, args.input_len, args.steps, rng)
        runner.decode_graphs = graphs
    moe = moe_shape(hf_config)
    for batch in args.batch_sizes:  # last: the routing is counted eagerly, after every compiled and graphed step
        distinct = routed_experts(driver, batch, args.input_len, ROUTING_STEPS, rng) if moe else None
        floor = step_bytes(hf_config, [context] * batch, distinct_experts=distinct)
        # The floor's cache in the cache's element size (step_bytes counts the weights' 2 bytes).
        floor = attrs.evolve(floor, kv_cache=floor.kv_cache * runner.kv_layout.dtype.itemsize // 2)
        results[f"decode_b{batch}_floor_GB"] = floor.total / 1e9
        results[f"decode_b{batch}_floor_ms"] = floor_ms = floor.floor_ms(bandwidth)
        if moe:
            results[f"decode_b{batch}_distinct_experts"] = statistics.mean(distinct)
            results[f"decode_b{batch}_distinct_experts_uniform"] = expected_distinct_experts(
                moe.num_experts, moe.top_k, batch
            )
            results[f"decode_b{batch}_floor_uniform_ms"] = step_bytes(hf_config, [context] * batch).floor_ms(bandwidth)
        results[f"decode_b{batch}_vs_floor"] = results[f"decode_b{batch}_ms_per_step"] / floor_ms
        results[f"decode_b{batch}_async_vs_floor"] = results[f"decode_b{batch}_async_ms_per_step"] / floor_ms
    runner.close()
    del runner, driver
    gc.collect()
    torch.cuda.empty_cache()
    return results


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_shapes_arguments(parser)
    parser.add_argument("--input-len", type=int, default=1024)
    parser.add_argument("--prefill-len", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=32, help="decode steps per measurement")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 32, 128])
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    parser.add_argument("--skip-transformers", action="store_true")
    parser.add_argument("--transformers-batch-sizes", type=int, nargs="+", default=[1, 32])
    parser.add_argument(
        "--transformers-experts",
        nargs="+",
        default=["eager", "grouped_mm"],
        help="transformers' experts implementations to time a mixture of experts with",
    )
    parser.add_argument(
        "--level",
        type=int,
        default=3,
        choices=range(4),
        help="torch.compile level; one per process (on the H100 a second runner in one process ran out of memory)",
    )
    parser.add_argument("--profile", action="store_true", help="also list the kernels of a batch-1 decode step")
    parser.add_argument(
        "--capacity-tokens",
        type=int,
        default=4096,
        help="count the sequences of this many tokens the KV cache holds (latent attention: also stored per head)",
    )
    parser.add_argument(
        "--kv-cache-dtype",
        choices=["auto", "fp8"],
        default="auto",
        help="the KV cache's elements: the model's bf16, or FP8 (e4m3, scales 1.0 with dummy weights)",
    )
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")

    results: dict = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
    bandwidth = copy_bandwidth()
    results["copy_bandwidth_GB_s"] = bandwidth / 1e9
    results["config"] = args.config
    hf_config = model_shapes(args.config, unquantized=args.unquantized)
    results["quantization"] = (hf_config.get("quantization_config") or {}).get("quant_method", "none")
    model_dir = write_model_dir(Path(tempfile.mkdtemp(prefix=f"{Path(args.config).stem}-shapes-")), hf_config)

    if not args.skip_transformers:
        implementations = args.transformers_experts if moe_shape(hf_config) else [None]
        results.update(
            transformers_baseline(
                model_dir,
                args.input_len,
                args.prefill_len,
                args.steps,
                batch_sizes=args.transformers_batch_sizes,
                experts_implementations=implementations,
            )
        )
        print(json.dumps(results, indent=1), flush=True)
        if args.json:
            args.json.write_text(json.dumps(results, indent=1))

    results[f"level_{args.level}"] = runner_benchmark(model_dir, hf_config, args.level, bandwidth, args)
    print(json.dumps(results, indent=1), flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return results


if __name__ == "__main__":
    main()
