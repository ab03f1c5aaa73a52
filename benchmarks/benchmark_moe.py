"""One fused-experts call per expert shape and batch on one GPU: Triton against its byte floor and the reference.

    python -m benchmarks.benchmark_moe [--quick] [--iters 50] [--json out.json]

The expert layers of Qwen3-30B-A3B, Mixtral-8x7B and GLM-4.5-Air
(``atom_trio.testing``'s configs) with random bf16 weights (std 0.02), at
batch 1, 2, 8, 32, 128 and 512 tokens (``--quick``: 1 and 32). Routing is the
renormalised softmax top-k of random router logits, drawn once per batch, so
the experts a batch touches are what a real router's spread gives.

Each row: the Triton kernel's median device time per call, from CUDA-graph
replays (``eager_ms``: launched from Python), and the reference's
(``TorchRefBackend``, every expert on every token) in the same run; the bytes
the call must move, which are the weights of the distinct experts the batch's
routing touches (never all of them), the hidden states read and the output
written, and the routing ids and weights; and the floor those bytes set at the
device-to-device copy bandwidth measured at the start (as
``benchmarks.roofline`` counts floors). ``x_floor`` is the time over that
floor. Consecutive replays read the same experts, so where a batch touches
under 50 MB of them (none here) L2 would serve part of them.
"""

from __future__ import annotations

import argparse
import functools
import json
from typing import Any

import torch

from atom_trio.ops import TorchRefBackend
from atom_trio.ops.triton import TritonBackend
from atom_trio.testing import GLM_4_5_AIR, MIXTRAL_8X7B, QWEN3_30B_A3B
from benchmarks.benchmark_kernels import copy_bandwidth, cuda_time_ms

CONFIGS = {"qwen3-30b-a3b": QWEN3_30B_A3B, "mixtral-8x7b": MIXTRAL_8X7B, "glm-4.5-air": GLM_4_5_AIR}
BATCHES = (1, 2, 8, 32, 128, 512)
QUICK_BATCHES = (1, 32)


def expert_shape(config: dict[str, Any]) -> tuple[int, int, int, int]:
    """(experts, top-k, hidden, expert intermediate) of a Hugging Face Qwen3-MoE, Mixtral or GLM-4-MoE config."""
    experts = config.get("num_experts") or config.get("num_local_experts") or config["n_routed_experts"]
    inter = config.get("moe_intermediate_size") or config["intermediate_size"]
    return experts, config["num_experts_per_tok"], config["hidden_size"], inter


def random_experts(num_experts: int, hidden: int, inter: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """bf16 ``w13`` ``[E, 2I, H]`` and ``w2`` ``[E, H, I]``, std 0.02, drawn an expert at a time (no fp32 copy)."""
    generator = torch.Generator(device="cuda").manual_seed(seed)
    w13 = torch.empty(num_experts, 2 * inter, hidden, dtype=torch.bfloat16, device="cuda")
    w2 = torch.empty(num_experts, hidden, inter, dtype=torch.bfloat16, device="cuda")
    for e in range(num_experts):
        w13[e] = torch.randn(2 * inter, hidden, device="cuda", generator=generator) * 0.02
        w2[e] = torch.randn(hidden, inter, device="cuda", generator=generator) * 0.02
    return w13, w2


def random_routing(tokens: int, num_experts: int, top_k: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator(device="cuda").manual_seed(seed)
    logits = torch.randn(tokens, num_experts, device="cuda", generator=generator)
    weights, ids = torch.softmax(logits, dim=-1).topk(top_k, dim=-1)
    return weights / weights.sum(dim=-1, keepdim=True), ids.to(torch.int32)


def moved_bytes(ids: torch.Tensor, hidden: int, inter: int, dtype_bytes: int = 2) -> int:
    """What a call must move: the touched experts' gate, up and down weights, hidden states in and out, routing."""
    touched = ids.unique().numel()
    tokens, top_k = ids.shape
    return touched * 3 * hidden * inter * dtype_bytes + 2 * tokens * hidden * dtype_bytes + tokens * top_k * (4 + 4)


def bench_shape(name: str, batches, copy_bw: float, iters: int, reference_iters: int) -> list[dict[str, Any]]:
    """One row per batch for shape ``name`` (its weights live only while this runs)."""
    triton_ops, reference = TritonBackend("cuda"), TorchRefBackend()
    num_experts, top_k, hidden, inter = expert_shape(CONFIGS[name])
    w13, w2 = random_experts(num_experts, hidden, inter)
    rows = []
    for batch in batches:
        x = torch.randn(batch, hidden, device="cuda", dtype=torch.bfloat16)
        weights, ids = random_routing(batch, num_experts, top_k, seed=batch)
        triton_call = functools.partial(triton_ops.fused_experts, x, w13, w2, weights, ids)
        nbytes = moved_bytes(ids, hidden, inter)
        floor_ms = nbytes / copy_bw * 1e3
        ms = cuda_time_ms(triton_call, iters=iters)
        reference_ms = cuda_time_ms(
            functools.partial(reference.fused_experts, x, w13, w2, weights, ids), iters=reference_iters, warmup=2
        )
        row = dict(
            shape=name,
            batch=batch,
            experts_touched=ids.unique().numel(),
            bytes=nbytes,
            floor_ms=round(floor_ms, 4),
            triton_ms=round(ms, 4),
            x_floor=round(ms / floor_ms, 2),
            eager_ms=round(cuda_time_ms(triton_call, iters=iters, graph=False), 4),
            reference_ms=round(reference_ms, 4),
            speedup_over_reference=round(reference_ms / ms, 1),
        )
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help=f"batches {QUICK_BATCHES} only")
    parser.add_argument("--iters", type=int, default=50)
    parser.add_argument("--reference-iters", type=int, default=5, help="the reference runs every expert: fewer")
    parser.add_argument("--shapes", nargs="+", choices=list(CONFIGS), default=list(CONFIGS))
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args(argv)
    copy_bw = copy_bandwidth(args.iters)
    rows = []
    for name in args.shapes:
        rows += bench_shape(name, QUICK_BATCHES if args.quick else BATCHES, copy_bw, args.iters, args.reference_iters)
        torch.cuda.empty_cache()
    result = dict(device=torch.cuda.get_device_name(), copy_gb_per_s=round(copy_bw / 1e9, 1), rows=rows)
    print(json.dumps(result, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main()
