"""Microbenchmarks of the Triton kernels, against the device's measured copy bandwidth.

    python -m benchmarks.benchmark_kernels [--dtype bfloat16] [--iters 100] [--json out.json] [--sampling-only | --gemv-only]

Shapes are Llama-3.1-8B's (hidden 4096, 32 query / 8 KV heads of 128, MLP
14336). The run first times a 1 GiB device-to-device copy; every kernel's
achieved bandwidth (the bytes it must read and write, over its time) is then
reported as a fraction of that copy rate, the practical ceiling for
memory-bound kernels. Prefill attention is compute-bound, so it reports
TFLOP/s and is set beside PyTorch's fused SDPA on the same dense tensors.
Times are the median over ``--iters`` runs, each bracketed by CUDA events,
after a warm-up; the torch reference backend is timed alongside.

The one-row GEMV (a batch-1 decode step's matmuls) is set beside cuBLAS
(``F.linear``) on each of Llama-3.1-8B's weight shapes; every call of a timed
graph reads another copy of the weight, so none is served from L2.

The sampling section draws from float32 logits of Llama-3's vocabulary (128256)
with top-k 50 + top-p 0.9, then top-p 0.9 alone, against the torch sampler's
sort-based path; its bandwidth counts one read of the logits, so it also says
how far the tiled passes (statistics, search rounds, draw) are from a single pass.
"""

from __future__ import annotations

import argparse
import itertools
import json
import random
import statistics
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from atom_trio.sampling_params import SamplingParams
from atom_trio.layers.sampler import SampleRequest, Sampler
from atom_trio.ops import AttentionMetadata, TorchRefBackend
from atom_trio.ops.triton import TritonBackend, launch_config, sample
from atom_trio.ops.triton.attention import LaunchConfig, paged_attention
from atom_trio.testing import LLAMA_3_1_8B
from benchmarks.roofline import kv_cache_bytes

HIDDEN, HEADS, KV_HEADS, HEAD_DIM, INTERMEDIATE = 4096, 32, 8, 128, 14336
VOCAB = 128256
BLOCK_SIZE = 16
GRAPH_REPS = 10


def cuda_time_ms(fn: Callable[[], Any], *, iters: int, warmup: int = 5, graph: bool = True) -> float:
    """Median milliseconds of one ``fn`` call, bracketed by CUDA events after a warm-up.

    With ``graph``, `GRAPH_REPS` calls are captured in one CUDA graph and each
    replay is timed: the device's time alone, as the runner's decode graphs
    see it. Without, the host's launch cost shows wherever it exceeds the
    device's work (small kernels), which is what eager mode pays.
    """
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    run, reps = fn, 1
    if graph:
        cuda_graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(cuda_graph):
            for _ in range(GRAPH_REPS):
                fn()
        run, reps = cuda_graph.replay, GRAPH_REPS
        run()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
    for start, end in zip(starts, ends):
        start.record()
        run()
        end.record()
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in zip(starts, ends)) / reps


