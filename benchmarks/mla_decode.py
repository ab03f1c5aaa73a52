"""The Triton latent-attention decode kernel alone, at DeepSeek-V3's shapes, against the device's copy rate.

    python -m benchmarks.mla_decode [--batch 64] [--contexts 4096 32768] [--tune] [--json out.json]

128 query heads, one cached vector of latent 512 + rope 64 a token (bf16), the runner's block size 16 over
shuffled blocks; every sequence at the full context. The run first times a 1 GiB device-to-device copy
(`benchmarks.benchmark_kernels.copy_bandwidth`); each row then gives the kernel's median time (CUDA
events around replays of a CUDA graph of several calls, `cuda_time_ms`), the bytes it must move (every
sequence's cached rows, the queries read, the outputs written; not the split partials, which are the
kernel's own overhead), the achieved GB/s and its fraction of the copy rate. Consecutive calls read the
same cache, which is far larger than L2 at these sizes.

With 128 heads the kernel does 2 x (576 + 512) FLOPs per head for every 1152 bytes it reads, 242 FLOP/B,
close to an H100's ratio of bf16 tensor throughput to memory bandwidth: the rows also give TFLOP/s and the
time the FLOPs alone would take at ``BF16_PEAK_TFLOPS`` (the dense matmul rate `benchmark_gpu` measured),
so that which one binds is visible. ``--tune`` times other head tiles, vector tiles, warps and stages
(`MLALaunchConfig`) beside the default.
"""

from __future__ import annotations

import argparse
import json
import random
from typing import Any

import torch

from atom_trio.ops.triton import MLALaunchConfig, TritonBackend, mla_decode, mla_num_splits, mla_tiles
from benchmarks.benchmark_gpu import BF16_PEAK_TFLOPS
from benchmarks.benchmark_kernels import copy_bandwidth, cuda_time_ms

HEADS, LATENT, ROPE = 128, 512, 64
BLOCK_SIZE = 16
SCALE = (128 + ROPE) ** -0.5
TUNE_CONFIGS = [
    MLALaunchConfig(block_h=block_h, block_n=block_n, num_warps=warps, num_stages=stages)
    for block_h, block_n, warps, stages in [
        (16, 32, 4, 2),
        (16, 64, 4, 2),
        (32, 32, 4, 2),
        (32, 32, 8, 2),
        (64, 32, 8, 2),
        (64, 16, 8, 2),
        (64, 32, 8, 1),
        (64, 64, 8, 1),
    ]
]


def decode_inputs(batch: int, context: int, seed: int = 0):
    """Queries (latent part, rope part), a cache holding ``batch`` sequences of ``context`` tokens, tables, lengths."""
    blocks = -(-context // BLOCK_SIZE)
    physical = list(range(batch * blocks))
    random.Random(seed).shuffle(physical)
    tables = torch.tensor(physical, dtype=torch.int32, device="cuda").view(batch, blocks)
    cache = torch.empty(batch * blocks, BLOCK_SIZE, LATENT + ROPE, dtype=torch.bfloat16, device="cuda").normal_()
    query = torch.randn(batch, HEADS, LATENT + ROPE, dtype=torch.bfloat16, device="cuda")
    lens = torch.full((batch,), context, dtype=torch.int32, device="cuda")
    return query[..., :LATENT], query[..., LATENT:], cache, tables, lens


def moved_bytes(batch: int, context: int, dtype_bytes: int = 2) -> int:
    """Every sequence's cached rows, the queries in, the outputs out."""
    return dtype_bytes * (batch * context * (LATENT + ROPE) + batch * HEADS * (LATENT + ROPE) + batch * HEADS * LATENT)


def flops(batch: int, context: int) -> float:
    """Scores over latent + rope features and the latent output, for every head and cached token."""
    return 2.0 * batch * HEADS * context * (LATENT + ROPE + LATENT)


def bench(batch: int, context: int, copy_bw: float, iters: int, configs: list[MLALaunchConfig]) -> list[dict[str, Any]]:
    num_sms = TritonBackend("cuda").num_sms
    q_latent, q_rope, cache, tables, lens = decode_inputs(batch, context)
    nbytes, work = moved_bytes(batch, context), flops(batch, context)
    rows = []
    expected = None  # the first configuration's output (the default's): every other one must give the same
    for config in configs:
        splits = mla_num_splits(
            programs=-(-HEADS // config.block_h) * batch, max_context_len=context, num_sms=num_sms
        )
        row: dict[str, Any] = dict(batch=batch, context=context, config=str(config), num_splits=splits)
        def run(config: MLALaunchConfig = config) -> torch.Tensor:
            return mla_decode(
                q_latent, q_rope, cache, tables, lens, max_context_len=context, scale=SCALE, num_sms=num_sms,
                config=config,
            )

        try:
            out = run()
            ms = cuda_time_ms(run, iters=iters)
        except Exception as exc:  # a tile that does not fit the device's registers or shared memory
            row["error"] = f"{type(exc).__name__}: {str(exc)[:200]}"
            print(json.dumps(row), flush=True)
            rows.append(row)
            continue
        if expected is None:
            expected = out
        row.update(
            max_abs_diff_vs_default=round((out.float() - expected.float()).abs().max().item(), 5),
            ms=round(ms, 4),
            bytes=nbytes,
            gb_per_s=round(nbytes / ms / 1e6, 1),
            share_of_copy_rate=round(nbytes / (ms * 1e-3) / copy_bw, 3),
            memory_floor_ms=round(nbytes / copy_bw * 1e3, 4),
            tflops=round(work / (ms * 1e-3) / 1e12, 1),
            compute_floor_ms=round(work / (BF16_PEAK_TFLOPS * 1e12) * 1e3, 4),
        )
        print(json.dumps(row), flush=True)
        rows.append(row)
    del q_latent, q_rope, cache
    torch.cuda.empty_cache()
    return rows


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--contexts", type=int, nargs="+", default=[4096, 32768])
    parser.add_argument("--iters", type=int, default=30)
    parser.add_argument("--tune", action="store_true", help="also time the other tile configurations")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args(argv)
    copy_bw = copy_bandwidth(args.iters)
    default = mla_tiles(HEADS)
    configs = [default] + ([c for c in TUNE_CONFIGS if c != default] if args.tune else [])
    rows = [row for context in args.contexts for row in bench(args.batch, context, copy_bw, args.iters, configs)]
    result = dict(
        device=torch.cuda.get_device_name(), copy_gb_per_s=round(copy_bw / 1e9, 1), default=str(default), rows=rows
    )
    print(json.dumps(result, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main()
