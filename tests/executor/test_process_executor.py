"""ProcessExecutor with real worker subprocesses on CPU: same tokens as in-process, deaths, hangs, no orphans."""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import trio

from atom_trio.config import EngineConfig
from atom_trio.engine import open_engine
from atom_trio.errors import EngineDeadError, ModelLoadError, WorkerDied
from atom_trio.core.plan import PREVIOUS_TOKEN, SeqChunk, StepPlan
from atom_trio.sampling_params import SamplingParams
from atom_trio.executor.process import ProcessExecutor, open_process_executor

ROOT = Path(__file__).resolve().parents[2]
GREEDY = SamplingParams(temperature=0.0, max_tokens=16)


def cpu_config(model_dir: Path, **fields) -> EngineConfig:
    return EngineConfig(model=str(model_dir), dtype="float32", device="cpu", num_kv_blocks=32, **fields)


def alive(pid: int) -> bool:
    """Running, as opposed to gone or a zombie waiting for a reaper that may not exist in a container."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state not in ("Z", "X")


def worker_children() -> list[int]:
    """Our child processes running ``atom_trio.executor.worker``, straight from /proc."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            cmdline = (entry / "cmdline").read_bytes()
        except (FileNotFoundError, ProcessLookupError, IndexError):
            continue
        if ppid == os.getpid() and b"atom_trio.executor.worker" in cmdline and alive(int(entry.name)):
            found.append(int(entry.name))
    return found


