"""The quantized GEMMs on Llama-3.1-8B's weight shapes, against bf16 and against the bytes they must read.

    python -m benchmarks.quant [--iters 30] [--batches 1 32 128 2048] [--json out.json]
    python -m benchmarks.quant --engine fp8 [--json out.json]     # end to end; one format per process

For each projection of a Llama-3.1-8B layer (merged qkv, o, merged gate/up,
down) and each batch size, the run times the bf16 GEMM (`TritonBackend.linear`:
the one-row GEMV at batch 1, cuBLAS above) and every quantized format on dummy
weights: FP8 per-channel (dynamic per-token activations), FP8 with 128 x 128
block scales (1 x 128 activation groups), INT8 W8A8 and W4A16 (group 128,
asymmetric). Each time includes the activations' quantization kernel.

The floor of a call is the bytes it cannot avoid (the weight in its format
plus its scales and zero points; the activations and the output, which are
small until prefill) at the device-to-device copy rate measured at the start
of the same run (`benchmark_kernels.copy_bandwidth`): batch-1 decode is a
weight stream, so ``x floor`` says how close a kernel gets. Large batches are
compute-bound, so they also report TFLOP/s and the speed-up over bf16. Times
are medians of CUDA-graph replays (`benchmark_kernels.cuda_time_ms`), each
call reading another copy of the weight where copies fit, so that weights
stay out of L2.

``--engine bf16|fp8`` runs the engine's runner instead, on Llama-3.1-8B with
dummy weights (``fp8``: the dense dummy checkpoint quantized as it loads,
``--quantization fp8``: per-channel weights, per-token activations), at
compile level 3 with decode graphs: a 2048-token prefill and decode steps at
batch 1, 32 and 128 (1024 tokens of context), each decode against the floor
of the bytes the step reads in that format (`roofline.step_bytes` with the
model's weights counted as the runner holds them, scales included). One
runner per process, as `benchmark_gpu` (a second one in the process ran out
of memory on the H100): run bf16 and fp8 one after the other to compare.
"""

from __future__ import annotations

import argparse
import itertools
import json
import random
import tempfile
from pathlib import Path
from typing import Any

import torch

from atom_trio.ops.quant_ref import FP8_DTYPE, FP8_MAX, pack_int4
from atom_trio.ops.triton import TritonBackend
from benchmarks.benchmark_kernels import GRAPH_REPS, HIDDEN, INTERMEDIATE, copy_bandwidth, cuda_time_ms

# (out, in) of Llama-3.1-8B's projections (32 query and 8 KV heads of 128).
SHAPES = {
    "qkv_proj": (6144, HIDDEN),
    "o_proj": (HIDDEN, HIDDEN),
    "gate_up_proj": (2 * INTERMEDIATE, HIDDEN),
    "down_proj": (HIDDEN, INTERMEDIATE),
}
GROUP_SIZE = 128
BLOCK = (128, 128)
WEIGHT_BUDGET = 400_000_000
"""Bytes of weight copies per format and shape: enough that one graph replay's calls never find theirs in L2."""


