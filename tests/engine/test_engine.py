"""The trio engine end to end on the real default model (float32, CPU): batching, streaming, aborts, liveness."""

from __future__ import annotations

import gc
import random
import time
import weakref

import attrs
import pytest
import trio

from atom_trio import (
    ContextLengthExceeded,
    EngineConfig,
    EngineDeadError,
    EngineOverloaded,
    InvalidRequest,
    RequestOutput,
    SamplingParams,
    open_engine,
)

GREEDY = SamplingParams(temperature=0.0, max_tokens=12)

QUESTIONS = [
    "What is the capital of France?",
    "Name three colours.",
    "Write a haiku about the sea.",
    "What is 12 times 12?",
    "Give me a synonym for happy.",
    "Who wrote Hamlet?",
    "Explain gravity in one sentence.",
    "What do bees make?",
]


def config(model_dir, **overrides) -> EngineConfig:
    fields = dict(
        model=str(model_dir),
        dtype="float32",
        num_kv_blocks=256,
        max_model_len=1024,
        max_num_seqs=64,
        max_num_batched_tokens=512,
    )
    fields.update(overrides)
    return EngineConfig(**fields)


async def collect(stream) -> RequestOutput:
    """Read a stream to its end and fold its deltas into one complete output."""
    result = None
    async for delta in stream:
        if result is None:
            result = delta
        else:
            result.add(delta)
    assert result is not None and result.finished
    return result


def chat(question: str) -> list[dict]:
    return [{"role": "user", "content": question}]


