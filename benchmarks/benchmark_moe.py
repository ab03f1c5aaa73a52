"""One fused-experts call per expert shape and batch on one GPU: Triton against its byte floor and the reference.

    python -m benchmarks.benchmark_moe [--quick] [--iters 50] [--weights bf16|fp8|w4a16|mxfp4] [--json out.json]

The expert layers of Qwen3-30B-A3B, Mixtral-8x7B, GLM-4.5-Air (``atom_trio.testing``'s
configs) and gpt-oss-20b with random bf16 weights (std 0.02), or with ``--weights``
random quantized ones of about that scale in the layouts of
`atom_trio.ops.quant_experts`: FP8 with 128 x 128 block scales, 4-bit symmetric
in groups of 128, MXFP4 (a shape whose experts a layout cannot hold, such as
gpt-oss-20b's 2880 features in FP8 blocks of 128, is skipped). Batches 1, 2, 8,
32, 128 and 512 tokens (``--quick``: 1 and 32). Routing is the
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
under 50 MB of them (none here) L2 would serve part of them. Quantized rows
count the bytes actually read (packed weights, scales, zero points) and add
``bf16_triton_ms``, the same batch on bf16 experts in the same run.
"""

from __future__ import annotations

import argparse
import functools
import json
from typing import Any

import torch

from atom_trio.ops import TorchRefBackend
from atom_trio.ops.quant_experts import MXFP4_GROUP, QuantizedExperts
from atom_trio.ops.quant_ref import FP8_DTYPE
from atom_trio.ops.triton import TritonBackend
from atom_trio.testing import GLM_4_5_AIR, MIXTRAL_8X7B, QWEN3_30B_A3B
from benchmarks.benchmark_kernels import copy_bandwidth, cuda_time_ms

GPT_OSS_20B_EXPERTS = {"num_local_experts": 32, "num_experts_per_tok": 4, "hidden_size": 2880, "intermediate_size": 2880}
"""gpt-oss-20b's expert layer (its config.json's fields)."""
CONFIGS = {
    "qwen3-30b-a3b": QWEN3_30B_A3B,
    "mixtral-8x7b": MIXTRAL_8X7B,
    "glm-4.5-air": GLM_4_5_AIR,
    "gpt-oss-20b": GPT_OSS_20B_EXPERTS,
}
WEIGHTS = ("bf16", "fp8", "w4a16", "mxfp4")
FP8_BLOCK = (128, 128)
W4A16_GROUP = 128
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


