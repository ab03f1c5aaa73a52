"""The real server (``atom-trio serve`` in a subprocess, default model) driven by the openai client and httpx.

One server process serves the whole module (model loads are the slow part);
the last test drains it with SIGTERM.
"""

from __future__ import annotations

import json
import re
import signal
import time
from pathlib import Path

import httpx
import openai
import pytest
import transformers
import trio

from atom_trio.config import DEFAULT_MODEL_NAME
from atom_trio.testing import ServerProcess, server_process

KEY = "test-key"
MAX_MODEL_LEN = 256
MAX_REQUEST_BYTES = 65536
PROMPT = "The capital of France is"
STATS_INTERVAL = 1.0


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> ServerProcess:
    log = tmp_path_factory.mktemp("server") / "server.log"
    args = ["--dtype", "float32", "--max-model-len", str(MAX_MODEL_LEN), "--api-key", KEY,
            "--max-request-bytes", str(MAX_REQUEST_BYTES), "--shutdown-timeout", "60",
            "--profile-dir", str(log.parent / "profiles"), "--log-stats-interval", str(STATS_INTERVAL)]
    with server_process(args, log_path=log) as proc:
        yield proc


@pytest.fixture
def client(server: ServerProcess) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=120)


@pytest.fixture
def http(server: ServerProcess) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url=server.url, headers={"Authorization": f"Bearer {KEY}"}, timeout=120)


async def sse_events(response: httpx.Response) -> list:
    """The ``data:`` payloads of an SSE response, decoded (``[DONE]`` kept as a string)."""
    events = []
    async for line in response.aiter_lines():
        if line.startswith("data: "):
            data = line[len("data: "):]
            events.append(data if data == "[DONE]" else json.loads(data))
    return events


async def test_models_health_version(client: openai.AsyncOpenAI, http: httpx.AsyncClient) -> None:
    models = await client.models.list()
    assert [m.id for m in models.data] == [DEFAULT_MODEL_NAME]
    assert models.data[0].max_model_len == MAX_MODEL_LEN
    assert (await http.get("/health")).status_code == 200
    assert (await http.get("/version")).json()["version"]


async def test_completion(client: openai.AsyncOpenAI, http: httpx.AsyncClient) -> None:
    result = await client.completions.create(model=DEFAULT_MODEL_NAME, prompt=PROMPT, max_tokens=4,
                                             temperature=0, extra_body={"ignore_eos": True})
    choice = result.choices[0]
    assert result.object == "text_completion" and result.id.startswith("cmpl-")
    assert choice.finish_reason == "length" and choice.text
    prompt_tokens = (await http.post("/tokenize", json={"prompt": PROMPT})).json()["count"]
    assert result.usage.prompt_tokens == prompt_tokens
    assert result.usage.completion_tokens == 4 and result.usage.total_tokens == prompt_tokens + 4
    assert result.usage.prompt_tokens_details.cached_tokens >= 0


async def test_chat(client: openai.AsyncOpenAI) -> None:
    result = await client.chat.completions.create(
        model=DEFAULT_MODEL_NAME, messages=[{"role": "user", "content": "Say hello."}], max_tokens=4, temperature=0)
    choice = result.choices[0]
    assert result.object == "chat.completion"
    assert choice.message.role == "assistant" and choice.message.content
    assert choice.finish_reason in ("stop", "length") and result.usage.completion_tokens <= 4


async def test_streaming_matches_plain_and_reports_usage(http: httpx.AsyncClient) -> None:
    body = {"prompt": PROMPT, "max_tokens": 5, "temperature": 0, "ignore_eos": True}
    plain = (await http.post("/v1/completions", json=body)).json()
    options = {"include_usage": True, "continuous_usage_stats": True}
    async with http.stream("POST", "/v1/completions", json={**body, "stream": True, "stream_options": options}) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        events = await sse_events(response)
    assert events[-1] == "[DONE]"
    chunks, usage = events[:-2], events[-2]
    assert all(c["object"] == "text_completion" for c in chunks)
    running = [c["usage"]["completion_tokens"] for c in chunks]  # continuous_usage_stats: usage so far
    assert running == sorted(running) and running[-1] == 5
    assert "".join(c["choices"][0]["text"] for c in chunks) == plain["choices"][0]["text"]
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == 5
    assert usage["usage"] == plain["usage"] | {"prompt_tokens_details": usage["usage"]["prompt_tokens_details"]}