async def test_64_concurrent_requests_finish_and_greedy_ones_match_one_at_a_time(default_model_dir):
    rng = random.Random(0)
    requests = []
    for i in range(64):
        question = QUESTIONS[i % len(QUESTIONS)] + " " * (i // len(QUESTIONS))  # mixed prompt lengths
        max_tokens = rng.randint(1, 8)
        if i % 4 == 0:
            params = SamplingParams(temperature=0.0, max_tokens=max_tokens)
        else:
            params = SamplingParams(
                temperature=rng.choice([0.7, 1.0]),
                top_p=rng.choice([1.0, 0.9]),
                top_k=rng.choice([0, 20]),
                seed=i,
                n=rng.choice([1, 2]),
                max_tokens=max_tokens,
                logprobs=rng.choice([None, 2]),
            )
        prompt = chat(question) if i % 3 else question
        requests.append((prompt, params))

    async with open_engine(config(default_model_dir, num_kv_blocks=400)) as engine:
        together: list[RequestOutput | None] = [None] * len(requests)

        async def run(i: int) -> None:
            prompt, params = requests[i]
            together[i] = await collect(engine.generate(prompt, params, request_id=f"r{i}"))

        with trio.fail_after(600):
            async with trio.open_nursery() as nursery:
                for i in range(len(requests)):
                    nursery.start_soon(run, i)

        for i, ((prompt, params), result) in enumerate(zip(requests, together, strict=True)):
            assert result.request_id == f"r{i}"
            assert [c.index for c in result.outputs] == list(range(params.n))
            for completion in result.outputs:
                assert completion.finish_reason in ("stop", "length")
                assert 1 <= len(completion.token_ids) <= params.max_tokens
                assert completion.text == engine.tokenizer.decode(completion.token_ids, skip_special_tokens=True)
                if params.logprobs is not None:
                    assert len(completion.logprobs) == len(completion.token_ids)
                    assert all(len(top) == params.logprobs for top in completion.top_logprobs)

        with trio.fail_after(600):
            for i in range(0, len(requests), 4):  # the greedy ones, alone
                prompt, params = requests[i]
                alone = await collect(engine.generate(prompt, params))
                assert alone.outputs[0].token_ids == together[i].outputs[0].token_ids, i
                assert alone.outputs[0].text == together[i].outputs[0].text

        stats = engine.stats()
        assert stats.num_running == stats.num_waiting == 0
        assert stats.kv_cache_usage == 0.0
        assert sum(stats.finished_requests.values()) == 64 + 16
        assert stats.generation_tokens_total == sum(len(c.token_ids) for r in together for c in r.outputs) + sum(
            len(together[i].outputs[0].token_ids) for i in range(0, 64, 4)
        )


async def test_cancelled_stream_frees_its_blocks_within_a_step_and_the_next_request_is_served(default_model_dir):
    async with open_engine(config(default_model_dir)) as engine:
        num_blocks = engine.executor.facts.num_kv_blocks
        long = SamplingParams(temperature=0.0, max_tokens=200, ignore_eos=True)
        with trio.fail_after(600):
            stream = engine.generate("Count from one to a thousand: one, two, three,", long)
            with trio.CancelScope() as reader:
                seen = 0
                async for delta in stream:
                    seen += len(delta.outputs[0].token_ids)
                    if seen >= 5:
                        reader.cancel()  # the consumer is cancelled midway, while waiting for its next delta
        assert 5 <= seen < 200
        # The abort went to the scheduler at once: no block of that request is held now.
        assert engine.stats().kv_cache_usage == 0.0
        assert engine.stats().finished_requests == {"abort": 1}

        steps = engine.stats().num_steps
        result = await collect(engine.generate("Hi!", GREEDY))
        assert result.outputs[0].finish_reason in ("stop", "length")
        assert engine.stats().num_steps > steps

        # Breaking out of the loop and dropping the stream aborts just the same.
        async for delta in engine.generate("Count from one to a thousand:", long):
            break
        del delta
        with trio.fail_after(5):  # the dropped stream hands its abort to the event loop
            while engine.stats().finished_requests["abort"] < 2:
                await trio.sleep(0.001)
        assert round(engine.stats().kv_cache_usage * num_blocks) == 0


async def test_slow_reader_gets_merged_deltas(default_model_dir):
    async with open_engine(config(default_model_dir)) as engine:
        params = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
        fast = await collect(engine.generate("Tell me a story.", params))

        stream = engine.generate("Tell me a story.", params)
        first = await stream.__anext__()  # admitted, first token out
        with trio.fail_after(300):
            while engine.stats().generation_tokens_total < 2 * 16:  # the engine runs on without the reader
                await trio.sleep(0.05)
        rest = [delta async for delta in stream]
        assert len(rest) == 1 and rest[0].finished  # everything since the first delta, merged into one
        first.add(rest[0])
        assert first.outputs[0].token_ids == fast.outputs[0].token_ids
        assert first.outputs[0].text == fast.outputs[0].text


async def test_stop_string_split_across_tokens(default_model_dir):
    async with open_engine(config(default_model_dir)) as engine:
        tokenizer = engine.tokenizer
        prompt = chat("Write a haiku about the sea.")
        params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
        free = (await collect(engine.generate(prompt, params))).outputs[0]
        pieces = [tokenizer.decode([t]) for t in free.token_ids]
        # A stop string made of the end of one token, the next token and the start of the one after,
        # whose first occurrence in the text is that one.
        def split_stop(k: int) -> str:
            return pieces[k][-2:] + pieces[k + 1] + pieces[k + 2][:1]

        k = next(
            k
            for k in range(2, len(pieces) - 2)
            if len(pieces[k]) >= 2 and pieces[k + 1] and pieces[k + 2]
            and free.text.index(split_stop(k)) == len("".join(pieces[: k + 1])) - 2
        )
        stop = split_stop(k)
        start = free.text.index(stop)

        for include in (False, True):
            deltas = []
            stopping = attrs.evolve(params, stop=[stop], include_stop_str_in_output=include)
            async for delta in engine.generate(prompt, stopping):
                deltas.append(delta)
            text = "".join(d.outputs[0].text for d in deltas)
            assert text == (free.text[: start + len(stop)] if include else free.text[:start])
            last = deltas[-1].outputs[0]
            assert (last.finish_reason, last.stop_reason) == ("stop", stop)
            token_ids = [t for d in deltas for t in d.outputs[0].token_ids]
            assert token_ids == free.token_ids[: len(token_ids)]
            assert stop in tokenizer.decode(token_ids) and stop not in tokenizer.decode(token_ids[:-1])
        await trio.sleep(0)
        assert engine.stats().kv_cache_usage == 0.0  # the stopped sequence was dropped by the scheduler


async def test_multibyte_characters_stream_intact(default_model_dir):
    async with open_engine(config(default_model_dir)) as engine:
        for question in ("Reply with three emoji.", "Write the word 'hello' in Chinese characters."):
            deltas = [d async for d in engine.generate(chat(question), SamplingParams(temperature=0.0, max_tokens=24))]
            completions = [d.outputs[0] for d in deltas]
            text = "".join(c.text for c in completions)
            token_ids = [t for c in completions for t in c.token_ids]
            assert text == engine.tokenizer.decode(token_ids, skip_special_tokens=True)
            assert any(ord(ch) > 0x2E80 for ch in text)  # emoji or CJK really came out
            assert all("\ufffd" not in c.text for c in completions)
            # a token that ended inside a character yielded no text until the character was whole
            assert any(c.token_ids and not c.text and not c.finished for c in completions)


async def test_step_failure_kills_the_engine_and_every_waiter_sees_it(default_model_dir, inject_step_fault):
    boom = RuntimeError("injected step failure")
    errors: list[BaseException] = []
    with trio.fail_after(300):
        with pytest.raises(EngineDeadError) as at_exit:
            async with open_engine(config(default_model_dir)) as engine:
                params = SamplingParams(temperature=0.0, max_tokens=100, ignore_eos=True)
                started = trio.Semaphore(0)

                async def wait_on_a_request(prompt: str) -> None:
                    try:
                        stream = engine.generate(prompt, params)
                        await stream.__anext__()
                        started.release()
                        async for _ in stream:
                            pass
                    except EngineDeadError as exc:
                        errors.append(exc)

                async with trio.open_nursery() as nursery:
                    for question in QUESTIONS[:3]:
                        nursery.start_soon(wait_on_a_request, question)
                    for _ in range(3):
                        await started.acquire()  # every request is streaming
                    inject_step_fault(engine.executor.runner, boom)
                    dead = await engine.wait_dead()
                assert dead.__cause__ is boom
                assert not engine.is_healthy()
                with pytest.raises(EngineDeadError) as refused:
                    await engine.generate("anyone there?").__anext__()
                assert refused.value.__cause__ is boom
    assert len(errors) == 3 and all(e.__cause__ is boom for e in errors)
    assert at_exit.value.__cause__ is boom


async def test_leaving_or_cancelling_the_block_shuts_down_and_releases_the_model(default_model_dir):
    outside: list[BaseException] = []

    async def read_outside(engine, task_status=trio.TASK_STATUS_IGNORED) -> None:
        try:
            stream = engine.generate("Count to a hundred.", SamplingParams(max_tokens=500, ignore_eos=True))
            task_status.started()
            async for _ in stream:
                pass
        except EngineDeadError as exc:
            outside.append(exc)

    with trio.fail_after(300):
        async with trio.open_nursery() as readers:
            with trio.CancelScope() as scope:
                async with open_engine(config(default_model_dir)) as engine:
                    model = weakref.ref(engine.executor.runner.model)
                    await readers.start(read_outside, engine)
                    await trio.sleep(0.5)
                    scope.cancel()  # cancel the block from outside, mid-stream
                    await trio.sleep_forever()
    assert scope.cancelled_caught
    assert not engine.is_healthy()
    gc.collect()
    assert engine.executor.runner is None and model() is None  # runner.close() ran; the weights are gone
    assert len(outside) == 1 and "shut down" in str(outside[0])
    with pytest.raises(EngineDeadError):
        await engine.generate("late").__anext__()


async def test_admission_errors(default_model_dir):
    cfg = config(default_model_dir, max_model_len=64, max_num_seqs=1, max_queued_requests=1)
    async with open_engine(cfg) as engine:
        assert engine.max_model_len == 64

        with pytest.raises(InvalidRequest) as bad:
            await engine.generate("hi", SamplingParams(temperature=-1.0)).__anext__()
        assert bad.value.param == "temperature"
        with pytest.raises(InvalidRequest) as bad:
            await engine.generate([], GREEDY).__anext__()
        assert bad.value.param == "prompt"
        with pytest.raises(InvalidRequest) as bad:
            await engine.generate([1, 2, 10**9], GREEDY).__anext__()
        assert bad.value.param == "prompt"

        long_prompt = list(range(100, 160))
        with pytest.raises(ContextLengthExceeded) as too_long:
            await engine.generate(long_prompt, SamplingParams(max_tokens=10)).__anext__()
        assert "64" in str(too_long.value) and "60" in str(too_long.value)
        assert (too_long.value.prompt_tokens, too_long.value.max_model_len) == (60, 64)
        with pytest.raises(ContextLengthExceeded):
            await engine.generate(list(range(100, 164)), SamplingParams(max_tokens=None)).__anext__()
        # max_tokens=None: up to the context
        up_to_context = await collect(
            engine.generate(long_prompt, SamplingParams(temperature=0.0, max_tokens=None, ignore_eos=True))
        )
        assert len(up_to_context.outputs[0].token_ids) == 4
        assert up_to_context.outputs[0].finish_reason == "length"

        # max_num_seqs=1: one request runs, one waits, the next is refused at once.
        params = SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True)
        running = engine.generate("one", params)
        await running.__anext__()
        waiting = engine.generate("two", params)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(collect, waiting)
            await trio.sleep(0.2)
            assert engine.stats().num_waiting == 1
            steps = engine.stats().num_steps
            with pytest.raises(EngineOverloaded):
                await engine.generate("three", params).__anext__()
            assert engine.stats().num_steps == steps  # refused at once, not after waiting for capacity
            await running.aclose()
        assert engine.stats().finished_requests == {"length": 2, "abort": 1}


