"""What grammar-constrained decoding costs: step time at one batch with none, half or all rows constrained, and compile time.

    python -m benchmarks.structured_outputs                        # tiny random-weight Llama, CPU, batch 32
    python -m benchmarks.structured_outputs --model default        # SmolLM2-135M-Instruct
    python -m benchmarks.structured_outputs --model default --device cuda --dtype bfloat16
    python -m benchmarks.structured_outputs --model DIR --load-format dummy --device cuda --dtype bfloat16

With ``--load-format dummy`` the model directory needs only its config and
tokenizer (random weights of its shapes): the masks, the step and the
grammar are what they would be with the real weights, the text is not.

Each configuration opens the engine, sends ``--batch-size`` requests at once
(short prompts, ``--steps`` tokens each; the unconstrained ones ignore EOS)
and times the steps from the arrival of consecutive outputs of one request
that is in every step: the median interval is the step time (the lowest of
``--repeats`` runs, taken in rotation, since a shared machine's noise only adds), with
everything the engine does between steps included (planning, filling the
masks on the event loop, applying them in the sampler). The constrained rows
follow a mid-size JSON schema (an order: customer, address, a list of at
least 40 line items) that no row completes within ``--steps`` tokens, so the
batch keeps its size. The fill time is the engine's own mask filling,
timed around `StructuredOutputs.fill` for every step that has constrained rows.

Compile time: the grammar of the same schema compiled cold (first request,
the compiler itself built beforehand and timed apart) and cached (the
same schema again, as another client would send it).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import attrs
import trio

from atom_trio import EngineConfig, SamplingParams, StructuredOutputsParams, open_engine

ORDER_SCHEMA = {
    "type": "object",
    "properties": {
        "order_id": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{6}$"},
        "customer": {
            "type": "object",
            "properties": {
                "name": {"type": "string"},
                "email": {"type": "string"},
                "tier": {"enum": ["bronze", "silver", "gold"]},
                "address": {
                    "type": "object",
                    "properties": {
                        "street": {"type": "string"},
                        "city": {"type": "string"},
                        "zip": {"type": "string", "pattern": "^[0-9]{5}$"},
                        "country": {"type": "string", "minLength": 2, "maxLength": 2},
                    },
                    "required": ["street", "city", "zip", "country"],
                },
            },
            "required": ["name", "email", "tier", "address"],
        },
        "items": {
            "type": "array",
            "minItems": 40,
            "items": {
                "type": "object",
                "properties": {
                    "sku": {"type": "string"},
                    "quantity": {"type": "integer", "minimum": 1, "maximum": 999},
                    "price": {"type": "number", "minimum": 0},
                    "gift": {"type": "boolean"},
                    "note": {"anyOf": [{"type": "string"}, {"type": "null"}]},
                },
                "required": ["sku", "quantity", "price", "gift"],
            },
        },
        "status": {"enum": ["new", "paid", "shipped"]},
    },
    "required": ["order_id", "customer", "items", "status"],
}

PROMPT = "Write the order as JSON."


def engine_config(args: argparse.Namespace, model: str) -> EngineConfig:
    return EngineConfig(
        model=model,
        device=args.device,
        dtype=args.dtype,
        max_num_seqs=args.batch_size,
        max_model_len=args.steps + 64,
        max_num_batched_tokens=max(512, args.batch_size * 16),
        load_format=args.load_format,
        num_kv_blocks=args.batch_size * (-(-(args.steps + 64) // 16)) + 8 if args.device == "cpu" else None,
    )


async def step_times(args: argparse.Namespace, model: str, num_constrained: int) -> tuple[float, list[float]]:
    """(median step seconds, seconds of each mask fill) for one batch with ``num_constrained`` constrained rows."""
    spec = StructuredOutputsParams(json=ORDER_SCHEMA)
    plain = SamplingParams(temperature=0.0, max_tokens=args.steps, ignore_eos=True)
    constrained = SamplingParams(temperature=0.0, max_tokens=args.steps, structured_outputs=spec)
    params = [constrained] * num_constrained + [plain] * (args.batch_size - num_constrained)
    arrivals: list[float] = []
    fills: list[float] = []
    async with open_engine(engine_config(args, model)) as engine:
        grammars = engine._structured_outputs
        fill = grammars.fill

        def timed_fill(bitmask) -> None:
            start = time.perf_counter()
            fill(bitmask)
            fills.append(time.perf_counter() - start)

        grammars.fill = timed_fill
        # warm: the first constrained request compiles the grammar, the first steps build what they build
        async for _ in engine.generate(PROMPT, attrs.evolve(constrained, max_tokens=4)):
            pass
        fills.clear()

        async def one(i: int) -> None:
            async for _ in engine.generate(PROMPT, params[i]):
                if i == args.batch_size - 1:  # unconstrained but for "all", and in every step
                    arrivals.append(time.perf_counter())

        async with trio.open_nursery() as nursery:
            for i in range(args.batch_size):
                nursery.start_soon(one, i)
    intervals = [b - a for a, b in zip(arrivals[1:], arrivals[2:])]  # from the second token: prefill is over
    return statistics.median(intervals), fills


async def compile_times(model: str, args: argparse.Namespace) -> tuple[float, float, float]:
    """(compiler build, cold compile, cached compile) seconds for the schema, as the engine compiles it."""
    from atom_trio.engine.structured_outputs import StructuredOutputs
    from atom_trio.loader.tokenizer import load_tokenizer
    from transformers import AutoConfig

    config = EngineConfig(model=model)
    tokenizer = load_tokenizer(config)
    vocab_size = AutoConfig.from_pretrained(model).vocab_size
    grammars = StructuredOutputs(tokenizer, vocab_size=vocab_size, eos_token_ids=frozenset({tokenizer.eos_token_id}))
    start = time.perf_counter()
    await grammars._get_compiler()
    build = time.perf_counter() - start
    cold = []
    for i in range(args.compile_repeats):  # a fresh schema each time (its description differs): all cold
        schema = {**ORDER_SCHEMA, "description": f"order {i}"}
        start = time.perf_counter()
        await grammars.matcher_factory(StructuredOutputsParams(json=schema))
        cold.append(time.perf_counter() - start)
    cached = []
    for _ in range(args.compile_repeats):
        start = time.perf_counter()
        again = json.dumps({**ORDER_SCHEMA, "description": "order 0"}, indent=2)  # another spelling, one entry
        await grammars.matcher_factory(StructuredOutputsParams(json=again))
        cached.append(time.perf_counter() - start)
    return build, statistics.median(cold), statistics.median(cached)


def resolve_model(name: str, workdir: Path) -> str:
    from atom_trio.loader import default_model_path

    if name == "default":
        return str(default_model_path())
    if name == "tiny":
        from atom_trio.testing import write_tiny_model_dir

        return str(write_tiny_model_dir("llama", workdir, default_model_path()))
    return name


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny", help="tiny (random-weight Llama), default (SmolLM2), or a path")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["auto", "float32", "bfloat16", "float16"])
    parser.add_argument("--load-format", default="auto", choices=["auto", "dummy"])
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=64, help="tokens per request")
    parser.add_argument("--compile-repeats", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3, help="runs of each configuration; the fastest counts")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as workdir:
        model = resolve_model(args.model, Path(workdir))
        build, cold, cached = trio.run(compile_times, model, args)
        configs = (("none", 0), ("half", args.batch_size // 2), ("all", args.batch_size))
        steps: dict[str, list[float]] = {label: [] for label, _ in configs}
        fills: dict[str, list[float]] = {label: [] for label, _ in configs}
        for _ in range(args.repeats):  # in rotation, so that a busy spell of the machine hits all alike
            for label, num_constrained in configs:
                step, filled = trio.run(step_times, args, model, num_constrained)
                steps[label].append(step)
                fills[label] += filled
        rows = [(label, n, min(steps[label]), fills[label]) for label, n in configs]
    base = rows[0][2]
    print(f"\nmodel {args.model}, device {args.device}, {args.dtype}, batch {args.batch_size}, {args.steps} tokens")
    print(f"{'constrained rows':>18} | {'step ms':>8} | {'vs none':>8} | {'fill ms median':>14} | {'fill ms max':>11}")
    for label, n, step, fills in rows:
        fill_median = f"{statistics.median(fills) * 1e3:.3f}" if fills else "-"
        fill_max = f"{max(fills) * 1e3:.3f}" if fills else "-"
        print(f"{f'{label} ({n})':>18} | {step * 1e3:8.2f} | {step / base:7.2f}x | {fill_median:>14} | {fill_max:>11}")
    print(f"\ngrammar compiler build (tokenizer info): {build * 1e3:.1f} ms")
    print(f"schema compile, cold: {cold * 1e3:.2f} ms; cached: {cached * 1e3:.3f} ms")


if __name__ == "__main__":
    main()
