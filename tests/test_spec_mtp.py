"""The MTP layer of a tiny DeepSeek-V3 checkpoint, written in by `atom_trio.testing.write_tiny_mtp_target`.

The layer must draft what transformers' DeepSeek-V3 decoder layer computes in
MTP's arrangement, and configs and checkpoints it cannot serve must be
refused by name. (Whole engine runs are test_spec_heads.py's.)
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
from atom_trio.testing import greedy_window_drafts, write_tiny_model_dir, write_tiny_mtp_target

ENGINE = {"dtype": "float32", "num_kv_blocks": 64, "max_model_len": 256, "seed": 0}
MTP = {"method": "mtp", "num_speculative_tokens": 3}


@pytest.fixture(scope="module")
def target(default_model_dir, tmp_path_factory) -> Path:
    """A tiny DeepSeek-V3 checkpoint carrying a random MTP layer."""
    root = tmp_path_factory.mktemp("mtp")
    return write_tiny_mtp_target(write_tiny_model_dir("deepseek_v3", root, default_model_dir), root / "random")


def test_the_config_and_the_checkpoint_are_checked(target, tiny_llama_dir, tmp_path) -> None:
    with pytest.raises(InvalidConfig, match="takes no draft model"):
        EngineConfig(speculative_config={**MTP, "draft_model": "x"})
    with pytest.raises(InvalidConfig, match="drafts on one rank"):
        EngineConfig(speculative_config=MTP, tensor_parallel_size=2)
    with pytest.raises(ModelLoadError, match="multi-token-prediction layers of DeepseekV3ForCausalLM"):
        LLM(str(tiny_llama_dir), speculative_config=MTP, **ENGINE)
    none = tmp_path / "none"
    none.mkdir()
    for file in target.iterdir():
        (none / file.name).symlink_to(file)
    (none / "config.json").unlink()
    config = json.loads((target / "config.json").read_text())
    (none / "config.json").write_text(json.dumps({**config, "num_nextn_predict_layers": 0}))
    with pytest.raises(ModelLoadError, match="num_nextn_predict_layers is 0"):
        LLM(str(none), speculative_config=MTP, **ENGINE)


def _reference_drafts(model_dir: Path, tokens: list[int], hidden: torch.Tensor, k: int) -> list[int]:
    """Greedy MTP drafting with transformers' DeepSeek-V3 decoder layer, recomputing the whole window each step."""
    import transformers
    from transformers.models.deepseek_v3 import modeling_deepseek_v3

    config = json.loads((model_dir / "config.json").read_text())
    mtp_index = config["num_hidden_layers"]
    # Loaded as a model one layer deeper, the MTP layer's decoder weights land in its last layer.
    model = transformers.DeepseekV3ForCausalLM.from_pretrained(
        model_dir, num_hidden_layers=mtp_index + 1, dtype=torch.float32, attn_implementation="sdpa"
    ).eval()
    block, rotary = model.model.layers[mtp_index], model.model.rotary_emb
    weights = safetensors.torch.load_file(model_dir / "model.safetensors")
    prefix = f"model.layers.{mtp_index}."

    def norm(name: str) -> modeling_deepseek_v3.DeepseekV3RMSNorm:
        module = modeling_deepseek_v3.DeepseekV3RMSNorm(config["hidden_size"], config["rms_norm_eps"])
        module.weight.data = weights[prefix + name]
        return module

    enorm, hnorm, head_norm = norm("enorm.weight"), norm("hnorm.weight"), norm("shared_head.norm.weight")
    eh_proj = weights[prefix + "eh_proj.weight"]
    start = len(tokens) - 1 - len(hidden)  # hidden[i] is position start + i's, read with token start + i + 1
    ids, features = list(tokens[start + 1 :]), hidden
    drafts = []
    with torch.no_grad():
        for _ in range(k):
            positions = torch.arange(start, start + len(ids))
            embeds = model.model.embed_tokens(torch.tensor(ids)) * (positions != 0)[:, None]
            x = (torch.cat([enorm(embeds), hnorm(features)], -1) @ eh_proj.T)[None]
            out = block(x, position_embeddings=rotary(x, positions[None]), attention_mask=None)
            out = (out[0] if isinstance(out, tuple) else out)[0]
            drafts.append(int(model.lm_head(head_norm(out[-1])).argmax()))
            ids.append(drafts[-1])
            features = torch.cat([features, out[-1:]])
    return drafts


def test_the_layer_drafts_what_transformers_layers_compute(target) -> None:
    runner = ModelRunner(EngineConfig(
        model=str(target), dtype="float32", num_kv_blocks=16, max_model_len=128, seed=0,
        speculative_config={**MTP, "num_speculative_tokens": 4},
    ))
    try:
        for context, hidden, drafts in greedy_window_drafts(runner.drafter, runner.vocab_size, 64):
            assert drafts == _reference_drafts(target, context, hidden, 4)
    finally:
        runner.close()
