"""Control overhead of the process executor per step, with no model in the way.

    python -m benchmarks.benchmark_wire [--batch 1 64 256] [--steps 1000] [--context 1024] [--baseline-rev HEAD]

The engine side is the real `ProcessExecutor.execute` (encode the plan, send
it, wait for the answer, decode it); the worker is an echo process that runs
the real worker's framing and codec but answers every plan at once with one
sampled token per sampled chunk. So the time per step is everything a step
costs beyond the forward pass, both directions included.

Also measured, per step: the plan's one-way trip, from before the engine
encodes it to when the worker has decoded it (encode, send, receive, decode:
the issue's definition of the control overhead), and its three parts: the
engine's encode, the transit (from the encoded frame to the worker holding
all of it: the send, the kernel, waking the worker, its reads) and the
worker's decode. Both ends read ``time.perf_counter`` (CLOCK_MONOTONIC on
Linux, one clock for every process of the host); the echo worker keeps its
times and writes them to a file when its connection closes.

Two workloads, as the scheduler plans them:

- ``decode``: ``batch`` running sequences with contexts of ``context/2`` to
  ``3*context/2`` tokens in 16-token blocks, each gaining one token per step,
  so about one table in 16 gains a block each step.
- ``mixed``: the same, but each step one sequence finishes and a new one
  takes its place with its whole prompt (128-1024 tokens) as a prefill chunk:
  a new block table, new sampling parameters and a reordered batch every step.

For a same-run baseline, the codec and executor of ``--baseline-rev`` (read
with ``git show``, loaded beside this tree's) run the same plans, in turns
with this tree's (see `round_trips`); ``--baseline-rev ''`` skips it. Also
printed: the in-process cost of each codec half.
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import json
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import NamedTuple

from atom_trio.config import EngineConfig
from atom_trio.core.plan import SeqChunk, StepPlan, StepResult
from atom_trio.sampling_params import SamplingParams

BLOCK_SIZE = 16
WARMUP = 20
ROUNDS = 5
ROOT = Path(__file__).resolve().parents[1]


# -- the codec under test: this tree's, or another revision's ---------------------------------


class Wire(NamedTuple):
    """One revision's wire modules; before the protocol was split, one ``protocol`` module plays the first three."""

    messages: ModuleType
    codec: ModuleType
    framing: ModuleType
    process: ModuleType


class Layout(NamedTuple):
    """Where one revision keeps its wire modules."""

    modules: tuple[tuple[str, tuple[tuple[str, str], ...]], ...]
    """Each module to load, in import order, with the import rewrites that make it import the revision's
    modules loaded before it (not this tree's), and the shared vocabulary from where this tree keeps it."""
    parts: tuple[str, str, str, str]
    """The module that plays each part of a `Wire`."""


_PROTOCOL = "atom_trio/executor/protocol.py"
_PROCESS = "atom_trio/executor/process.py"

LAYOUTS = (
    # messages, codec and framing apart; the plan in core/
    Layout(
        (
            ("atom_trio/core/plan.py", ()),
            (
                "atom_trio/executor/messages.py",
                (("atom_trio.core.plan import", "atom_trio.core._baseline_plan import"),),
            ),
            (
                "atom_trio/executor/framing.py",
                (("atom_trio.executor.messages import", "atom_trio.executor._baseline_messages import"),),
            ),
            (
                "atom_trio/executor/codec.py",
                (
                    ("atom_trio.core.plan import", "atom_trio.core._baseline_plan import"),
                    ("atom_trio.executor.framing import", "atom_trio.executor._baseline_framing import"),
                    ("atom_trio.executor.messages import", "atom_trio.executor._baseline_messages import"),
                ),
            ),
            (
                _PROCESS,
                (
                    (
                        "from atom_trio.executor import messages\n",
                        "from atom_trio.executor import _baseline_messages as messages\n",
                    ),
                    ("atom_trio.executor.codec import", "atom_trio.executor._baseline_codec import"),
                    ("atom_trio.executor.framing import", "atom_trio.executor._baseline_framing import"),
                ),
            ),
        ),
        ("atom_trio/executor/messages.py", "atom_trio/executor/codec.py", "atom_trio/executor/framing.py", _PROCESS),
    ),
    # one protocol module; the plan in core/
    Layout(
        (
            ("atom_trio/core/plan.py", ()),
            (_PROTOCOL, (("atom_trio.core.plan import", "atom_trio.core._baseline_plan import"),)),
            (_PROCESS, (("from . import protocol", "from . import _baseline_protocol as protocol"),)),
        ),
        (_PROTOCOL, _PROTOCOL, _PROTOCOL, _PROCESS),
    ),
    # one protocol module; the plan and the shared vocabulary in engine/, imported relatively
    Layout(
        (
            ("atom_trio/engine/plan.py", (("from .sampling_params import", "from atom_trio.sampling_params import"),)),
            (
                _PROTOCOL,
                (
                    ("from ..engine.plan import", "from ..engine._baseline_plan import"),
                    ("from ..engine.sampling_params import", "from atom_trio.sampling_params import"),
                ),
            ),
            (
                _PROCESS,
                (
                    ("from . import protocol", "from . import _baseline_protocol as protocol"),
                    ("from ..engine.errors import", "from atom_trio.errors import"),
                ),
            ),
        ),
        (_PROTOCOL, _PROTOCOL, _PROTOCOL, _PROCESS),
    ),
)
"""The layouts the wire's modules have had, newest first."""


