"""Tiny EAGLE draft heads in the layout EAGLE publishes, for the speculative-decoding tests and benchmarks.

A head is what ``yuhuili/EAGLE-LLaMA3.1-Instruct-8B`` ships, at a tiny
target's sizes: ``fc.weight`` over [embedding, hidden], one Llama layer
(``layers.0.*``, no input norm), and neither embedding nor LM head (shared
with the target). The "copy" head predicts the token it reads (its own
embedding is the target's LM head matrix, its layer adds nothing), so its
drafts are accepted wherever the target repeats itself: `write_echo_target`
makes a target that mostly does.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path


def write_tiny_eagle_head(target_dir: Path, out: Path, *, copy: bool = False, seed: int = 0) -> Path:
    """``out``: an EAGLE-1 head for the Llama at ``target_dir`` (random, or the copy head), drawn from ``seed``."""
    import safetensors.torch
    import torch

    config = json.loads((target_dir / "config.json").read_text())
    hidden, inter = config["hidden_size"], config["intermediate_size"]
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    head_dim = hidden // heads
    generator = torch.Generator().manual_seed(seed)

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator) * 0.1

    tensors = {
        "fc.weight": rand(hidden, 2 * hidden),
        "layers.0.self_attn.q_proj.weight": rand(heads * head_dim, hidden),
        "layers.0.self_attn.k_proj.weight": rand(kv_heads * head_dim, hidden),
        "layers.0.self_attn.v_proj.weight": rand(kv_heads * head_dim, hidden),
        "layers.0.self_attn.o_proj.weight": rand(hidden, heads * head_dim),
        "layers.0.mlp.gate_proj.weight": rand(inter, hidden),
        "layers.0.mlp.up_proj.weight": rand(inter, hidden),
        "layers.0.mlp.down_proj.weight": rand(hidden, inter),
        "layers.0.post_attention_layernorm.weight": torch.ones(hidden),
    }
    if copy:
        target = safetensors.torch.load_file(target_dir / "model.safetensors")
        tensors["fc.weight"] = torch.cat([torch.eye(hidden), torch.zeros(hidden, hidden)], 1)
        tensors["layers.0.self_attn.o_proj.weight"].zero_()
        tensors["layers.0.mlp.down_proj.weight"].zero_()
        tensors["embed_tokens.weight"] = target["lm_head.weight"] * 4
    out.mkdir(parents=True)
    safetensors.torch.save_file(tensors, out / "model.safetensors")
    head_config = {**config, "num_hidden_layers": 1, "architectures": ["LlamaForCausalLM"], "bias": False}
    (out / "config.json").write_text(json.dumps(head_config))
    return out


def write_echo_target(target_dir: Path, out: Path) -> Path:
    """``out``: the Llama at ``target_dir`` made to mostly repeat its last token (LM head = embedding, damped)."""
    import safetensors.torch

    shutil.copytree(target_dir, out)
    tensors = safetensors.torch.load_file(out / "model.safetensors")
    tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"] * 4
    for name in tensors:
        if name.endswith(("o_proj.weight", "down_proj.weight")):
            tensors[name] = tensors[name] * 0.3
    safetensors.torch.save_file(tensors, out / "model.safetensors")
    return out
