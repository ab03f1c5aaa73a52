"""The CPU backend's share of a CPU decode step: its fused kernels against the torch reference, interleaved.

    python -m benchmarks.benchmark_cpu_kernels                          # default model's shapes, batch 1 and 32
    python -m benchmarks.benchmark_cpu_kernels --batch-sizes 32 --contexts 64 128 192 --repeats 5

One "step" is every backend call a decode step of the model makes, without
the linear layers: for each of ``--layers`` layers (each with its own K/V
cache, so the step reads as much memory as the real one) add + RMSNorm,
rotary, `store_kv` of the batch's new tokens, `paged_attention`, add +
RMSNorm and SiLU-and-mul, after one `plan_attention`. ``--attention-only``
times `store_kv` and `paged_attention` alone. Blocks are shuffled in the
cache, as after a while of serving. Both paths run on the same inputs, in
alternation, ``--repeats`` rounds of ``--steps`` steps each; the table gives
each path's median step time over the rounds (min-max in brackets), so a box
shared with other work affects both alike.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from atom_trio.ops import AttentionMetadata, CpuBackend, TorchRefBackend
from atom_trio.ops.cpu import load_cpu_kernels

HIDDEN, INTERMEDIATE = 576, 1536  # the default model's


def decode_step_inputs(*, batch, context, layers, heads, kv_heads, head_dim, block_size, dtype, seed=0):
    """Caches per layer, the step's metadata and its query/key/value rows."""
    gen = torch.Generator().manual_seed(seed)
    blocks_per_seq = -(-context // block_size)
    num_blocks = batch * blocks_per_seq + 8
    shape = (kv_heads, num_blocks, block_size, head_dim)
    caches = [tuple(torch.randn(shape, generator=gen).to(dtype) for _ in "kv") for _ in range(layers)]
    tables = torch.randperm(num_blocks, generator=gen)[: batch * blocks_per_seq].view(batch, blocks_per_seq)
    last = torch.tensor([context - 1] * batch)
    slots = tables.gather(1, (last // block_size)[:, None])[:, 0] * block_size + last % block_size
    metadata = AttentionMetadata(
        cu_seqlens_q=torch.arange(batch + 1, dtype=torch.int32),
        context_lens=torch.full((batch,), context, dtype=torch.int32),
        block_tables=tables.to(torch.int32),
        slot_mapping=slots.to(torch.int64),
        query_lens_host=[1] * batch,
        context_lens_host=[context] * batch,
        block_size=block_size,
    )
    # q, k, v as the layers hand them over: views of one fused projection output
    qkv = torch.randn(batch, (heads + 2 * kv_heads) * head_dim, generator=gen).to(dtype)
    q, k, v = qkv.split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=-1)
    qkv = q.view(batch, heads, head_dim), k.view(batch, kv_heads, head_dim), v.view(batch, kv_heads, head_dim)
    return caches, metadata, qkv


def run_step(backend, caches, metadata, qkv, scale, layer_inputs=None):
    """One decode step's backend calls; ``layer_inputs`` (hidden, residual, norm weight, positions,
    cos/sin table, gate/up rows) adds the elementwise ones."""
    q, k, v = qkv
    plan = backend.plan_attention(metadata)
    for k_cache, v_cache in caches:
        if layer_inputs is not None:
            hidden, residual, weight, positions, cos_sin, gate_up = layer_inputs
            backend.rms_norm(hidden, weight, 1e-5, residual)
            q, k = backend.rotary_embedding(positions, *qkv[:2], cos_sin)
        backend.store_kv(k, v, k_cache, v_cache, metadata.slot_mapping)
        backend.paged_attention(q, k, v, k_cache, v_cache, plan, scale)
        if layer_inputs is not None:
            backend.rms_norm(hidden, weight, 1e-5, residual)
            backend.silu_and_mul(gate_up)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--contexts", type=int, nargs="+", default=[64, 128, 192])
    parser.add_argument("--layers", type=int, default=30, help="default: the default model's 30")
    parser.add_argument("--heads", type=int, default=9)
    parser.add_argument("--kv-heads", type=int, default=3)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    parser.add_argument("--steps", type=int, default=10, help="steps per round")
    parser.add_argument("--repeats", type=int, default=5, help="rounds per path")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--attention-only", action="store_true", help="time store_kv and paged_attention alone")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if load_cpu_kernels() is None:
        raise SystemExit("the CPU kernels did not build here (see the log): nothing to compare")
    paths = {"torch": TorchRefBackend(), "kernels": CpuBackend()}
    dtype = getattr(torch, args.dtype)
    print(
        f"{args.layers} layers, {args.heads} heads / {args.kv_heads} KV heads x {args.head_dim}, "
        f"block {args.block_size}, {args.dtype}, {torch.get_num_threads()} threads; "
        f"{'attention only' if args.attention_only else 'all backend calls'}; "
        f"ms per step, median of {args.repeats} rounds (min-max)"
    )
    print(f"{'batch':>5} | {'context':>7} | {'torch path':>21} | {'CPU kernels':>21} | speed-up")
    for batch in args.batch_sizes:
        for context in args.contexts:
            caches, metadata, qkv = decode_step_inputs(
                batch=batch,
                context=context,
                layers=args.layers,
                heads=args.heads,
                kv_heads=args.kv_heads,
                head_dim=args.head_dim,
                block_size=args.block_size,
                dtype=dtype,
            )
            layer_inputs = None
            if not args.attention_only:
                hidden, residual = torch.randn(2, batch, HIDDEN).to(dtype)
                layer_inputs = (
                    hidden,
                    residual,
                    (1 + torch.randn(HIDDEN)).to(dtype),
                    metadata.context_lens.to(torch.int64) - 1,
                    torch.randn(context + 1, args.head_dim),
                    torch.randn(batch, 2 * INTERMEDIATE).to(dtype),
                )
            rounds = {name: [] for name in paths}
            for name, backend in paths.items():  # warm-up
                run_step(backend, caches, metadata, qkv, args.head_dim**-0.5, layer_inputs)
            for _ in range(args.repeats):
                for name, backend in paths.items():
                    start = time.perf_counter()
                    for _ in range(args.steps):
                        run_step(backend, caches, metadata, qkv, args.head_dim**-0.5, layer_inputs)
                    rounds[name].append((time.perf_counter() - start) / args.steps * 1e3)
            cells = [
                f"{statistics.median(r):7.3f} ({min(r):.3f}-{max(r):.3f})".rjust(21) for r in rounds.values()
            ]
            ratio = statistics.median(rounds["torch"]) / statistics.median(rounds["kernels"])
            print(f"{batch:>5} | {context:>7} | {cells[0]} | {cells[1]} | {ratio:.2f}x")


if __name__ == "__main__":
    main()