def _baseline_name(path: str) -> str:
    """Where another revision's ``path`` is loaded: ``atom_trio/x/y.py`` as ``atom_trio.x._baseline_y``."""
    package, _, module = path.removesuffix(".py").replace("/", ".").rpartition(".")
    return f"{package}._baseline_{module}"


@functools.cache
def load_revision(rev: str) -> Wire:
    """``rev``'s wire modules, loaded beside this tree's (with its own plan classes), whichever layout it has.

    Raises:
        subprocess.CalledProcessError: ``rev`` is unknown to git, or has none of the `LAYOUTS`.
    """
    layout, sources = _layout(rev)
    loaded = {}
    for (path, rewrites), source in zip(layout.modules, sources):
        for old, new in rewrites:
            if old not in source:  # the layout changed in a way LAYOUTS does not know: never time our own modules
                raise RuntimeError(f"{rev}:{path} has no {old!r} to rewrite")
            source = source.replace(old, new)
        name = _baseline_name(path)
        spec = importlib.util.spec_from_loader(name, loader=None, origin=str(ROOT / path))
        module = importlib.util.module_from_spec(spec)
        module.__file__ = str(ROOT / path)  # process.py finds the source root from it
        sys.modules[name] = module
        exec(compile(source, f"{rev}:{path}", "exec"), module.__dict__)
        loaded[path] = module
    return Wire(*(loaded[path] for path in layout.parts))


def _layout(rev: str) -> tuple[Layout, list[str]]:
    """The first of `LAYOUTS` whose modules ``rev`` has, and their sources."""
    for layout in LAYOUTS:
        try:
            return layout, [_git_show(rev, path) for path, _ in layout.modules]
        except subprocess.CalledProcessError as exc:
            missing = exc
    raise missing


def _git_show(rev: str, path: str) -> str:
    return subprocess.run(["git", "show", f"{rev}:{path}"], cwd=ROOT, check=True, capture_output=True, text=True).stdout


def wire(rev: str | None) -> Wire:
    """This tree's wire modules (``rev`` None), or ``rev``'s."""
    if rev is None:
        from atom_trio.executor import codec, framing, messages, process

        return Wire(messages, codec, framing, process)
    return load_revision(rev)


# -- the echo worker ------------------------------------------------------------------------------


def echo_worker(fd: int, rev: str | None, times_path: str) -> int:
    """A worker without a model: InitDone for Init, one token per sampled chunk for Execute.

    Writes ``{step_id: [perf_counter() once the frame was read, once it was decoded]}``
    as JSON to ``times_path`` at the end.
    """
    modules = wire(rev)
    times: dict[int, tuple[float, float]] = {}
    try:
        return _echo(modules, fd, times)
    finally:
        Path(times_path).write_text(json.dumps(times))


def _init_done(messages: ModuleType):
    """The echo worker's InitDone, in the form of ``messages``'s revision (the facts as its own fields before
    `ModelFacts`)."""
    facts = dict(
        num_kv_blocks=1 << 16, block_size=BLOCK_SIZE, max_model_len=8192, vocab_size=49152, eos_token_ids=frozenset({2})
    )
    if hasattr(messages, "ModelFacts"):
        return messages.InitDone(facts=messages.ModelFacts(**facts))
    return messages.InitDone(**facts)