def copy_bandwidth(iters: int) -> float:
    """Bytes per second of a 1 GiB device-to-device copy, counting the read and the write."""
    src = torch.empty(2**30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = cuda_time_ms(lambda: dst.copy_(src), iters=iters, graph=False)
    return 2 * src.numel() / (ms * 1e-3)


def decode_step(batch: int, contexts: list[tuple[int, int]], dtype: torch.dtype, seed: int = 0):
    """A step of ``contexts`` = [(query_len, cached_len)] over shuffled blocks: (q, k, v, caches, metadata)."""
    rng = random.Random(seed)
    needed = [-(-(n + c) // BLOCK_SIZE) for n, c in contexts]
    physical = list(range(sum(needed)))
    rng.shuffle(physical)
    tables = [[physical.pop() for _ in range(nb)] for nb in needed]
    width = max(needed)
    slots = [t[p // BLOCK_SIZE] * BLOCK_SIZE + p % BLOCK_SIZE for (n, c), t in zip(contexts, tables) for p in range(c, c + n)]
    query_lens = [n for n, _ in contexts]
    context_lens = [n + c for n, c in contexts]
    cu = [0]
    for n in query_lens:
        cu.append(cu[-1] + n)
    tokens = cu[-1]
    cache_shape = (sum(needed), BLOCK_SIZE, KV_HEADS, HEAD_DIM)
    metadata = AttentionMetadata(
        cu_seqlens_q=torch.tensor(cu, dtype=torch.int32, device="cuda"),
        context_lens=torch.tensor(context_lens, dtype=torch.int32, device="cuda"),
        block_tables=torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32, device="cuda"),
        slot_mapping=torch.tensor(slots, dtype=torch.int64, device="cuda"),
        query_lens_host=query_lens,
        context_lens_host=context_lens,
        block_size=BLOCK_SIZE,
    )
    return (
        torch.randn(tokens, HEADS, HEAD_DIM, device="cuda", dtype=dtype),
        torch.randn(tokens, KV_HEADS, HEAD_DIM, device="cuda", dtype=dtype),
        torch.randn(tokens, KV_HEADS, HEAD_DIM, device="cuda", dtype=dtype),
        torch.randn(cache_shape, device="cuda", dtype=dtype),
        torch.randn(cache_shape, device="cuda", dtype=dtype),
        metadata,
    )


TUNE_PREFILL = [(128, 128, 8, 3), (128, 64, 8, 3), (128, 64, 8, 2), (128, 64, 4, 3), (64, 64, 4, 3), (64, 128, 4, 3),
                (64, 64, 4, 2), (128, 32, 4, 3)]
TUNE_DECODE = [(64, 4, 3), (128, 4, 3), (32, 4, 3), (64, 4, 2), (64, 8, 3), (64, 2, 3), (128, 8, 2), (128, 4, 4)]


def cache_layouts(triton_ops: TritonBackend, ref_ops: TorchRefBackend, k_cache: torch.Tensor, v_cache: torch.Tensor):
    """The Triton-layout caches ``[blocks, block_size, kv_heads, dim]`` for each backend, torch_ref's head-major."""
    return {
        triton_ops: (k_cache, v_cache),
        ref_ops: tuple(c.permute(2, 0, 1, 3).contiguous() for c in (k_cache, v_cache)),
    }


def tune(triton_ops: TritonBackend, dtype: torch.dtype, iters: int) -> None:
    """Paged attention's device time per tile config (block_m, block_n, warps, stages); the first is the default."""
    scale = HEAD_DIM**-0.5
    group = HEADS // KV_HEADS
    cases = [("prefill", [(2048, 0)]), ("prefill", [(8192, 0)]), ("decode", [(1, 32767)]), ("decode", [(1, 4095)]),
             ("decode", [(1, 1023)] * 32), ("decode", [(1, 1023)] * 128)]
    print("\ntuning paged attention: us per call for each (block_m, block_n, num_warps, num_stages)")
    for kind, contexts in cases:
        q, k, v, kc, vc, metadata = decode_step(len(contexts), contexts, dtype)
        plan = triton_ops.plan_attention(metadata)
        default = launch_config(num_tokens=q.shape[0], num_seqs=len(contexts), max_query_len=metadata.max_query_len,
                                max_context_len=metadata.max_context_len, group=group, head_dim=HEAD_DIM,
                                num_kv_heads=KV_HEADS, num_sms=triton_ops.num_sms, num_splits=None)
        configs = TUNE_PREFILL if kind == "prefill" else [(default.block_m, *c) for c in TUNE_DECODE]
        results = []
        for block_m, block_n, warps, stages in configs:
            config = LaunchConfig(block_m, block_m // group, block_n, default.num_splits, warps, stages)
            try:
                ms = cuda_time_ms(lambda: paged_attention(q, kc, vc, plan, scale, triton_ops.num_sms, config), iters=iters)
                results.append(f"{(block_m, block_n, warps, stages)}: {ms * 1e3:.1f}")
            except Exception as exc:  # e.g. a config asking for more shared memory than the device has
                results.append(f"{(block_m, block_n, warps, stages)}: {type(exc).__name__}")
        n, c = contexts[0]
        print(f"{kind} {len(contexts)} x ({n} new, {c} cached), {default.num_splits} splits: " + "; ".join(results),
              flush=True)


SAMPLING_CASES = [("top-k 50 + top-p 0.9", 50, 0.9), ("top-p 0.9", 0, 0.9)]


def sampling(copy_bw: float, iters: int) -> list[dict[str, Any]]:
    """Sampling with `SAMPLING_CASES`: the Triton kernels, alone and inside `Sampler`, against torch's path.

    "kernel" is `sample` on ready device tensors (CUDA-graph replays, and eager);
    "sampler" is a whole `Sampler` call as the runner makes it (host packing of
    the per-row knobs and the final read of the tokens included), with the
    kernels and with the torch path (topk, sort + softmax + cumsum for top-p,
    exponential noise, argmax), eager: the torch path's host syncs cannot be captured.
    top-p alone is the kernels' hardest case: its nucleus can hold much of the
    vocabulary, so every search round works on many tiles.
    """
    rows = []
    for name, top_k, top_p in SAMPLING_CASES:
        print(f"\nsampling, vocab {VOCAB}, float32 logits * 4, {name} (bandwidth: one read of the logits)")
        params = SamplingParams(temperature=1.0, top_k=top_k, top_p=top_p)
        with_kernels = Sampler(frozenset(), backend=TritonBackend("cuda"), fused=True)
        with_torch = Sampler(frozenset(), fused=False)
        for batch in (1, 32, 128, 256):
            logits = torch.randn(batch, VOCAB, device="cuda") * 4
            requests = [SampleRequest(params, [], [])] * batch
            knobs = (
                torch.ones(batch, device="cuda"),
                torch.full((batch,), top_k, dtype=torch.int32, device="cuda"),
                torch.full((batch,), top_p, device="cuda"),
                torch.zeros(batch, device="cuda"),
                torch.randint(0, 2**62, (batch,), device="cuda"),
            )
            kernel_ms = cuda_time_ms(lambda: sample(logits, *knobs), iters=iters)
            kernel_eager_ms = cuda_time_ms(lambda: sample(logits, *knobs), iters=iters, graph=False)
            sampler_ms = cuda_time_ms(lambda: with_kernels(logits, requests), iters=iters, graph=False)
            torch_ms = cuda_time_ms(lambda: with_torch(logits, requests), iters=iters, graph=False)
            nbytes = logits.numel() * logits.element_size()
            row = dict(kernel=f"sampling {name}", shape=f"batch {batch} x {VOCAB}", triton_us=kernel_ms * 1e3,
                       triton_eager_us=kernel_eager_ms * 1e3, sampler_triton_us=sampler_ms * 1e3,
                       baseline="torch sampler (sort)", baseline_us=torch_ms * 1e3,
                       gb_per_s=nbytes / kernel_ms / 1e6, of_copy_bw=nbytes / (kernel_ms * 1e-3) / copy_bw)
            rows.append(row)
            print(f"{'sampling':<18} {row['shape']:<42} kernel {kernel_ms * 1e3:8.1f} us (eager {kernel_eager_ms * 1e3:7.1f})  "
                  f"sampler: triton {sampler_ms * 1e3:8.1f} us, torch {torch_ms * 1e3:8.1f} us  "
                  f"{row['gb_per_s']:7.0f} GB/s {100 * row['of_copy_bw']:5.1f}% of copy", flush=True)
    return rows


def gemv_rows(
    report: Callable[..., None], rand: Callable[..., torch.Tensor], element: int, triton_ops: TritonBackend
) -> None:
    """The one-row GEMV (`TritonBackend.linear` at one row) against cuBLAS on each weight of a decode step."""
    shapes = {
        "qkv_proj": (HIDDEN, (HEADS + 2 * KV_HEADS) * HEAD_DIM),
        "o_proj": (HIDDEN, HIDDEN),
        "gate_up_proj": (HIDDEN, 2 * INTERMEDIATE),
        "down_proj": (INTERMEDIATE, HIDDEN),
        "lm_head": (HIDDEN, VOCAB),
    }
    for name, (k, n) in shapes.items():
        # Enough copies that the GRAPH_REPS calls of one replay never find their weight in L2 (50 MB on an H100).
        copies = max(1, min(GRAPH_REPS, 400_000_000 // (n * k * element)))
        weights = itertools.cycle([rand(n, k) / k**0.5 for _ in range(copies)])
        x = rand(1, k)
        report("gemv", f"{name} [{n}, {k}]", lambda ops: ops.linear(x, next(weights)),
               nbytes=(n * k + n + k) * element, baseline=lambda: F.linear(x, next(weights)), baseline_name="cublas")
        if name == "gate_up_proj":
            report("gemv_silu_and_mul", f"{name} [{n}, {k}], SiLU-and-mul fused",
                   lambda ops: ops.linear(x, next(weights), silu_and_mul=True), nbytes=(n * k + n // 2 + k) * element,
                   baseline=lambda: triton_ops.silu_and_mul(F.linear(x, next(weights))),
                   baseline_name="cublas + silu_and_mul")


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    parser.add_argument("--iters", type=int, default=100)
    parser.add_argument("--json", help="also write the rows here")
    parser.add_argument("--tune", action="store_true", help="also time paged attention under several tile configs")
    parser.add_argument("--sampling-only", action="store_true", help="time only the sampling kernels")
    parser.add_argument("--gemv-only", action="store_true", help="time only the one-row GEMV against cuBLAS")
    args = parser.parse_args(argv)
    dtype = getattr(torch, args.dtype)
    element = torch.empty(0, dtype=dtype).element_size()
    triton_ops, ref_ops = TritonBackend("cuda"), TorchRefBackend()
    copy_bw = copy_bandwidth(args.iters)
    print(f"device: {torch.cuda.get_device_name()}, dtype {args.dtype}")
    print(f"device-to-device copy (1 GiB, read+write): {copy_bw / 1e9:.0f} GB/s")
    print("times: median device time per call from CUDA-graph replays (eager: launched from Python)\n")
    rows: list[dict[str, Any]] = []
    if args.sampling_only:
        rows += sampling(copy_bw, args.iters)
        write_json(args.json, args.dtype, copy_bw, rows)
        return rows

    def report(kernel: str, shape: str, run: Callable[[Any], Any], *, nbytes: float = 0, flops: float = 0,
               baseline: Callable[[], Any] | None = None, baseline_name: str = "torch_ref") -> None:
        """Times ``run(triton_ops)``, eagerly too, and ``baseline`` (default ``run(ref_ops)``); prints and keeps a row."""
        ms = cuda_time_ms(lambda: run(triton_ops), iters=args.iters)
        eager_ms = cuda_time_ms(lambda: run(triton_ops), iters=args.iters, graph=False)
        try:
            ref_ms = cuda_time_ms(baseline or (lambda: run(ref_ops)), iters=args.iters)
        except RuntimeError:  # a baseline that cannot be captured is timed eagerly
            ref_ms = cuda_time_ms(baseline or (lambda: run(ref_ops)), iters=args.iters, graph=False)
            baseline_name += " (eager)"
        row = dict(kernel=kernel, shape=shape, triton_us=ms * 1e3, triton_eager_us=eager_ms * 1e3,
                   baseline=baseline_name, baseline_us=ref_ms * 1e3)
        if nbytes:
            row.update(gb_per_s=nbytes / ms / 1e6, of_copy_bw=nbytes / (ms * 1e-3) / copy_bw)
        if flops:
            row.update(tflop_per_s=flops / ms / 1e9, baseline_tflop_per_s=flops / ref_ms / 1e9)
        rows.append(row)
        extra = (f"{row['gb_per_s']:7.0f} GB/s {100 * row['of_copy_bw']:5.1f}% of copy" if nbytes
                 else f"{row['tflop_per_s']:6.1f} TFLOP/s (baseline {row['baseline_tflop_per_s']:.1f})")
        print(f"{kernel:<18} {shape:<42} {ms * 1e3:8.1f} us (eager {eager_ms * 1e3:7.1f})  "
              f"{baseline_name} {ref_ms * 1e3:8.1f} us  {extra}", flush=True)

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, device="cuda", dtype=dtype)

    gemv_rows(report, rand, element, triton_ops)
    if args.gemv_only:
        write_json(args.json, args.dtype, copy_bw, rows)
        return rows

    tokens = 16384
    x, residual, weight = rand(tokens, HIDDEN), rand(tokens, HIDDEN), rand(HIDDEN)
    report("rms_norm", f"[{tokens}, {HIDDEN}]", lambda ops: ops.rms_norm(x, weight, 1e-5),
           nbytes=(2 * tokens + 1) * HIDDEN * element)
    report("add_rms_norm", f"[{tokens}, {HIDDEN}]", lambda ops: ops.rms_norm(x, weight, 1e-5, residual),
           nbytes=(4 * tokens + 1) * HIDDEN * element)

    qkv = rand(tokens, (HEADS + 2 * KV_HEADS) * HEAD_DIM)
    q = qkv[:, : HEADS * HEAD_DIM].view(tokens, HEADS, HEAD_DIM)
    k = qkv[:, HEADS * HEAD_DIM : (HEADS + KV_HEADS) * HEAD_DIM].view(tokens, KV_HEADS, HEAD_DIM)
    positions = torch.randint(0, 8192, (tokens,), device="cuda")
    freqs = torch.outer(torch.arange(8192, device="cuda").float(), torch.rand(HEAD_DIM // 2, device="cuda"))
    cos_sin = torch.cat((freqs.cos(), freqs.sin()), dim=-1)
    report("rotary", f"[{tokens}, {HEADS}+{KV_HEADS}, {HEAD_DIM}]",
           lambda ops: ops.rotary_embedding(positions, q, k, cos_sin),
           nbytes=2 * tokens * (HEADS + KV_HEADS) * HEAD_DIM * element + tokens * (HEAD_DIM * 4 + 8))

    gate_up = rand(4096, 2 * INTERMEDIATE)
    report("silu_and_mul", f"[4096, 2*{INTERMEDIATE}]", lambda ops: ops.silu_and_mul(gate_up),
           nbytes=3 * 4096 * INTERMEDIATE * element)

    kv_tokens = 16384
    key, value = rand(kv_tokens, KV_HEADS, HEAD_DIM), rand(kv_tokens, KV_HEADS, HEAD_DIM)
    # each backend's own cache layout
    caches = {ops: [rand(*ops.kv_cache_shape(kv_tokens // BLOCK_SIZE, BLOCK_SIZE, KV_HEADS, HEAD_DIM)) for _ in range(2)]
              for ops in (triton_ops, ref_ops)}
    slots = torch.randperm(kv_tokens, device="cuda")
    report("store_kv", f"[{kv_tokens}, {KV_HEADS}, {HEAD_DIM}]",
           lambda ops: ops.store_kv(key, value, *caches[ops], slots),
           nbytes=4 * kv_tokens * KV_HEADS * HEAD_DIM * element + 8 * kv_tokens)

    v = qkv[:, (HEADS + KV_HEADS) * HEAD_DIM :].view(tokens, KV_HEADS, HEAD_DIM)
    report("rotary_store_kv", f"[{tokens}, {HEADS}+{KV_HEADS}, {HEAD_DIM}] + store",
           lambda ops: ops.rotary_store_kv(positions, q, k, v, cos_sin, *caches[ops], slots[:tokens]),
           nbytes=tokens * (2 * HEADS + 5 * KV_HEADS) * HEAD_DIM * element + tokens * (HEAD_DIM * 4 + 16))

    scale = HEAD_DIM**-0.5
    for batch, context in [(1, 1024), (1, 8192), (1, 32768), (32, 1024), (128, 1024), (64, 4096)]:
        qd, kd, vd, kc, vc, metadata = decode_step(batch, [(1, context - 1)] * batch, dtype)
        plans = {ops: ops.plan_attention(metadata) for ops in (triton_ops, ref_ops)}
        splits = launch_config(num_tokens=batch, num_seqs=batch, max_query_len=1, max_context_len=context,
                               group=HEADS // KV_HEADS, head_dim=HEAD_DIM, num_kv_heads=KV_HEADS,
                               num_sms=triton_ops.num_sms, num_splits=None).num_splits
        kv_bytes = kv_cache_bytes(LLAMA_3_1_8B, batch * context, dtype_bytes=element, layers=1)
        layouts = cache_layouts(triton_ops, ref_ops, kc, vc)
        report("decode_attention", f"batch {batch} x ctx {context} ({splits} splits)",
               lambda ops: ops.paged_attention(qd, kd, vd, *layouts[ops], plans[ops], scale),
               nbytes=kv_bytes + 2 * qd.numel() * element)

    # a chunk of a long prompt over its cached start, beside 63 decodes (a continuous-batching step)
    mixed = [(512, 1536)] + [(1, 1023)] * 63
    qm, km, vm, kc, vc, metadata = decode_step(64, mixed, dtype)
    plans = {ops: ops.plan_attention(metadata) for ops in (triton_ops, ref_ops)}
    layouts = cache_layouts(triton_ops, ref_ops, kc, vc)
    report("mixed_attention", "512-token chunk @1536 + 63 decodes @1024",
           lambda ops: ops.paged_attention(qm, km, vm, *layouts[ops], plans[ops], scale),
           nbytes=kv_cache_bytes(LLAMA_3_1_8B, sum(n + c for n, c in mixed), dtype_bytes=element, layers=1)
           + 2 * qm.numel() * element)

    for prompt in (2048, 8192):
        qp, kp, vp, kc, vc, metadata = decode_step(1, [(prompt, 0)], dtype)
        triton_ops.store_kv(kp, vp, kc, vc, metadata.slot_mapping)
        plan = triton_ops.plan_attention(metadata)
        dense = [t.transpose(0, 1)[None].contiguous() for t in (qp, kp.repeat_interleave(4, 1), vp.repeat_interleave(4, 1))]
        report("prefill_attention", f"1 x {prompt} causal", lambda ops: ops.paged_attention(qp, kp, vp, kc, vc, plan, scale),
               flops=2 * 2 * HEADS * HEAD_DIM * prompt * (prompt + 1) / 2,
               baseline=lambda: F.scaled_dot_product_attention(*dense, is_causal=True, scale=scale),
               baseline_name="sdpa")

    rows += sampling(copy_bw, args.iters)
    if args.tune:
        tune(triton_ops, dtype, args.iters)
    write_json(args.json, args.dtype, copy_bw, rows)
    return rows


def write_json(path: str | None, dtype: str, copy_bw: float, rows: list[dict[str, Any]]) -> None:
    if path:
        with open(path, "w") as f:
            json.dump(dict(device=torch.cuda.get_device_name(), dtype=dtype, copy_gb_per_s=copy_bw / 1e9, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