def quantized_experts(
    kind: str, num_experts: int, hidden: int, inter: int, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, QuantizedExperts] | None:
    """Random ``w13``, ``w2`` in ``kind``'s layout with scales that give them about bf16's std 0.02; None where
    the layout cannot hold the shape (a block or group that does not divide it)."""
    generator = torch.Generator(device="cuda").manual_seed(seed)
    shapes = {"w13": (num_experts, 2 * inter, hidden), "w2": (num_experts, hidden, inter)}
    weights, scales = {}, {}
    for name, (e, n, k) in shapes.items():
        if kind == "fp8":
            rows, cols = FP8_BLOCK
            if inter % rows or inter % cols:
                return None
            weights[name] = torch.empty(e, n, k, dtype=FP8_DTYPE, device="cuda")
            for expert in range(e):  # std 1 in FP8, an expert at a time (no fp32 copy of them all)
                weights[name][expert] = torch.randn(n, k, device="cuda", generator=generator).to(FP8_DTYPE)
            scales[name] = torch.full((e, -(-n // rows), -(-k // cols)), 0.02, device="cuda")
            continue
        group = W4A16_GROUP if kind == "w4a16" else MXFP4_GROUP
        if hidden % group or inter % group:
            return None
        weights[name] = torch.randint(0, 256, (e, n, k // 2), dtype=torch.uint8, device="cuda", generator=generator)
        if kind == "w4a16":  # symmetric codes -8..7 times 0.005
            scales[name] = torch.full((e, n, k // group), 0.005, dtype=torch.bfloat16, device="cuda")
        else:  # e2m1 values up to 6 times 2 ** -7
            scales[name] = torch.full((e, n, k // group), 127 - 7, dtype=torch.uint8, device="cuda")
    quant = QuantizedExperts(
        kind=kind,
        w13_scale=scales["w13"],
        w2_scale=scales["w2"],
        block_size=FP8_BLOCK if kind == "fp8" else None,
        group_size=W4A16_GROUP if kind == "w4a16" else 0,
    )
    return weights["w13"], weights["w2"], quant


def expert_bytes(w13: torch.Tensor, w2: torch.Tensor, quant: QuantizedExperts | None) -> int:
    """The bytes of one expert as stored: its weights, and their scales and zero points."""
    tensors = [w13, w2] if quant is None else [w13, w2, quant.w13_scale, quant.w2_scale, quant.w13_zeros, quant.w2_zeros]
    return sum(t[0].numel() * t.element_size() for t in tensors if t is not None)


def random_routing(tokens: int, num_experts: int, top_k: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator(device="cuda").manual_seed(seed)
    logits = torch.randn(tokens, num_experts, device="cuda", generator=generator)
    weights, ids = torch.softmax(logits, dim=-1).topk(top_k, dim=-1)
    return weights / weights.sum(dim=-1, keepdim=True), ids.to(torch.int32)


def moved_bytes(ids: torch.Tensor, hidden: int, per_expert: int, dtype_bytes: int = 2) -> int:
    """What a call must move: the touched experts' ``per_expert`` bytes, hidden states in and out, routing."""
    touched = ids.unique().numel()
    tokens, top_k = ids.shape
    return touched * per_expert + 2 * tokens * hidden * dtype_bytes + tokens * top_k * (4 + 4)


def bench_shape(
    name: str, batches, copy_bw: float, iters: int, reference_iters: int, weights_kind: str = "bf16"
) -> list[dict[str, Any]]:
    """One row per batch for shape ``name`` (its weights live only while this runs)."""
    triton_ops, reference = TritonBackend("cuda"), TorchRefBackend()
    num_experts, top_k, hidden, inter = expert_shape(CONFIGS[name])
    dense = random_experts(num_experts, hidden, inter)
    if weights_kind == "bf16":
        w13, w2, quant = *dense, None
    elif (made := quantized_experts(weights_kind, num_experts, hidden, inter)) is None:
        print(json.dumps(dict(shape=name, weights=weights_kind, skipped="the layout's blocks do not divide it")))
        return []
    else:
        w13, w2, quant = made
    per_expert = expert_bytes(w13, w2, quant)
    rows = []
    for batch in batches:
        x = torch.randn(batch, hidden, device="cuda", dtype=torch.bfloat16)
        weights, ids = random_routing(batch, num_experts, top_k, seed=batch)
        triton_call = functools.partial(triton_ops.fused_experts, x, w13, w2, weights, ids, quant=quant)
        nbytes = moved_bytes(ids, hidden, per_expert)
        floor_ms = nbytes / copy_bw * 1e3
        ms = cuda_time_ms(triton_call, iters=iters)
        reference_call = functools.partial(reference.fused_experts, x, w13, w2, weights, ids, quant=quant)
        reference_ms = cuda_time_ms(reference_call, iters=reference_iters, warmup=2)
        if quant is not None:
            bf16_ms = cuda_time_ms(functools.partial(triton_ops.fused_experts, x, *dense, weights, ids), iters=iters)
        row = dict(
            shape=name,
            weights=weights_kind,
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
        if quant is not None:
            row.update(bf16_triton_ms=round(bf16_ms, 4), speedup_over_bf16=round(bf16_ms / ms, 2))
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help=f"batches {QUICK_BATCHES} only")
    parser.add_argument("--iters", type=int, default=50)
    parser.add_argument("--reference-iters", type=int, default=5, help="the reference runs every expert: fewer")
    parser.add_argument("--shapes", nargs="+", choices=list(CONFIGS), default=list(CONFIGS))
    parser.add_argument("--weights", choices=WEIGHTS, default="bf16", help="the experts' layout (default bf16)")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args(argv)
    copy_bw = copy_bandwidth(args.iters)
    rows = []
    for name in args.shapes:
        batches = QUICK_BATCHES if args.quick else BATCHES
        rows += bench_shape(name, batches, copy_bw, args.iters, args.reference_iters, args.weights)
        torch.cuda.empty_cache()
    result = dict(device=torch.cuda.get_device_name(), copy_gb_per_s=round(copy_bw / 1e9, 1), rows=rows)
    print(json.dumps(result, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main()
