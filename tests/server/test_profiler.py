"""``/start_profile`` and ``/stop_profile`` on the real ``atom-trio serve``: every rank traces the model's steps.

One server per executor, each with the tiny Llama on the CPU: the thread
executor (the model on the server's runner thread) and the process executor
with two tensor-parallel ranks (one worker process each). A trace is checked
for what only the ranks that run the model can record: every step range
(`STEP_EVENT`) holds the model's ``aten::linear`` calls.
"""

from __future__ import annotations

import json
import time
from bisect import bisect_left, bisect_right
from collections import Counter
from pathlib import Path

import httpx
import openai
import pytest

from atom_trio.runner.profiling import MAX_STEPS, STEP_EVENT
from atom_trio.testing import ServerProcess, server_process

KEY = "profile-key"
MAX_SECONDS = 15.0
"""The servers' time limit, three times what the tests that stop a profile themselves take: the longest,
296 steps on two ranks, took 5 s with the 2-core machine's load average at 5 (the time-limit test waits it out,
once per executor)."""

# Two ranks, with the GPU's default of asynchronous scheduling: a profile must come between launched steps.
EXECUTORS = {
    "thread": ["--executor", "thread"],
    "process-tp2": ["--executor", "process", "-tp", "2", "--async-scheduling"],
}


def serve_args(model_dir: Path, *extra: str) -> list[str]:
    return ["--model", str(model_dir), "--device", "cpu", "--dtype", "float32", "--max-model-len", "512",
            "--num-kv-blocks", "64", *extra]  # fmt: skip


