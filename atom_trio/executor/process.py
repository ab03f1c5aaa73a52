"""`ProcessExecutor`: one worker subprocess per tensor-parallel rank.

On a GPU the model runs in its own process, so the server's event loop and
the device's Python never share a GIL, and each rank of a tensor-parallel
group owns one device. Every rank receives the same plan over its own
socketpair (``messages.py``); rank 0 answers with the sampled tokens, the
others with an `Ack`, so that a rank that died or hung is noticed at once.

Supervision: each worker is a ``trio.run_process`` task in the nursery the
engine hands to `ProcessExecutor.create` (or the one `open_process_executor`
opens). A worker's death never cancels that nursery: it marks the executor
failed and kills the other ranks (a tensor-parallel group with a hole can
only hang), the step in flight raises `WorkerDied`, and `wait_failed`
returns it, so the engine dies at once even while no step runs.
A worker that stops answering without exiting (stopped, frozen, stuck in a
collective) is found by the step it never answers, after ``worker_timeout``;
one that stops while idle is found by the next step. An idle worker blocks
in recv() on its socket, so only something outside it can stop it there,
and a heartbeat would be one more message to interleave with the steps.
`aclose` stops workers with Shutdown, then SIGTERM, then SIGKILL; cancelling
the nursery skips the Shutdown.
Workers also exit on their own when the engine process dies (see ``worker.py``).
"""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
from collections import deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import attrs
import trio

from atom_trio._net import free_port
from atom_trio.errors import ModelLoadError, ProfilerError, WorkerDied
from atom_trio.executor import messages
from atom_trio.executor.codec import Decoder, Encoder
from atom_trio.executor.framing import FrameStream

if TYPE_CHECKING:
    from atom_trio.config import EngineConfig
    from atom_trio.core.facts import ModelFacts
    from atom_trio.core.plan import StepPlan, StepResult

SHUTDOWN_GRACE = 5.0
"""Seconds idle workers get to exit after Shutdown before they are terminated."""

KILL_GRACE = 3.0
"""Seconds between SIGTERM and SIGKILL."""

EXIT_WAIT = 5.0
"""Seconds to wait for the exit status of a worker that closed its socket."""

MIN_INIT_TIMEOUT = 600.0
"""Loading weights (and compiling) takes far longer than a step, so start-up waits at least this long."""

# The worker must import this very atom_trio, installed or not.
_SOURCE_ROOT = str(Path(__file__).resolve().parents[2])


async def _terminate_then_kill(process: trio.Process) -> None:
    """``deliver_cancel`` for workers: SIGTERM, a grace period, then SIGKILL (run_process stops us at exit)."""
    process.terminate()
    await trio.sleep(KILL_GRACE)
    process.kill()


class _TapStarted:
    """Keeps the `trio.Process` that ``run_process`` reports through ``task_status``."""

    def __init__(self, worker: _Worker, inner: trio.TaskStatus[trio.Process]) -> None:
        self._worker = worker
        self._inner = inner

    def started(self, process: trio.Process) -> None:
        self._worker.process = process
        self._inner.started(process)


@attrs.define(eq=False)
class _Worker:
    rank: int
    stream: FrameStream
    decoder: Decoder = attrs.Factory(Decoder)
    process: trio.Process | None = None
    cancel_scope: trio.CancelScope = attrs.Factory(trio.CancelScope)
    exited: trio.Event = attrs.Factory(trio.Event)
    ready: bool = False  # answered Init, so it reads its socket and will see Shutdown
    error: messages.Error | None = None  # what the worker said before exiting, if anything
    owed: int = 0  # answers due (a step executed, or launched and then followed or flushed) and not read yet

    @property
    def returncode(self) -> int | None:
        return None if self.process is None else self.process.returncode