async def test_chat_messages_use_the_chat_template(default_model_dir):
    async with open_engine(config(default_model_dir)) as engine:
        messages = chat("What is the capital of France?")
        rendered = engine.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        from_chat = await collect(engine.generate(messages, GREEDY))
        from_text = await collect(engine.generate(engine.tokenizer.encode(rendered, add_special_tokens=False), GREEDY))
        assert from_chat.prompt == rendered
        assert from_chat.prompt_token_ids == from_text.prompt_token_ids
        assert from_chat.outputs[0].token_ids == from_text.outputs[0].token_ids
        assert "Paris" in from_chat.outputs[0].text
        assert from_chat.metrics.arrival_time <= from_chat.metrics.first_token_time <= from_chat.metrics.finished_time
        assert from_text.num_cached_tokens > 0  # the same prompt again: its full blocks came from the prefix cache


async def test_responsiveness_during_a_long_prefill(default_model_dir):
    """A task sleeping 10 ms in a loop keeps its cadence while the model prefills a long prompt."""
    cfg = config(default_model_dir, max_num_batched_tokens=1024)
    async with open_engine(cfg) as engine:
        prompt = engine.tokenizer.encode("The quick brown fox jumps over the lazy dog. " * 80)[:800]
        worst = 0.0
        ticks = 0
        done = trio.Event()

        async def ticker() -> None:
            nonlocal worst, ticks
            while not done.is_set():
                before = trio.current_time()
                await trio.sleep(0.010)
                worst = max(worst, trio.current_time() - before - 0.010)
                ticks += 1

        async with trio.open_nursery() as nursery:
            nursery.start_soon(ticker)
            t0 = time.monotonic()
            result = await collect(engine.generate(prompt, SamplingParams(temperature=0.0, max_tokens=1)))
            prefill = time.monotonic() - t0
            done.set()
        print(f"\nprefill of {len(prompt)} tokens took {prefill:.2f} s; {ticks} ticks, worst lag {worst * 1000:.1f} ms")
        assert result.outputs[0].token_ids
        assert ticks >= 10
        assert worst < 0.250


