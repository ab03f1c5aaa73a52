"""Start-up of `atom-trio serve`: seconds to a healthy server, its logged phases, and the first request.

Each run is a fresh process. ``cold`` starts on an empty cache directory
(``ATOM_TRIO_CACHE``: the converted default model, the CPU kernels' build and
the Inductor/Triton compile caches all live there); ``warm`` starts again on the
cache the cold run filled. The network is left out of ``cold``: the default
model's GGUF, when a local cache already holds it, is copied into the empty
cache first, so the figure is conversion, not download.

``--tree DIR`` (repeatable) starts the server from another checkout of the
package (``PYTHONPATH=DIR``), which puts a before and an after in one run on one
machine.

Examples::

    python -m benchmarks.startup --runs 3                      # the default model on the CPU
    python -m benchmarks.startup --config llama-3.1-8b --tokenizer-from DIR --device cuda --level 3
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

from atom_trio._cache import cache_root
from atom_trio.testing import server_process
from atom_trio.testing.models import REAL_CONFIGS, write_model_dir

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
# "start-up took 8.6 s: model build 0.2 s, weight load 6.0 s, ..." (the runner's summary line).
SUMMARY = re.compile(r"start-up took ([\d.]+) s: (.*)")
PHASE = re.compile(r"([a-zA-Z -]+) ([\d.]+) s")
KERNEL_BUILD = "built the CPU decode attention kernel"


def start_once(tree: Path | None, cache: Path, serve_args: list[str], log_path: Path) -> dict:
    """One start: seconds from spawn to a 200 from /health, the runner's phases, and the first request's seconds."""
    env = {"ATOM_TRIO_CACHE": str(cache)}
    command = None
    if tree is not None:
        # -P: the server's working directory (this checkout) must not come before the tree on sys.path.
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(tree), os.environ.get("PYTHONPATH")]))
        command = [sys.executable, "-P", "-m", "atom_trio", "serve", "--host", "127.0.0.1", "--port", "{port}",
                   *serve_args]
    began = time.perf_counter()
    with server_process(serve_args, command=command, env=env, log_path=log_path, ready_timeout=900) as server:
        healthy = time.perf_counter() - began
        started_log = server.log()
        body = {"prompt": "The capital of France is", "max_tokens": 4}
        sent = time.perf_counter()
        response = httpx.post(server.url + "/v1/completions", json=body, timeout=600)
        first_request = time.perf_counter() - sent
        response.raise_for_status()
        after_log = server.log()
    result = {"healthy_s": round(healthy, 2), "first_request_s": round(first_request, 3)}
    match = SUMMARY.search(started_log)
    if match:
        result["runner_s"] = float(match.group(1))
        result["phases_s"] = {name.strip(): float(s) for name, s in PHASE.findall(match.group(2))}
    result["kernel_built_at_first_request"] = after_log.count(KERNEL_BUILD) > started_log.count(KERNEL_BUILD)
    return result


def seed_cache(cache: Path) -> None:
    """Put the default model's GGUF into an empty cache when the user's cache has it: cold then means conversion."""
    source = cache_root() / GGUF_NAME
    if source.is_file():
        shutil.copy2(source, cache / GGUF_NAME)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=2, help="cold+warm pairs per tree")
    parser.add_argument("--tree", type=Path, action="append", help="a checkout to start the server from (repeatable)")
    parser.add_argument("--config", choices=sorted(REAL_CONFIGS), help="real shapes with dummy weights (default: the default model)")
    parser.add_argument("--tokenizer-from", type=Path, help="a tokenizer directory for --config")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default=None, help="default: the server's")
    parser.add_argument("--level", type=int, default=None, help="compile level (default: the server's)")
    parser.add_argument("--extra", default="", help="more `atom-trio serve` flags, as one string")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)

    serve_args = ["--device", args.device, "--max-model-len", "2048"]
    work = Path(tempfile.mkdtemp(prefix="startup-"))
    if args.config:
        model_dir = write_model_dir(work / args.config, REAL_CONFIGS[args.config], tokenizer_from=args.tokenizer_from)
        serve_args += ["--model", str(model_dir), "--load-format", "dummy"]
    if args.dtype:
        serve_args += ["--dtype", args.dtype]
    if args.level is not None:
        serve_args += ["--level", str(args.level)]
    serve_args += args.extra.split()

    trees: list[Path | None] = args.tree or [None]
    results: dict = {"serve_args": serve_args, "runs": {}}
    for run in range(args.runs):
        for tree in trees:  # interleaved, so a drifting machine does not favour one tree
            name = str(tree or "this checkout")
            cache = work / f"cache-{run}-{len(results['runs'].get(name, []))}-{abs(hash(name))}"
            cache.mkdir()
            seed_cache(cache)
            pair = {}
            for mode in ("cold", "warm"):
                pair[mode] = start_once(tree, cache, serve_args, work / f"{mode}.log")
                print(name, mode, json.dumps(pair[mode]), flush=True)
            results["runs"].setdefault(name, []).append(pair)
            shutil.rmtree(cache, ignore_errors=True)
    for name, pairs in results["runs"].items():
        for mode in ("cold", "warm"):
            healthy = [p[mode]["healthy_s"] for p in pairs]
            print(f"{name}: {mode} median {statistics.median(healthy):.2f} s to healthy ({healthy})")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return results


if __name__ == "__main__":
    main()