class ProcessExecutor:
    """Runs step plans on worker subprocesses, one per rank; rank 0's answer is the result.

    Build it with `ProcessExecutor.create` inside a nursery that outlives it,
    or with `open_process_executor`; always `aclose` it. Implements the
    `Executor` interface.
    """

    facts: ModelFacts
    """Rank 0's, with the fewest KV blocks of any rank; set once every worker has loaded the model."""

    def __init__(self, config: EngineConfig, nursery: trio.Nursery) -> None:
        self._config = config
        self._nursery = nursery
        self._timeout = config.worker_timeout
        self._encoder = Encoder()
        self._workers: list[_Worker] = []
        self._failure: WorkerDied | None = None
        self._failed = trio.Event()
        self._step_scope: trio.CancelScope | None = None
        self._closed = False
        self._launched: deque[int] = deque()
        """Steps launched and not collected, oldest first."""
        self._held = False
        """Whether the workers hold the newest launched step's answer until the next Launch or a Flush."""

    @classmethod
    async def create(cls, config: EngineConfig, nursery: trio.Nursery) -> ProcessExecutor:
        """Start ``config.tensor_parallel_size`` workers supervised by ``nursery`` and load the model in each.

        Raises:
            ModelLoadError: a worker could not load the model.
            WorkerDied: a worker exited or hung while starting.
        """
        self = cls(config, nursery)
        try:
            await self._start()
        except BaseException:
            await self.aclose()
            raise
        return self

    @property
    def failure(self) -> WorkerDied | None:
        """Why the executor is unusable, or None while all workers are alive."""
        return self._failure

    async def wait_failed(self) -> WorkerDied:
        """Wait until a worker exits, fails or misses a deadline (not when `aclose` stops them); return why."""
        await self._failed.wait()
        assert self._failure is not None
        return self._failure

    @property
    def worker_pids(self) -> list[int]:
        return [w.process.pid for w in self._workers if w.process is not None]

    async def _start(self) -> None:
        world_size = self._config.tensor_parallel_size
        master_port = free_port() if world_size > 1 else 0
        for rank in range(world_size):
            if self._failure is not None:
                raise self._failure
            ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
            worker = _Worker(rank, FrameStream(ours))
            self._workers.append(worker)
            with theirs:  # closed here once the child has its copy, so the child's exit reads as EOF
                await self._nursery.start(self._supervise, worker, theirs.fileno())
        for worker in self._workers:
            init = messages.Init(config=self._config, rank=worker.rank, world_size=world_size, master_port=master_port)
            await self._send(worker, self._encoder.encode(init), trio.current_time() + self._timeout)
        info: list[messages.InitDone] = []
        with trio.move_on_after(max(self._timeout, MIN_INIT_TIMEOUT)) as deadline:
            for worker in self._workers:
                info.append(await self._receive(worker, messages.InitDone))
                worker.ready = True
        if deadline.cancelled_caught:
            raise self._fail(WorkerDied(rank=len(info), returncode=None, detail="did not finish loading the model"))
        # Every rank must fit the same blocks.
        self.facts = attrs.evolve(info[0].facts, num_kv_blocks=min(i.facts.num_kv_blocks for i in info))

    def _command(self, fd: int) -> list[str]:
        """How to start a worker on socket ``fd`` (the wire benchmark substitutes an echo worker)."""
        # Workers log at the engine's level to the inherited stderr, so the server log
        # shows what each rank did (KV sizing, graph capture).
        log_level = logging.getLevelName(logging.getLogger("atom_trio").getEffectiveLevel())
        return [
            sys.executable, "-m", "atom_trio.executor.worker",
            "--fd", str(fd), "--parent-pid", str(os.getpid()), "--log-level", log_level,
        ]

    async def _supervise(self, worker: _Worker, fd: int, *, task_status: trio.TaskStatus[trio.Process]) -> None:
        command = self._command(fd)
        pythonpath = os.pathsep.join(filter(None, [_SOURCE_ROOT, os.environ.get("PYTHONPATH")]))
        try:
            with worker.cancel_scope:
                await trio.run_process(
                    command,
                    pass_fds=(fd,),
                    stdin=subprocess.DEVNULL,
                    env={**os.environ, "PYTHONPATH": pythonpath},
                    check=False,  # an exit is reported through execute() as WorkerDied, not raised into the nursery
                    deliver_cancel=_terminate_then_kill,
                    task_status=_TapStarted(worker, task_status),
                )
        finally:  # also when the nursery itself is cancelled: run_process has reaped the worker either way
            worker.exited.set()
        if not self._closed:
            self._fail(_died(worker))

    def _fail(self, failure: WorkerDied) -> WorkerDied:
        """Record the first failure, stop every worker and the step in flight; return what execute raises."""
        if self._failure is None:
            self._failure = failure
            self._failed.set()
            for worker in self._workers:
                worker.cancel_scope.cancel()
            if self._step_scope is not None:
                self._step_scope.cancel()
        return self._failure

    async def _lost(self, worker: _Worker, detail: str = "") -> WorkerDied:
        """The failure to raise once ``worker`` stopped talking (with its exit status, if that comes soon)."""
        with trio.move_on_after(EXIT_WAIT):
            await worker.exited.wait()
        return self._fail(_died(worker, detail))

    async def _send(self, worker: _Worker, frame: bytes, deadline: float) -> None:
        try:
            sent = await worker.stream.send(frame, deadline)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            raise await self._lost(worker) from None
        if not sent:
            raise self._fail(self._timed_out(worker))

    async def _receive(self, worker: _Worker, expected: type[Any]) -> Any:
        try:
            message = worker.decoder.decode(await worker.stream.receive())
        except (EOFError, trio.BrokenResourceError, trio.ClosedResourceError):
            raise await self._lost(worker) from None
        except messages.ProtocolError as exc:
            raise await self._lost(worker, detail=str(exc)) from exc
        if isinstance(message, messages.Error):
            worker.error = message  # before waiting: the supervisor may report the exit first
            failure = await self._lost(worker)
            if message.type_name == ModelLoadError.__name__ and not worker.ready:
                raise ModelLoadError(message.message) from failure
            raise failure
        if not isinstance(message, expected):
            raise await self._lost(worker, detail=f"expected {expected.__name__}, got {type(message).__name__}")
        return message

    async def execute(self, plan: StepPlan) -> StepResult:
        """Send ``plan`` to every rank; return rank 0's result.

        Raises:
            WorkerDied: a worker exited, failed, or gave no answer within ``config.worker_timeout``.
        """
        self._check_ready()
        if self._launched:
            raise trio.BusyResourceError("launched steps await collect()")
        return await self._round(plan.step_id, self._encoder.encode(messages.Execute(plan=plan)))

    async def launch(self, plan: StepPlan) -> None:
        """Send ``plan`` to every rank, which start it and answer the step launched before it, if any.

        Raises:
            WorkerDied: as `execute`.
        """
        self._check_ready()
        if len(self._launched) >= 2:
            raise trio.BusyResourceError("two launched steps await collect()")
        await self._round(None, self._encoder.encode(messages.Launch(plan=plan)), due=self._held)
        self._launched.append(plan.step_id)
        self._held = True

    async def collect(self) -> StepResult:
        """Rank 0's result of the oldest launched step (asking for it when no step was launched after it).

        Raises:
            WorkerDied: as `execute`.
        """
        self._check_ready()
        step_id = self._launched.popleft()  # a collect cancelled midway leaves its answer to be skipped
        if self._held and not self._launched:
            self._held = False
            return await self._round(step_id, self._encoder.encode(messages.Flush()))
        return await self._round(step_id, None)

    async def start_profile(self, trace_prefix: str) -> list[str]:
        """Have every rank start its profiler; the trace paths, by rank (see `Executor.start_profile`).

        Raises:
            ProfilerError: a rank could not; those that could are stopped again.
            WorkerDied: as `execute`.
        """
        answers = await self._profile(messages.ProfileStart(trace_prefix=trace_prefix))
        if any(answer.error for answer in answers):
            await self._profile(messages.ProfileStop())  # the ranks that did start write a trace nobody asked for
            raise _profiler_error(answers)
        return [answer.trace for answer in answers]

    async def stop_profile(self) -> list[str]:
        """Have every rank stop its profiler and write its trace; the trace paths, by rank.

        Raises:
            ProfilerError: a rank could not.
            WorkerDied: as `execute`.
        """
        answers = await self._profile(messages.ProfileStop())
        if any(answer.error for answer in answers):
            raise _profiler_error(answers)
        return [answer.trace for answer in answers]

    async def _profile(self, message: messages.ProfileStart | messages.ProfileStop) -> list[messages.Profiled]:
        """Send ``message`` to every rank, with no step launched; each rank's answer, within ``worker_timeout``."""
        self._check_ready()
        if self._launched:
            raise trio.BusyResourceError("launched steps await collect()")
        frame = self._encoder.encode(message)
        answers = []
        with trio.CancelScope(deadline=trio.current_time() + self._timeout) as scope:
            self._step_scope = scope  # so that `_fail` stops the wait
            try:
                for worker in self._workers:
                    await self._send(worker, frame, scope.deadline)
                for worker in self._workers:
                    while worker.owed:  # answers of steps whose reader was cancelled come first
                        await self._answer(worker)
                    answers.append(await self._receive(worker, messages.Profiled))
            finally:
                self._step_scope = None
        if self._failure is not None:
            raise self._failure
        if scope.cancelled_caught:
            raise self._fail(self._timed_out(self._workers[len(answers)]))
        return answers

    def _check_ready(self) -> None:
        if self._failure is not None:
            raise self._failure
        if self._closed:
            raise trio.ClosedResourceError("the executor is closed")
        if self._step_scope is not None:
            raise trio.BusyResourceError("another task is already running a step")

    async def _round(self, step_id: int | None, frame: bytes | None, *, due: bool = True) -> Any:
        """Send ``frame`` (if any) to every rank, which makes one answer ``due`` from each; then, unless
        ``step_id`` is None, read each rank's latest answer and return rank 0's result of step ``step_id``."""
        deadline = trio.current_time() + self._timeout
        answers: list[Any] = []
        # One scope for both ways a step ends early (each costs µs): `_fail` cancels it
        # after recording the failure, so a cancellation without one is the deadline.
        with trio.CancelScope(deadline=deadline) as scope:
            self._step_scope = scope
            try:
                if frame is not None:
                    for worker in self._workers:
                        await self._send(worker, frame, deadline)  # only the deadline may interrupt it
                        worker.owed += due
                if step_id is not None:
                    answers = [await self._latest_answer(worker) for worker in self._workers]
            finally:
                self._step_scope = None
        if self._failure is not None:  # a worker exited while we waited on another
            raise self._failure
        if scope.cancelled_caught:
            raise self._fail(self._timed_out(next((w for w in self._workers if w.owed), self._workers[0])))
        if step_id is None:
            return None
        result = answers[0].result
        if result.step_id != step_id or any(ack.step_id != step_id for ack in answers[1:]):
            raise self._fail(WorkerDied(rank=0, returncode=None, detail="answered another step"))
        return result

    async def _latest_answer(self, worker: _Worker) -> Any:
        """The last answer due from ``worker``, after those of steps whose reader was cancelled."""
        while worker.owed > 1:
            await self._answer(worker)
        return await self._answer(worker)

    def _timed_out(self, worker: _Worker) -> WorkerDied:
        return WorkerDied(rank=worker.rank, returncode=None, detail=f"no answer within worker_timeout={self._timeout} s")

    async def _answer(self, worker: _Worker) -> Any:
        answer = await self._receive(worker, messages.Result if worker.rank == 0 else messages.Ack)
        worker.owed -= 1
        return answer

    async def aclose(self) -> None:
        """Stop every worker (Shutdown, then SIGTERM, then SIGKILL) and wait for them; safe to call twice."""
        if self._closed:
            return
        self._closed = True
        with trio.CancelScope(shield=True):
            with trio.move_on_after(SHUTDOWN_GRACE):
                shutdown = self._encoder.encode(messages.Shutdown())
                for worker in self._workers:
                    if worker.ready and not worker.exited.is_set():
                        try:
                            await worker.stream.send(shutdown, trio.current_time() + SHUTDOWN_GRACE)
                        except (trio.BrokenResourceError, trio.ClosedResourceError):
                            pass
                for worker in self._workers:
                    if worker.ready:
                        await worker.exited.wait()
            for worker in self._workers:
                worker.cancel_scope.cancel()  # run_process delivers SIGTERM, then SIGKILL
            for worker in self._workers:
                if worker.process is not None:
                    await worker.exited.wait()
                await worker.stream.aclose()


@asynccontextmanager
async def open_process_executor(config: EngineConfig) -> AsyncIterator[ProcessExecutor]:
    """A `ProcessExecutor` whose workers live exactly as long as the ``async with`` block.

    The supervising tasks never raise, so an error here came from start-up or
    from the block itself; it is re-raised as itself, not wrapped in the
    nursery's ExceptionGroup.
    """
    try:
        async with trio.open_nursery() as nursery:
            executor = await ProcessExecutor.create(config, nursery)
            try:
                yield executor
            finally:
                await executor.aclose()
    except BaseExceptionGroup as group:
        if len(group.exceptions) == 1:
            raise group.exceptions[0] from group.exceptions[0].__cause__
        raise


def _profiler_error(answers: list[messages.Profiled]) -> ProfilerError:
    return ProfilerError("; ".join(answer.error for answer in answers if answer.error))


def _died(worker: _Worker, detail: str = "") -> WorkerDied:
    error = worker.error
    if error is not None:
        detail = f"{error.type_name}: {error.message}"
    failure = WorkerDied(rank=worker.rank, returncode=worker.returncode, detail=detail)
    if error is not None:
        failure.add_note(f"worker traceback:\n{error.traceback}")
    return failure