async def test_prompt_logprobs_match_transformers_across_chunks_and_bypass_the_prefix_cache(default_model_dir):
    import torch
    import transformers

    text = "The quick brown fox jumps over the lazy dog, then runs into the forest to look for its friends."
    scored_params = SamplingParams(temperature=0.0, max_tokens=2, prompt_logprobs=2)
    # 8-token steps: the prompt is prefilled in several chunks
    async with open_engine(config(default_model_dir, block_size=4, max_num_batched_tokens=8)) as engine:
        plain = await collect(engine.generate(text, SamplingParams(temperature=0.0, max_tokens=1)))
        scored = await collect(engine.generate(text, scored_params))
        again = await collect(engine.generate(text, SamplingParams(temperature=0.0, max_tokens=1)))
    prompt = scored.prompt_token_ids
    assert len(prompt) > 2 * engine.config.block_size
    assert plain.prompt_logprobs is None and again.prompt_logprobs is None
    assert again.num_cached_tokens > 0 and scored.num_cached_tokens == 0  # cached, yet computed again
    assert scored.outputs[0].token_ids[:1] == plain.outputs[0].token_ids

    hf = transformers.AutoModelForCausalLM.from_pretrained(default_model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        expected = hf(torch.tensor([prompt])).logits[0].float().log_softmax(dim=-1)
    assert len(scored.prompt_logprobs) == len(prompt) and scored.prompt_logprobs[0] is None
    for pos in range(1, len(prompt)):
        logprobs, token, row = scored.prompt_logprobs[pos], prompt[pos], expected[pos - 1]
        assert next(iter(logprobs)) == token  # the prompt token first, then the 2 most likely
        assert len(logprobs) in (2, 3)
        second_best = float(row.topk(2).values[-1])
        for t, logprob in logprobs.items():
            assert logprob == pytest.approx(float(row[t]), abs=2e-3)
            assert t == token or logprob >= second_best - 2e-3
