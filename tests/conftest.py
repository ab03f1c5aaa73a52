"""Shared fixtures: the real default model, and tiny random-weight models of each architecture.

Tiny models are real Hugging Face model directories written by transformers
(``save_pretrained``) with random weights and the default model's tokenizer, so
every path a user's model takes (config.json, safetensors, tokenizer files)
is exercised, and transformers' own implementation is the reference.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

TINY_CONFIGS: dict[str, dict] = {
    "llama": dict(
        architectures=["LlamaForCausalLM"],
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
    ),
    "llama3": dict(
        architectures=["LlamaForCausalLM"],
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=1,
        max_position_embeddings=4096,
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
        rope_parameters=dict(
            rope_type="llama3",
            rope_theta=500000.0,
            factor=8.0,
            low_freq_factor=1.0,
            high_freq_factor=4.0,
            original_max_position_embeddings=256,
        ),
    ),
    "qwen3": dict(
        architectures=["Qwen3ForCausalLM"],
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        max_position_embeddings=2048,
        rms_norm_eps=1e-6,
        tie_word_embeddings=True,
    ),
}


@pytest.fixture(scope="session")
def default_model_dir() -> Path:
    """The built-in default model (SmolLM2-135M-Instruct), fetched and converted once per machine."""
    from atom_trio.loader import default_model_path

    return default_model_path()


def make_tiny_model_dir(arch: str, root: Path, tokenizer_dir: Path, *, seed: int = 0) -> Path:
    """Write a tiny random-weight HF model directory of ``arch`` under ``root``."""
    import torch
    import transformers

    spec = dict(TINY_CONFIGS[arch])
    architecture = spec.pop("architectures")[0]
    config_cls = {"LlamaForCausalLM": transformers.LlamaConfig, "Qwen3ForCausalLM": transformers.Qwen3Config}[
        architecture
    ]
    tokenizer = transformers.AutoTokenizer.from_pretrained(tokenizer_dir)
    config = config_cls(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.eos_token_id,
        dtype="float32",
        **spec,
    )
    config.architectures = [architecture]
    torch.manual_seed(seed)
    model = getattr(transformers, architecture)(config).eval()
    out = root / arch
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    for extra in ("generation_config.json",):
        if (tokenizer_dir / extra).exists() and not (out / extra).exists():
            shutil.copy(tokenizer_dir / extra, out / extra)
    return out


@pytest.fixture(scope="session")
def tiny_model_dirs(tmp_path_factory, default_model_dir) -> dict[str, Path]:
    """Every tiny architecture, by name (``llama``, ``llama3``, ``qwen3``)."""
    root = tmp_path_factory.mktemp("tiny-models")
    return {arch: make_tiny_model_dir(arch, root, default_model_dir) for arch in TINY_CONFIGS}


@pytest.fixture(scope="session")
def tiny_llama_dir(tiny_model_dirs) -> Path:
    return tiny_model_dirs["llama"]


@pytest.fixture(scope="session")
def tiny_qwen3_dir(tiny_model_dirs) -> Path:
    return tiny_model_dirs["qwen3"]
