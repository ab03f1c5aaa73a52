"""Faults an operator meets, each with its documented outcome, no orphan process and no stuck stream.

Faults tested elsewhere, not repeated here (docs/reliability.md lists them all with their outcomes):

- a worker SIGKILLed mid-stream, and while idle (also under plain hypercorn): tests/server/test_process_server.py
  ``test_killed_worker_ends_stream_with_error_and_server_exits``,
  ``test_worker_killed_while_idle_ends_the_server_at_once``,
  ``test_worker_killed_while_idle_under_plain_hypercorn_turns_health_to_503``;
- a worker hung (SIGSTOP) past ``--worker-timeout``, idle and mid-stream:
  ``test_hung_worker_fails_the_request_and_ends_the_server``;
- SIGTERM under load, and past ``--shutdown-timeout``:
  ``test_sigterm_under_load_finishes_running_requests_refuses_new_ones_and_exits_0``,
  ``test_sigterm_ends_requests_still_running_after_the_grace_with_an_error_and_exits_0``;
- one full queue, in process: tests/server/test_server_engine.py
  ``test_disconnect_frees_kv_full_queue_is_429_dead_engine_is_503``, and the bound counting requests, not
  samples: tests/server/test_backpressure.py ``test_the_queue_bound_counts_requests_not_sequences``.

Here: out of memory in a step, a storm of client disconnects, and a burst far past the queue whose
clients honour Retry-After.
"""

from __future__ import annotations

import concurrent.futures
import json
import random
import socket
import threading
import time
from collections import Counter
from pathlib import Path

import httpx
import pytest
import torch
import trio

from atom_trio.config import EngineConfig
from atom_trio.errors import EngineDeadError
from atom_trio.server import ServerSettings, serve
from atom_trio.testing import ServerProcess, server_process
from atom_trio.testing.reliability import scrape_metrics, wait_drained

BOUND = 60.0
"""Every client call must end within this (a stuck stream would not); steps of the tiny model take
milliseconds, seconds on the loaded 2-core box."""


def tiny_serve_args(model_dir: Path, *extra: str) -> list[str]:
    return ["--model", str(model_dir), "--device", "cpu", "--dtype", "float32", "--max-model-len", "1024",
            "--shutdown-timeout", "10", *extra]


def sse_events(lines: list[str]) -> list:
    return [line[6:] if line == "data: [DONE]" else json.loads(line[6:]) for line in lines if line.startswith("data: ")]


# ---- out of memory in a step ----------------------------------------------------------------------------

