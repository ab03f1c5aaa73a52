"""`atom-trio serve` on a cached default model: every start-up phase logged, and the CPU kernels built before the first request."""

from __future__ import annotations

import httpx

from atom_trio.runner.startup import StartupClock
from atom_trio.testing import server_process

BUILD_LINE = "built the CPU decode attention kernel"


def test_serve_builds_the_cpu_kernels_at_start_up_not_at_the_first_request(tmp_path, default_model_dir):
    # A cache that holds the converted model but no kernel build: start-up must build it.
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / default_model_dir.name).symlink_to(default_model_dir)
    env = {"ATOM_TRIO_CACHE": str(cache), "ATOM_TRIO_CPU_KERNELS": "1"}
    args = ["--device", "cpu", "--max-model-len", "256"]
    with server_process(args, env=env, log_path=tmp_path / "server.log") as server:
        started = server.log()
        body = {"model": "SmolLM2-135M-Instruct", "prompt": "The capital of France is", "max_tokens": 4}
        response = httpx.post(server.url + "/v1/completions", json=body, timeout=120)
        assert response.status_code == 200, response.text
        after_request = server.log()

    (summary,) = [line for line in started.splitlines() if "start-up took" in line]
    for phase in StartupClock.PHASES:
        assert f"{phase} " in summary
    assert started.count(BUILD_LINE) == 1
    assert started.index(BUILD_LINE) < started.index("start-up took")  # built during the warm-up
    assert after_request.count(BUILD_LINE) == 1  # and the request built nothing
    assert list((cache / "cpu_kernels").glob("*.so"))
    # The access log has one line per request, with its status (written once the response is out).
    (access,) = [line for line in server.log().splitlines() if "atom_trio.access" in line and "/v1/completions" in line]
    assert '"POST /v1/completions HTTP/1.1" 200 OK' in access
