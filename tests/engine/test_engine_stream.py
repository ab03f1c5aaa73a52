"""Per-request output buffers and streams, without a model: merging for slow readers, aborts, errors."""

from __future__ import annotations

import gc

import pytest
import trio
import trio.testing
from hypothesis import given, settings
from hypothesis import strategies as st

from atom_trio.engine._stream import OutputBuffer, RequestStream
from atom_trio.errors import EngineDeadError
from atom_trio.outputs import CompletionOutput, RequestMetrics, RequestOutput


def delta(pieces: list[tuple[int, str, list[int]]], *, finished: bool = False, reason: str | None = None) -> RequestOutput:
    return RequestOutput(
        request_id="r",
        prompt=None,
        prompt_token_ids=[1, 2],
        outputs=[
            CompletionOutput(index=i, text=t, token_ids=list(ids), logprobs=[-0.5] * len(ids),
                             finish_reason=reason if finished else None)
            for i, t, ids in sorted(pieces)
        ],
        finished=finished,
        num_cached_tokens=0,
        metrics=RequestMetrics(arrival_time=0.0),
    )


step = st.lists(
    st.tuples(st.integers(0, 2), st.text(max_size=4), st.lists(st.integers(0, 100), max_size=2)),
    min_size=1,
    max_size=3,
    unique_by=lambda p: p[0],
)


@settings(max_examples=100, deadline=None)
@given(steps=st.lists(st.tuples(step, st.booleans()), min_size=1, max_size=30))
def test_a_lagging_reader_gets_merged_deltas_that_add_up_to_everything(steps):
    """Whenever the reader reads, what it gets, concatenated per completion, is exactly what was put."""

    async def main() -> None:
        buffer = OutputBuffer()
        read: list[RequestOutput] = []
        for k, (pieces, reader_reads_now) in enumerate(steps):
            last = k == len(steps) - 1
            buffer.put(delta(pieces, finished=last, reason="length"))
            assert buffer._pending is not None  # at most one pending output, whatever the lag
            if reader_reads_now and not last:
                read.append(await buffer.get())
        read.append(await buffer.get())
        with pytest.raises(StopAsyncIteration):
            await buffer.get()

        assert [out.finished for out in read] == [False] * (len(read) - 1) + [True]
        for index in range(3):
            put = [p for pieces, _ in steps for p in pieces if p[0] == index]
            got = [c for out in read for c in out.outputs if c.index == index]
            assert "".join(c.text for c in got) == "".join(t for _, t, _ in put)
            assert [t for c in got for t in c.token_ids] == [t for _, _, ids in put for t in ids]
            assert [lp for c in got for lp in c.logprobs] == [-0.5] * sum(len(ids) for _, _, ids in put)
        for out in read:
            assert [c.index for c in out.outputs] == sorted({c.index for c in out.outputs})
            if got:  # the latest delta of a completion decides its finish reason
                ended = any(p[0] == index for p in steps[-1][0])
                assert got[-1].finish_reason == ("length" if ended else None)

    trio.run(main)


async def test_an_error_arrives_after_pending_output():
    buffer = OutputBuffer()
    buffer.put(delta([(0, "a", [1])]))
    buffer.fail(EngineDeadError("dead"))
    assert (await buffer.get()).outputs[0].text == "a"
    with pytest.raises(EngineDeadError):
        await buffer.get()


async def test_a_waiting_reader_is_woken_by_output_and_by_failure():
    buffer = OutputBuffer()
    async with trio.open_nursery() as nursery:
        got = []

        async def read() -> None:
            got.append(await buffer.get())

        nursery.start_soon(read)
        await trio.testing.wait_all_tasks_blocked()
        buffer.put(delta([(0, "x", [5])]))
    assert got[0].outputs[0].text == "x"

    with pytest.RaisesGroup(EngineDeadError):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(buffer.get)
            await trio.testing.wait_all_tasks_blocked()
            buffer.fail(EngineDeadError("dead"))


def stream_with_counter() -> tuple[RequestStream, OutputBuffer, list[int]]:
    buffer = OutputBuffer()
    aborts: list[int] = []

    async def admit():
        return buffer, lambda: aborts.append(1)

    return RequestStream(admit, trio.lowlevel.current_trio_token()), buffer, aborts


async def test_cancelling_a_waiting_reader_aborts_once():
    stream, buffer, aborts = stream_with_counter()
    with trio.move_on_after(0.01):
        await stream.__anext__()
    assert aborts == [1]
    await stream.aclose()
    assert aborts == [1]


async def test_dropping_an_unfinished_stream_aborts_it():
    stream, buffer, aborts = stream_with_counter()
    buffer.put(delta([(0, "a", [1])]))
    async for _ in stream:
        break
    del stream
    gc.collect()
    await trio.testing.wait_all_tasks_blocked()  # the abort runs on the trio thread
    assert aborts == [1]


async def test_a_finished_stream_is_not_aborted():
    stream, buffer, aborts = stream_with_counter()
    buffer.put(delta([(0, "a", [1])], finished=True, reason="stop"))
    async with stream:
        assert [out.outputs[0].text async for out in stream] == ["a"]
    del stream
    gc.collect()
    await trio.testing.wait_all_tasks_blocked()
    assert aborts == []
