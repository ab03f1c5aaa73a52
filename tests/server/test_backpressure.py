"""What a slow client and a full queue cost the real server (``atom-trio serve`` in a subprocess, tiny Llama).

- A client that stops reading a long stream: the server's response blocks on the socket while the engine
  goes on, and what it holds for that response stays one merged output (``http_pending_outputs``); once read,
  the stream's text is a fast reader's.
- The waiting queue counts requests, whatever their ``n``: an ``n=8`` request is one waiting request, and the
  request past ``--max-queued-requests`` gets 429 with ``Retry-After``.

One server serves the module, with one running sequence at a time so that requests queue behind a stream.
"""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path
from urllib.parse import urlsplit

import h11
import httpx
import pytest
import trio

from atom_trio.testing import ServerProcess, server_process

MAX_QUEUED = 2


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, tiny_llama_dir: Path) -> ServerProcess:
    log = tmp_path_factory.mktemp("server") / "server.log"
    args = ["--model", str(tiny_llama_dir), "--dtype", "float32", "--max-model-len", "2048",
            "--max-num-seqs", "1", "--max-queued-requests", str(MAX_QUEUED)]
    with server_process(args, log_path=log, ready_timeout=180) as proc:
        yield proc


def scrape(url: str) -> dict[str, float]:
    """The server's metrics that the tests read, summed over labels (one model; one reason where named)."""
    text = httpx.get(url + "/metrics", timeout=30).text
    wanted = {
        "atom_trio:http_pending_outputs": "pending",
        "atom_trio:num_requests_running": "running",
        "atom_trio:num_requests_waiting": "waiting",
        "atom_trio:kv_cache_usage_perc": "kv",
        'atom_trio:request_success_total{finished_reason="length"': "length",
    }
    values = dict.fromkeys(wanted.values(), 0.0)
    for line in text.splitlines():
        for prefix, key in wanted.items():
            if line.startswith(prefix + ("" if "{" in prefix else "{")):
                values[key] += float(line.rsplit(" ", 1)[1])
    return values


def sse_payloads(body: bytes) -> list[dict]:
    """The JSON ``data:`` events of an SSE body, in order; it must end with ``[DONE]``."""
    lines = [line[len("data: "):] for line in body.decode().split("\n") if line.startswith("data: ")]
    assert lines[-1] == "[DONE]", lines[-3:]
    return [json.loads(line) for line in lines[:-1]]


def streamed(events: list[dict]) -> tuple[str, list[str]]:
    """The text and the logprob tokens a completion stream carried."""
    text, tokens = "", []
    for event in events:
        for choice in event["choices"]:
            text += choice["text"]
            tokens += choice["logprobs"]["tokens"] if choice["logprobs"] else []
    return text, tokens


class StalledClient:
    """An HTTP/1.1 client on a raw socket with a small receive window, which reads only when told to."""

    def __init__(self, url: str) -> None:
        parts = urlsplit(url)
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connect: the advertised window
        self.sock.connect((parts.hostname, parts.port))
        self.sock.settimeout(120)
        self.conn = h11.Connection(h11.CLIENT)
        self.host = parts.netloc

    def post(self, path: str, payload: dict) -> int:
        """Send the request and read up to the response's status line and headers; the status."""
        data = json.dumps(payload).encode()
        headers = [("Host", self.host), ("Content-Type", "application/json"), ("Content-Length", str(len(data)))]
        for event in (h11.Request(method="POST", target=path, headers=headers), h11.Data(data=data),
                      h11.EndOfMessage()):
            self.sock.sendall(self.conn.send(event))
        while True:
            event = self._next_event()
            if isinstance(event, h11.Response):
                return event.status_code

    def read_body(self) -> bytes:
        body = b""
        while True:
            event = self._next_event()
            if isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, h11.EndOfMessage):
                return body

    def _next_event(self):
        while True:
            event = self.conn.next_event()
            if event is not h11.NEED_DATA:
                return event
            self.conn.receive_data(self.sock.recv(65536))

    def close(self) -> None:
        self.sock.close()


