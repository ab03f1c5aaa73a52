"""`RunnerThread`: every call on one thread, in order; errors come back; a cancelled caller waits for its call;
`aclose` ends the thread."""

from __future__ import annotations

import threading
import time

import pytest
import trio

from atom_trio.executor._runner_thread import RunnerThread


async def test_calls_run_in_order_on_one_thread_off_the_event_loop() -> None:
    thread = RunnerThread("test runner")
    try:
        seen: list[tuple[int, int]] = []

        def record(i: int) -> int:
            seen.append((i, threading.get_ident()))
            return i * i

        async with trio.open_nursery() as nursery:
            # Concurrent callers, with trio's own threads busy beside them.
            for i in range(20):
                nursery.start_soon(thread.run, record, i)
                nursery.start_soon(trio.to_thread.run_sync, time.sleep, 0.001)
        assert sorted(i for i, _ in seen) == list(range(20))
        assert len({ident for _, ident in seen}) == 1
        assert seen[0][1] != threading.get_ident()
        assert await thread.run(record, 7) == 49
        with pytest.raises(ZeroDivisionError):
            await thread.run(lambda: 1 / 0)
    finally:
        await thread.aclose()
    # Ended, not left as a daemon: one still inside torch at interpreter exit aborts the process.
    assert "test runner" not in {t.name for t in threading.enumerate()}


async def test_a_cancelled_caller_waits_for_its_call_to_end() -> None:
    thread = RunnerThread("test runner")
    release = threading.Event()
    ended: list[bool] = []

    def slow() -> None:
        release.wait(10)
        ended.append(True)

    timer = threading.Timer(0.3, release.set)
    timer.start()
    try:
        with trio.move_on_after(0.05) as scope:
            await thread.run(slow)
            assert ended == [True]  # not abandoned: the caller resumes only once the call is over
            await trio.lowlevel.checkpoint()  # where the cancellation lands
            pytest.fail("the cancellation was lost")
        assert scope.cancelled_caught and ended == [True]
    finally:
        timer.cancel()
        await thread.aclose()
