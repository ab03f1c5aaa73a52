"""Embed the engine in a trio program: three conversations at once, one of them cancelled midway.

    python examples/trio_embedding.py [--model PATH_OR_ID] [--max-tokens N]

Each conversation is an ordinary trio task streaming from ``engine.generate``;
the engine batches them together. The third one runs under a cancel scope
with a deadline: when it fires, the stream is abandoned, the engine aborts
the request and frees its KV blocks, and the other two go on undisturbed.
"""

from __future__ import annotations

import argparse

import trio

import atom_trio

CONVERSATIONS = {
    "geography": [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}],
    "poetry": [{"role": "user", "content": "Write a short poem about the sea."}],
    "story": [{"role": "user", "content": "Tell me a long story about a dragon who learns to bake bread."}],
}


async def converse(engine: atom_trio.AsyncEngine, name: str, max_tokens: int) -> None:
    params = atom_trio.SamplingParams(temperature=0.7, seed=1, max_tokens=max_tokens)
    text = ""
    async for delta in engine.generate(CONVERSATIONS[name], params, request_id=name):
        completion = delta.outputs[0]
        text += completion.text
        if completion.finished:
            print(f"[{name}] finished ({completion.finish_reason}): {text.strip()!r}\n")


async def converse_until_cancelled(engine: atom_trio.AsyncEngine, name: str, max_tokens: int, seconds: float) -> None:
    with trio.move_on_after(seconds) as scope:
        await converse(engine, name, max_tokens)
    if scope.cancelled_caught:
        stats = engine.stats()
        print(f"[{name}] cancelled after {seconds} s; engine: {stats.num_running} running, "
              f"aborted so far: {stats.finished_requests.get('abort', 0)}\n")


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="model directory, .gguf file or hub id (default: SmolLM2-135M-Instruct)")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--cancel-after", type=float, default=3.0, help="seconds before the story is cancelled")
    args = parser.parse_args()

    async with atom_trio.open_engine(model=args.model) as engine:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(converse, engine, "geography", args.max_tokens)
            nursery.start_soon(converse, engine, "poetry", args.max_tokens)
            nursery.start_soon(converse_until_cancelled, engine, "story", 10 * args.max_tokens, args.cancel_after)
        print("final stats:", engine.stats())


if __name__ == "__main__":
    trio.run(main)
