"""The peer comparison's protocol runs end to end on atom_trio alone: rounds, quiet and loaded conditions, reports."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_compare_cpu_runs_rounds_under_both_conditions_and_reports_what_each_kept(tiny_llama_dir, tmp_path):
    env = {**os.environ, "ATOM_TRIO_PEERS_DIR": str(tmp_path)}
    command = [
        sys.executable, "-m", "benchmarks.peers.compare_cpu", "--engines", "atom_trio", "--model", str(tiny_llama_dir),
        "--dtype", "float32", "--num-prompts", "3", "--input-len", "8", "--output-len", "4", "--repeats", "1",
        "--rounds", "2", "--conditions", "quiet", "loaded", "--competing-load", "1", "--serving-loads", "2x2",
        "--max-model-len", "64",
    ]  # fmt: skip
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "== offline, loaded" in done.stdout and "atom_trio kept" in done.stdout
    assert "== serving, loaded: 2 prompts, concurrency 2, median of 2 round(s)" in done.stdout
    assert "output kept" in done.stdout

    summary = json.loads((tmp_path / "results" / "summary.json").read_text())
    offline, serving = summary["offline"]["atom_trio"], summary["serving"]["atom_trio"]
    assert len(offline) == len(serving) == 2  # one fresh process (and one fresh server) per round
    for result in offline:
        for condition in ("quiet", "loaded"):
            assert len(result[condition]["batch_output_tok_s"]) == 1
            assert result[condition]["bs1_decode_tok_s"][0] > 0
    for result in serving:
        for condition in ("quiet", "loaded"):
            assert result[condition]["2x2"]["completed"] == 2
            assert result[condition]["2x2"]["total_output_tokens"] == 2 * 4
    # The busy processes of the loaded runs are gone.
    running = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout.splitlines()
    assert f"{sys.executable} -c while True: pass" not in running
