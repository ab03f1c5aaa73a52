"""Reading GGUF files (llama.cpp's format) as Hugging Face models.

Metadata (config, tokenizer, chat template) goes through transformers' own
GGUF conversion, which already knows every key llama.cpp writes. Tensors go
through our own path (`atom_trio.loader.weights.iter_gguf_tensors`), which
renames them with `hf_tensor_name`. This module needs no torch, so the engine
can load a GGUF tokenizer without it.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import transformers

logger = logging.getLogger("atom_trio.loader")

_GLOBAL_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_LAYER_TENSOR = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")

# convert_hf_to_gguf.py reorders the rows of q and k for these architectures
# only (llama.cpp's rope pairs adjacent dimensions, HF's pairs the two halves);
# qwen2/qwen3 are written with rows as they are.
PERMUTED_ARCHITECTURES = frozenset({"llama"})


def hf_tensor_name(gguf_name: str) -> str:
    """The Hugging Face name of a llama.cpp tensor name, e.g. ``blk.0.attn_q.weight``."""
    if match := _LAYER_TENSOR.fullmatch(gguf_name):
        layer, part, suffix = match.groups()
        if part in _LAYER_NAMES:
            return f"model.layers.{layer}.{_LAYER_NAMES[part]}.{suffix}"
    else:
        base, _, suffix = gguf_name.rpartition(".")
        if base in _GLOBAL_NAMES:
            return f"{_GLOBAL_NAMES[base]}.{suffix}"
    raise ValueError(f"GGUF tensor {gguf_name!r} has no Hugging Face counterpart known to atom_trio")


def load_gguf_config(path: Path) -> transformers.PretrainedConfig:
    """The model's config from the GGUF metadata (transformers' conversion)."""
    return transformers.AutoConfig.from_pretrained(path.parent, gguf_file=path.name)


def load_gguf_tokenizer(path: Path) -> transformers.PreTrainedTokenizerBase:
    """Tokenizer, special tokens and chat template from the GGUF metadata."""
    return transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
