"""AITER's Triton kernels against ours, on one GPU, for the ops both backends have.

    python -m benchmarks.aiter_vs_triton                     # kernels only (about a minute)
    python -m benchmarks.aiter_vs_triton --decode-step       # and a batch-1 decode step of the whole model per backend
    python -m benchmarks.aiter_vs_triton --decode-step --skip-kernels
    python -m benchmarks.aiter_vs_triton --json out.json

Shapes are Llama-3.1-8B's (`benchmarks.benchmark_kernels`' constants), bf16:

- decode attention at batch 1, 32 and 128 with ``--context`` tokens each
  (AITER ``unified_attention`` against our paged attention, same cache);
- fused add + RMSNorm over ``[rows, 4096]`` (AITER ``rmsnorm2d_fwd_with_add``);
- the rotary embedding of a step's queries and keys (AITER
  ``rope_cached_thd_positions_2c_fwd``);
- the FP8 GEMM with 128 x 128 weight blocks at each Llama weight shape (AITER
  ``gemm_a8w8_blockscale`` against ours; both quantize the activations with
  our per-group kernel, which is timed with them);
- the bf16 GEMM (AITER ``gemm_a16w16`` against what our backend calls: the
  one-row GEMV at one row, cuBLAS otherwise).

Each backend's op is called through `KernelBackend`, as the layers call it
(where AITER's tile does not fit the GPU, the aiter backend runs ours: the
shapes are listed under ``aiter_fallbacks``),
and timed as `benchmark_kernels.cuda_time_ms` times: replays of a captured
CUDA graph (the device's time alone). ``--decode-step`` then builds the whole
Llama-3.1-8B (dummy weights) on each backend at level 3 and reports the time
per batch-1 decode step from the host and its graph's replay.
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
from pathlib import Path
from typing import Any

import torch

from atom_trio.ops.aiter import AiterBackend
from atom_trio.ops.quant_ref import FP8_DTYPE, FP8_MAX
from atom_trio.ops.triton import TritonBackend
from benchmarks.benchmark_kernels import HEAD_DIM, HEADS, HIDDEN, KV_HEADS, cuda_time_ms, decode_step

LINEAR_SHAPES = {
    "qkv_proj": (6144, 4096),
    "o_proj": (4096, 4096),
    "gate_up_proj": (28672, 4096),
    "down_proj": (4096, 14336),
}


def compare(rows: list[dict[str, Any]], op: str, shape: str, calls: dict[str, Any], iters: int) -> None:
    timed = {name: cuda_time_ms(call, iters=iters) for name, call in calls.items()}
    row = {"op": op, "shape": shape, **{f"{name}_us": ms * 1e3 for name, ms in timed.items()}}
    row["aiter_over_triton"] = timed["aiter"] / timed["triton"]
    rows.append(row)
    print(json.dumps(row), flush=True)


def kernels(backends: dict[str, TritonBackend], context: int, iters: int) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    dtype = torch.bfloat16
    for batch in (1, 32, 128):
        q, _, _, k_cache, v_cache, metadata = decode_step(batch, [(1, context)] * batch, dtype)
        calls = {}
        for name, ops in backends.items():
            plan = ops.plan_attention(metadata)
            calls[name] = lambda ops=ops, plan=plan: ops.paged_attention(
                q, q, q, k_cache, v_cache, plan, HEAD_DIM**-0.5
            )
        compare(rows, "decode_attention", f"batch {batch} x {context} tokens, {HEADS}/{KV_HEADS} heads", calls, iters)

    weight = torch.randn(HIDDEN, device="cuda", dtype=dtype)
    for tokens in (1, 32, 2048):
        x, residual = (torch.randn(tokens, HIDDEN, device="cuda", dtype=dtype) for _ in range(2))
        calls = {name: lambda ops=ops: ops.rms_norm(x, weight, 1e-5, residual) for name, ops in backends.items()}
        compare(rows, "add_rms_norm", f"{tokens} x {HIDDEN}", calls, iters)

    inv_freq = 1.0 / (500000 ** (torch.arange(0, HEAD_DIM, 2, device="cuda").float() / HEAD_DIM))
    freqs = torch.outer(torch.arange(8192, device="cuda").float(), inv_freq)
    cos_sin = torch.cat([freqs.cos(), freqs.sin()], dim=-1)
    for tokens in (1, 32, 2048):
        query = torch.randn(tokens, HEADS, HEAD_DIM, device="cuda", dtype=dtype)
        key = torch.randn(tokens, KV_HEADS, HEAD_DIM, device="cuda", dtype=dtype)
        positions = torch.randint(0, 8192, (tokens,), device="cuda")
        calls = {
            name: lambda ops=ops: ops.rotary_embedding(positions, query, key, cos_sin) for name, ops in backends.items()
        }
        compare(rows, "rotary_embedding", f"{tokens} tokens", calls, iters)

    for shape, (n, k) in LINEAR_SHAPES.items():
        fp8_weight = (torch.randn(n, k, device="cuda") * 100).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
        scale = (torch.rand(-(-n // 128), -(-k // 128), device="cuda") + 0.5) / (100 * k**0.5)
        bf16_weight = (torch.randn(n, k, device="cuda") / k**0.5).to(dtype)
        for tokens in (1, 32, 128, 2048):
            x = torch.randn(tokens, k, device="cuda", dtype=dtype)
            calls = {
                name: lambda ops=ops: ops.fp8_linear(x, fp8_weight, scale, None, block_size=(128, 128))
                for name, ops in backends.items()
            }
            compare(rows, "fp8_block_linear", f"{shape} {tokens} x {k} -> {n}", calls, iters)
            calls = {name: lambda ops=ops: ops.linear(x, bf16_weight) for name, ops in backends.items()}
            compare(rows, "linear", f"{shape} {tokens} x {k} -> {n}", calls, iters)
    return rows


def decode_steps(context: int, steps: int) -> dict[str, Any]:
    """Batch-1 decode of Llama-3.1-8B (dummy weights) at level 3 on each backend: host ms per step, graph replay ms."""
    from atom_trio.config import EngineConfig
    from atom_trio.runner import ModelRunner
    from atom_trio.testing import LLAMA_3_1_8B, write_model_dir
    from benchmarks.benchmark_gpu import Driver, decode_ms, graph_replay_ms

    model_dir = write_model_dir(Path(tempfile.mkdtemp(prefix="llama-3.1-8b-shapes-")), LLAMA_3_1_8B)
    results: dict[str, Any] = {}
    for backend in ("triton", "aiter"):
        config = EngineConfig(
            model=str(model_dir), load_format="dummy", dtype="bfloat16", max_num_seqs=1, kernel_backend=backend,
            gpu_memory_utilization=0.5,
        )
        runner = ModelRunner(config)
        try:
            driver = Driver(runner)
            results[f"{backend}_decode_b1_ms_per_step"] = decode_ms(driver, 1, context, steps, random.Random(0))
            if runner.decode_graphs is not None:
                size = runner.decode_graphs.padded_size(1)
                results[f"{backend}_decode_b1_graph_replay_ms"] = graph_replay_ms(runner, size)
        finally:
            runner.close()
        torch.cuda.empty_cache()
        print(json.dumps(results), flush=True)
    return results


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--context", type=int, default=1024, help="tokens of context per decode sequence")
    parser.add_argument("--iters", type=int, default=50)
    parser.add_argument("--decode-step", action="store_true", help="also time a whole-model batch-1 decode step")
    parser.add_argument("--steps", type=int, default=32, help="decode steps timed per backend with --decode-step")
    parser.add_argument("--skip-kernels", action="store_true", help="only the decode step (with --decode-step)")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args(argv)
    results: dict[str, Any] = {"device": torch.cuda.get_device_name()}
    if not args.skip_kernels:
        backends = {"triton": TritonBackend("cuda"), "aiter": AiterBackend("cuda")}
        with torch.inference_mode():
            results["kernels"] = kernels(backends, args.context, args.iters)
        results["aiter_fallbacks"] = sorted(backends["aiter"].fallbacks)  # where "aiter" timed our kernel
    if args.decode_step:
        results["decode_step"] = decode_steps(args.context, args.steps)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return results


if __name__ == "__main__":
    main()