def wait_gone(pid: int, timeout: float = 15.0) -> bool:
    deadline = time.monotonic() + timeout
    while alive(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def chunk(seq_id, tokens, start, prompt_len, blocks, *, prefix=None, params=GREEDY) -> SeqChunk:
    return SeqChunk(
        seq_id=seq_id,
        token_ids=tokens,
        start_pos=start,
        block_table=blocks,
        prompt_len=prompt_len,
        sample=True,
        sampling_params=params,
        prefix_token_ids=prefix,
    )


PROMPTS = [
    [1, 504, 3458, 282, 4649, 314, 1345, 28, 253, 3191, 3304, 282, 2942, 30, 378, 4649, 314, 1177, 288, 5],
    [1, 23, 4921, 30, 2070],
    # Shares its first full block (16 tokens) with prompt 0: admitted later on a prefix-cache hit.
    [1, 504, 3458, 282, 4649, 314, 1345, 28, 253, 3191, 3304, 282, 2942, 30, 378, 4649, 1035, 17, 9],
]
BLOCKS = [[0, 1, 2], [3, 4], [0, 5, 6]]
SEEDED = SamplingParams(temperature=0.8, seed=1234, max_tokens=16)


async def generate(execute, steps: int = 6) -> list[list[int]]:
    """Prefill two prompts, admit the third on a cached prefix, decode all three; the sampled tokens."""
    outputs: list[list[int]] = [[], [], []]
    params = [GREEDY, SEEDED, GREEDY]

    def decode(i: int) -> SeqChunk:
        end = len(PROMPTS[i]) + len(outputs[i])
        return chunk(i, [outputs[i][-1]], end - 1, len(PROMPTS[i]), BLOCKS[i], params=params[i])

    plans = [
        lambda: StepPlan(
            step_id=0,
            chunks=[chunk(i, PROMPTS[i], 0, len(PROMPTS[i]), BLOCKS[i], params=params[i]) for i in (0, 1)],
        ),
        lambda: StepPlan(
            step_id=1,
            chunks=[
                decode(0),
                decode(1),
                chunk(2, PROMPTS[2][16:], 16, len(PROMPTS[2]), BLOCKS[2], prefix=PROMPTS[2][:16]),
            ],
        ),
    ]
    plans += [lambda step=step: StepPlan(step_id=step, chunks=[decode(i) for i in range(3)]) for step in range(2, steps)]
    for make in plans:
        plan = make()
        result = await execute(plan)
        for c, token in zip([c for c in plan.chunks if c.sample], result.token_ids):
            outputs[c.seq_id].append(token)
    return outputs


def first_plan() -> StepPlan:
    return StepPlan(step_id=0, chunks=[chunk(0, PROMPTS[0], 0, len(PROMPTS[0]), BLOCKS[0])])


async def test_same_tokens_as_the_runner_in_process(default_model_dir):
    from atom_trio.runner import ModelRunner

    config = cpu_config(default_model_dir)
    runner = await trio.to_thread.run_sync(ModelRunner, config)
    try:
        expected = await generate(lambda plan: trio.to_thread.run_sync(runner.execute, plan))
    finally:
        runner.close()
    async with open_process_executor(config) as executor:
        assert executor.facts == runner.facts
        assert (executor.facts.num_kv_blocks, executor.facts.block_size) == (32, 16)
        got = await generate(executor.execute)
        pids = executor.worker_pids
    assert got == expected
    assert [len(out) for out in got] == [6, 6, 5]
    assert all(len(set(out)) > 1 for out in got)  # real generations, not a constant
    assert not any(alive(pid) for pid in pids)


async def test_killed_worker_raises_worker_died_and_leaves_nothing(tiny_llama_dir):
    async with open_process_executor(cpu_config(tiny_llama_dir)) as executor:
        await executor.execute(first_plan())
        (pid,) = executor.worker_pids
        os.kill(pid, signal.SIGKILL)
        with pytest.raises(WorkerDied) as caught:
            await executor.execute(first_plan())
        assert (caught.value.rank, caught.value.returncode) == (0, -signal.SIGKILL)
        assert executor.failure is caught.value
        with pytest.raises(WorkerDied):  # dead for good
            await executor.execute(first_plan())
    assert not alive(pid)
    assert worker_children() == []


async def test_a_worker_killed_between_steps_is_reported_without_a_step(nursery, tiny_llama_dir):
    """`wait_failed` returns as soon as a worker exits, with no step to notice it; `aclose` is not a failure."""
    returned = []

    async def watch(executor: ProcessExecutor) -> None:
        returned.append(await executor.wait_failed())

    async with open_process_executor(cpu_config(tiny_llama_dir)) as executor:
        nursery.start_soon(watch, executor)
        (pid,) = executor.worker_pids
        os.kill(pid, signal.SIGKILL)
        with trio.fail_after(10):
            failure = await executor.wait_failed()
        assert (failure.rank, failure.returncode) == (0, -signal.SIGKILL)
        assert str(failure) == "worker rank 0 exited with status -9 (SIGKILL)"
        with pytest.raises(WorkerDied) as caught:
            await executor.execute(first_plan())
        assert caught.value is failure
    await trio.sleep(0)
    assert returned == [failure]
    assert worker_children() == []

    async with open_process_executor(cpu_config(tiny_llama_dir)) as executor:
        nursery.start_soon(watch, executor)
        await executor.execute(first_plan())
    await trio.sleep(0.5)  # the workers' exit, after Shutdown, is no failure
    assert returned == [failure]


async def test_an_engine_dies_at_once_when_an_idle_worker_dies(tiny_llama_dir, caplog):
    """No request needs to come: the engine dies, logs one ERROR line naming the rank and the signal, turns
    unhealthy and refuses requests; leaving the block raises `EngineDeadError` and leaves no process."""
    with pytest.raises(EngineDeadError) as left:
        async with open_engine(cpu_config(tiny_llama_dir, executor="process")) as engine:
            (pid,) = engine.executor.worker_pids
            assert engine.is_healthy()
            os.kill(pid, signal.SIGKILL)
            with trio.fail_after(10):
                dead = await engine.wait_dead()
            assert not engine.is_healthy()
            assert isinstance(dead.__cause__, WorkerDied)
            with pytest.raises(EngineDeadError, match="exited with status -9"):
                async for _ in engine.generate("Hi", SamplingParams(max_tokens=1)):
                    pass
    assert isinstance(left.value.__cause__, WorkerDied)
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert [r.getMessage() for r in errors] == [
        "the engine died: WorkerDied: worker rank 0 exited with status -9 (SIGKILL)"
    ]
    assert not alive(pid) and worker_children() == []


async def test_failing_step_reports_the_worker_traceback(tiny_llama_dir):
    async with open_process_executor(cpu_config(tiny_llama_dir)) as executor:
        (pid,) = executor.worker_pids
        too_few_blocks = StepPlan(step_id=0, chunks=[chunk(0, list(range(1, 40)), 0, 39, [0])])
        with pytest.raises(WorkerDied) as caught:
            await executor.execute(too_few_blocks)
    assert (caught.value.rank, caught.value.returncode) == (0, 1)
    assert "ValueError" in str(caught.value) and "cannot hold 39 tokens" in str(caught.value)
    assert any("Traceback" in note and "_check_chunk" in note for note in caught.value.__notes__)
    assert not alive(pid)


async def test_a_step_cancelled_midway_does_not_desync_the_next(tiny_llama_dir):
    async with open_process_executor(cpu_config(tiny_llama_dir)) as executor:
        expected = await generate(executor.execute, steps=3)
        with trio.move_on_after(0) as scope:  # the plan goes out whole; waiting for its answer is cancelled
            await executor.execute(StepPlan(step_id=99, chunks=first_plan().chunks))
        assert scope.cancelled_caught
        assert await generate(executor.execute, steps=3) == expected


async def test_launched_steps_feed_back_their_tokens_and_a_cancelled_collect_does_not_desync(tiny_llama_dir):
    async with open_process_executor(cpu_config(tiny_llama_dir)) as executor:
        expected = await generate(executor.execute, steps=4)
        params = [GREEDY, SEEDED]
        prefill = [chunk(i, PROMPTS[i], 0, len(PROMPTS[i]), BLOCKS[i], params=params[i]) for i in (0, 1)]

        def fed_back(step: int) -> StepPlan:  # decode step ``step`` with the token of the step launched before
            return StepPlan(
                step_id=step,
                chunks=[
                    chunk(i, [PREVIOUS_TOKEN], len(PROMPTS[i]) + step - 1, len(PROMPTS[i]), BLOCKS[i], params=params[i])
                    for i in (0, 1)
                ],
            )

        await executor.launch(StepPlan(step_id=0, chunks=prefill))
        await executor.launch(fed_back(1))  # the worker starts it before answering step 0
        results = [await executor.collect()]
        await executor.launch(fed_back(2))
        results += [await executor.collect(), await executor.collect()]  # the last one is asked for (Flush)
        assert [r.step_id for r in results] == [0, 1, 2]
        assert [[r.token_ids[i] for r in results] for i in (0, 1)] == [expected[0][:3], expected[1][:3]]

        await executor.launch(StepPlan(step_id=3, chunks=prefill))
        with trio.move_on_after(0) as scope:  # the Flush goes out whole; waiting for its answer is cancelled
            await executor.collect()
        assert scope.cancelled_caught
        assert await generate(executor.execute, steps=4) == expected  # step 3's answer is skipped


async def test_hung_worker_times_out(tiny_llama_dir):
    async with open_process_executor(cpu_config(tiny_llama_dir, worker_timeout=1.0)) as executor:
        (pid,) = executor.worker_pids
        os.kill(pid, signal.SIGSTOP)  # alive, but never answers
        with pytest.raises(WorkerDied, match="no answer within") as caught:
            await executor.execute(first_plan())
        assert (caught.value.rank, caught.value.returncode) == (0, None)
    assert not alive(pid)


async def test_model_load_error_is_typed_and_leaves_nothing(tmp_path):
    with pytest.raises(ModelLoadError):
        async with open_process_executor(EngineConfig(model=str(tmp_path / "missing"), device="cpu")):
            pass
    assert worker_children() == []


async def test_cancelling_the_nursery_leaves_no_process(tiny_llama_dir):
    # Cancelled while the worker is still starting (it never answered Init) ...
    async with trio.open_nursery() as nursery:
        nursery.start_soon(ProcessExecutor.create, cpu_config(tiny_llama_dir), nursery)
        while not worker_children():
            await trio.sleep(0.01)
        nursery.cancel_scope.cancel()
    assert worker_children() == []
    # ... and while it is up and idle.
    with trio.CancelScope() as scope:
        async with trio.open_nursery() as nursery:
            executor = await ProcessExecutor.create(cpu_config(tiny_llama_dir), nursery)
            pids = executor.worker_pids
            scope.cancel()
            await trio.sleep_forever()
    assert not any(alive(pid) for pid in pids)
    assert worker_children() == []


PARENT = """
import sys, trio
from atom_trio.config import EngineConfig
from atom_trio.executor.process import open_process_executor

async def main():
    config = EngineConfig(model=sys.argv[1], dtype="float32", device="cpu", num_kv_blocks=8)
    async with open_process_executor(config) as executor:
        print(*executor.worker_pids, flush=True)
        await trio.sleep_forever()

trio.run(main)
"""


def test_parent_killed_leaves_no_worker(tiny_llama_dir):
    parent = subprocess.Popen(
        [sys.executable, "-c", PARENT, str(tiny_llama_dir)], stdout=subprocess.PIPE, text=True, cwd=ROOT
    )
    try:
        (pid,) = map(int, parent.stdout.readline().split())
        assert alive(pid)
    finally:
        parent.kill()
        parent.wait()
    assert wait_gone(pid)


SPAWN_FROM_A_THREAD = """
import os, subprocess, sys, threading, time
fd = int(sys.argv[1])
def spawn():
    child = subprocess.Popen([sys.executable, "-m", "atom_trio.executor.worker", "--fd", str(fd),
                              "--parent-pid", str(os.getpid())], pass_fds=(fd,))
    # Outlive the worker's prctl (its watchdog thread is up right after), so that our exit signals it.
    while len(os.listdir(f"/proc/{child.pid}/task")) < 2:
        time.sleep(0.01)
    print(child.pid, flush=True)
spawner = threading.Thread(target=spawn)  # trio spawns from a cached thread, which retires after 10 s idle
spawner.start()
spawner.join()
time.sleep(3600)
"""


def test_worker_exits_with_its_parent_even_without_eof():
    """The socket stays open (we hold the other end), so only PR_SET_PDEATHSIG can tell the worker."""
    ours, theirs = socket.socketpair()
    with ours:
        with theirs:
            parent = subprocess.Popen(
                [sys.executable, "-c", SPAWN_FROM_A_THREAD, str(theirs.fileno())],
                pass_fds=(theirs.fileno(),),
                stdout=subprocess.PIPE,
                text=True,
                cwd=ROOT,
            )
        try:
            pid = int(parent.stdout.readline())
            time.sleep(0.5)  # the spawning thread is gone: that signal must not kill the worker
            assert alive(pid)
        finally:
            parent.kill()
            parent.wait()
        assert wait_gone(pid)
