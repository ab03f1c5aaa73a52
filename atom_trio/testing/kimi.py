"""Tiny checkpoints in Kimi-K2's layout: DeepSeek-V3's architecture under ``model_type`` ``kimi_k2``, with a
tiktoken tokenizer whose code ships in the checkpoint (``tokenization_kimi.py``, loaded through ``auto_map``).

The structural config values are Kimi-K2-Instruct's (``KIMI_K2_STRUCTURE``); the sizes are tiny. The
checkpoint also ships stand-ins for the model and config code Kimi's ``auto_map`` names, which fail if
anything runs them: atom_trio reads the config with transformers' DeepSeek-V3 class and builds its own model.
"""

from __future__ import annotations

import base64
import json
import shutil
from pathlib import Path
from typing import Any

KIMI_K2_STRUCTURE: dict[str, Any] = dict(
    architectures=["DeepseekV3ForCausalLM"],
    model_type="kimi_k2",
    topk_method="noaux_tc",
    scoring_func="sigmoid",
    n_group=1,
    topk_group=1,
    routed_scaling_factor=2.827,
    norm_topk_prob=True,
    n_shared_experts=1,
    first_k_dense_replace=1,
    moe_layer_freq=1,
    num_nextn_predict_layers=0,
    rope_theta=50000.0,
    rope_scaling=dict(
        type="yarn",
        factor=32.0,
        original_max_position_embeddings=4096,
        mscale=1.0,
        mscale_all_dim=1.0,
        beta_fast=1.0,
        beta_slow=1.0,
    ),
    max_position_embeddings=131072,
    rms_norm_eps=1e-6,
    attention_bias=False,
    tie_word_embeddings=False,
    auto_map={
        "AutoConfig": "configuration_deepseek.DeepseekV3Config",
        "AutoModel": "modeling_deepseek.DeepseekV3Model",
        "AutoModelForCausalLM": "modeling_deepseek.DeepseekV3ForCausalLM",
    },
)
"""moonshotai/Kimi-K2-Instruct's config.json, the fields that decide what is computed (its sizes left out: 61 layers
of 7168 features, 64 heads, ``q_lora_rank`` 1536, ``kv_lora_rank`` 512, 384 experts, 8 a token)."""

TINY_KIMI_K2_SIZES: dict[str, Any] = dict(
    hidden_size=64,
    intermediate_size=128,
    moe_intermediate_size=32,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=4,
    q_lora_rank=24,
    kv_lora_rank=32,
    qk_nope_head_dim=16,
    qk_rope_head_dim=8,
    v_head_dim=24,
    n_routed_experts=8,
    num_experts_per_tok=2,
)

# Kimi-K2's special tokens, by their offset from the first id after the ranks (163584 in Kimi-K2).
KIMI_SPECIAL_TOKENS = {
    0: "[BOS]",
    1: "[EOS]",
    2: "<|im_end|>",
    3: "<|im_user|>",
    4: "<|im_assistant|>",
    10: "<|im_system|>",
    17: "<|im_middle|>",
}

KIMI_CHAT_TEMPLATE = (
    "{%- if tools -%}<|im_system|>tool_declare<|im_middle|>{{ tools | tojson }}<|im_end|>{%- endif -%}"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'system' -%}<|im_system|>system<|im_middle|>"
    "{%- elif message['role'] == 'user' -%}<|im_user|>user<|im_middle|>"
    "{%- else -%}<|im_assistant|>assistant<|im_middle|>{%- endif -%}"
    "{{ message['content'] }}<|im_end|>"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}<|im_assistant|>assistant<|im_middle|>{%- endif -%}"
)
"""Kimi-K2's turn markup: ``<|im_{role}|>{role}<|im_middle|>{content}<|im_end|>``, tools declared first."""

_CORPUS = (
    "The quick brown fox jumps over the lazy dog. The theory of the thing is that there is nothing there. "
    "In the beginning the tokens were bytes; then the pairs that came together most often were merged. "
    "Hello, world! 12345 + 678 = 13023. It's what they'd said they'll do, and we've done it. "
    "你好，世界。我们的模型在这里。今天天气很好。"
) * 4
# Whole tokens across places where Kimi's pattern splits words and GPT-2's does not (a case change, Han after
# Latin): a tokenizer that splits text the wrong way encodes them differently.
_ACROSS_SPLITS = ("HelloWorld", "Kimi你好")