def _echo(modules: Wire, fd: int, times: dict[int, tuple[float, float]]) -> int:
    messages = modules.messages
    encoder, decoder = modules.codec.Encoder(), modules.codec.Decoder()
    with socket.socket(fileno=fd) as sock:
        while True:
            try:
                frame = modules.framing.receive_frame(sock)
            except EOFError:
                return 0
            received_at = time.perf_counter()
            message = decoder.decode(frame)
            if isinstance(message, messages.Execute):
                times[message.plan.step_id] = (received_at, time.perf_counter())
                plan = message.plan
                n = [c.sample for c in plan.chunks].count(True)  # sum() over bools is slow: 20 µs at 256
                reply = messages.Result(
                    result=StepResult(
                        step_id=plan.step_id,
                        token_ids=[plan.step_id % 49152] * n,
                        logprobs=[None] * n,
                        top_logprobs=[None] * n,
                    )
                )
            elif isinstance(message, messages.Init):
                reply = _init_done(messages)
            else:
                return 0
            sock.sendall(encoder.encode(reply))
            message = plan = reply = frame = None  # as the worker does: the next plan reuses this one's memory


# -- plans ----------------------------------------------------------------------------------------


class _Seq:
    def __init__(self, seq_id: int, prompt: list[int], table: list[int], params: SamplingParams) -> None:
        self.seq_id = seq_id
        self.prompt = prompt  # not yet run: its first chunk is the whole prompt
        self.length = len(prompt)
        self.table = table
        self.params = params


