"""The EAGLE head on a tiny random Llama, written in the published layout (`atom_trio.testing.eagle`).

It must draft what transformers' Llama layer computes in EAGLE's
arrangement, and a head that does not fit its target must be refused. (Whole
engine runs are test_spec_heads.py's; the distribution test is the
runner's, in tests/runner/test_spec_distribution.py.)
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import safetensors.torch
import torch

from atom_trio import LLM
from atom_trio.config import EngineConfig
from atom_trio.errors import InvalidConfig, ModelLoadError
from atom_trio.runner import ModelRunner
from atom_trio.testing import greedy_window_drafts, write_tiny_eagle_head

ENGINE = {"dtype": "float32", "num_kv_blocks": 64, "max_model_len": 256, "seed": 0}


@pytest.fixture(scope="module")
def head(tiny_llama_dir, tmp_path_factory) -> Path:
    """A random EAGLE head for the tiny Llama."""
    return write_tiny_eagle_head(tiny_llama_dir, tmp_path_factory.mktemp("eagle") / "random")


def _eagle(model_dir: Path, head: Path, k: int = 3, **fields) -> LLM:
    spec = {"method": "eagle", "num_speculative_tokens": k, "draft_model": str(head)}
    return LLM(str(model_dir), speculative_config=spec, **ENGINE, **fields)


def test_a_draft_model_is_required_and_checked(tiny_llama_dir, tmp_path) -> None:
    with pytest.raises(InvalidConfig, match="needs a draft model"):
        EngineConfig(speculative_config={"method": "eagle", "num_speculative_tokens": 2})
    with pytest.raises(InvalidConfig, match="drafts on one rank"):
        EngineConfig(
            speculative_config={"method": "eagle", "num_speculative_tokens": 2, "model": "x"}, tensor_parallel_size=2
        )
    config = json.loads((tiny_llama_dir / "config.json").read_text())
    wrong = write_tiny_eagle_head(tiny_llama_dir, tmp_path / "wrong")
    (wrong / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 1, "vocab_size": 77}))
    with pytest.raises(ModelLoadError, match="vocab_size 77 differs"):
        _eagle(tiny_llama_dir, wrong)


def _reference_drafts(target_dir: Path, head_dir: Path, tokens: list[int], hidden: torch.Tensor, k: int) -> list[int]:
    """Greedy EAGLE drafting written with transformers' Llama layer, recomputing the whole window each step."""
    import transformers
    from transformers.models.llama import modeling_llama

    config = transformers.LlamaConfig(**{
        key: value for key, value in json.loads((head_dir / "config.json").read_text()).items() if key != "architectures"
    })
    config._attn_implementation = "sdpa"
    weights = safetensors.torch.load_file(head_dir / "model.safetensors")
    target = safetensors.torch.load_file(target_dir / "model.safetensors")
    layer = modeling_llama.LlamaDecoderLayer(config, 0).eval()
    layer.input_layernorm = torch.nn.Identity()
    layer.load_state_dict({n.removeprefix("layers.0."): w for n, w in weights.items() if n.startswith("layers.0.")},
                          strict=False)
    rotary = modeling_llama.LlamaRotaryEmbedding(config)
    embed, lm_head = target["model.embed_tokens.weight"], target["lm_head.weight"]
    start = len(tokens) - 1 - len(hidden)  # hidden[i] is position start + i's, read with token start + i + 1
    ids, features = list(tokens[start + 1 :]), hidden
    drafts = []
    with torch.no_grad():
        for _ in range(k):
            x = torch.cat([embed[ids], features], -1) @ weights["fc.weight"].T
            positions = torch.arange(start, start + len(ids))[None]
            out = layer(x[None], position_embeddings=rotary(x[None], positions))[0]
            drafts.append(int((out[-1] @ lm_head.T).argmax()))
            ids.append(drafts[-1])
            features = torch.cat([features, out[-1:]])
    return drafts


def test_the_head_drafts_what_transformers_layers_compute(tiny_llama_dir, head) -> None:
    target = tiny_llama_dir
    runner = ModelRunner(EngineConfig(
        model=str(target), dtype="float32", num_kv_blocks=16, max_model_len=128, seed=0,
        speculative_config={"method": "eagle", "num_speculative_tokens": 4, "draft_model": str(head)},
    ))
    try:
        for context, hidden, drafts in greedy_window_drafts(runner.drafter, runner.vocab_size, 64):
            assert drafts == _reference_drafts(target, head, context, hidden, 4)
    finally:
        runner.close()
