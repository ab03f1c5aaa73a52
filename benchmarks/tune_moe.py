"""Tile configs for the fused-MoE Triton kernel: sweep them per expert shape and batch size on the GPU, write the table.

    python -m benchmarks.tune_moe                                  # the three model shapes, every batch, quick space
    python -m benchmarks.tune_moe --shapes qwen3-30b-a3b --batches 1 8 32 --space full
    python -m benchmarks.tune_moe --tp 2                           # the expert slices of a TP=2 rank (I / 2)
    python -m benchmarks.tune_moe --ep 2                           # the experts of an EP=2 rank (E / 2)

For each shape (local experts ``E``, intermediate ``N`` as one rank holds
them) and batch size, every candidate tile config runs one whole
``fused_experts`` call (align, gate/up, down, sum) on random bf16 weights and
renormalised softmax top-k routing of random logits; the median device time
of CUDA-graph replays decides. The winner is checked against the default
tiles' result, then written to ``atom_trio/ops/triton/moe_configs/E=..,N=..,
device_name=...json`` (merged with the batch sizes already there), which
``tile_config`` reads at run time (nearest batch size wins).

Candidates: ``block_m`` from 16 up to twice the rows an expert gets on
average (more rows than that only pads); for 16-row tiles (decode, a weight
stream) narrow and deep tiles and deeper pipelines, for larger ones square
tiles and 4 or 8 warps. Configs whose tiles would not fit the device's shared
memory are skipped, as are any Triton cannot compile. Each candidate compiles
once per shape (the batch size is not a specialisation), so a shape takes a
few minutes with ``--space quick``, several times that with ``full``.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import time
from pathlib import Path
from typing import Any

import attrs
import torch
import triton

from atom_trio.ops.triton.moe import (
    CONFIG_DIR,
    MoeTileConfig,
    config_file_name,
    default_tile_config,
    fused_experts,
)
from benchmarks.benchmark_kernels import cuda_time_ms
from benchmarks.benchmark_moe import CONFIGS, expert_shape, random_experts, random_routing

BATCHES = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 256, 512, 1024, 2048, 4096)
SPACES: dict[str, dict[str, dict[str, tuple[int, ...]]]] = {
    # For 16-row tiles (a weight stream), then for larger ones (a matmul).
    "quick": {
        "stream": dict(block_n=(32, 64, 128), block_k=(128, 256), group_m=(1,), num_warps=(4,), num_stages=(3, 4, 5)),
        "matmul": dict(block_n=(64, 128), block_k=(64, 128), group_m=(8,), num_warps=(4, 8), num_stages=(3, 4)),
    },
    "full": {
        "stream": dict(
            block_n=(16, 32, 64, 128), block_k=(64, 128, 256), group_m=(1,), num_warps=(2, 4, 8),
            num_stages=(2, 3, 4, 5),
        ),
        "matmul": dict(
            block_n=(32, 64, 128, 256), block_k=(32, 64, 128), group_m=(1, 8, 16), num_warps=(4, 8),
            num_stages=(2, 3, 4, 5),
        ),
    },
}


def shared_memory_bytes(config: MoeTileConfig, element_size: int = 2) -> int:
    """The gate/up pass's pipelined tiles (the larger pass): a row tile and two weight tiles per stage."""
    return config.num_stages * (config.block_m * config.block_k + 2 * config.block_k * config.block_n) * element_size


def candidates(space: str, tokens: int, top_k: int, num_experts: int, shared_memory: int) -> list[MoeTileConfig]:
    rows_per_expert = tokens * top_k / num_experts
    block_ms = [m for m in (16, 32, 64, 128) if m == 16 or m <= 2 * rows_per_expert]
    configs = []
    for block_m in block_ms:
        axes = SPACES[space]["stream" if block_m == 16 else "matmul"]
        for values in itertools.product(*axes.values()):
            config = MoeTileConfig(block_m=block_m, **dict(zip(axes, values)))
            if shared_memory_bytes(config) <= shared_memory:
                configs.append(config)
    return configs


def tune_batch(w13, w2, top_k: int, num_global_experts: int, tokens: int, space: str, iters: int, shared_memory: int):
    """The fastest config for ``tokens`` tokens and its time, with every candidate's time (ms; None: did not run)."""
    x = torch.randn(tokens, w13.shape[2], device="cuda", dtype=torch.bfloat16)
    weights, ids = random_routing(tokens, num_global_experts, top_k, seed=tokens)
    times: dict[MoeTileConfig, float | None] = {}
    for config in candidates(space, tokens, top_k, w13.shape[0], shared_memory):
        try:
            call = functools.partial(fused_experts, x, w13, w2, weights, ids, config=config)
            times[config] = cuda_time_ms(call, iters=iters)
        except (triton.OutOfResources, triton.CompilationError) as exc:
            print(f"  skipped {config}: {type(exc).__name__}", flush=True)
            times[config] = None
    best = min((c for c, t in times.items() if t is not None), key=lambda c: times[c])
    expected = fused_experts(x, w13, w2, weights, ids, config=default_tile_config(w13.shape[0], top_k, tokens))
    got = fused_experts(x, w13, w2, weights, ids, config=best)
    scale = expected.float().abs().max().item()
    if (got.float() - expected.float()).abs().max().item() > 4 * 2**-8 * scale:
        raise AssertionError(f"tiles {best} disagree with the default tiles at {tokens} tokens")
    return best, times[best], times


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", choices=list(CONFIGS), default=list(CONFIGS))
    parser.add_argument("--batches", nargs="+", type=int, default=list(BATCHES))
    parser.add_argument("--space", choices=list(SPACES), default="quick")
    parser.add_argument("--tp", type=int, default=1, help="tensor-parallel size: a rank holds I / tp of each expert")
    parser.add_argument("--ep", type=int, default=1, help="expert-parallel size: each rank holds E / ep experts")
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--out-dir", type=Path, default=CONFIG_DIR)
    args = parser.parse_args(argv)
    device = torch.cuda.get_device_name()
    properties = torch.cuda.get_device_properties(0)
    shared_memory = getattr(properties, "shared_memory_per_block_optin", 227 * 1024)
    written = {}
    for name in args.shapes:
        num_experts, top_k, hidden, inter = expert_shape(CONFIGS[name])
        local_experts, local_inter = num_experts // args.ep, inter // args.tp
        w13, w2 = random_experts(local_experts, hidden, local_inter)
        path = args.out_dir / config_file_name(local_experts, local_inter, device)
        table = json.loads(path.read_text()) if path.is_file() else {}
        for tokens in args.batches:
            start = time.perf_counter()
            best, ms, times = tune_batch(w13, w2, top_k, num_experts, tokens, args.space, args.iters, shared_memory)
            default_ms = times.get(default_tile_config(local_experts, top_k, tokens))
            print(
                f"{name} E={local_experts} N={local_inter} batch {tokens}: {ms:.4f} ms with {best} "
                f"(default tiles: {'not a candidate' if default_ms is None else f'{default_ms:.4f} ms'}; "
                f"{len(times)} candidates in {time.perf_counter() - start:.0f} s)",
                flush=True,
            )
            table[str(tokens)] = attrs.asdict(best)
        path.write_text(json.dumps(dict(sorted(table.items(), key=lambda kv: int(kv[0]))), indent=1) + "\n")
        written[str(path)] = table
        print(f"wrote {path}", flush=True)
        del w13, w2
        torch.cuda.empty_cache()
    return written


if __name__ == "__main__":
    main()