def quantized_weights(fmt: str, n: int, k: int) -> dict[str, Any]:
    """Dummy weights of ``fmt`` for an ``[n, k]`` projection: the tensors its op takes, all on the GPU."""
    if fmt == "bf16":
        return dict(weight=torch.randn(n, k, device="cuda", dtype=torch.bfloat16) / k**0.5)
    if fmt in ("fp8", "fp8_block"):
        weight = (torch.randn(n, k, device="cuda") * 100).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
        shape = (n, 1) if fmt == "fp8" else (-(-n // BLOCK[0]), -(-k // BLOCK[1]))
        return dict(weight=weight, weight_scale=torch.rand(shape, device="cuda") / (100 * k**0.5))
    if fmt == "int8":
        weight = torch.randint(-127, 128, (n, k), device="cuda", dtype=torch.int8)
        return dict(weight=weight, weight_scale=torch.rand(n, 1, device="cuda") / (127 * k**0.5))
    if fmt == "w4a16":
        groups = k // GROUP_SIZE
        return dict(
            qweight=pack_int4(torch.randint(0, 16, (n, k), device="cuda")),
            scales=(torch.rand(n, groups, device="cuda") / (4 * k**0.5)).to(torch.bfloat16),
            zeros=torch.randint(0, 16, (n, groups), device="cuda", dtype=torch.uint8),
        )
    raise ValueError(f"unknown format {fmt!r}")


def call(ops: TritonBackend, fmt: str, x: torch.Tensor, w: dict[str, Any]) -> torch.Tensor:
    """``fmt``'s op of the backend on ``x`` and the weights of `quantized_weights`."""
    if fmt == "bf16":
        return ops.linear(x, w["weight"])
    if fmt == "fp8":
        return ops.fp8_linear(x, w["weight"], w["weight_scale"], None)
    if fmt == "fp8_block":
        return ops.fp8_linear(x, w["weight"], w["weight_scale"], None, block_size=BLOCK)
    if fmt == "int8":
        return ops.int8_linear(x, w["weight"], w["weight_scale"], None)
    return ops.w4a16_linear(x, w["qweight"], w["scales"], w["zeros"], None, group_size=GROUP_SIZE)


def weight_bytes(w: dict[str, Any]) -> int:
    """What a call must read of its weights: every tensor of the format, scales and zero points included."""
    return sum(t.numel() * t.element_size() for t in w.values())


def gemm_rows(ops: TritonBackend, formats: list[str], batches: list[int], copy_bw: float, iters: int) -> list[dict]:
    rows: list[dict[str, Any]] = []
    for (name, (n, k)), fmt in itertools.product(SHAPES.items(), formats):
        first = quantized_weights(fmt, n, k)
        copies = max(1, min(GRAPH_REPS, WEIGHT_BUDGET // weight_bytes(first)))
        weights = [first] + [quantized_weights(fmt, n, k) for _ in range(copies - 1)]
        for m in batches:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            cycle = itertools.cycle(weights)
            ms = cuda_time_ms(lambda: call(ops, fmt, x, next(cycle)), iters=iters)
            nbytes = weight_bytes(first) + 2 * m * (k + n)  # bf16 activations in, output out
            floor_ms = nbytes / copy_bw * 1e3
            rows.append(dict(shape=name, n=n, k=k, format=fmt, m=m, us=ms * 1e3, floor_us=floor_ms * 1e3,
                             of_floor=ms / floor_ms, tflop_per_s=2 * m * n * k / (ms * 1e-3) / 1e12))  # fmt: skip
        del weights, first
        torch.cuda.empty_cache()
    bf16 = {(r["shape"], r["m"]): r["us"] for r in rows if r["format"] == "bf16"}
    for row in rows:
        row["speedup_vs_bf16"] = bf16[row["shape"], row["m"]] / row["us"] if bf16 else None
    return rows


def print_rows(rows: list[dict[str, Any]]) -> None:
    print(f"{'shape':<13} {'format':<9} {'M':>5} {'us':>9} {'floor us':>9} {'x floor':>8} {'TFLOP/s':>8} {'vs bf16':>8}")
    for r in rows:
        speedup = f"{r['speedup_vs_bf16']:7.2f}x" if r["speedup_vs_bf16"] else ""
        print(f"{r['shape']:<13} {r['format']:<9} {r['m']:>5} {r['us']:9.1f} {r['floor_us']:9.1f} "
              f"{r['of_floor']:7.2f}x {r['tflop_per_s']:8.1f} {speedup:>8}", flush=True)  # fmt: skip


def summary(rows: list[dict[str, Any]]) -> dict[str, dict[int, dict[str, float]]]:
    """Per format and batch: a layer's four GEMMs together (time, floor), as a decode step sees them."""
    out: dict[str, dict[int, dict[str, float]]] = {}
    for r in rows:
        entry = out.setdefault(r["format"], {}).setdefault(r["m"], dict(us=0.0, floor_us=0.0))
        entry["us"] += r["us"]
        entry["floor_us"] += r["floor_us"]
    for per_batch in out.values():
        for entry in per_batch.values():
            entry["of_floor"] = entry["us"] / entry["floor_us"]
    return out


def engine_rows(fmt: str, copy_bw: float, args: argparse.Namespace) -> dict[str, Any]:
    """The runner's prefill and decode figures on dummy Llama-3.1-8B weights in ``fmt``."""
    import transformers

    from atom_trio.config import EngineConfig
    from atom_trio.runner import ModelRunner
    from atom_trio.testing import REAL_CONFIGS, write_model_dir
    from benchmarks.benchmark_gpu import DUMMY_SEED, Driver, decode_ms, median_ms
    from benchmarks.roofline import prefill_flops, step_bytes

    hf_config = REAL_CONFIGS["llama-3.1-8b"]
    model_dir = write_model_dir(Path(tempfile.mkdtemp(prefix="llama-3.1-8b-shapes-")), hf_config)
    runner = ModelRunner(
        EngineConfig(
            model=str(model_dir),
            load_format="dummy",
            seed=DUMMY_SEED,
            dtype="bfloat16",
            quantization=None if fmt == "bf16" else fmt,
            max_num_seqs=max(args.engine_batches),
            max_num_batched_tokens=args.prefill_len,
            gpu_memory_utilization=0.9,
            level=3,
        )
    )
    with torch.device("meta"):
        dense = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.for_model(**hf_config))
    dense_bytes = sum(t.numel() * 2 for t in dense.state_dict().values())
    held_bytes = model_bytes(runner.model)
    results: dict[str, Any] = dict(format=fmt, weight_GB=held_bytes / 1e9, dense_bf16_weight_GB=dense_bytes / 1e9)
    rng = random.Random(0)
    driver = Driver(runner)
    prompt = [rng.randrange(1000, runner.vocab_size) for _ in range(args.prefill_len)]
    results["prefill_ms"] = median_ms(
        lambda: driver.finish(driver.start([prompt], args.prefill_len + 1, args.prefill_len)), iters=5
    )
    results["prefill_tflops"] = prefill_flops(hf_config, args.prefill_len) / (results["prefill_ms"] * 1e-3) / 1e12
    context = args.input_len + 1 + (args.steps + 2) // 2  # the median timed step's
    for batch in args.engine_batches:
        ms = decode_ms(driver, batch, args.input_len, args.steps, rng)
        # The floor as roofline counts it, with the weights the runner holds in place of the dense bf16 ones.
        floor_bytes = step_bytes(hf_config, [context] * batch).total - dense_bytes + held_bytes
        results[f"decode_b{batch}_ms"] = ms
        results[f"decode_b{batch}_floor_ms"] = floor_bytes / copy_bw * 1e3
        results[f"decode_b{batch}_vs_floor"] = ms / results[f"decode_b{batch}_floor_ms"]
        print(json.dumps(results, indent=1), flush=True)
    runner.close()
    return results


def model_bytes(model: torch.nn.Module) -> int:
    """Bytes of a model's weights as it holds them: parameters and persistent buffers (scales, packed weights)."""
    seen: dict[int, int] = {}
    for tensor in model.state_dict().values():
        seen[tensor.data_ptr()] = tensor.numel() * tensor.element_size()
    return sum(seen.values())


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iters", type=int, default=30)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 32, 128, 2048])
    parser.add_argument("--formats", nargs="+", default=["bf16", "fp8", "fp8_block", "int8", "w4a16"])
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--engine", choices=["bf16", "fp8"], help="time the runner end to end in this format instead")
    parser.add_argument("--engine-batches", type=int, nargs="+", default=[1, 32, 128])
    parser.add_argument("--input-len", type=int, default=1024)
    parser.add_argument("--prefill-len", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=32, help="decode steps per measurement")
    args = parser.parse_args(argv)
    copy_bw = copy_bandwidth(args.iters)
    print(f"device: {torch.cuda.get_device_name()}; device-to-device copy (1 GiB, read+write): {copy_bw / 1e9:.0f} GB/s")
    if args.engine:
        result = dict(device=torch.cuda.get_device_name(), copy_gb_per_s=copy_bw / 1e9, **engine_rows(args.engine, copy_bw, args))
        write_json(args.json, result)
        return result
    ops = TritonBackend("cuda")
    print("times: median device time per call from CUDA-graph replays, activation quantization included\n")
    rows = gemm_rows(ops, args.formats, args.batches, copy_bw, args.iters)
    print_rows(rows)
    per_layer = summary(rows)
    print("\none layer's four GEMMs:")
    for fmt, per_batch in per_layer.items():
        for m, entry in per_batch.items():
            print(f"  {fmt:<9} M={m:<5} {entry['us']:9.1f} us, floor {entry['floor_us']:8.1f} us ({entry['of_floor']:.2f}x)")
    result = dict(device=torch.cuda.get_device_name(), copy_gb_per_s=copy_bw / 1e9, rows=rows, per_layer=per_layer)
    write_json(args.json, result)
    return result


def write_json(path: str | None, result: dict[str, Any]) -> None:
    if path:
        with open(path, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
