"""The real ``atom-trio serve --executor process`` in a subprocess: worker deaths and signals leave nothing behind.

Each test starts the server as a user would, finds its worker processes in
/proc, and then kills a worker mid-stream or signals the server. Whatever
happens, the in-flight request must end with a clear error, the server must
stop answering as healthy and exit, and no process of the tree may survive.
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import httpx
import pytest

from atom_trio.testing import ServerProcess, server_process

EXIT_TIMEOUT = 30.0
"""Bound on every wait for a process to start, die or be reaped (the engine's own graces are 3-5 s)."""


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


def serve_args(model_dir: Path, tensor_parallel_size: int = 1) -> list[str]:
    return [
        "--model", str(model_dir), "--executor", "process", "--device", "cpu", "--dtype", "float32",
        "--max-model-len", "512", "--num-kv-blocks", "64", "--tensor-parallel-size", str(tensor_parallel_size),
        "--shutdown-timeout", "10",
    ]  # fmt: skip


# Long enough that the stream is still running when the worker dies (the tiny model is fast even on CPU).
LONG_STREAM = {"prompt": "Once upon a time", "max_tokens": 480, "ignore_eos": True, "temperature": 0.0, "stream": True}


def stream_events(response: httpx.Response):
    """The SSE ``data:`` payloads of a stream, decoded (``[DONE]`` stays a string)."""
    for line in response.iter_lines():
        if line.startswith("data: "):
            payload = line.removeprefix("data: ")
            yield payload if payload == "[DONE]" else json.loads(payload)


@pytest.mark.parametrize(
    ("model", "tensor_parallel_size", "victim"),
    [("tiny_llama_dir", 1, 0), ("tiny_qwen3_dir", 2, 1)],
    ids=["tp1-rank0", "tp2-rank1"],
)
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
        assert f"worker rank {victim} exited with status -9" in error["message"], error["message"]
        assert "WorkerDied" in error["message"]
        finished = [c["finish_reason"] for e in events if isinstance(e, dict) for c in e.get("choices", ())]
        assert "length" not in finished  # it was cut short, not run to max_tokens

        health = []
        deadline = time.monotonic() + EXIT_TIMEOUT
        while server.process.poll() is None:  # /health says 503 until the server exits
            try:
                health.append(httpx.get(server.url + "/health", timeout=2).status_code)
            except httpx.TransportError:
                health.append(None)  # stopped listening, about to exit
            assert time.monotonic() < deadline, "the server outlived its engine"
            time.sleep(0.05)
        assert 503 in health and set(health) <= {503, None}, health
        assert server.process.returncode == 1
        assert "WorkerDied" in server.log()
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
