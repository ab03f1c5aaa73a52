"""The output processor on the default model's tokenizer, fed sequence outputs by hand: deltas, stop strings, counters."""

from __future__ import annotations

import pytest

from atom_trio.core.scheduler import SchedulerStats
from atom_trio.core.sequence import SeqOutput
from atom_trio.engine.input_processor import EngineRequest
from atom_trio.engine.output_processor import OutputProcessor
from atom_trio.errors import EngineDeadError
from atom_trio.sampling_params import SamplingParams

IDLE = SchedulerStats(num_running=0, num_waiting=0, num_running_requests=0, num_waiting_requests=0,
                      kv_cache_usage=0.0, prefix_cache_queries=0, prefix_cache_hits=0, num_preemptions=0)


@pytest.fixture(scope="module")
def tokenizer(default_model_dir):
    import transformers

    return transformers.AutoTokenizer.from_pretrained(default_model_dir)


def request(key: str, params: SamplingParams, prompt_token_ids=(1, 2, 3)) -> EngineRequest:
    return EngineRequest(key=key, request_id=f"id-{key}", prompt=None, prompt_token_ids=list(prompt_token_ids),
                         params=params)


def out(key, index, token_ids, finish_reason=None, stop_reason=None, logprobs=None, cached=0) -> SeqOutput:
    return SeqOutput(request_id=key, index=index, new_token_ids=token_ids, logprobs=logprobs,
                     top_logprobs=[[] for _ in logprobs] if logprobs else None, finish_reason=finish_reason,
                     stop_reason=stop_reason, num_cached_tokens=cached)


async def test_one_delta_per_request_per_step_and_the_counters(tokenizer) -> None:
    processor = OutputProcessor(tokenizer)
    hello, world = tokenizer.encode("Hello"), tokenizer.encode(" world")
    state = processor.add_request(request("0", SamplingParams(n=2, logprobs=0)))
    assert processor.process_outputs([out("0", 1, hello, logprobs=[-0.5] * len(hello), cached=2),
                                      out("0", 0, hello, logprobs=[-0.25] * len(hello))]) == []
    first = await state.buffer.get()
    assert [c.index for c in first.outputs] == [0, 1] and not first.finished
    assert first.request_id == "id-0" and first.num_cached_tokens == 2
    assert [c.text for c in first.outputs] == ["Hello", "Hello"]
    processor.process_outputs([out("0", 0, world, "length", logprobs=[-1.0] * len(world))])
    processor.process_outputs([out("0", 1, world, "length", logprobs=[-1.0] * len(world))])
    merged = await state.buffer.get()  # the reader was slow: two steps' deltas in one
    assert merged.finished and [c.text for c in merged.outputs] == [" world", " world"]
    assert merged.outputs[0].cumulative_logprob == pytest.approx(-0.25 * len(hello) - len(world))
    stats = processor.stats(IDLE, num_steps=7)
    assert (stats.num_steps, stats.prompt_tokens_total) == (7, 3)
    assert stats.generation_tokens_total == 2 * (len(hello) + len(world))
    assert stats.finished_requests == {"length": 1}
    assert state.metrics.arrival_time <= state.metrics.first_token_time <= state.metrics.finished_time


async def test_a_stop_string_ends_the_completion_and_is_reported_for_the_scheduler(tokenizer) -> None:
    processor = OutputProcessor(tokenizer)
    state = processor.add_request(request("s", SamplingParams(stop=["two"])))
    ids = tokenizer.encode("one two three")
    assert processor.process_outputs([out("s", 0, ids)]) == [("s", 0)]
    final = await state.buffer.get()
    completion = final.outputs[0]
    assert final.finished and (completion.finish_reason, completion.stop_reason) == ("stop", "two")
    assert completion.text == "one " and completion.token_ids == ids[: len(tokenizer.encode("one two"))]
    # the step already in flight for it brings one more token: ignored, nothing reported
    assert processor.process_outputs([out("s", 0, [5], "abort")]) == []
    assert processor.stats(IDLE, num_steps=0).finished_requests == {"stop": 1}


async def test_aborts_and_failures_end_the_streams(tokenizer) -> None:
    processor = OutputProcessor(tokenizer)
    aborted = processor.add_request(request("a", SamplingParams()))
    failed = processor.add_request(request("f", SamplingParams()))
    assert processor.abort_request("a") and not processor.abort_request("a")
    assert processor.process_outputs([out("a", 0, [5])]) == []  # its last step's output is dropped
    assert aborted.metrics.finished_time is not None
    processor.fail_all(lambda: EngineDeadError("the engine has shut down"))
    with pytest.raises(EngineDeadError):
        await failed.buffer.get()
    assert not processor.abort_request("f")
    assert processor.stats(IDLE, num_steps=0).finished_requests == {"abort": 1}