async def test_out_of_memory_in_a_step_ends_requests_with_503_and_ends_serve(
    tiny_llama_dir: Path, inject_step_fault
) -> None:
    """``torch.OutOfMemoryError`` from a step (thread executor, as on the CPU) is a step failure like any
    other: the engine dies, every running request ends with a 503 naming the error (an error event and
    [DONE] for streams), /health answers 503, and `serve` ends with `EngineDeadError`, so ``atom-trio
    serve`` exits non-zero for its supervisor to restart it; the runner's thread ends with it."""
    config = EngineConfig(model=str(tiny_llama_dir), dtype="float32", max_model_len=1024, executor="thread",
                          device="cpu")
    settings = ServerSettings(host="127.0.0.1", port=0, shutdown_timeout=5)
    oom = torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB (injected)")
    long = {"prompt": "Once upon a time", "max_tokens": 900, "ignore_eos": True}
    streams: list[list] = []
    plain: list[httpx.Response] = []
    ended: list[BaseException] = []
    health: list[int] = []

    async def run_server(task_status: trio.TaskStatus = trio.TASK_STATUS_IGNORED) -> None:
        try:
            await serve(config, settings, task_status=task_status)
        except* EngineDeadError as group:
            ended.append(group)

    async def stream(http: httpx.AsyncClient, started: trio.Semaphore) -> None:
        lines = []
        try:
            async with http.stream("POST", "/v1/completions", json={**long, "stream": True}) as response:
                assert response.status_code == 200
                async for line in response.aiter_lines():
                    lines.append(line)
                    if len(lines) == 1:
                        started.release()
        except (httpx.RemoteProtocolError, httpx.ReadError):
            pass  # the server may close the connection after the error event
        streams.append(sse_events(lines))

    async with trio.open_nursery() as nursery:
        serving = await nursery.start(run_server)
        engine = serving.state.engine
        async with httpx.AsyncClient(base_url=serving.urls[0], timeout=BOUND) as http:
            with trio.fail_after(BOUND):
                async with trio.open_nursery() as clients:
                    started = trio.Semaphore(0)
                    for _ in range(3):
                        clients.start_soon(stream, http, started)
                    clients.start_soon(_post, http, long, plain)
                    for _ in range(3):
                        await started.acquire()
                    while engine.stats().num_running < 4:  # the plain request runs too
                        await trio.sleep(0.01)
                    inject_step_fault(engine.executor.runner, oom)
                    await engine.wait_dead()
                    health.append((await http.get("/health")).status_code)
        with trio.fail_after(BOUND):
            while not ended:  # serve() ends by itself
                await trio.sleep(0.01)

    assert health == [503]
    assert len(streams) == 3 and len(plain) == 1
    for events in streams:
        assert events[-1] == "[DONE]", events[-3:]
        error = events[-2]["error"]
        assert error["code"] == "engine_unavailable" and "OutOfMemoryError" in error["message"], error
        assert "length" not in [c["finish_reason"] for e in events[:-2] for c in e["choices"]]
    assert plain[0].status_code == 503 and "out of memory" in plain[0].json()["error"]["message"]
    assert ended[0].exceptions[0].__cause__ is oom or "OutOfMemoryError" in repr(ended[0].exceptions[0])
    with trio.fail_after(BOUND):
        while any(t.name == "atom-trio runner" for t in threading.enumerate()):
            await trio.sleep(0.05)


async def _post(http: httpx.AsyncClient, body: dict, into: list) -> None:
    into.append(await http.post("/v1/completions", json=body))


# ---- a storm of client disconnects -----------------------------------------------------------------------

@pytest.fixture(scope="module")
def storm_server(tmp_path_factory: pytest.TempPathFactory, tiny_llama_dir: Path) -> ServerProcess:
    log = tmp_path_factory.mktemp("storm") / "server.log"
    with server_process(tiny_serve_args(tiny_llama_dir, "--num-kv-blocks", "512"), log_path=log) as proc:
        yield proc


def _half_request(url: str, rng: random.Random) -> None:
    """Send a request's headers and part of its body, then hang up."""
    host, port = url.removeprefix("http://").split(":")
    body = json.dumps({"prompt": "Hello", "max_tokens": 500, "ignore_eos": True}).encode()
    with socket.create_connection((host, int(port)), timeout=BOUND) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n" % len(body) + body[: rng.randrange(len(body))])
        time.sleep(rng.uniform(0, 0.2))


async def _storm_client(url: str, rng: random.Random, outcomes: Counter) -> None:
    """One client that gives up: mid-stream, before the answer, before sending its whole body."""
    kind = rng.choice(["stream", "stream", "plain", "half"])
    body = {"prompt": f"Tell me a story about {rng.randrange(100)}", "max_tokens": rng.choice([50, 500]),
            "ignore_eos": True, "n": rng.choice([1, 2]), "temperature": 1.0}
    if kind == "half":
        await trio.to_thread.run_sync(_half_request, url, rng)
    else:
        async with httpx.AsyncClient(base_url=url, timeout=BOUND) as http:
            with trio.move_on_after(rng.uniform(0.0, 1.0)):
                if kind == "plain":
                    await http.post("/v1/completions", json=body)
                else:
                    async with http.stream("POST", "/v1/completions", json={**body, "stream": True}) as response:
                        async for _ in response.aiter_lines():
                            pass
    outcomes[kind] += 1


