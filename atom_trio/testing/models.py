"""The model configurations that tests and benchmarks share, and the helpers that turn them into model directories.

Each configuration is the contents of a Hugging Face ``config.json``:

- Real models' shapes (``LLAMA_3_1_8B``, ``QWEN3_0_6B``: ``configs/*.json``), for dummy-weight runs at their
  true sizes: real weights can't travel to the GPU machine, and ``--load-format dummy`` with one of these
  gives the same shapes, bytes and FLOPs. The GPU tests and the recorded benchmark figures depend on these
  exact values.
- Tiny models (``TINY_CONFIGS``), written with random weights by transformers itself and the default model's
  tokenizer, so every path a user's model takes (config.json, safetensors, tokenizer files) runs on the CPU
  in seconds, with transformers' own implementation as the reference.
"""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path
from typing import Any


def _real_config(name: str) -> dict[str, Any]:
    return json.loads((Path(__file__).with_name("configs") / f"{name}.json").read_text())


LLAMA_3_1_8B = _real_config("llama-3.1-8b")
QWEN3_0_6B = _real_config("qwen3-0.6b")

_TINY_LLAMA = dict(
    architectures=["LlamaForCausalLM"],
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=2048,
    rms_norm_eps=1e-5,
    tie_word_embeddings=False,
)
TINY_CONFIGS: dict[str, dict[str, Any]] = {
    "llama": _TINY_LLAMA,
    # Llama-3.1's rope scaling over an original context of 256 positions, which the tests run far past;
    # one KV head for all four query heads, and tied embeddings.
    "llama3": dict(
        _TINY_LLAMA,
        num_key_value_heads=1,
        max_position_embeddings=4096,
        tie_word_embeddings=True,
        rope_parameters=dict(LLAMA_3_1_8B["rope_parameters"], original_max_position_embeddings=256),
    ),
    # The llama's sizes with Qwen3's q/k norms, and a head size that is not hidden_size / heads.
    "qwen3": dict(
        _TINY_LLAMA,
        architectures=["Qwen3ForCausalLM"],
        head_dim=32,
        rms_norm_eps=1e-6,
        tie_word_embeddings=True,
    ),
}
"""Tiny random-weight models by name; vocabulary and special tokens come from the tokenizer they are saved with."""


def transformers_config(hf_config: dict[str, Any], **overrides: Any):
    """``hf_config`` with ``overrides`` as the transformers config class of its architecture."""
    import transformers

    values = copy.deepcopy({**hf_config, **overrides})  # a config class may rewrite rope_parameters in place
    return getattr(transformers, values["architectures"][0]).config_class(**values)


def write_tiny_model_dir(name: str, root: Path, tokenizer_dir: Path, *, seed: int = 0) -> Path:
    """``root/name``: the tiny model ``name``, random weights drawn from ``seed``, ``tokenizer_dir``'s tokenizer."""
    import torch
    import transformers

    tokenizer = transformers.AutoTokenizer.from_pretrained(tokenizer_dir)
    config = transformers_config(
        TINY_CONFIGS[name],
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.eos_token_id,
        dtype="float32",
    )
    torch.manual_seed(seed)
    model = getattr(transformers, config.architectures[0])(config).eval()
    out = root / name
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    generation_config = tokenizer_dir / "generation_config.json"
    if generation_config.exists() and not (out / generation_config.name).exists():
        shutil.copy(generation_config, out / generation_config.name)
    return out


def write_model_dir(path: Path, hf_config: dict[str, Any], tokenizer_from: Path | None = None) -> Path:
    """A model directory of ``hf_config`` without weights (for ``--load-format dummy``).

    With ``tokenizer_from`` (a directory with a byte-level BPE ``tokenizer.json`` and its
    ``tokenizer_config.json``), its tokenizer goes in too, the vocabulary padded with placeholder tokens up to
    the model's ``vocab_size``: random weights generate ids over the whole model vocabulary, and an id the
    tokenizer does not know decodes to no text, which would hide most tokens from text-chunk timings.
    """
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(hf_config, indent=1))
    if tokenizer_from is None:
        return path
    shutil.copy(tokenizer_from / "tokenizer_config.json", path / "tokenizer_config.json")
    tokenizer = json.loads((tokenizer_from / "tokenizer.json").read_text())
    vocab = tokenizer["model"]["vocab"]
    # ASCII placeholders after the byte-level space marker: each decodes to " tok<id>"
    for token_id in range(max(vocab.values()) + 1, hf_config["vocab_size"]):
        vocab[f"\u0120tok{token_id}"] = token_id
    (path / "tokenizer.json").write_text(json.dumps(tokenizer, ensure_ascii=False))
    return path
