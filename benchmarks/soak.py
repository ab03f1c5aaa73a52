"""Soak a real ``atom-trio serve`` with mixed, partly abandoned requests, and say whether it held.

    python -m benchmarks.soak --requests 5000 --concurrency 64 --json soak.json

Starts the server on the CPU with the default model (`SOAK_SERVER_ARGS`, plus ``--server-arg`` extras),
plays the mix of `atom_trio.testing.reliability.plan_request` at the given concurrency, waits for the
server to drain, prints the summary as JSON and exits 1 when the verdict is not clean: a request that
should have succeeded failed, a KV block stayed held, ``/health``'s p99 reached 50 ms, or resident
memory grew 5% or more over the second half. ``tests/reliability/test_soak.py`` runs the same soak at
a small scale (or at this one with ``ATOM_TRIO_RELIABILITY=full``).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from atom_trio.testing import server_process
from atom_trio.testing.reliability import SOAK_API_KEY, SOAK_SERVER_ARGS, SoakConfig, run_soak


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    defaults = SoakConfig()
    parser.add_argument("--requests", type=int, default=5000)
    parser.add_argument("--concurrency", type=int, default=defaults.concurrency)
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--max-tokens", type=int, default=defaults.max_tokens)
    parser.add_argument("--cancel-fraction", type=float, default=defaults.cancel_fraction)
    parser.add_argument("--server-arg", action="append", default=[], help="an extra flag for atom-trio serve")
    parser.add_argument("--json", type=Path, help="also write the summary here")
    args = parser.parse_args(argv)
    config = SoakConfig(requests=args.requests, concurrency=args.concurrency, seed=args.seed,
                        max_tokens=args.max_tokens, cancel_fraction=args.cancel_fraction, api_key=SOAK_API_KEY)
    with tempfile.TemporaryDirectory() as tmp:
        log = Path(tmp) / "server.log"
        with server_process([*SOAK_SERVER_ARGS, *args.server_arg], log_path=log) as server:
            report = run_soak(server.url, server.process.pid, config)
            exit_status = server.stop()
        problems = report.verdict()
        if exit_status != 0:
            problems.append(f"the server exited with {exit_status} after SIGTERM:\n{log.read_text()[-3000:]}")
    summary = {"command": " ".join(sys.argv), "server_args": [*SOAK_SERVER_ARGS, *args.server_arg],
               **report.summary(), "problems": problems, "failures": report.failures[:20]}
    text = json.dumps(summary, indent=1)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