async def test_chat_stream_with_two_choices(client: openai.AsyncOpenAI) -> None:
    stream = await client.chat.completions.create(
        model=DEFAULT_MODEL_NAME, messages=[{"role": "user", "content": "Count."}], max_tokens=3, n=2,
        stream=True, stream_options={"include_usage": True}, seed=3)
    texts: dict[int, str] = {0: "", 1: ""}
    roles, finished, usage = set(), set(), None
    async for chunk in stream:
        assert chunk.object == "chat.completion.chunk"
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            if choice.delta.role:
                roles.add(choice.index)
            texts[choice.index] += choice.delta.content or ""
            if choice.finish_reason:
                finished.add(choice.index)
    assert roles == finished == {0, 1}
    assert all(texts.values())
    assert usage is not None and 2 <= usage.completion_tokens <= 6


async def test_seed_reproduces_samples_and_n_gives_n_choices(client: openai.AsyncOpenAI) -> None:
    async def sample(seed: int) -> list[str]:
        result = await client.completions.create(model=DEFAULT_MODEL_NAME, prompt="Once upon a time", max_tokens=5,
                                                 temperature=1.0, seed=seed, n=2, extra_body={"ignore_eos": True})
        assert [c.index for c in result.choices] == [0, 1]
        assert result.usage.completion_tokens == 10
        return [c.text for c in result.choices]

    assert await sample(1234) == await sample(1234)


