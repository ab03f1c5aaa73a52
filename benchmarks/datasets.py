"""Workloads shared by the benchmarks: random token-id prompts, JSONL prompts, nano-vllm's workload.

Prompts are built as token ids with the model's own tokenizer, so a prompt of N tokens is exactly
N tokens on the server (sent as ids on /v1/completions), and two engines given the same seed see
the same prompts.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import attrs
import numpy as np


@attrs.frozen(kw_only=True)
class BenchRequest:
    """One request of a workload: its prompt (token ids or text) and how many tokens to generate."""

    prompt: list[int] | str
    prompt_len: int
    output_len: int


def get_tokenizer(model: str | None, tokenizer: str | None = None) -> Any:
    """The tokenizer of ``tokenizer`` (or ``model``); the built-in default model's when neither names another."""
    from atom_trio.config import DEFAULT_MODEL_NAME, EngineConfig

    name = tokenizer or model
    if name is None or name == DEFAULT_MODEL_NAME:
        from atom_trio.loader import load_tokenizer

        return load_tokenizer(EngineConfig())
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(name)


def ordinary_token_ids(tokenizer: Any) -> np.ndarray:
    """Every id of the base vocabulary that is not a special token (BOS, EOS, chat markers...)."""
    special = set(tokenizer.all_special_ids)
    return np.array([i for i in range(tokenizer.vocab_size) if i not in special], dtype=np.int64)


def _lengths(rng: np.random.Generator, mean: int, range_ratio: float, n: int) -> np.ndarray:
    low = max(1, int(np.floor(mean * (1 - range_ratio))))
    high = max(low, int(np.ceil(mean * (1 + range_ratio))))
    return rng.integers(low, high + 1, size=n)


def random_requests(
    tokenizer: Any,
    *,
    num_prompts: int,
    input_len: int,
    output_len: int,
    range_ratio: float = 0.0,
    prefix_len: int = 0,
    seed: int = 0,
    as_text: bool = False,
) -> list[BenchRequest]:
    """vLLM's "random" dataset: prompts of random ordinary token ids.

    Input and output lengths are uniform in ``[len * (1 - range_ratio), len * (1 + range_ratio)]``;
    every prompt starts with the same ``prefix_len`` random tokens (to exercise prefix caching).
    With ``as_text`` the ids are decoded to text (for chat), and ``prompt_len`` is the length of
    that text re-encoded, which may differ slightly from the ids drawn.
    """
    if not 0.0 <= range_ratio < 1.0:
        raise ValueError(f"range_ratio must be in [0, 1), got {range_ratio}")
    rng = np.random.default_rng(seed)
    vocab = ordinary_token_ids(tokenizer)
    prefix = vocab[rng.integers(0, len(vocab), size=prefix_len)].tolist()
    input_lens = _lengths(rng, input_len, range_ratio, num_prompts)
    output_lens = _lengths(rng, output_len, range_ratio, num_prompts)
    requests = []
    for n_in, n_out in zip(input_lens, output_lens):
        ids = prefix + vocab[rng.integers(0, len(vocab), size=int(n_in))].tolist()
        if as_text:
            text = tokenizer.decode(ids)
            requests.append(
                BenchRequest(
                    prompt=text,
                    prompt_len=len(tokenizer.encode(text, add_special_tokens=False)),
                    output_len=int(n_out),
                )
            )
        else:
            requests.append(BenchRequest(prompt=ids, prompt_len=len(ids), output_len=int(n_out)))
    return requests


def jsonl_requests(
    path: str | Path, tokenizer: Any, *, num_prompts: int | None, output_len: int, seed: int = 0
) -> list[BenchRequest]:
    """Prompts from a JSONL file: one object per line with ``"prompt"`` (text) and, optionally,
    ``"output_len"``. ``num_prompts`` lines are drawn (shuffled with ``seed``); more than the file
    holds cycles through it again."""
    rows = []
    for lineno, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        row = json.loads(line)
        if not isinstance(row, dict) or not isinstance(row.get("prompt"), str):
            raise ValueError(f"{path}:{lineno}: expected an object with a string 'prompt'")
        rows.append(row)
    if not rows:
        raise ValueError(f"{path}: no prompts")
    random.Random(seed).shuffle(rows)
    count = len(rows) if num_prompts is None else num_prompts
    return [
        BenchRequest(
            prompt=row["prompt"],
            prompt_len=len(tokenizer.encode(row["prompt"], add_special_tokens=False)),
            output_len=int(row.get("output_len", output_len)),
        )
        for row in (rows[i % len(rows)] for i in range(count))
    ]


def nano_vllm_requests(
    *, num_seqs: int = 256, max_input_len: int = 1024, max_output_len: int = 1024, seed: int = 0
) -> list[BenchRequest]:
    """nano-vllm's ``bench.py`` workload, draw for draw: ``num_seqs`` prompts of random ids in
    [0, 10000] with lengths uniform in [100, max_input_len], then output lengths uniform in
    [100, max_output_len] (to be generated with ``ignore_eos``)."""
    rng = random.Random(seed)
    prompts = [[rng.randint(0, 10000) for _ in range(rng.randint(100, max_input_len))] for _ in range(num_seqs)]
    output_lens = [rng.randint(100, max_output_len) for _ in range(num_seqs)]
    return [BenchRequest(prompt=p, prompt_len=len(p), output_len=n) for p, n in zip(prompts, output_lens)]