@pytest.fixture(scope="module", params=list(EXECUTORS))
def executor(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture(scope="module")
def server(executor: str, tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp(f"profile-{executor}")
    args = serve_args(tiny_llama_dir, *EXECUTORS[executor], "--api-key", KEY,
                      "--profile-dir", str(root / "traces"), "--profile-max-seconds", str(MAX_SECONDS))  # fmt: skip
    with server_process(args, log_path=root / "server.log", ready_timeout=300) as proc:
        yield proc


@pytest.fixture
def http(server: ServerProcess):
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {KEY}"}, timeout=120) as client:
        yield client


@pytest.fixture
def client(server: ServerProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=120)


def complete(client: openai.OpenAI, max_tokens: int) -> None:
    completion = client.completions.create(
        model=client.models.list().data[0].id, prompt="Once upon a time", max_tokens=max_tokens, temperature=0,
        extra_body={"ignore_eos": True},
    )
    assert completion.usage.completion_tokens == max_tokens


def trace_events(path: str) -> list[dict]:
    return json.loads(Path(path).read_text())["traceEvents"]


PACKED_LINEAR = "mkldnn::_linear_pointwise"
"""A CPU linear layer's matmul on oneDNN-packed weights (`atom_trio.layers.linear.pack_cpu_weight`)."""


def steps_with_ops(path: str) -> tuple[int, Counter]:
    """The number of steps a trace holds, and the operators it recorded inside them, by name.

    Asserts that each step range holds at least one of the model's linear layers' calls.
    """
    events = [e for e in trace_events(path) if e.get("ph") == "X"]
    steps = [e for e in events if e["name"] == STEP_EVENT]
    ops = sorted((e for e in events if e.get("cat") == "cpu_op"), key=lambda e: e["ts"])
    starts = [op["ts"] for op in ops]
    inside: Counter = Counter()
    for step in steps:
        during = ops[bisect_left(starts, step["ts"]) : bisect_right(starts, step["ts"] + step["dur"])]
        names = Counter(op["name"] for op in during if op["tid"] == step["tid"])
        assert names["aten::linear"] + names[PACKED_LINEAR] > 0, f"a step without the model's ops in {path}"
        inside.update(names)
    return len(steps), inside


def assert_traces(executor: str, traces: list[str]) -> None:
    """One trace per rank, the rank in its name, under the profile directory."""
    world_size = 2 if executor == "process-tp2" else 1
    assert [Path(t).name.rsplit("-", 1)[1] for t in traces] == [f"rank{r}.trace.json" for r in range(world_size)]
    assert len({Path(t).parent for t in traces}) == 1


def test_every_rank_traces_the_model_in_each_step(executor: str, http: httpx.Client, client: openai.OpenAI):
    started = http.post("/start_profile")
    assert started.status_code == 200, started.text
    traces = started.json()["traces"]
    assert_traces(executor, traces)
    again = http.post("/start_profile")
    assert again.status_code == 409 and again.json()["error"]["code"] == "profile_running"

    complete(client, 4)
    complete(client, 4)
    stopped = http.post("/stop_profile")
    assert stopped.status_code == 200, stopped.text
    assert stopped.json()["traces"] == traces and stopped.json()["stopped_by"] == "request"

    counts = []
    for trace in traces:
        steps, ops = steps_with_ops(trace)
        counts.append(steps)
        assert steps >= 8  # two requests of 4 tokens: a prefill and 3 decodes each
        assert ops["aten::mm"] + ops["aten::addmm"] + ops[PACKED_LINEAR] > 0
        assert ops["aten::scaled_dot_product_attention"] > 0
    assert len(set(counts)) == 1  # every rank ran every step
    again = http.post("/stop_profile")
    assert again.status_code == 409 and again.json()["error"]["code"] == "profile_not_running"
    assert http.get("/health").status_code == 200


def test_a_profile_starts_and_stops_between_the_steps_of_a_running_stream(http: httpx.Client):
    # 400 tokens: a second or more of steps after the first, so that the profile starts mid-stream.
    body = {"prompt": "Once upon a time", "max_tokens": 400, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True}}  # fmt: skip
    with http.stream("POST", "/v1/completions", json=body) as response:
        events = (json.loads(line[6:]) for line in response.iter_lines() if line.startswith("data: {"))
        assert next(events)["choices"]
        traces = http.post("/start_profile").json()["traces"]
        time.sleep(0.3)
        stopped = http.post("/stop_profile")
        assert stopped.status_code == 200, stopped.text
        rest = list(events)
    # The stream went on undisturbed and ran to its end.
    assert rest[-1]["usage"]["completion_tokens"] == 400
    assert rest[-2]["choices"][0]["finish_reason"] == "length"
    assert stopped.json()["traces"] == traces
    for trace in traces:
        assert steps_with_ops(trace)[0] >= 1
    assert http.get("/health").status_code == 200


def test_a_profile_records_at_most_max_steps(http: httpx.Client, client: openai.OpenAI):
    traces = http.post("/start_profile").json()["traces"]
    complete(client, MAX_STEPS + 40)
    stopped = http.post("/stop_profile").json()
    assert stopped["traces"] == traces and stopped["stopped_by"] == "request"
    for trace in traces:
        assert steps_with_ops(trace)[0] == MAX_STEPS


def test_a_profile_stops_at_its_time_limit(server: ServerProcess, http: httpx.Client, client: openai.OpenAI):
    started = time.monotonic()
    traces = http.post("/start_profile").json()["traces"]
    complete(client, 4)
    # The traces are written when the limit strikes, before anyone asks for them.
    deadline = started + MAX_SECONDS + 30
    while not all(Path(t).exists() for t in traces):
        assert time.monotonic() < deadline, server.log()[-3000:]
        time.sleep(0.2)
    assert time.monotonic() - started >= MAX_SECONDS
    stopped = http.post("/stop_profile")
    assert stopped.status_code == 200, stopped.text
    assert stopped.json()["traces"] == traces and stopped.json()["stopped_by"] == "time limit"
    for trace in traces:
        assert steps_with_ops(trace)[0] >= 4
    assert http.post("/stop_profile").status_code == 409  # answered once
    assert "reached its time limit" in server.log()


def test_a_failing_profiler_is_a_500_and_the_server_serves_on(
    server: ServerProcess, http: httpx.Client, client: openai.OpenAI
):
    traces = http.post("/start_profile").json()["traces"]
    directory = Path(traces[0]).parent
    # Where the traces go is now a file: no rank can write its trace.
    moved = directory.rename(directory.with_name("moved-away"))
    directory.write_text("")
    try:
        complete(client, 2)
        failed = http.post("/stop_profile")
        assert failed.status_code == 500 and failed.json()["error"]["code"] == "profiler_failed"
        assert "rank 0" in failed.json()["error"]["message"]
    finally:
        directory.unlink()
        moved.rename(directory)
    assert http.get("/health").status_code == 200
    complete(client, 2)
    # Every rank's session ended with the failure: a new one starts.
    again = http.post("/start_profile")
    assert again.status_code == 200, again.text
    stopped = http.post("/stop_profile").json()["traces"]
    assert all(Path(t).exists() for t in stopped)


@pytest.mark.parametrize("route", ["/start_profile", "/stop_profile"])
def test_profiling_needs_the_key(server: ServerProcess, route: str):
    for headers in ({}, {"Authorization": "Bearer wrong"}):
        response = httpx.post(server.url + route, headers=headers, timeout=30)
        assert response.status_code == 401 and response.json()["error"]["code"] == "invalid_api_key"


def test_without_a_profile_dir_there_are_no_profiling_routes(tiny_llama_dir: Path, tmp_path: Path):
    with server_process(serve_args(tiny_llama_dir), log_path=tmp_path / "server.log", ready_timeout=300) as server:
        for route in ("/start_profile", "/stop_profile"):
            response = httpx.post(server.url + route, timeout=30)
            assert response.status_code == 404 and response.json()["error"]["code"] == "not_found"
