"""Control overhead of the process executor per step, with no model in the way.

    python -m benchmarks.benchmark_wire [--batch 256] [--steps 2000]

The engine side is the real `ProcessExecutor.execute` (encode the plan, send
it, wait for the answer, decode it); the worker is an echo process that runs
the real worker's framing and codec but answers every plan at once with one
sampled token per sequence. So the time per step is everything a step costs
beyond the forward pass. The plan is a decode batch with realistic block
tables (contexts of 256-4096 tokens, 16-token blocks, one sampling-parameters
object per request) that grows by one token per step, so some tables gain a
block each step, as in serving.

Also printed: the in-process cost of each codec half, and the cost of a
plan sent whole (the first step of every sequence).
"""

from __future__ import annotations

import argparse
import random
import socket
import statistics
import sys
import time

from atom_trio.config import EngineConfig
from atom_trio.engine.plan import SeqChunk, StepPlan, StepResult
from atom_trio.engine.sampling_params import SamplingParams
from atom_trio.executor import protocol

BLOCK_SIZE = 16


def echo_worker(fd: int) -> int:
    """A worker without a model: InitDone for Init, one token per sampled chunk for Execute."""
    encoder, decoder = protocol.Encoder(), protocol.Decoder()
    with socket.socket(fileno=fd) as sock:
        while True:
            try:
                message = decoder.decode(protocol.receive_frame(sock))
            except EOFError:
                return 0
            if isinstance(message, protocol.Execute):
                plan = message.plan
                n = sum(c.sample for c in plan.chunks)
                reply = protocol.Result(
                    result=StepResult(
                        step_id=plan.step_id,
                        token_ids=[(plan.step_id + i) % 49152 for i in range(n)],
                        logprobs=[None] * n,
                        top_logprobs=[None] * n,
                    )
                )
            elif isinstance(message, protocol.Init):
                reply = protocol.InitDone(
                    num_kv_blocks=1 << 16, block_size=BLOCK_SIZE, max_model_len=8192, vocab_size=49152, eos_token_ids={2}
                )
            else:
                return 0
            sock.sendall(encoder.encode(reply))


class DecodeBatch:
    """``batch`` running sequences that each gain one token per step, as the scheduler would plan them."""

    def __init__(self, batch: int, seed: int = 0) -> None:
        rng = random.Random(seed)
        self.lengths = [rng.randint(256, 4096) for _ in range(batch)]
        self.tables = [rng.sample(range(1 << 16), -(-n // BLOCK_SIZE)) for n in self.lengths]
        self.params = [
            SamplingParams(temperature=0.7, top_p=0.95, max_tokens=1024, seed=rng.randrange(1 << 30), stop=["\n\n"])
            for _ in range(batch)
        ]
        self.free = iter(range(1 << 16, 1 << 20))
        self.step_id = 0

    def next_plan(self) -> StepPlan:
        chunks = []
        for seq_id, (n, table, params) in enumerate(zip(self.lengths, self.tables, self.params)):
            if len(table) * BLOCK_SIZE < n:
                table.append(next(self.free))
            chunks.append(
                SeqChunk(
                    seq_id=seq_id,
                    token_ids=[n % 49152],
                    start_pos=n - 1,
                    block_table=table[:],  # the scheduler hands out a fresh slice each step
                    prompt_len=200,
                    sample=True,
                    sampling_params=params,
                )
            )
            self.lengths[seq_id] = n + 1
        self.step_id += 1
        return StepPlan(step_id=self.step_id, chunks=chunks)


def per_call_us(fn, repeat: int) -> float:
    fn()
    start = time.perf_counter()
    for _ in range(repeat):
        fn()
    return (time.perf_counter() - start) / repeat * 1e6


def codec_costs(batch: int) -> None:
    source = DecodeBatch(batch)
    first, steady = source.next_plan(), source.next_plan()
    result = StepResult(step_id=1, token_ids=list(range(batch)), logprobs=[None] * batch, top_logprobs=[None] * batch)
    for name, previous, plan in (("whole plan (first step)", None, first), ("steady decode plan", first, steady)):
        encoder, decoder = protocol.Encoder(), protocol.Decoder()
        if previous is not None:
            decoder.decode(encoder.encode(protocol.Execute(plan=previous))[4:])
        # Each timed call starts from the state after ``previous``, as the real step does.
        encoder_state, decoder_state = encoder._state.tables, decoder._state.tables
        frame = encoder.encode(protocol.Execute(plan=plan))

        def encode(plan=plan, encoder=encoder, state=encoder_state):
            encoder._state.tables = state
            encoder.encode(protocol.Execute(plan=plan))

        def decode(frame=frame, decoder=decoder, state=decoder_state):
            decoder._state.tables = state
            decoder.decode(frame[4:])

        print(
            f"  {name:24s} {len(frame):7d} B   encode {per_call_us(encode, 300):7.1f} us"
            f"   decode {per_call_us(decode, 300):7.1f} us"
        )
    frame = protocol.Encoder().encode(protocol.Result(result=result))
    print(
        f"  {'result':24s} {len(frame):7d} B   encode "
        f"{per_call_us(lambda: protocol.Encoder().encode(protocol.Result(result=result)), 1000):7.1f} us"
        f"   decode {per_call_us(lambda: protocol.Decoder().decode(frame[4:]), 1000):7.1f} us"
    )


async def round_trips(batch: int, steps: int) -> list[float]:
    import trio

    from atom_trio.executor.process import ProcessExecutor

    class EchoExecutor(ProcessExecutor):
        def _command(self, fd: int) -> list[str]:
            return [sys.executable, "-m", "benchmarks.benchmark_wire", "--echo-fd", str(fd)]

    source = DecodeBatch(batch)
    plans = [source.next_plan() for _ in range(steps + 50)]
    timings = []
    async with trio.open_nursery() as nursery:
        executor = await EchoExecutor.create(EngineConfig(model="echo"), nursery)
        try:
            for i, plan in enumerate(plans):
                start = time.perf_counter()
                result = await executor.execute(plan)
                elapsed = time.perf_counter() - start
                assert result.step_id == plan.step_id and len(result.token_ids) == batch
                if i >= 50:  # warm-up, and the first plan goes whole
                    timings.append(elapsed * 1e6)
        finally:
            await executor.aclose()
    return timings


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=256, help="decode sequences per step")
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--echo-fd", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.echo_fd is not None:
        return echo_worker(args.echo_fd)

    import trio

    print(f"codec, in process, batch {args.batch}:")
    codec_costs(args.batch)
    timings = trio.run(round_trips, args.batch, args.steps)
    q = statistics.quantiles(timings, n=100)
    print(
        f"execute() round trip over a socketpair to an echo worker, batch {args.batch}, {len(timings)} steps:\n"
        f"  median {statistics.median(timings):.1f} us   mean {statistics.fmean(timings):.1f} us"
        f"   p90 {q[89]:.1f} us   p99 {q[98]:.1f} us"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
