"""Soak a real ``atom-trio serve`` (the default model on the CPU) with 64 clients at once.

The mix and the checks are `atom_trio.testing.reliability`'s, shared with ``python -m benchmarks.soak``, which
runs the full scale docs/reliability.md records. CI runs 120 short requests (every kind the mix has);
``ATOM_TRIO_RELIABILITY=full`` runs 5,000.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from atom_trio.testing import server_process
from atom_trio.testing.reliability import SOAK_API_KEY, SOAK_SERVER_ARGS, SoakConfig, run_soak, scale


@pytest.mark.slow
def test_soak_succeeds_frees_every_block_and_keeps_health_fast(tmp_path: Path) -> None:
    config = SoakConfig(requests=scale(120, 5000), max_tokens=scale(8, 24), api_key=SOAK_API_KEY)
    with server_process(SOAK_SERVER_ARGS, log_path=tmp_path / "server.log") as server:
        report = run_soak(server.url, server.process.pid, config)
        print(json.dumps(report.summary()))
        exit_status = server.stop()
    assert report.verdict() == [], server.log()[-3000:]
    assert report.sent == config.requests and report.succeeded + report.cancelled == config.requests
    assert report.cancelled > 0 and report.drained["request_success_total:abort"] > 0  # clients did leave
    assert report.drained["prefix_cache_hits_total"] > 0  # the shared prefixes were shared
    assert exit_status == 0, server.log()[-3000:]  # and SIGTERM after all that still drains cleanly