class Workload:
    """``batch`` running sequences planned step after step, as the scheduler does (see the module docstring)."""

    def __init__(self, batch: int, context: int, mixed: bool, seed: int = 0) -> None:
        self.rng = random.Random(seed)
        self.mixed = mixed
        self.free_blocks = iter(range(1 << 30))
        self.seq_ids = iter(range(1 << 30))
        self.step_id = 0
        self.running = []
        for _ in range(batch):
            seq = self._new_seq(self.rng.randint(context // 2, context * 3 // 2))
            seq.prompt = None  # already running: it decodes from the first plan on
            self.running.append(seq)

    def _new_seq(self, length: int) -> _Seq:
        rng = self.rng
        table = [next(self.free_blocks) for _ in range(-(-length // BLOCK_SIZE))]
        params = SamplingParams(
            temperature=0.7, top_p=0.95, max_tokens=1024, seed=rng.randrange(1 << 30), stop=["\n\n"]
        )
        return _Seq(next(self.seq_ids), [rng.randrange(49152) for _ in range(length)], table, params)

    def next_plan(self) -> StepPlan:
        finished = []
        if self.mixed:
            # One sequence ends; a new one joins at the end of the batch, as in the scheduler's running dict.
            done = self.running.pop(self.rng.randrange(len(self.running)))
            finished.append(done.seq_id)
            self.running.append(self._new_seq(self.rng.randint(128, 1024)))
        chunks = []
        for seq in self.running:
            if seq.prompt is not None:
                chunks.append(
                    SeqChunk(
                        seq_id=seq.seq_id, token_ids=seq.prompt, start_pos=0, block_table=seq.table[:],
                        prompt_len=len(seq.prompt), sample=True, sampling_params=seq.params, prefix_token_ids=[],
                    )
                )
                seq.prompt = None
                continue
            seq.length += 1
            if len(seq.table) * BLOCK_SIZE < seq.length:
                seq.table.append(next(self.free_blocks))
            chunks.append(
                SeqChunk(
                    seq_id=seq.seq_id, token_ids=[seq.length % 49152], start_pos=seq.length - 1,
                    block_table=seq.table[:],  # the scheduler hands out a fresh slice each step
                    prompt_len=200, sample=True, sampling_params=seq.params,
                )
            )
        self.step_id += 1
        return StepPlan(step_id=self.step_id, chunks=chunks, finished_seq_ids=finished)


# -- measurements ---------------------------------------------------------------------------------


def per_call_us(fn, repeat: int) -> float:
    """µs per call of ``fn``: the best of five runs of ``repeat`` calls, so that other load shows least."""
    fn()
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(repeat):
            fn()
        best = min(best, time.perf_counter() - start)
    return best / repeat * 1e6


def rewinder(end) -> Callable[[], None]:
    """A function that puts an `Encoder` or `Decoder` back in its current state."""
    if hasattr(end, "_state"):  # the codec before columns kept its tables in a mutable _state
        state, tables = end._state, end._state.tables
        return lambda: setattr(state, "tables", tables)
    sent = end._sent
    return lambda: setattr(end, "_sent", sent)


def codec_costs(modules: Wire, batch: int, context: int, mixed: bool) -> str:
    """Encode and decode of one steady plan and its result, in process: µs of each half, and bytes."""
    source = Workload(batch, context, mixed)
    previous, plan = source.next_plan(), source.next_plan()
    execute, encoder, decoder = modules.messages.Execute, modules.codec.Encoder(), modules.codec.Decoder()
    decoder.decode(encoder.encode(execute(plan=previous))[4:])
    # Each timed call starts from the state after ``previous``, as the real step does.
    rewind_encoder, rewind_decoder = rewinder(encoder), rewinder(decoder)
    frame = encoder.encode(execute(plan=plan))

    def encode():
        rewind_encoder()
        encoder.encode(execute(plan=plan))

    def decode():
        rewind_decoder()
        decoder.decode(frame[4:])

    n = len(plan.chunks)
    result = modules.messages.Result(
        result=StepResult(step_id=1, token_ids=[7] * n, logprobs=[None] * n, top_logprobs=[None] * n)
    )
    result_frame = encoder.encode(result)
    return (
        f"plan {len(frame):6d} B encode {per_call_us(encode, 300):6.1f} decode {per_call_us(decode, 300):6.1f}"
        f" | result {len(result_frame):5d} B encode {per_call_us(lambda: encoder.encode(result), 1000):5.1f}"
        f" decode {per_call_us(lambda: decoder.decode(result_frame[4:]), 1000):5.1f}"
    )


class _TimedEncoder:
    """An executor's `Encoder`, noting when each plan's frame is ready."""

    def __init__(self, encoder) -> None:
        self._encoder = encoder
        self.encoded_at: dict[int, float] = {}

    def encode(self, message) -> bytes:
        frame = self._encoder.encode(message)
        plan = getattr(message, "plan", None)
        if plan is not None:
            self.encoded_at[plan.step_id] = time.perf_counter()
        return frame


ONE_WAY_PARTS = ("one way", "encode", "transit", "decode")


async def round_trips(
    revs: list[str | None], batch: int, context: int, mixed: bool, steps: int
) -> tuple[dict[str | None, list[float]], dict[str | None, dict[str, list[float]]]]:
    """µs per `execute` over a socketpair to an echo worker, and µs of the plan's one-way trip and of its
    parts (see `ONE_WAY_PARTS`), for each codec.

    One worker per codec, all up at once; the codecs take turns in
    ``ROUNDS`` blocks of steps, so that they share the machine's drifting
    load, each on the same stream of plans. Not step by step: each step would
    then find the caches cooled by the other worker, which no engine does.
    The first steps of each block (and the whole first plan) are warm-up.
    """
    import trio

    times_dir = Path(tempfile.mkdtemp(prefix="benchmark-wire-"))
    times_paths = {rev: times_dir / f"worker-{i}.json" for i, rev in enumerate(revs)}

    def echo_executor(rev: str | None) -> type:
        class EchoExecutor(wire(rev).process.ProcessExecutor):
            def _command(self, fd: int) -> list[str]:
                baseline = [] if rev is None else ["--echo-rev", rev]
                times = ["--echo-times", str(times_paths[rev])]
                return [sys.executable, "-m", "benchmarks.benchmark_wire", "--echo-fd", str(fd), *times, *baseline]

        return EchoExecutor

    sources = {rev: Workload(batch, context, mixed) for rev in revs}  # same seed: the same plans
    timings: dict[str | None, list[float]] = {rev: [] for rev in revs}
    started: dict[str | None, dict[int, float]] = {rev: {} for rev in revs}
    async with trio.open_nursery() as nursery:
        executors = {}
        try:
            for rev in revs:
                executors[rev] = executor = await echo_executor(rev).create(EngineConfig(model="echo"), nursery)
                executor._encoder = _TimedEncoder(executor._encoder)  # the executor's own, which we time
            for round_ in range(ROUNDS):
                for rev in revs if round_ % 2 else revs[::-1]:
                    for i in range(WARMUP + steps // ROUNDS):
                        # Planned right before it runs, as the scheduler does (its lists as warm in the cache).
                        plan = sources[rev].next_plan()
                        start = time.perf_counter()
                        result = await executors[rev].execute(plan)
                        elapsed = time.perf_counter() - start
                        assert result.step_id == plan.step_id and len(result.token_ids) == len(plan.chunks)
                        if i >= WARMUP:
                            timings[rev].append(elapsed * 1e6)
                            started[rev][plan.step_id] = start
        finally:
            for executor in executors.values():
                await executor.aclose()
    one_way = {}
    for rev in revs:
        worker_times = {int(step): t for step, t in json.loads(times_paths[rev].read_text()).items()}
        encoded_at = executors[rev]._encoder.encoded_at
        one_way[rev] = {part: [] for part in ONE_WAY_PARTS}
        for step, start in started[rev].items():
            encoded, (received, decoded) = encoded_at[step], worker_times[step]
            seconds = (decoded - start, encoded - start, received - encoded, decoded - received)
            for part, duration in zip(ONE_WAY_PARTS, seconds):
                one_way[rev][part].append(duration * 1e6)
    return timings, one_way


def summary(timings: list[float]) -> str:
    return f"{statistics.median(timings):8.1f} (p90 {statistics.quantiles(timings, n=10)[8]:7.1f})"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 64, 256], help="sequences per step")
    parser.add_argument("--steps", type=int, default=1000, help="measured steps per case")
    parser.add_argument("--context", type=int, default=1024, help="mean context length of a decoding sequence")
    parser.add_argument("--baseline-rev", default="HEAD", help="git revision to compare against ('' for none)")
    parser.add_argument("--echo-fd", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--echo-rev", help=argparse.SUPPRESS)
    parser.add_argument("--echo-times", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.echo_fd is not None:
        return echo_worker(args.echo_fd, args.echo_rev, args.echo_times)

    import trio

    revs: list[str | None] = [None]
    if args.baseline_rev:
        try:
            load_revision(args.baseline_rev)
            revs.append(args.baseline_rev)
        except (OSError, subprocess.CalledProcessError) as exc:
            print(f"no baseline: cannot read {args.baseline_rev!r} from git ({exc})")
    names = {None: "this tree", args.baseline_rev: args.baseline_rev}
    cases = [(batch, mixed) for mixed in (False, True) for batch in args.batch]

    print("codec in process, one steady plan (µs per call, best of 5 runs):")
    for batch, mixed in cases:
        for rev in revs:
            line = codec_costs(wire(rev), batch, args.context, mixed)
            print(f"  {'mixed' if mixed else 'decode':6s} {batch:4d} {names[rev]:>10s}: {line}")

    print(
        f"\nper step, median µs of {args.steps} steps (p90): the execute() round trip to an echo worker, and the"
        " plan's one-way trip (encode, send, receive, decode)"
    )
    header = f"  {'workload':8s} {'batch':>5s} {'round trip':>24s} {'plan one way':>24s}"
    if len(revs) > 1:
        header += f" {names[args.baseline_rev] + ' round trip':>24s} {'one way':>24s} {'ratio':>6s}"
    print(header)
    parts = []
    for batch, mixed in cases:
        workload = f"{'mixed' if mixed else 'decode':8s} {batch:5d}"
        timings, one_way = trio.run(round_trips, revs, batch, args.context, mixed, args.steps)
        line = f"  {workload} {summary(timings[None]):>24s} {summary(one_way[None]['one way']):>24s}"
        if len(revs) > 1:
            ratio = statistics.median(timings[args.baseline_rev]) / statistics.median(timings[None])
            line += (
                f" {summary(timings[args.baseline_rev]):>24s} {summary(one_way[args.baseline_rev]['one way']):>24s}"
                f" {ratio:5.2f}x"
            )
        print(line, flush=True)
        for rev in revs:
            medians = " ".join(f"{statistics.median(one_way[rev][part]):8.1f}" for part in ONE_WAY_PARTS[1:])
            parts.append(f"  {workload} {names[rev]:>10s} {medians}")

    print("\nthe plan's one-way trip in parts, median µs")
    print(f"  {'workload':8s} {'batch':>5s} {'codec':>10s}" + "".join(f" {part:>8s}" for part in ONE_WAY_PARTS[1:]))
    print("\n".join(parts))
    return 0


if __name__ == "__main__":
    sys.exit(main())