async def test_stop_strings(client: openai.AsyncOpenAI) -> None:
    full = (await client.completions.create(model=DEFAULT_MODEL_NAME, prompt=PROMPT, max_tokens=8, temperature=0,
                                            extra_body={"ignore_eos": True})).choices[0].text
    stop = full.strip()[len(full.strip()) // 2:][:2]
    cut = await client.completions.create(model=DEFAULT_MODEL_NAME, prompt=PROMPT, max_tokens=8, temperature=0,
                                          stop=[stop])
    assert cut.choices[0].text == full[: full.index(stop)]
    assert cut.choices[0].finish_reason == "stop"
    assert cut.choices[0].model_extra["stop_reason"] == stop
    kept = await client.completions.create(model=DEFAULT_MODEL_NAME, prompt=PROMPT, max_tokens=8, temperature=0,
                                           stop=stop, extra_body={"include_stop_str_in_output": True})
    assert kept.choices[0].text == full[: full.index(stop) + len(stop)]


async def test_stop_token_ids_and_logit_bias(client: openai.AsyncOpenAI, http: httpx.AsyncClient) -> None:
    token = (await http.post("/tokenize", json={"prompt": " banana", "add_special_tokens": False})).json()["tokens"][0]
    result = await client.completions.create(
        model=DEFAULT_MODEL_NAME, prompt=PROMPT, max_tokens=5, temperature=0, logit_bias={str(token): 100},
        extra_body={"stop_token_ids": [token]})
    choice = result.choices[0]
    assert choice.finish_reason == "stop" and choice.model_extra["stop_reason"] == token
    assert result.usage.completion_tokens == 1


async def test_logprobs(client: openai.AsyncOpenAI) -> None:
    result = await client.completions.create(model=DEFAULT_MODEL_NAME, prompt=PROMPT, max_tokens=3, temperature=0,
                                             logprobs=2, extra_body={"ignore_eos": True})
    lp = result.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 3
    assert "".join(lp.tokens) == result.choices[0].text
    assert lp.text_offset == [0, len(lp.tokens[0]), len(lp.tokens[0]) + len(lp.tokens[1])]
    for token, logprob, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert logprob <= 0 and 1 <= len(top) <= 2
        assert top[token] == pytest.approx(logprob, abs=1e-4) and logprob >= max(top.values()) - 1e-4  # greedy

    chat = await client.chat.completions.create(
        model=DEFAULT_MODEL_NAME, messages=[{"role": "user", "content": "Hi"}], max_tokens=2, temperature=0,
        logprobs=True, top_logprobs=3)
    content = chat.choices[0].logprobs.content
    assert len(content) == chat.usage.completion_tokens
    for entry in content:
        assert len(entry.top_logprobs) == 3 and entry.bytes == list(entry.token.encode())
        assert entry.logprob == pytest.approx(entry.top_logprobs[0].logprob, abs=1e-4)


async def test_prompt_shapes_and_echo(client: openai.AsyncOpenAI, http: httpx.AsyncClient) -> None:
    ids = (await http.post("/tokenize", json={"prompt": PROMPT})).json()["tokens"]
    assert (await http.post("/detokenize", json={"tokens": ids})).json()["prompt"] == PROMPT
    unknown = await http.post("/detokenize", json={"tokens": [10**9]})
    assert unknown.status_code == 400 and unknown.json()["error"]["param"] == "tokens"
    assert unknown.json()["error"]["message"].startswith("tokens holds a token id outside [0, ")
    by_text = await client.completions.create(model=DEFAULT_MODEL_NAME, prompt=PROMPT, max_tokens=2, temperature=0)
    by_ids = await client.completions.create(model=DEFAULT_MODEL_NAME, prompt=ids, max_tokens=2, temperature=0)
    assert by_ids.choices[0].text == by_text.choices[0].text
    two = await client.completions.create(model=DEFAULT_MODEL_NAME, prompt=[PROMPT, "1, 2, 3,"], max_tokens=2,
                                          temperature=0)
    assert [c.index for c in two.choices] == [0, 1] and two.choices[0].text == by_text.choices[0].text
    echoed = await client.completions.create(model=DEFAULT_MODEL_NAME, prompt=PROMPT, max_tokens=2, temperature=0,
                                             echo=True)
    assert echoed.choices[0].text == PROMPT + by_text.choices[0].text
    # lm-evaluation-harness's log-likelihood request: the prompt scored, nothing generated
    scored = await client.completions.create(model=DEFAULT_MODEL_NAME, prompt=PROMPT + " Paris", max_tokens=0,
                                             echo=True, logprobs=1, temperature=0)
    lp = scored.choices[0].logprobs
    assert scored.choices[0].text == "".join(lp.tokens) == PROMPT + " Paris"
    assert scored.usage.completion_tokens == 0 and len(lp.tokens) == scored.usage.prompt_tokens
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert all(logprob < 0 for logprob in lp.token_logprobs[1:])
    assert lp.top_logprobs[-1] == {" Paris": pytest.approx(lp.token_logprobs[-1])}  # the greedy continuation
    messages = [{"role": "user", "content": "Hi"}]
    chat_ids = (await http.post("/tokenize", json={"messages": messages})).json()
    assert chat_ids["count"] == len(chat_ids["tokens"]) > 3 and chat_ids["max_model_len"] == MAX_MODEL_LEN
    chat = (await http.post("/v1/chat/completions", json={"messages": messages, "max_tokens": 1})).json()
    assert chat["usage"]["prompt_tokens"] == chat_ids["count"]  # /tokenize sees what generation sees


async def test_metrics_count_what_was_served(http: httpx.AsyncClient) -> None:
    def sample(text: str, name: str) -> float:
        return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name + "{"))

    before = (await http.get("/metrics")).text
    await http.post("/v1/completions", json={"prompt": "Hello", "max_tokens": 3, "ignore_eos": True})
    after = (await http.get("/metrics")).text
    assert sample(after, "atom_trio:generation_tokens_total") - sample(before, "atom_trio:generation_tokens_total") == 3
    for name in ("atom_trio:time_to_first_token_seconds_count", "atom_trio:e2e_request_latency_seconds_count",
                 'atom_trio:request_success_total{finished_reason="length"'):
        assert sample(after, name.split("{")[0]) - sample(before, name.split("{")[0]) >= 1
    assert sample(after, "atom_trio:inter_token_latency_seconds_count") >= 2
    assert sample(after, "atom_trio:num_requests_running") == 0
    assert 'model_name="SmolLM2-135M-Instruct"' in after and "atom_trio:kv_cache_usage_perc" in after


