"""Server behaviour that needs the engine object: served in-process with hypercorn.trio.serve.

These use the tiny random-weight Llama (fast to load and step): what they check,
KV blocks, queue limits and engine death, does not depend on what the model says.
"""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path

import httpx
import hypercorn.trio
import pytest
import trio

from atom_trio.config import EngineConfig
from atom_trio.errors import EngineDeadError
from atom_trio.sampling_params import SamplingParams
from atom_trio.server import ServerSettings, create_app, hypercorn_config, serve

LOCAL = ServerSettings(host="127.0.0.1", port=0, shutdown_timeout=5)


def tiny_config(model_dir: Path, **fields: object) -> EngineConfig:
    return EngineConfig(**{"model": str(model_dir), "dtype": "float32", "max_model_len": 256, **fields})


async def wait_until(predicate, timeout: float = 60) -> None:
    with trio.fail_after(timeout):
        while not predicate():
            await trio.sleep(0.02)


def metric(text: str, name: str) -> float:
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name + "{"))


async def test_disconnect_frees_kv_full_queue_is_429_dead_engine_is_503(
    nursery: trio.Nursery, tiny_llama_dir: Path, inject_step_fault
) -> None:
    # The hypercorn-CLI path: the app opens the engine in its own lifespan.
    # A stream long enough (2000 tokens) that it is still running while the other requests arrive.
    config = tiny_config(tiny_llama_dir, max_num_seqs=1, max_queued_requests=1, max_model_len=2048)
    app = create_app(config, LOCAL)
    stop = trio.Event()
    urls = await nursery.start(partial(hypercorn.trio.serve, app, hypercorn_config(LOCAL), shutdown_trigger=stop.wait))
    engine = app.extensions["atom_trio"].engine
    long_stream = {"prompt": "Hello there", "max_tokens": 2000, "ignore_eos": True, "stream": True}
    async with httpx.AsyncClient(base_url=urls[0], timeout=60) as http:
        async with http.stream("POST", "/v1/completions", json=long_stream) as response:
            lines = response.aiter_lines()  # kept referenced: a collected iterator would close the stream
            assert (await anext(lines)).startswith("data: ")
            stats = engine.stats()
            assert stats.num_running == 1 and stats.kv_cache_usage > 0

            # max_num_seqs=1: the next request waits, and fills the queue (max_queued_requests=1).
            async with trio.open_nursery() as waiting:
                waiting.start_soon(partial(http.post, "/v1/completions", json={"prompt": "Hi", "max_tokens": 1}))
                await wait_until(lambda: engine.stats().num_waiting == 1)
                refused = await http.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 1})
                assert refused.status_code == 429
                assert refused.headers["Retry-After"] == "1"
                assert refused.json()["error"]["code"] == "engine_overloaded"
                waiting.cancel_scope.cancel()  # that client gives up too
        # Leaving the block closed the connection mid-stream: the request is aborted, its blocks freed.
        await wait_until(lambda: engine.stats().kv_cache_usage == 0 and engine.stats().num_running == 0
                         and engine.stats().num_waiting == 0)
        finished = engine.stats().finished_requests
        assert finished.get("abort") == 2 and "length" not in finished  # aborted, not run to max_tokens
        assert engine.stats().generation_tokens_total < 2000
        scraped = (await http.get("/metrics")).text
        assert metric(scraped, "atom_trio:kv_cache_usage_perc") == 0
        assert 'atom_trio:request_success_total{finished_reason="abort",model_name="' in scraped

        assert (await http.get("/health")).status_code == 200
        inject_step_fault(engine._executor.runner, RuntimeError("injected fault"))
        failed = await http.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 2})
        assert failed.status_code == 503 and "injected fault" in failed.json()["error"]["message"]
        assert (await http.get("/health")).status_code == 503
        assert (await http.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 2})).status_code == 503
    stop.set()


async def test_serve_ends_with_the_engine(tiny_llama_dir: Path, inject_step_fault) -> None:
    """`serve` owns the root nursery: a dead engine ends it with EngineDeadError (so the CLI exits non-zero)."""
    with pytest.RaisesGroup(EngineDeadError, flatten_subgroups=True, allow_unwrapped=True):
        async with trio.open_nursery() as nursery:
            serving = await nursery.start(serve, tiny_config(tiny_llama_dir), LOCAL)
            async with httpx.AsyncClient(base_url=serving.urls[0]) as http:
                assert (await http.get("/health")).status_code == 200
            engine = serving.state.engine
            inject_step_fault(engine._executor.runner, RuntimeError("injected fault"))
            with pytest.raises(EngineDeadError):
                async for _ in engine.generate("Hi", SamplingParams(max_tokens=1)):
                    pass
            await trio.sleep_forever()  # serve() must end this nursery by itself


