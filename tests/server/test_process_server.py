"""The real ``atom-trio serve --executor process`` in a subprocess: worker deaths and signals leave nothing behind.

Each test starts the server as a user would, finds its worker processes in
/proc, and then kills or stops a worker (idle or mid-stream) or signals the
server. A worker that dies or hangs must end every in-flight request with a
clear error, turn /health to 503 and end the process with a non-zero status;
SIGTERM must let running requests finish, refuse new ones and exit 0. Either
way no process of the tree may survive.
"""

from __future__ import annotations

import itertools
import json
import os
import signal
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from atom_trio.testing import ServerProcess, server_process

EXIT_TIMEOUT = 30.0
"""Bound on every wait for a process to start, die or be reaped (the engine's own graces are 3-5 s)."""

DEATH_EXIT_BOUND = 10.0
"""How soon after a worker's death the server must have exited. The target is 2 s (0.45-0.97 s measured on
a 2-core box under a load of 5); the margin is for a busier box."""

HANG_TIMEOUT = 3.0
"""``--worker-timeout`` for the hang tests: long for a step of the tiny model, short for a test."""


def _stat(pid: int) -> tuple[str, int] | None:
    """(state, ppid) of ``pid``, or None once it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return fields[0], int(fields[1])


def alive(pid: int) -> bool:
    """Running, as opposed to gone or a zombie (whose reaper may be a container's init that never reaps)."""
    stat = _stat(pid)
    return stat is not None and stat[0] not in ("Z", "X")


def descendants(root: int) -> dict[int, bytes]:
    """Every live process below ``root``, with its command line."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (stat := _stat(int(entry.name))) is not None and stat[0] not in ("Z", "X"):
            children.setdefault(stat[1], []).append(int(entry.name))
    found: dict[int, bytes] = {}
    stack = list(children.get(root, ()))
    while stack:
        pid = stack.pop()
        try:
            found[pid] = Path(f"/proc/{pid}/cmdline").read_bytes()
        except (FileNotFoundError, ProcessLookupError):
            continue
        stack.extend(children.get(pid, ()))
    return found


def worker_pids(server: ServerProcess, count: int) -> list[int]:
    """The server's ``atom_trio.executor.worker`` children, rank order (the executor starts rank 0 first)."""
    deadline = time.monotonic() + EXIT_TIMEOUT
    while True:
        workers = sorted(pid for pid, cmd in descendants(server.process.pid).items() if b"atom_trio.executor.worker" in cmd)
        if len(workers) == count:
            return workers
        assert time.monotonic() < deadline, f"expected {count} workers, found {workers}:\n{server.log()[-3000:]}"
        time.sleep(0.05)


def assert_all_gone(pids: list[int], server: ServerProcess) -> None:
    deadline = time.monotonic() + EXIT_TIMEOUT
    while survivors := [pid for pid in pids if alive(pid)]:
        assert time.monotonic() < deadline, f"left behind: {survivors}:\n{server.log()[-3000:]}"
        time.sleep(0.05)


def serve_args(model_dir: Path, tensor_parallel_size: int = 1, *more: str) -> list[str]:
    """Flags for a CPU server with worker processes; ``more`` comes last, so it overrides."""
    return [
        "--model", str(model_dir), "--executor", "process", "--device", "cpu", "--dtype", "float32",
        "--max-model-len", "512", "--num-kv-blocks", "64", "--tensor-parallel-size", str(tensor_parallel_size),
        "--shutdown-timeout", "10", *more,
    ]  # fmt: skip


def health_until_exit(server: ServerProcess, timeout: float = EXIT_TIMEOUT) -> list[int | None]:
    """Poll /health until the server exits; what it answered (None: no longer listening)."""
    health: list[int | None] = []
    deadline = time.monotonic() + timeout
    while server.process.poll() is None:
        try:
            health.append(httpx.get(server.url + "/health", timeout=2).status_code)
        except httpx.TransportError:
            health.append(None)  # stopped listening, about to exit
        assert time.monotonic() < deadline, f"the server outlived its engine:\n{server.log()[-3000:]}"
        time.sleep(0.01)
    return health


def death_lines(server: ServerProcess) -> list[str]:
    """The engine's ERROR lines announcing its death."""
    return [line for line in server.log().splitlines() if "ERROR atom_trio.engine: the engine died:" in line]


def running_requests(server: ServerProcess) -> float:
    """The server's ``num_requests_running`` gauge."""
    families = text_string_to_metric_families(httpx.get(server.url + "/metrics", timeout=5).text)
    return sum(s.value for f in families if f.name == "atom_trio:num_requests_running" for s in f.samples)


# (model, tensor-parallel size, the rank to kill): rank 0 alone, and a rank whose death must take rank 0 along.
TOPOLOGIES = pytest.mark.parametrize(
    ("model", "tensor_parallel_size", "victim"),
    [("tiny_llama_dir", 1, 0), ("tiny_qwen3_dir", 2, 1)],
    ids=["tp1-rank0", "tp2-rank1"],
)


# Long enough that the stream is still running when the worker dies (the tiny model is fast even on CPU).
LONG_STREAM = {"prompt": "Once upon a time", "max_tokens": 480, "ignore_eos": True, "temperature": 0.0, "stream": True}


def stream_events(response: httpx.Response):
    """The SSE ``data:`` payloads of a stream, decoded (``[DONE]`` stays a string)."""
    for line in response.iter_lines():
        if line.startswith("data: "):
            payload = line.removeprefix("data: ")
            yield payload if payload == "[DONE]" else json.loads(payload)


@TOPOLOGIES
def test_killed_worker_ends_stream_with_error_and_server_exits(
    request: pytest.FixtureRequest, tmp_path: Path, model: str, tensor_parallel_size: int, victim: int
) -> None:
    """SIGKILL a worker mid-stream: the stream ends with a 503-style error event naming the rank and status,
    /health never answers 200 again, ``atom-trio serve`` exits non-zero, and no process of the tree is left."""
    args = serve_args(request.getfixturevalue(model), tensor_parallel_size)
    with server_process(args, log_path=tmp_path / "server.log", ready_timeout=120) as server:
        workers = worker_pids(server, tensor_parallel_size)
        tree = [server.process.pid, *descendants(server.process.pid)]
        events: list = []
        with httpx.stream("POST", server.url + "/v1/completions", json=LONG_STREAM, timeout=EXIT_TIMEOUT) as response:
            assert response.status_code == 200
            received = stream_events(response)
            events.append(next(received))
            assert events[0]["choices"][0]["text"] is not None  # generation is under way
            os.kill(workers[victim], signal.SIGKILL)
            try:
                events.extend(received)
            except (httpx.RemoteProtocolError, httpx.ReadError):
                pass  # the server may go away before finishing the stream; the error event must precede that

        errors = [e for e in events if isinstance(e, dict) and "error" in e]
        assert errors, f"no error event in the stream; last events {events[-3:]}:\n{server.log()[-3000:]}"
        error = errors[0]["error"]
        assert error["code"] == "engine_unavailable" and error["type"] == "service_unavailable_error"
        assert f"worker rank {victim} exited with status -9 (SIGKILL)" in error["message"], error["message"]
        assert "WorkerDied" in error["message"]
        finished = [c["finish_reason"] for e in events if isinstance(e, dict) for c in e.get("choices", ())]
        assert "length" not in finished  # it was cut short, not run to max_tokens

        health = health_until_exit(server)  # /health says 503 until the server exits
        assert set(health) <= {503, None}, health
        assert server.process.returncode == 1
        assert len(death_lines(server)) == 1, server.log()[-3000:]
        assert_all_gone(tree, server)


@TOPOLOGIES
def test_worker_killed_while_idle_ends_the_server_at_once(
    request: pytest.FixtureRequest, tmp_path: Path, model: str, tensor_parallel_size: int, victim: int
) -> None:
    """SIGKILL a worker while no request runs: without waiting for a request, the engine dies and logs one ERROR
    line naming the rank and the signal, /health never answers 200 again, ``atom-trio serve`` exits non-zero
    within `DEATH_EXIT_BOUND` (under 1 s measured), and no process of the tree is left."""
    args = serve_args(request.getfixturevalue(model), tensor_parallel_size)
    with server_process(args, log_path=tmp_path / "server.log", ready_timeout=120) as server:
        workers = worker_pids(server, tensor_parallel_size)
        tree = [server.process.pid, *descendants(server.process.pid)]
        killed = time.monotonic()
        os.kill(workers[victim], signal.SIGKILL)
        health = health_until_exit(server)
        took = time.monotonic() - killed
        print(f"exited {took:.2f} s after the worker's SIGKILL", file=sys.stderr)
        assert server.process.returncode == 1, server.log()[-3000:]
        assert took < DEATH_EXIT_BOUND, server.log()[-3000:]
        after_death = list(itertools.dropwhile(lambda status: status == 200, health))  # 200 until it is noticed
        assert set(after_death) <= {503, None}, health
        (line,) = death_lines(server)
        assert line.endswith(f"WorkerDied: worker rank {victim} exited with status -9 (SIGKILL)"), line
        assert_all_gone(tree, server)


@pytest.mark.parametrize("busy", [False, True], ids=["idle", "mid-stream"])
def test_hung_worker_fails_the_request_and_ends_the_server(tmp_path: Path, tiny_llama_dir: Path, busy: bool) -> None:
    """SIGSTOP a worker: the step it does not answer fails after ``--worker-timeout``, which ends that request
    with a 503 naming the timeout, and the server exits non-zero leaving no process behind. An idle worker's
    hang is found by the next step: nothing asks an idle worker anything."""
    args = serve_args(tiny_llama_dir, 1, "--worker-timeout", str(HANG_TIMEOUT))
    with server_process(args, log_path=tmp_path / "server.log", ready_timeout=120) as server:
        (worker,) = worker_pids(server, 1)
        tree = [server.process.pid, *descendants(server.process.pid)]
        expected = f"worker rank 0 did not answer: no answer within worker_timeout={HANG_TIMEOUT} s"
        if busy:
            with httpx.stream("POST", server.url + "/v1/completions", json=LONG_STREAM, timeout=EXIT_TIMEOUT) as response:
                assert response.status_code == 200
                received = stream_events(response)
                first = next(received)
                assert first["choices"][0]["text"] is not None  # generation is under way
                os.kill(worker, signal.SIGSTOP)
                stopped = time.monotonic()
                events = []
                try:
                    events.extend(received)
                except (httpx.RemoteProtocolError, httpx.ReadError):
                    pass
            errors = [e["error"] for e in events if isinstance(e, dict) and "error" in e]
            assert errors and errors[0]["code"] == "engine_unavailable", events[-3:]
            message = errors[0]["message"]
        else:
            os.kill(worker, signal.SIGSTOP)
            stopped = time.monotonic()
            assert httpx.get(server.url + "/health", timeout=2).status_code == 200  # nothing can tell yet
            refused = httpx.post(server.url + "/v1/completions", json={"prompt": "Hi", "max_tokens": 4},
                                 timeout=EXIT_TIMEOUT)
            assert refused.status_code == 503, refused.text
            message = refused.json()["error"]["message"]
        assert time.monotonic() - stopped >= HANG_TIMEOUT * 0.9  # the deadline, not an early guess
        assert expected in message, message
        health = health_until_exit(server)
        assert set(health) <= {503, None}, health
        assert server.process.returncode == 1, server.log()[-3000:]
        (line,) = death_lines(server)
        assert line.endswith(f"WorkerDied: {expected}"), line
        assert_all_gone(tree, server)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_stops_server_and_workers(tmp_path: Path, tiny_llama_dir: Path, signum: signal.Signals) -> None:
    """SIGTERM, or Ctrl-C (SIGINT to the whole foreground group, workers included), drains and exits 0,
    and no process of the tree is left."""
    with server_process(serve_args(tiny_llama_dir), log_path=tmp_path / "server.log", ready_timeout=120) as server:
        workers = worker_pids(server, 1)
        tree = [server.process.pid, *descendants(server.process.pid)]
        completion = httpx.post(
            server.url + "/v1/completions", json={"prompt": "Hi", "max_tokens": 4, "ignore_eos": True}, timeout=30
        )
        assert completion.status_code == 200 and completion.json()["usage"]["completion_tokens"] == 4
        # Ctrl-C reaches every process of the terminal's foreground group; SIGTERM only the server.
        for pid in [server.process.pid, *workers] if signum == signal.SIGINT else [server.process.pid]:
            os.kill(pid, signum)
        assert server.process.wait(EXIT_TIMEOUT) == 0, server.log()[-3000:]
        assert_all_gone(tree, server)


def test_sigterm_under_load_finishes_running_requests_refuses_new_ones_and_exits_0(
    tmp_path: Path, tiny_llama_dir: Path
) -> None:
    """SIGTERM while streams and a plain request generate: each runs to ``max_tokens`` and ends with [DONE],
    requests arriving during the drain get 503, /health answers 503, the server exits 0, and no process of
    the tree is left.

    The worker is stopped (SIGSTOP) from just before the signal until the newcomer's 503, so the load is
    still running then however fast the machine; it resumes well within ``--worker-timeout``.
    """
    max_tokens, streams = 64, 4
    # Room for every request at once, so that all of them are running when the signal comes.
    args = serve_args(tiny_llama_dir, 1, "--num-kv-blocks", "128", "--shutdown-timeout", "120")
    body = {"prompt": "Once upon a time", "max_tokens": max_tokens, "ignore_eos": True, "temperature": 0.0}
    with server_process(args, log_path=tmp_path / "server.log", ready_timeout=120) as server:
        (worker,) = worker_pids(server, 1)
        tree = [server.process.pid, *descendants(server.process.pid)]
        running = threading.Barrier(streams + 1, timeout=EXIT_TIMEOUT)

        def stream() -> list:
            with httpx.Client(timeout=EXIT_TIMEOUT * 4) as http:
                with http.stream("POST", server.url + "/v1/completions", json={**body, "stream": True}) as response:
                    assert response.status_code == 200
                    received = stream_events(response)
                    events = [next(received)]
                    running.wait()
                    events.extend(received)
                    return events

        def plain() -> httpx.Response:
            return httpx.post(server.url + "/v1/completions", json=body, timeout=EXIT_TIMEOUT * 4)

        with ThreadPoolExecutor(streams + 1) as pool:
            streamed = [pool.submit(stream) for _ in range(streams)]
            answered = pool.submit(plain)
            running.wait()
            deadline = time.monotonic() + EXIT_TIMEOUT
            while running_requests(server) < streams + 1:
                assert time.monotonic() < deadline, "the plain request never started"
                time.sleep(0.02)
            os.kill(worker, signal.SIGSTOP)
            try:
                server.process.send_signal(signal.SIGTERM)
                # The listener stays open during the drain: a newcomer gets a clear 503, not a refused connection.
                deadline = time.monotonic() + EXIT_TIMEOUT
                while (health := httpx.get(server.url + "/health", timeout=5)).status_code == 200:
                    assert time.monotonic() < deadline, "the signal was not handled"
                    time.sleep(0.01)
                assert health.status_code == 503
                late = httpx.post(server.url + "/v1/completions", json=body, timeout=5)
                assert late.status_code == 503 and late.json()["error"]["code"] == "engine_unavailable", late.text
                assert "shutting down" in late.json()["error"]["message"]
                assert not any(future.done() for future in [*streamed, answered])
            finally:
                os.kill(worker, signal.SIGCONT)
            results = [future.result() for future in streamed]
            completion = answered.result()

        assert server.process.wait(EXIT_TIMEOUT) == 0, server.log()[-3000:]
        for events in results:
            assert events[-1] == "[DONE]", events[-3:]
            assert not [e for e in events if isinstance(e, dict) and "error" in e], events[-3:]
            chunks = [c for e in events if isinstance(e, dict) for c in e["choices"]]
            assert chunks[-1]["finish_reason"] == "length"
        assert completion.status_code == 200, completion.text
        assert completion.json()["usage"]["completion_tokens"] == max_tokens
        assert completion.json()["choices"][0]["finish_reason"] == "length"
        assert "ERROR" not in server.log(), server.log()[-3000:]
        assert_all_gone(tree, server)


def test_sigterm_ends_requests_still_running_after_the_grace_with_an_error_and_exits_0(
    tmp_path: Path, tiny_llama_dir: Path
) -> None:
    """A stream still generating when ``--shutdown-timeout`` is over ends with an error event and [DONE]
    (not a cut connection); the server exits 0 and no process of the tree is left.

    The worker is stopped (SIGSTOP) while the grace runs out, so the stream is still running then however
    fast the machine; it resumes once the stream has ended, so the workers stop as on any shutdown.
    """
    args = serve_args(tiny_llama_dir, 1, "--shutdown-timeout", "1")
    with server_process(args, log_path=tmp_path / "server.log", ready_timeout=120) as server:
        (worker,) = worker_pids(server, 1)
        tree = [server.process.pid, *descendants(server.process.pid)]
        with httpx.stream("POST", server.url + "/v1/completions", json=LONG_STREAM, timeout=EXIT_TIMEOUT) as response:
            assert response.status_code == 200
            received = stream_events(response)
            events = [next(received)]
            os.kill(worker, signal.SIGSTOP)
            try:
                server.process.send_signal(signal.SIGTERM)
                events.extend(received)
            finally:
                os.kill(worker, signal.SIGCONT)
        assert server.process.wait(EXIT_TIMEOUT) == 0, server.log()[-3000:]
        assert events[-1] == "[DONE]", events[-3:]
        error = events[-2]["error"]
        assert error["code"] == "engine_unavailable" and "shut down" in error["message"], error
        finished = [c["finish_reason"] for e in events if isinstance(e, dict) for c in e.get("choices", ())]
        assert "length" not in finished  # it was cut short, not run to max_tokens
        assert "shutdown_timeout=1.0 s is over: ending 1 running requests" in server.log()
        assert_all_gone(tree, server)


def test_worker_killed_while_idle_under_plain_hypercorn_turns_health_to_503(
    tmp_path: Path, tiny_llama_dir: Path
) -> None:
    """Under ``hypercorn atom_trio.app:app`` (asyncio worker, trio as a guest) nothing ends the process on the
    engine's death, but /health and every request answer 503 at once, the death is logged once, and a
    SIGTERM later leaves no process behind."""
    command = [sys.executable, "-m", "hypercorn", "--bind", "127.0.0.1:{port}", "atom_trio.app:app"]
    env = {"ATOM_TRIO_MODEL": str(tiny_llama_dir), "ATOM_TRIO_EXECUTOR": "process", "ATOM_TRIO_DEVICE": "cpu",
           "ATOM_TRIO_DTYPE": "float32", "ATOM_TRIO_MAX_MODEL_LEN": "512", "ATOM_TRIO_NUM_KV_BLOCKS": "64"}
    with server_process(command=command, env=env, log_path=tmp_path / "server.log", ready_timeout=120) as server:
        (worker,) = worker_pids(server, 1)
        tree = [server.process.pid, *descendants(server.process.pid)]
        os.kill(worker, signal.SIGKILL)
        deadline = time.monotonic() + DEATH_EXIT_BOUND
        while httpx.get(server.url + "/health", timeout=2).status_code == 200:
            assert time.monotonic() < deadline, server.log()[-3000:]
            time.sleep(0.01)
        refused = httpx.post(server.url + "/v1/completions", json={"prompt": "Hi", "max_tokens": 2}, timeout=10)
        assert refused.status_code == 503, refused.text
        assert "worker rank 0 exited with status -9 (SIGKILL)" in refused.json()["error"]["message"]
        assert server.process.poll() is None  # hypercorn keeps serving the 503s
        assert server.log().count("the engine died: WorkerDied: worker rank 0 exited with status -9 (SIGKILL)") == 1
        assert server.stop(EXIT_TIMEOUT) == 0, server.log()[-3000:]
        assert_all_gone(tree, server)