# How the training corpus is split into words: GPT-2's pattern (Python's `regex`, which trains, reads Kimi's
# class intersections `&&` differently from tiktoken's engine; the ranks are good whichever split made them).
_TRAINING_SPLIT = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


def write_kimi_tokenizer(path: Path, *, num_merges: int = 64) -> Path:
    """A tiktoken tokenizer in Kimi-K2's layout in ``path``: ``tiktoken.model`` (byte-level ranks trained on a small
    corpus), ``tokenization_kimi.py``, and a ``tokenizer_config.json`` whose ``auto_map`` names its class."""
    from tiktoken._educational import bpe_train

    from atom_trio.testing import tokenization_kimi

    path.mkdir(parents=True, exist_ok=True)
    ranks = bpe_train(_CORPUS, 256 + num_merges, _TRAINING_SPLIT, visualise=None)
    for word in map(str.encode, _ACROSS_SPLITS):
        for end in range(2, len(word) + 1):  # each a merge of the one before and a byte
            ranks.setdefault(word[:end], len(ranks))
    by_rank = sorted(ranks.items(), key=lambda item: item[1])
    lines = (f"{base64.b64encode(token).decode()} {rank}\n" for token, rank in by_rank)
    (path / "tiktoken.model").write_text("".join(lines))  # tiktoken's format (its writer needs blobfile)
    shutil.copy(tokenization_kimi.__file__, path / "tokenization_kimi.py")
    base = len(ranks)
    token = dict(lstrip=False, normalized=False, rstrip=False, single_word=False, special=True)
    tokenizer_config = {
        "tokenizer_class": "TikTokenTokenizer",
        "auto_map": {"AutoTokenizer": ["tokenization_kimi.TikTokenTokenizer", None]},
        "bos_token": "[BOS]",
        "eos_token": "[EOS]",
        "added_tokens_decoder": {str(base + i): dict(token, content=c) for i, c in KIMI_SPECIAL_TOKENS.items()},
        "additional_special_tokens": [c for i, c in sorted(KIMI_SPECIAL_TOKENS.items()) if i > 1],
        "chat_template": KIMI_CHAT_TEMPLATE,
        "model_max_length": 131072,
    }
    (path / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=1))
    return path


def write_tiny_kimi_k2(path: Path, *, seed: int = 0) -> Path:
    """A tiny Kimi-K2 checkpoint in ``path``: random weights saved by transformers' DeepSeek-V3 (routers sharpened,
    as the other tiny MoE models'), Kimi's config.json layout, its tokenizer, and model code that must not run."""
    import torch
    import transformers

    from atom_trio.testing.models import sharpen_routers, transformers_config
    from atom_trio.testing.tokenization_kimi import NUM_RESERVED_SPECIAL_TOKENS

    write_kimi_tokenizer(path)
    base = len((path / "tiktoken.model").read_text().splitlines())  # the ranks; the special tokens follow
    kimi = dict(
        KIMI_K2_STRUCTURE,
        **TINY_KIMI_K2_SIZES,
        vocab_size=base + NUM_RESERVED_SPECIAL_TOKENS,
        bos_token_id=base,
        eos_token_id=base + 1,
    )
    # transformers' DeepSeek-V3 config names the YaRN parameters rope_parameters; Kimi's file, rope_scaling
    fields = {k: v for k, v in kimi.items() if k not in ("model_type", "auto_map", "rope_scaling", "rope_theta")}
    rope = {"rope_type": "yarn", "rope_theta": kimi["rope_theta"], **kimi["rope_scaling"]}
    del rope["type"]
    config = transformers_config(fields, rope_parameters=rope, dtype="float32")
    torch.manual_seed(seed)
    model = sharpen_routers(transformers.DeepseekV3ForCausalLM(config).eval())
    model.save_pretrained(path)
    (path / "config.json").write_text(json.dumps(dict(kimi, torch_dtype="float32"), indent=1))
    for module in ("configuration_deepseek", "modeling_deepseek"):
        (path / f"{module}.py").write_text(f'raise RuntimeError("the checkpoint\'s {module}.py ran")\n')
    return path
