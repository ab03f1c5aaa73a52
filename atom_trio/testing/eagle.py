"""Tiny draft heads in the layouts their authors publish, for the speculative-decoding tests and benchmarks.

- EAGLE: what ``yuhuili/EAGLE-LLaMA3.1-Instruct-8B`` ships, at a tiny
  target's sizes: ``fc.weight`` over [embedding, hidden], one Llama layer
  (``layers.0.*``, no input norm), and neither embedding nor LM head (shared
  with the target).
- EAGLE-3: what ``yuhuili/EAGLE3-LLaMA3.1-Instruct-8B`` ships: ``fc`` over
  three target taps, ``midlayer.*`` (attention over ``2 * hidden``
  features, ``hidden_norm``), ``norm``, an ``lm_head`` over a draft
  vocabulary with ``d2t`` / ``t2d``; no embedding.
- MTP: a tiny DeepSeek-V3 checkpoint with its ``num_nextn_predict_layers``
  layer written in, as DeepSeek ships it (transformers saves none).

Each has a "copy" variant whose drafts repeat a token it reads (its layer
adds nothing to its input), so its drafts are accepted wherever the target
repeats itself: `write_echo_target` makes a target that mostly does.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from atom_trio.runner.drafter import Drafter


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


def write_tiny_eagle3_head(
    target_dir: Path, out: Path, *, copy: bool = False, seed: int = 0, taps: tuple[int, int, int] = (0, 1, 1)
) -> Path:
    """``out``: an EAGLE-3 head for the Llama at ``target_dir`` reading the inputs of its layers ``taps``.

    The random head drafts from half the vocabulary (``d2t`` maps it into the
    target's); the copy head, from all of it, drafts the token whose
    embedding the first tap is (``taps[0]`` 0: the token at the position read).
    """
    import safetensors.torch
    import torch

    config = json.loads((target_dir / "config.json").read_text())
    hidden, inter, vocab = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    head_dim = hidden // heads
    generator = torch.Generator().manual_seed(seed)

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator) * 0.1

    draft_ids = torch.arange(vocab) if copy else torch.randperm(vocab, generator=generator)[: vocab // 2].sort().values
    tensors = {
        "fc.weight": rand(hidden, 3 * hidden),
        "midlayer.hidden_norm.weight": torch.ones(hidden),
        "midlayer.input_layernorm.weight": torch.ones(hidden),
        "midlayer.post_attention_layernorm.weight": torch.ones(hidden),
        "midlayer.self_attn.q_proj.weight": rand(heads * head_dim, 2 * hidden),
        "midlayer.self_attn.k_proj.weight": rand(kv_heads * head_dim, 2 * hidden),
        "midlayer.self_attn.v_proj.weight": rand(kv_heads * head_dim, 2 * hidden),
        "midlayer.self_attn.o_proj.weight": rand(hidden, heads * head_dim),
        "midlayer.mlp.gate_proj.weight": rand(inter, hidden),
        "midlayer.mlp.up_proj.weight": rand(inter, hidden),
        "midlayer.mlp.down_proj.weight": rand(hidden, inter),
        "norm.weight": torch.ones(hidden),
        "lm_head.weight": rand(len(draft_ids), hidden),
        "d2t": draft_ids - torch.arange(len(draft_ids)),
        "t2d": torch.zeros(vocab, dtype=torch.bool).index_fill_(0, draft_ids, True),
    }
    if copy:
        target = safetensors.torch.load_file(target_dir / "model.safetensors")
        tensors["fc.weight"] = torch.cat([torch.eye(hidden), torch.zeros(hidden, 2 * hidden)], 1)
        tensors["midlayer.self_attn.o_proj.weight"].zero_()
        tensors["midlayer.mlp.down_proj.weight"].zero_()
        tensors["lm_head.weight"] = target["lm_head.weight"].clone()
    out.mkdir(parents=True)
    safetensors.torch.save_file(tensors, out / "model.safetensors")
    head_config = {
        **config,
        "num_hidden_layers": 1,
        "architectures": ["LlamaForCausalLMEagle3"],
        "draft_vocab_size": len(draft_ids),
        "eagle_aux_hidden_state_layer_ids": list(taps),
    }
    (out / "config.json").write_text(json.dumps(head_config))
    return out


def write_tiny_mtp_target(target_dir: Path, out: Path, *, copy: bool = False, seed: int = 0) -> Path:
    """``out``: the DeepSeek-V3 at ``target_dir`` with one MTP layer, ``model.layers.{num_hidden_layers}.*``.

    Its decoder layer is a copy of the last one's weights (latent attention,
    experts); ``enorm``, ``hnorm``, ``eh_proj`` and ``shared_head.norm`` are
    written here, with neither ``shared_head.head`` nor ``embed_tokens``
    (shared with the target). The copy layer drafts the token it reads
    (``eh_proj`` passes the embedding, the decoder layer adds nothing).
    """
    import safetensors.torch
    import torch

    shutil.copytree(target_dir, out)
    config = json.loads((out / "config.json").read_text())
    hidden, last = config["hidden_size"], config["num_hidden_layers"] - 1
    generator = torch.Generator().manual_seed(seed)
    tensors = safetensors.torch.load_file(out / "model.safetensors")
    prefix, mtp = f"model.layers.{last}.", f"model.layers.{last + 1}."
    layer = {mtp + name[len(prefix) :]: tensor.clone() for name, tensor in tensors.items() if name.startswith(prefix)}
    layer.update({
        f"{mtp}enorm.weight": torch.ones(hidden),
        f"{mtp}hnorm.weight": torch.ones(hidden),
        f"{mtp}eh_proj.weight": torch.randn(hidden, 2 * hidden, generator=generator) * 0.1,
        f"{mtp}shared_head.norm.weight": torch.ones(hidden),
    })
    if copy:
        layer[f"{mtp}eh_proj.weight"] = torch.cat([torch.eye(hidden), torch.zeros(hidden, hidden)], 1)
        for name, tensor in layer.items():
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                tensor.zero_()
    tensors.update(layer)
    safetensors.torch.save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps({**config, "num_nextn_predict_layers": 1}))
    return out


def greedy_window_drafts(
    drafter: Drafter, vocab_size: int, width: int, *, seed: int = 5
) -> list[tuple[list[int], torch.Tensor, list[int]]]:
    """A drafter's greedy drafts for a random context: over six target states, then that window continued by three.

    Returns (context, the target states read so far, drafts) of each proposal,
    for a reference that recomputes the whole window to redo.
    """
    import torch

    from atom_trio.runner.drafter import DraftRequest
    from atom_trio.sampling_params import SamplingParams

    generator = torch.Generator().manual_seed(seed)
    context = torch.randint(0, vocab_size, (12,), generator=generator).tolist()
    states = torch.randn(9, width, generator=generator)
    greedy = SamplingParams(temperature=0.0)
    first = drafter.propose([DraftRequest(0, context[:9], 9, greedy, states[:6])])
    continued = drafter.propose([DraftRequest(0, context, 10, greedy, states[6:])])
    assert first.draft_probs == continued.draft_probs == [None]  # greedy rows need no q
    return [(context[:9], states[:6], first.token_ids[0]), (context, states, continued.token_ids[0])]
