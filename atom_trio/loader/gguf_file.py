"""Reading GGUF files (llama.cpp's format) as Hugging Face models.

Metadata (config, tokenizer, chat template) goes through transformers' own
GGUF conversion, which already knows every key llama.cpp writes. Tensors go
through our own path: ``gguf.GGUFReader`` memory-maps the file, each tensor is
dequantized on its own (so peak memory is one tensor, not the model) and
renamed to the Hugging Face name the models in ``atom_trio.models`` expect.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator
from pathlib import Path

import gguf
import numpy as np
import torch
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
_PERMUTED_ARCHITECTURES = frozenset({"llama"})


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


def unpermute_rows(weight: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Invert llama.cpp's q/k row permutation.

    llama.cpp stores each head's rows as ``reshape(heads, 2, d/2).swapaxes(1, 2)``
    of the HF order (interleaving the rotary halves); reading them back as
    ``(heads, d/2, 2)`` and swapping again restores the HF order.
    """
    rows = weight.shape[0]
    return (
        weight.reshape(num_heads, rows // num_heads // 2, 2, *weight.shape[1:])
        .transpose(1, 2)
        .reshape(weight.shape)
    )


def load_gguf_config(path: Path) -> transformers.PretrainedConfig:
    """The model's config from the GGUF metadata (transformers' conversion)."""
    return transformers.AutoConfig.from_pretrained(path.parent, gguf_file=path.name)


def load_gguf_tokenizer(path: Path) -> transformers.PreTrainedTokenizerBase:
    """Tokenizer, special tokens and chat template from the GGUF metadata."""
    return transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)


def iter_gguf_tensors(
    path: Path, hf_config: transformers.PretrainedConfig, dtype: torch.dtype
) -> Iterator[tuple[str, torch.Tensor]]:
    """Dequantized tensors of a GGUF file, in Hugging Face names and ``dtype``."""
    reader = gguf.GGUFReader(path)
    permuted = reader.fields["general.architecture"].contents() in _PERMUTED_ARCHITECTURES
    heads = {"attn_q": hf_config.num_attention_heads, "attn_k": hf_config.num_key_value_heads}
    for tensor in reader.tensors:
        name = hf_tensor_name(tensor.name)
        # F32/F16 tensors come back as read-only views of the memory map.
        array = np.require(gguf.quants.dequantize(tensor.data, tensor.tensor_type), requirements=["C", "W"])
        weight = torch.from_numpy(array)
        part = tensor.name.split(".")[2] if tensor.name.startswith("blk.") else None
        if permuted and part in heads:
            weight = unpermute_rows(weight, heads[part])
        yield name, weight.to(dtype).contiguous()