def test_a_stalled_reader_holds_one_merged_output_and_gets_the_whole_text(server: ServerProcess) -> None:
    # 20 alternatives a token make each event over 1 kB, so the socket's buffers fill within a few dozen tokens.
    max_tokens = 300
    body = {"prompt": "Once upon a time", "max_tokens": max_tokens, "ignore_eos": True, "temperature": 0,
            "logprobs": 20, "stream": True}
    with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=300) as response:
        fast = sse_payloads(response.read())
    fast_text, fast_tokens = streamed(fast)
    assert len(fast_tokens) == max_tokens

    before = scrape(server.url)
    client = StalledClient(server.url)
    try:
        assert client.post("/v1/completions", body) == 200
        # Not a byte read while the engine generates the whole stream: the server must hold it in one output.
        pending_seen = []
        deadline = time.monotonic() + 240
        while True:
            now = scrape(server.url)
            pending_seen.append(now["pending"])
            assert now["pending"] <= 1, pending_seen
            if now["length"] > before["length"]:
                break
            assert time.monotonic() < deadline, "the stalled stream did not finish generating"
            time.sleep(0.2)
        # The response is blocked on the socket with the rest of the stream in one output: the premise of
        # the test (were the kernel's buffers to take the whole stream, nothing would be held). The last
        # delta reaches it a moment after the engine counted the request finished.
        deadline = time.monotonic() + 10
        while scrape(server.url)["pending"] != 1:
            assert time.monotonic() < deadline, "the response took the whole stream: nothing was held back"
            time.sleep(0.1)
        slow = sse_payloads(client.read_body())
    finally:
        client.close()
    slow_text, slow_tokens = streamed(slow)
    assert slow_text == fast_text and slow_tokens == fast_tokens
    assert len(slow) < max_tokens / 2, f"{len(slow)} events: the deltas were not merged"
    assert slow[-1]["choices"][0]["finish_reason"] == "length"
    after = scrape(server.url)
    assert after["pending"] == 0 and after["kv"] == 0


async def wait_for(url: str, predicate, timeout: float = 120) -> dict[str, float]:
    with trio.fail_after(timeout):
        while True:
            values = await trio.to_thread.run_sync(scrape, url)
            if predicate(values):
                return values
            await trio.sleep(0.1)


async def test_the_queue_bound_counts_requests_not_sequences(server: ServerProcess) -> None:
    stream_body = {"prompt": "Hello there", "max_tokens": 2000, "ignore_eos": True, "stream": True}
    results: dict[str, httpx.Response] = {}
    async with httpx.AsyncClient(base_url=server.url, timeout=120) as http:

        async def post(name: str, payload: dict) -> None:
            results[name] = await http.post("/v1/completions", json=payload)

        async with http.stream("POST", "/v1/completions", json=stream_body) as running:
            lines = running.aiter_lines()  # kept referenced: a collected iterator would close the stream
            assert (await anext(lines)).startswith("data: ")
            async with trio.open_nursery() as nursery:
                # max_num_seqs=1: these wait behind the stream. Eight sequences are one waiting request...
                nursery.start_soon(post, "eight", {"prompt": "Hi", "max_tokens": 2, "n": 8, "seed": 1})
                waiting = await wait_for(server.url, lambda m: m["waiting"] == 1)
                assert waiting["running"] == 1
                # ... so another request still fits under max_queued_requests=2,
                nursery.start_soon(post, "one", {"prompt": "Hi", "max_tokens": 2})
                await wait_for(server.url, lambda m: m["waiting"] == MAX_QUEUED)
                # and the one after that is refused, with the time to wait.
                refused = await http.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 2})
                assert refused.status_code == 429
                assert refused.headers["Retry-After"] == "1"
                assert refused.json()["error"]["code"] == "engine_overloaded"
                await running.aclose()  # the stream's client leaves: the queue runs
        assert results["eight"].status_code == 200 and len(results["eight"].json()["choices"]) == 8
        assert results["one"].status_code == 200 and len(results["one"].json()["choices"]) == 1
    idle = await wait_for(server.url, lambda m: m["running"] == m["waiting"] == 0)
    assert idle["kv"] == 0 and idle["pending"] == 0