async def test_disconnect_storm_aborts_every_request_and_frees_every_block(storm_server: ServerProcess) -> None:
    """Three waves of 64 clients that all hang up (mid-stream, before the answer, mid-body): the server
    aborts their requests, every KV block comes back, nothing is left running, waiting or undelivered,
    /health stays 200, and the next request is answered in full."""
    rng = random.Random(16)
    outcomes: Counter = Counter()
    health: list[int] = []
    before = scrape_metrics(storm_server.url).get("request_success_total", 0.0)

    async def probe(cancel: trio.CancelScope) -> None:
        async with httpx.AsyncClient(timeout=BOUND) as http:
            with cancel:
                while True:
                    health.append((await http.get(storm_server.url + "/health")).status_code)
                    await trio.sleep(0.05)

    with trio.fail_after(BOUND * 2):
        async with trio.open_nursery() as nursery:
            probing = trio.CancelScope()
            nursery.start_soon(probe, probing)
            for _ in range(3):
                async with trio.open_nursery() as wave:
                    for _ in range(64):
                        wave.start_soon(_storm_client, storm_server.url, random.Random(rng.random()), outcomes)
            probing.cancel()
    assert sum(outcomes.values()) == 192 and set(outcomes) == {"stream", "plain", "half"}
    assert health and set(health) == {200}
    drained = await trio.to_thread.run_sync(lambda: wait_drained(storm_server.url, timeout=BOUND))
    assert drained["request_success_total:abort"] > 0, drained
    assert drained["request_success_total"] > before
    answer = httpx.post(storm_server.url + "/v1/completions", timeout=BOUND,
                        json={"prompt": "Hello", "max_tokens": 8, "ignore_eos": True, "n": 2})
    assert answer.status_code == 200 and answer.json()["usage"]["completion_tokens"] == 16
    assert "Traceback" not in storm_server.log() and " ERROR " not in storm_server.log(), storm_server.log()[-3000:]


# ---- a burst far past the queue -------------------------------------------------------------------------

def test_burst_past_the_queue_gets_429_with_retry_after_and_all_succeed_on_retry(
    tmp_path: Path, tiny_llama_dir: Path
) -> None:
    """16 clients at once against room for 2 running and 2 waiting requests: the rest get 429 with
    ``Retry-After`` (no 5xx, no dropped connection); clients that wait that long and retry all get their
    whole answer, and then every block is free."""
    args = tiny_serve_args(tiny_llama_dir, "--max-num-seqs", "4", "--max-queued-requests", "2")
    body = {"prompt": "Count with me:", "max_tokens": 16, "ignore_eos": True, "n": 2}
    statuses: Counter = Counter()
    lock = threading.Lock()

    def client(url: str) -> dict:
        with httpx.Client(timeout=BOUND) as http:
            for _ in range(200):
                response = http.post(url + "/v1/completions", json=body)
                with lock:
                    statuses[response.status_code] += 1
                if response.status_code != 429:
                    break
                assert response.json()["error"]["code"] == "engine_overloaded"
                time.sleep(float(response.headers["Retry-After"]))
            assert response.status_code == 200, response.text
            return response.json()

    with server_process(args, log_path=tmp_path / "server.log") as server:
        with concurrent.futures.ThreadPoolExecutor(16) as pool:
            futures = [pool.submit(client, server.url) for _ in range(16)]
            answers = [future.result(timeout=BOUND * 4) for future in futures]  # none stuck, none failed
        print(f"full queue: answers {dict(statuses)}")
        assert set(statuses) == {200, 429} and statuses[200] == 16, statuses
        assert all(a["usage"]["completion_tokens"] == 32 for a in answers)
        wait_drained(server.url)
        assert server.stop() == 0, server.log()[-3000:]