async def test_echo_with_logprobs_scores_the_prompt_as_the_engine_does(
    nursery: trio.Nursery, tiny_llama_dir: Path
) -> None:
    """lm-evaluation-harness's log-likelihood request: echo, logprobs, max_tokens 1 or 0."""
    app = create_app(tiny_config(tiny_llama_dir), LOCAL)
    stop = trio.Event()
    urls = await nursery.start(partial(hypercorn.trio.serve, app, hypercorn_config(LOCAL), shutdown_trigger=stop.wait))
    engine = app.extensions["atom_trio"].engine
    prompt = "The capital of France is Paris"
    reference = None
    async for output in engine.generate(prompt, SamplingParams(temperature=0, max_tokens=1, logprobs=2,
                                                               prompt_logprobs=2)):
        assert reference is None and output.finished
        reference = output
    token_ids, expected = reference.prompt_token_ids, reference.prompt_logprobs
    num_prompt = len(token_ids)
    decode = engine.tokenizer.decode
    body = {"prompt": prompt, "echo": True, "logprobs": 2, "max_tokens": 1, "temperature": 0}
    async with httpx.AsyncClient(base_url=urls[0], timeout=60) as http:
        one = (await http.post("/v1/completions", json=body)).json()
        zero = (await http.post("/v1/completions", json={**body, "max_tokens": 0})).json()
        async with http.stream("POST", "/v1/completions", json={**body, "stream": True}) as response:
            events = [json.loads(line[6:]) async for line in response.aiter_lines()
                      if line.startswith("data: {")]
    stop.set()

    choice = one["choices"][0]
    logprobs = choice["logprobs"]
    generated = reference.outputs[0]
    assert choice["text"] == prompt + generated.text
    assert logprobs["tokens"] == [decode([t]) for t in token_ids + generated.token_ids]
    assert logprobs["token_logprobs"][0] is None and logprobs["top_logprobs"][0] is None
    for pos in range(1, num_prompt):
        assert logprobs["token_logprobs"][pos] == pytest.approx(expected[pos][token_ids[pos]], abs=1e-6)
        best = sorted(expected[pos].items(), key=lambda item: -item[1])[:2]
        assert logprobs["top_logprobs"][pos] == pytest.approx({decode([t]): lp for t, lp in best}, abs=1e-6)
    assert logprobs["token_logprobs"][-1] == pytest.approx(generated.logprobs[0], abs=1e-6)
    offsets = [0]
    for text in logprobs["tokens"][:-1]:
        offsets.append(offsets[-1] + len(text))
    assert logprobs["text_offset"] == offsets
    # vLLM's extra field: every prompt token's {token_id: {logprob, decoded_token}}
    assert choice["prompt_logprobs"][0] is None and len(choice["prompt_logprobs"]) == num_prompt
    for pos in range(1, num_prompt):
        served = {int(t): entry["logprob"] for t, entry in choice["prompt_logprobs"][pos].items()}
        assert served == pytest.approx(expected[pos], abs=1e-6)
    assert one["usage"]["completion_tokens"] == 1 and one["usage"]["prompt_tokens"] == num_prompt

    # max_tokens 0: the prompt alone, scored
    only = zero["choices"][0]
    assert only["text"] == prompt and only["finish_reason"] == "length"
    assert only["logprobs"]["tokens"] == logprobs["tokens"][:num_prompt]
    assert only["logprobs"]["token_logprobs"] == logprobs["token_logprobs"][:num_prompt]
    assert zero["usage"]["completion_tokens"] == 0 and zero["usage"]["prompt_tokens"] == num_prompt

    # streamed: the first chunk holds the prompt and its logprobs
    streamed = [e["choices"][0] for e in events if e["choices"]]
    assert "".join(c["text"] for c in streamed) == choice["text"]
    assert [lp for c in streamed if c["logprobs"] for lp in c["logprobs"]["token_logprobs"]] == \
        logprobs["token_logprobs"]
