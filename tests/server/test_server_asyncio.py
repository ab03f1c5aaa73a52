"""``hypercorn atom_trio.app:app`` serves the default model under either worker class.

The asyncio worker (hypercorn's default) is the interesting one: the trio side
runs there as a guest on asyncio's loop.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import httpx
import pytest

from atom_trio.testing import server_process


@pytest.mark.parametrize("worker_class", ["asyncio", "trio"])
def test_hypercorn_cli_serves_completions_and_streams(tmp_path: Path, worker_class: str) -> None:
    command = [sys.executable, "-m", "hypercorn", "--worker-class", worker_class, "--bind", "127.0.0.1:{port}",
               "atom_trio.app:app"]
    env = {"ATOM_TRIO_DTYPE": "float32", "ATOM_TRIO_MAX_MODEL_LEN": "256", "ATOM_TRIO_API_KEY": "k"}
    with server_process(command=command, env=env, log_path=tmp_path / "hypercorn.log") as server:
        headers = {"Authorization": "Bearer k"}
        body = {"prompt": "The capital of France is", "max_tokens": 3, "temperature": 0, "ignore_eos": True}
        plain = httpx.post(server.url + "/v1/completions", json=body, headers=headers, timeout=120)
        assert plain.status_code == 200, plain.text
        assert plain.json()["usage"]["completion_tokens"] == 3
        with httpx.stream("POST", server.url + "/v1/completions", json={**body, "stream": True}, headers=headers,
                          timeout=120) as response:
            events = [line[6:] for line in response.iter_lines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]"
        assert "".join(json.loads(e)["choices"][0]["text"] for e in events[:-1]) == plain.json()["choices"][0]["text"]
        assert httpx.get(server.url + "/v1/models").status_code == 401  # the env var configured the key
    assert server.process.returncode == 0, server.log()[-3000:]
    assert "Traceback" not in server.log() and "Error" not in server.log(), server.log()[-3000:]