# ---- errors -----------------------------------------------------------------

def assert_error(response: httpx.Response, status: int, param: str | None = None) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    if param is not None:
        assert error["param"] == param
    return error


async def test_malformed_and_mistyped_bodies(http: httpx.AsyncClient) -> None:
    assert_error(await http.post("/v1/completions", content=b'{"prompt": "x",'), 400)
    error = assert_error(await http.post("/v1/completions", json={"prompt": "x", "max_tokens": "5", "n": 1.5}), 400,
                         "max_tokens")
    assert "n: expected integer" in error["message"]
    assert_error(await http.post("/v1/chat/completions", json={"messages": "hi"}), 400, "messages")
    assert_error(await http.post("/v1/completions", json={"prompt": "x", "temperature": -1}), 400, "temperature")


async def test_unknown_model_is_404(client: openai.AsyncOpenAI) -> None:
    with pytest.raises(openai.NotFoundError, match="nope"):
        await client.completions.create(model="nope", prompt="x", max_tokens=1)


async def test_context_overflow_gives_the_numbers(client: openai.AsyncOpenAI) -> None:
    with pytest.raises(openai.BadRequestError, match=f"1000 > {MAX_MODEL_LEN} - "):
        await client.completions.create(model=DEFAULT_MODEL_NAME, prompt=PROMPT, max_tokens=1000)
    with pytest.raises(openai.BadRequestError, match=f"maximum context length is {MAX_MODEL_LEN}"):
        await client.completions.create(model=DEFAULT_MODEL_NAME, prompt="hello " * 300, max_tokens=1)


async def test_unsupported_fields_are_refused(client: openai.AsyncOpenAI) -> None:
    with pytest.raises(openai.BadRequestError, match="best_of"):
        await client.completions.create(model=DEFAULT_MODEL_NAME, prompt="x", best_of=2, max_tokens=1)


async def test_what_this_server_cannot_honour_is_refused_by_name(http: httpx.AsyncClient) -> None:
    """``auto`` tool choice (the default with tools) without a tool parser, and ``reasoning_effort`` for a chat
    template that does not read it (the default model's), would be served as if they had not been asked."""
    messages = [{"role": "user", "content": "x"}]
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    for body in ({"tools": tools}, {"tools": tools, "tool_choice": "auto"}):
        error = assert_error(await http.post("/v1/chat/completions", json={"messages": messages, **body}), 400)
        assert error["param"] == "tool_choice" and "--enable-auto-tool-choice" in error["message"]
    error = assert_error(await http.post("/v1/chat/completions",
                                         json={"messages": messages, "reasoning_effort": "low"}), 400)
    assert error["param"] == "reasoning_effort"
    answer = await http.post("/v1/chat/completions", json={"messages": messages, "tools": tools, "max_tokens": 2,
                                                           "tool_choice": "none"})
    assert answer.status_code == 200 and answer.json()["choices"][0]["message"]["content"]


async def test_oversized_body_is_413(http: httpx.AsyncClient) -> None:
    error = assert_error(await http.post("/v1/completions", json={"prompt": "x" * MAX_REQUEST_BYTES}), 413)
    assert error["code"] == "request_too_large"


async def test_api_key_guards_v1_only(server: ServerProcess) -> None:
    async with httpx.AsyncClient(base_url=server.url) as anonymous:
        assert_error(await anonymous.get("/v1/models"), 401)
        assert_error(await anonymous.get("/v1/models", headers={"Authorization": "Bearer wrong"}), 401)
        assert (await anonymous.get("/health")).status_code == 200
    with pytest.raises(openai.AuthenticationError):
        await openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0).models.list()


