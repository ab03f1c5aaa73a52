"""lm-evaluation-harness against the real server, checked against lm-eval's own HF backend.

The real ``lm_eval`` command runs a small multiple-choice task shipped beside
this file (lm_eval_task/: eleven log-likelihood requests) twice: once with
``local-completions`` against ``atom-trio serve`` with the default model, given
nothing but the served name and the URL (lm-eval reads the tokenizer from
``/tokenizer_info`` and ``/tokenize``, so nothing is fetched from the hub), and
once with its ``hf`` backend on the same weights. Both run in float32, so each
continuation's log-likelihood agrees to within float32 rounding of the two
implementations, and every greedy flag is the same.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from atom_trio.config import DEFAULT_MODEL_NAME
from atom_trio.testing import server_process

TASK_DIR = Path(__file__).parent / "lm_eval_task"
TASK = "atom_trio_tiny"
TOLERANCE = 1e-4


def run_lm_eval(model: str, model_args: str, output: Path) -> dict[tuple[int, int], tuple[float, bool]]:
    """Run the ``lm_eval`` command on the task; (doc id, choice) -> (log-likelihood, is greedy) of each request."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    command = [sys.executable, "-m", "lm_eval", "--model", model, "--model_args", model_args, "--tasks", TASK,
               "--include_path", str(TASK_DIR), "--device", "cpu", "--batch_size", "1", "--log_samples",
               "--output_path", str(output)]
    # From the task's directory: its YAML names the data file relative to it.
    result = subprocess.run(command, cwd=TASK_DIR, env=env, capture_output=True, text=True, timeout=900, check=False)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    (samples,) = output.rglob(f"samples_{TASK}_*.jsonl")
    found = {}
    for line in samples.read_text().splitlines():
        sample = json.loads(line)
        for choice, response in enumerate(sample["resps"]):
            log_likelihood, greedy = response[0]
            found[sample["doc_id"], choice] = (float(log_likelihood), str(greedy) == "True")
    return found


def test_local_completions_log_likelihoods_match_lm_evals_hf_backend(
    tmp_path: Path, default_model_dir: Path
) -> None:
    # On the CPU, as the reference is: a GPU's float32 matmuls may round differently (TF32).
    with server_process(["--dtype", "float32", "--device", "cpu"], log_path=tmp_path / "server.log") as server:
        served = run_lm_eval(
            "local-completions", f"model={DEFAULT_MODEL_NAME},base_url={server.url}/v1/completions",
            tmp_path / "served",
        )
        log = server.log()
    assert "GET /tokenizer_info" in log, log[-3000:]  # lm-eval took the tokenizer from the server
    reference = run_lm_eval("hf", f"pretrained={default_model_dir},dtype=float32", tmp_path / "hf")
    assert served.keys() == reference.keys() and len(served) == 11
    for key, (log_likelihood, greedy) in reference.items():
        assert served[key][0] == pytest.approx(log_likelihood, abs=TOLERANCE), key
        assert served[key][1] == greedy, key