async def test_tokenizer_info_is_the_tokenizers_config_as_vllm_serves_it(
    server: ServerProcess, http: httpx.AsyncClient, default_model_dir: Path
) -> None:
    tokenizer = transformers.AutoTokenizer.from_pretrained(default_model_dir)
    info = (await http.get("/tokenizer_info")).json()
    assert info["tokenizer_class"] == type(tokenizer).__name__
    assert info["chat_template"] == tokenizer.chat_template
    assert (info["eos_token"], info["bos_token"], info["pad_token"]) == (
        tokenizer.eos_token, tokenizer.bos_token, tokenizer.pad_token)
    assert info["model_max_length"] == tokenizer.model_max_length
    assert "vocab_file" not in info and "merges_file" not in info
    # What lm-eval's remote tokenizer derives from it: the special tokens' ids, through /tokenize.
    eos = await http.post("/tokenize", json={"prompt": info["eos_token"], "add_special_tokens": False})
    assert eos.json()["tokens"] == [tokenizer.eos_token_id]
    async with httpx.AsyncClient(base_url=server.url) as anonymous:
        assert_error(await anonymous.get("/tokenizer_info"), 401)
    document = (await http.get("/openapi.json")).json()
    assert document["paths"]["/tokenizer_info"]["get"]["security"] == [{"apiKey": []}]


async def test_access_log_has_a_line_per_request_and_hypercorn_says_where_once(
    server: ServerProcess, http: httpx.AsyncClient
) -> None:
    assert (await http.get("/version?probe=access-log")).status_code == 200
    await trio.sleep(0.5)
    log = server.log()
    assert re.search(r'127\.0\.0\.1:\d+ "GET /version\?probe=access-log HTTP/1\.1" 200 OK \d+\.\d+s', log), log[-3000:]
    assert log.count("Running on http://") == 1, log[-3000:]


def stats_lines(server: ServerProcess) -> list[str]:
    return [line for line in server.log().splitlines() if "generation throughput" in line]


async def test_stats_line_while_busy_and_none_while_idle(server: ServerProcess, client: openai.AsyncOpenAI) -> None:
    await trio.sleep(2.5 * STATS_INTERVAL)  # the line of the earlier tests' work comes out
    idle = len(stats_lines(server))
    await trio.sleep(4 * STATS_INTERVAL)
    assert len(stats_lines(server)) == idle, stats_lines(server)[idle:]
    await client.completions.create(model=DEFAULT_MODEL_NAME, prompt=PROMPT, max_tokens=48, temperature=0,
                                    extra_body={"ignore_eos": True})
    await trio.sleep(2.5 * STATS_INTERVAL)
    busy = stats_lines(server)[idle:]
    assert busy, server.log()[-3000:]
    numbers = [re.search(r"prompt throughput: ([\d.]+) tokens/s, generation throughput: ([\d.]+) tokens/s, "
                         r"running: (\d+) reqs, waiting: (\d+) reqs, KV cache usage: [\d.]+%, "
                         r"prefix cache hit rate: [\d.]+%", line) for line in busy]
    assert all(numbers), busy
    assert sum(float(m[2]) for m in numbers) > 0 and sum(float(m[1]) for m in numbers) > 0


# ---- last: SIGTERM drains the server ------------------------------------------

async def test_sigterm_drains_in_flight_streams(server: ServerProcess, http: httpx.AsyncClient) -> None:
    body = {"prompt": PROMPT, "max_tokens": 12, "ignore_eos": True, "stream": True}
    async with http.stream("POST", "/v1/completions", json=body) as response:
        lines = response.aiter_lines()
        first = await anext(lines)
        assert first.startswith("data: ")
        server.process.send_signal(signal.SIGTERM)
        rest = [line async for line in lines if line.startswith("data: ")]
    assert rest[-1] == "data: [DONE]"
    assert json.loads(rest[-2][len("data: "):])["choices"][0]["finish_reason"] == "length"
    text = "".join(json.loads(line[6:])["choices"][0]["text"] for line in [first, *rest[:-1]])
    assert text
    # A new request during or after the drain is refused (503 or no connection), never served.
    try:
        late = await http.post("/v1/completions", json={"prompt": "x", "max_tokens": 1})
        assert late.status_code == 503
    except httpx.TransportError:
        pass
    deadline = time.monotonic() + 60
    while server.process.poll() is None and time.monotonic() < deadline:
        await trio.sleep(0.1)
    assert server.process.returncode == 0, server.log()[-3000:]
    assert "Traceback" not in server.log(), server.log()[-3000:]
